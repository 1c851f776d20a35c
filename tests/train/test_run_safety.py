"""Run folders and checkpoints under faults: a fresh run never mixes with an older one, one
trainer per folder, checkpoint re-saves and metrics rewrites that survive a kill, skipped
batches, read-time skips counted, clear one-line errors on bad checkpoints, progress logging."""

import json
import logging
import re
import shutil
import signal

import pytest
import torch

from mmembed.checkpoint import load_tensors, save_tensors
from mmembed.cli import main
from mmembed.config import load_config
from mmembed.data.loader import EpochBatchSampler
from mmembed.errors import CheckpointError, UserError
from mmembed.train.align import train_align
from mmembed.train.state import latest_checkpoint, remove_partial_checkpoints
from tests.conftest import lock_holder, tiny_config


def _steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def test_fresh_run_refuses_a_folder_holding_an_older_run_and_overwrite_starts_clean(tiny_world, tmp_path):
    run = tmp_path / "run"
    train_align(load_config(tiny_config(tiny_world, run, epochs=3, checkpoint_every=1)))
    longer = latest_checkpoint(run).name
    shorter = load_config(tiny_config(tiny_world, run, epochs=1, checkpoint_every=1))
    with pytest.raises(UserError, match="already holds a run.*--resume.*--overwrite"):
        train_align(shorter)
    train_align(shorter, overwrite=True)
    # the older, longer run is gone: resuming finds the new run's last step, not the old one's
    assert latest_checkpoint(run).name < longer and latest_checkpoint(run).name == f"step_{51 // 16:07d}"
    assert main(["train", str(run.parent / "run.yaml")]) == 2  # the CLI says it in one line too


def test_an_interrupted_overwrite_leaves_nothing_to_resume(tiny_world, tmp_path, monkeypatch):
    """Ctrl+C while --overwrite deleted the old run (entry by entry) left its newest checkpoints
    behind its deleted logs, and --resume continued that half-deleted run."""
    import os
    import shutil

    import mmembed.train.run_dir as run_dir

    run = tmp_path / "run"
    train_align(load_config(tiny_config(tiny_world, run, epochs=2, checkpoint_every=1)))
    real = shutil.rmtree

    def interrupted(path, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_dir.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_dir.prepare_run_dir(run, resume=False, overwrite=True)
    monkeypatch.setattr(run_dir.shutil, "rmtree", real)
    assert latest_checkpoint(run) is None  # whatever was left, no checkpoint of the old run to resume
    assert [p.name for p in run.iterdir() if p.name != ".lock"] == [f".overwritten-{os.getpid()}"]
    # the leftover is no run: a fresh run (no --overwrite) takes the folder and removes it
    train_align(load_config(tiny_config(tiny_world, run, epochs=1, checkpoint_every=1)))
    assert not list(run.glob(".overwritten-*"))



@pytest.mark.parametrize("out_dir", ["world", "."])  # the data root itself, and the folder holding it
def test_overwrite_refuses_a_folder_that_holds_the_training_data(tmp_path, out_dir):
    """--overwrite with train.out_dir at (or above) data.root deleted the world, then failed for
    want of its manifest."""
    from mmembed.train.run_dir import prepare_run_dir

    world = tmp_path / "world"
    world.mkdir()
    (world / "train.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="holds .*world that this run reads: choose another train.out_dir"):
        prepare_run_dir(tmp_path / out_dir, resume=False, overwrite=True, keep=[world])
    assert (world / "train.jsonl").is_file()

def test_overwrite_refuses_a_folder_that_holds_the_tokenizer_or_gpt2_the_run_reads(tmp_path):
    """tokenizer.path inside train.out_dir: --overwrite deleted the tokenizer, then the run failed saying
    "tokenizer.path not found" (the preflight had found it); decoder.init_from_gpt2 likewise."""
    from mmembed.train.run_dir import prepare_run_dir, read_paths

    run = tmp_path / "run"
    (run / "gpt2").mkdir(parents=True)
    (run / "tokenizer.json").write_text("{}")
    for override in (f"tokenizer.path={run / 'tokenizer.json'}", f"decoder.init_from_gpt2={run / 'gpt2'}"):
        cfg = load_config("demo", [override, f"data.root={tmp_path / 'world'}"])
        with pytest.raises(UserError, match="that this run reads: choose another train.out_dir"):
            prepare_run_dir(run, resume=False, overwrite=True, keep=read_paths(cfg))
    assert (run / "tokenizer.json").is_file() and (run / "gpt2").is_dir()


def test_a_second_trainer_on_the_same_folder_is_refused_and_a_killed_ones_lock_is_not_stale(tiny_world, tmp_path):
    run = tmp_path / "run"
    holder = lock_holder(run)
    try:
        cfg = load_config(tiny_config(tiny_world, run, epochs=1))
        with pytest.raises(UserError, match=f"in use by a trainer \\(pid {holder.pid}\\)"):
            train_align(cfg, resume=True)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    train_align(cfg, overwrite=True)  # the kernel released the dead holder's lock
    assert latest_checkpoint(run) is not None


def test_resaving_a_step_never_leaves_a_checkpoint_without_weights(tmp_path, monkeypatch):
    import mmembed.train.state as state

    module = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    state.save_checkpoint(tmp_path, module, optimizer, state.Progress(step=5))
    real_rmtree = state.shutil.rmtree

    def dying_rmtree(path, *args, **kwargs):  # killed while deleting a whole copy of the step
        if (path / "trainer.json").is_file():
            (path / "model.safetensors").unlink()
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(state.shutil, "rmtree", dying_rmtree)
    with pytest.raises(KeyboardInterrupt):
        state.save_checkpoint(tmp_path, module, optimizer, state.Progress(step=5))  # the same step again
    monkeypatch.setattr(state.shutil, "rmtree", real_rmtree)
    remove_partial_checkpoints(tmp_path)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == "step_0000005"
    assert all((ckpt / f).is_file() for f in ("model.safetensors", "trainer.safetensors", "trainer.json"))
    assert state.load_checkpoint(ckpt, module, optimizer).step == 5


def test_a_kill_while_metrics_are_rewritten_on_resume_keeps_them(tiny_world, tmp_path, monkeypatch):
    import pathlib

    run = tmp_path / "run"
    cfg = load_config(tiny_config(tiny_world, run, epochs=2, checkpoint_every=1))
    train_align(cfg)
    before = (run / "metrics.jsonl").read_text()
    real = pathlib.Path.write_text

    def torn_write(self, data, *args, **kwargs):  # killed a third of the way into writing the metrics
        if "metrics.jsonl" not in self.name:
            return real(self, data, *args, **kwargs)
        real(self, data[: len(data) // 3], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(pathlib.Path, "write_text", torn_write)
    with pytest.raises(KeyboardInterrupt):
        train_align(cfg, resume=True)
    monkeypatch.setattr(pathlib.Path, "write_text", real)
    assert (run / "metrics.jsonl").read_text() == before


def test_a_batch_whose_rows_are_all_bad_is_skipped_and_training_finishes(tiny_world, tmp_path, caplog):
    rows = [json.loads(line) for line in (tiny_world / "train.jsonl").read_text().splitlines()]
    first = EpochBatchSampler(len(rows), 16, shuffle=True, seed=0, drop_last=True).indices()[:16]
    for i in first:  # every modality of every row in the first batch is unusable
        rows[i].update(image=f"images/missing{i}.png", audio=f"audio/missing{i}.wav", text="")
    (tmp_path / "bad-train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(tiny_config(tiny_world, tmp_path / "run", epochs=1))
    cfg.data.train = str(tmp_path / "bad-train.jsonl")
    cfg.data.cache = False
    with caplog.at_level(logging.WARNING):
        run = train_align(cfg)
    assert _steps(run) == list(range(1, len(rows) // 16))  # one step fewer, and no crash
    assert "1 batch(es) had no usable row" in caplog.text


def test_rows_refused_at_read_time_are_counted_and_val_honours_strict(tiny_world, tmp_path, caplog):
    lines = (tiny_world / "train.jsonl").read_text().splitlines()
    lines[3] = "{not json"
    row = json.loads(lines[5])
    row["image"] = "/etc/passwd"
    lines[5] = json.dumps(row)
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    cfg = load_config(tiny_config(tiny_world, tmp_path / "run", epochs=1))
    cfg.data.train = str(tmp_path / "train.jsonl")
    with caplog.at_level(logging.WARNING):
        train_align(cfg)
    assert "skipped 2 row(s)" in caplog.text and "invalid JSON" in caplog.text and "refused" in caplog.text
    (tmp_path / "val.jsonl").write_text("{not json\n" + (tiny_world / "val.jsonl").read_text())
    strict = load_config(tiny_config(tiny_world, tmp_path / "strict", epochs=1))
    strict.data.val, strict.data.strict = str(tmp_path / "val.jsonl"), True
    with pytest.raises(UserError, match="val.jsonl:1: invalid JSON"):
        train_align(strict)


def test_the_tokenizer_reads_captions_with_the_runs_root_and_path_rules(tiny_world, tmp_path):
    from mmembed.train.data_setup import captions

    rows = [json.loads(line) for line in (tiny_world / "train.jsonl").read_text().splitlines()]
    for r in rows:  # absolute media paths, which this run's config allows
        r["image"] = str(tiny_world / r["image"])
    (tmp_path / "abs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    every = sum(1 + len(r["captions"]) + len(r["qa"]) for r in rows)
    assert len(list(captions(tmp_path / "abs.jsonl", tiny_world, allow_outside_root=True))) == every
    with pytest.raises(UserError, match="no usable row"):  # refused rows, as training would refuse them
        list(captions(tmp_path / "abs.jsonl", tiny_world, allow_outside_root=False))


def test_bad_checkpoints_are_one_line_errors(tiny_world, tmp_path, capsys):
    run = tmp_path / "run"
    train_align(load_config(tiny_config(tiny_world, run, epochs=1, checkpoint_every=1)))
    ckpt = latest_checkpoint(run)
    meta = json.loads((ckpt / "trainer.json").read_text())
    meta["progress"]["step"] = "three"  # malformed: a wrong field type
    (ckpt / "trainer.json").write_text(json.dumps(meta))
    assert main(["train", str(run.parent / "run.yaml"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume from this checkpoint" in err and len(err.strip().splitlines()) == 1
    meta["progress"]["step"] = 3
    del meta["python_rng"]  # malformed: a missing field
    (ckpt / "trainer.json").write_text(json.dumps(meta))
    assert main(["train", str(run.parent / "run.yaml"), "--resume"]) == 2
    assert "python_rng" in capsys.readouterr().err
    state = load_tensors(run / "model.safetensors")  # weights of the wrong shape for config.yaml
    key = next(k for k in state if k.endswith("head.1.weight"))
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_tensors(run / "model.safetensors", state)
    assert main(["eval", str(run), "--manifest", str(tiny_world / "test.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "does not match config.yaml" in err and "size mismatch" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(CheckpointError):
        import mmembed as mm

        mm.load(run)
    from mmembed.tokenizer import Tokenizer  # another run's tokenizer: named, not "the weights do not match"

    Tokenizer.train(["a small red star on the left"] * 20, vocab_size=280).save(run)
    assert main(["eval", str(run), "--manifest", str(tiny_world / "test.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.json has 280 tokens" in err and "not the tokenizer this run trained with" in err


def test_progress_lines_at_a_bounded_rate_without_a_terminal(caplog):
    from mmembed.train.run_log import ProgressLine

    now = [0.0]
    line = ProgressLine(total=100, every_s=30.0, clock=lambda: now[0], logger=logging.getLogger("t"))
    with caplog.at_level(logging.INFO, logger="t"):
        for step in range(1, 101):
            now[0] += 1.0  # one step per second: 100 s in all
            line.update(step, loss=1.0 / step, samples_per_s=128.0)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 4  # steps 1, 31, 61, 91: at most one per 30 s
    assert messages[1] == "step 31/100 (31%), loss 0.0323, 128 samples/s, ETA 0:01:09"


def test_training_without_a_terminal_logs_progress(tiny_world, tmp_path, caplog):
    cfg = load_config(tiny_config(tiny_world, tmp_path / "run", epochs=1, progress_every_s=0.0))
    with caplog.at_level(logging.INFO, logger="mmembed.train.engine"):
        train_align(cfg)  # pytest's stderr is no terminal: tqdm shows no bar
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 51 // 16 and "samples/s" in lines[0] and "ETA" in lines[0]


def test_a_failed_resume_leaves_nothing_that_blocks_a_fresh_run(tiny_world, tmp_path):
    """--resume into a folder with no checkpoint (a typo) wrote config.yaml and tokenizer.json before
    failing, and the fresh run then said the folder already holds a run."""
    cfg = load_config(tiny_config(tiny_world, tmp_path / "typo", epochs=1))
    (tmp_path / "typo").mkdir()  # a missing folder is refused earlier, before anything is made
    with pytest.raises(UserError, match="no complete checkpoint"):
        train_align(cfg, resume=True)
    assert [p.name for p in (tmp_path / "typo").iterdir()] in ([], [".lock"])
    train_align(cfg)
    assert latest_checkpoint(tmp_path / "typo") is not None


def test_a_run_a_config_error_stopped_before_training_is_replaced_by_the_corrected_one(tiny_world, tmp_path):
    """A tower argument that fails at construction stopped the run after config.yaml and
    tokenizer.json were written; the corrected config was then refused ('already holds a run'),
    and --resume had no checkpoint: only --overwrite worked, for a run that never trained."""
    import copy

    from tests.conftest import TINY_MODEL

    bad = copy.deepcopy(TINY_MODEL)
    bad["towers"]["image"]["encoder_args"]["heads"] = 3  # 32 is not divisible by 3
    run = tmp_path / "run"
    with pytest.raises(Exception, match="divisible|heads"):
        train_align(load_config(tiny_config(tiny_world, run, model=bad, epochs=1)))
    assert {p.name for p in run.iterdir()} - {".lock"} == {".unstarted", "config.yaml", "tokenizer.json"}
    train_align(load_config(tiny_config(tiny_world, run, epochs=1)))
    assert latest_checkpoint(run) is not None and not (run / ".unstarted").exists()
    # a user's own config.yaml and tokenizer.json (no marker: no run of ours wrote them) are kept
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text("# mine\nx: 1\n")
    (other / "tokenizer.json").write_text("{}")
    # and no checkpoint: --resume, which the message offered, refused it too
    with pytest.raises(UserError, match="already holds files but no checkpoint to resume.*--overwrite"):
        train_align(load_config(tiny_config(tiny_world, other, epochs=1)))
    assert (other / "config.yaml").read_text() == "# mine\nx: 1\n" and (other / "tokenizer.json").is_file()


def test_a_start_whose_data_was_unusable_is_replaced_by_the_corrected_one(tiny_world, tmp_path):
    """A start that took no step because no item could be read ("no training step was taken") had removed
    its marker: the same command on the mended data was refused, "already holds files but no checkpoint"."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_world, broken)
    for media in [*broken.rglob("*.png"), *broken.rglob("*.wav")]:
        media.write_bytes(b"not a picture or a sound")
    run = tmp_path / "run"
    with pytest.raises(UserError, match="no training step was taken"):
        train_align(load_config(tiny_config(broken, run, epochs=1)))
    assert {p.name for p in run.iterdir()} - {".lock", "metrics.jsonl"} == {".unstarted", "config.yaml",
                                                                           "tokenizer.json"}
    train_align(load_config(tiny_config(tiny_world, run, epochs=1)))
    assert latest_checkpoint(run) is not None and not (run / ".unstarted").exists()


def test_resuming_on_other_training_rows_is_refused(tiny_world, tmp_path, caplog):
    """The saved place in the epoch means the rows it was trained on: a resume after the manifest
    changed went on without a word. Paths are compared relative to the data root, so the same
    rows elsewhere still resume. Also: a data.val naming no file says validation is off."""
    import shutil

    import yaml

    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    path = tiny_config(world, tmp_path / "run", epochs=2, checkpoint_every=1, max_steps=1)
    raw = yaml.safe_load(path.read_text())
    raw["data"]["val"] = "vall.jsonl"  # a typo
    path.write_text(yaml.safe_dump(raw))
    with caplog.at_level(logging.WARNING):
        train_align(load_config(path))
    assert "vall.jsonl not found: training without validation" in caplog.text
    moved = tmp_path / "moved"
    shutil.move(world, moved)  # the same rows under another root resume
    train_align(load_config(path, [f"data.root={moved}", "train.max_steps=2"]), resume=True)
    lines = (moved / "train.jsonl").read_text().splitlines()
    (moved / "train.jsonl").write_text("\n".join(reversed(lines)) + "\n")
    with pytest.raises(UserError, match="training rows .* are not those the checkpoint was trained on"):
        train_align(load_config(path, [f"data.root={moved}", "train.max_steps=3"]), resume=True)


def test_resume_into_a_file_is_one_line(tiny_world, tmp_path):
    (tmp_path / "afile").write_text("x")
    cfg = load_config(tiny_config(tiny_world, tmp_path / "afile", epochs=1))
    with pytest.raises(UserError, match="is a file, not a folder"):  # was FileExistsError
        train_align(cfg, resume=True)


def test_a_manifests_own_qa_column_of_another_shape_is_read_as_text(tmp_path):
    """Unknown columns are kept as read; a `qa` list of strings crashed tokenizer training
    ("'str' object has no attribute 'get'")."""
    import json

    from mmembed.train.data_setup import captions

    rows = [{"text": "a red star", "qa": ["What colour is it? red"]},
            {"text": "a blue circle", "qa": [{"question": "What shape?", "answer": "circle"}, 7]},
            {"text": "a green cross", "qa": "not a list"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert list(captions(manifest)) == ["a red star", "What colour is it? red", "a blue circle",
                                        "What shape? circle", "a green cross"]


def test_a_resume_after_a_kill_mid_resave_restores_the_set_aside_checkpoint(tiny_world, tmp_path):
    """Re-saving a step sets the old folder aside first; a kill between the two renames left only
    `.step_X.old…`, and --resume said there was no checkpoint (the engine's clean-up, which puts it
    back, ran only after that check)."""
    run = tmp_path / "run"
    cfg = load_config(tiny_config(tiny_world, run, epochs=1, max_steps=2, checkpoint_every=2))
    train_align(cfg)
    last = latest_checkpoint(run)
    last.rename(last.parent / f".{last.name}.old123")  # as save_checkpoint leaves it when killed there
    assert latest_checkpoint(run) is None
    train_align(cfg, resume=True)
    assert latest_checkpoint(run).name == last.name


def test_the_trash_of_an_overwrite_under_way_is_left_to_it(tmp_path):
    """--resume (and every decoder stage) deleted another process's trash without the lock, mid
    overwrite: that overwrite crashed and left a half-cleared run."""
    from mmembed.train.run_dir import prepare_run_dir

    run = tmp_path / "run"
    (run / ".overwritten-123" / "checkpoints").mkdir(parents=True)
    holder = lock_holder(run)  # the overwriting trainer
    try:
        with pytest.raises(UserError, match="in use by a trainer"):
            prepare_run_dir(run, resume=True, overwrite=False)
        assert (run / ".overwritten-123").is_dir()
    finally:
        holder.kill()
        holder.wait()
    prepare_run_dir(run, resume=True, overwrite=False)  # the trainer gone: its leftover goes
    assert not (run / ".overwritten-123").exists()


def test_a_resume_with_another_space_is_refused_before_config_yaml_changes(tiny_world, tmp_path):
    """`train CFG --resume model.embed_dim=48` wrote the new model section into config.yaml, then
    the checkpoint refused it (or the decoder stage finished on it): the run no longer loaded."""
    import mmembed as mm
    from mmembed.errors import ConfigError
    from mmembed.train import train

    path = tiny_config(tiny_world, tmp_path / "run", epochs=1)
    train(load_config(path))
    before = (tmp_path / "run" / "config.yaml").read_text()
    for change in ("model.embed_dim=48", "model.towers.text.encoder_args.layers=2", "tokenizer.vocab_size=400"):
        with pytest.raises(ConfigError, match=rf"^--resume: {change.split('=')[0]} .* -> .*weights are of its"):
            train(load_config(path, [change]), resume=True)
        assert (tmp_path / "run" / "config.yaml").read_text() == before
    train(load_config(path, ["train.epochs=2"]), resume=True)  # the train section may change
    mm.load(tmp_path / "run")


def test_resume_of_a_missing_out_dir_is_refused_before_anything_is_made(tiny_world, tmp_path, capsys):
    """`train --resume train.out_dir=new/sub` made new/, new/sub/ and a .lock, then said "no complete checkpoint"."""
    from mmembed.train.run_dir import prepare_run_dir

    with pytest.raises(UserError, match=r"train.out_dir .*sub does not exist, so there is no run to resume"):
        prepare_run_dir(tmp_path / "new" / "sub", resume=True, overwrite=False)
    assert not (tmp_path / "new").exists()
    config = tiny_config(tiny_world, tmp_path / "cfg")
    assert main(["train", str(config), "--resume", f"train.out_dir={tmp_path / 'new' / 'sub'}"]) == 2
    err = capsys.readouterr().err
    assert "does not exist, so there is no run to resume" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists()


def test_a_copied_run_resumed_from_its_own_config_is_refused_with_its_folder(tiny_world, tmp_path, monkeypatch,
                                                                            capsys):
    """`train COPY/config.yaml --resume` continued the original run (config.yaml's train.out_dir): it
    pruned the original's checkpoints and overwrote its weights, and the copy stayed as it was."""
    import shutil

    from mmembed.train import train
    from mmembed.train.run_dir import check_resumed_folder

    monkeypatch.chdir(tmp_path)  # out_dir as relative as the original's config.yaml records it
    original = train_align(load_config(tiny_config(tiny_world, tmp_path / "a1", epochs=2, max_steps=2),
                                       ["train.out_dir=a1"]))
    shutil.copytree(original, tmp_path / "a1 copy")
    copy = tmp_path / "a1 copy" / "config.yaml"
    before = sorted(p.name for p in (original / "checkpoints").iterdir())
    for flag, did in (("--resume", "continue"), ("--overwrite", "replace")):
        assert main(["train", str(copy), flag]) == 2
        err = capsys.readouterr().err.strip()
        assert re.fullmatch(rf"mmembed: error: .*a1 copy/config.yaml is the config of the run in .*a1 copy, but its "
                            rf"train.out_dir is a1: {flag} would {did} that folder's run, not this one; for this one, "
                            rf"add 'train.out_dir=.*a1 copy'", err), err
    assert sorted(p.name for p in (original / "checkpoints").iterdir()) == before  # the original untouched
    check_resumed_folder(original / "config.yaml", "a1")  # the run's own config, in its own folder
    check_resumed_folder(original / "checkpoints" / "step_0000002" / "config.yaml", "a1")  # a checkpoint's: the run's
    shutil.rmtree(original)  # gone: "train.out_dir a1 does not exist" named no fix
    with pytest.raises(UserError, match=r"for this one, add 'train.out_dir="):
        check_resumed_folder(copy, "a1")
    fix = [f"train.out_dir={tmp_path / 'a1 copy'}", "train.max_steps=4"]
    check_resumed_folder(copy, load_config(copy, fix).train.out_dir, fix)  # the README's RUN/config.yaml --resume
    run = train(load_config(copy, fix), resume=True)
    assert run == tmp_path / "a1 copy" and latest_checkpoint(run).name == "step_0000004"
