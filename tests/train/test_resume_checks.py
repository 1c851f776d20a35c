"""What a `--resume` keeps of the run it continues: the rate a collapse restart lowered train.lr to,
the seed that dealt the epoch, and the settings that shape the checkpoint's weights, each refused
in one line before any work and before config.yaml changes."""

import json
import logging
import shutil

import pytest

from mmembed.config import load_config, save_config
from mmembed.errors import ConfigError, UserError
from mmembed.train import train
from mmembed.train.align import train_align
from tests.conftest import tiny_config
from tests.train.test_decoder_stage import DECODER, decoder_config


def _stop_at(step: int):
    def stop(event, trainer, info):
        if event == "step" and trainer.progress.step == step:
            raise KeyboardInterrupt  # as a kill: the checkpoint of the step before is the latest

    return stop


def test_a_resume_goes_on_at_the_rate_a_collapse_restart_lowered_train_lr_to(tiny_world, tmp_path, monkeypatch,
                                                                            caplog):
    """A plain --resume of a run restarted at train.lr=1e-3 trained at the config's 3e-3 again, and config.yaml said so."""
    from tests.train.test_align import _collapse_on

    lrs = _collapse_on(monkeypatch, attempts={0})  # the first attempt collapses: the stage restarts at a third
    path = tiny_config(tiny_world, tmp_path / "run", epochs=2, checkpoint_every=1)
    with pytest.raises(KeyboardInterrupt):
        train_align(load_config(path), callbacks=[_stop_at(4)])
    assert lrs == pytest.approx([3e-3, 1e-3])
    with caplog.at_level(logging.WARNING):
        run = train(load_config(path), resume=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["lr"] for r in rows if "lr" in r]
    assert len(rates) == 6 and max(rates) <= 1e-3 * (1 + 1e-9)  # the resumed steps 4..6 too
    assert load_config(run / "config.yaml").train.lr == pytest.approx(1e-3)
    assert "training at train.lr=0.001, the rate this run restarted at" in caplog.text


def test_a_resume_from_the_runs_own_config_keeps_the_restart_for_the_next_resume(tiny_world, tmp_path, monkeypatch):
    """RUN/config.yaml (which records the lowered rate) dropped the restart from later checkpoints:
    a resume after it with the original config went back to the rate that collapsed."""
    from tests.train.test_align import _collapse_on

    _collapse_on(monkeypatch, attempts={0})
    path = tiny_config(tiny_world, tmp_path / "run", epochs=2, checkpoint_every=1)
    with pytest.raises(KeyboardInterrupt):
        train_align(load_config(path), callbacks=[_stop_at(3)])
    with pytest.raises(KeyboardInterrupt):
        train_align(load_config(tmp_path / "run" / "config.yaml"), resume=True, callbacks=[_stop_at(5)])
    run = train(load_config(path), resume=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["lr"] for r in rows if "lr" in r]
    assert len(rates) == 6 and max(rates) <= 1e-3 * (1 + 1e-9)


def test_a_decoder_resume_takes_settings_that_leave_its_weights_as_they_are():
    """window, norm_eps, activation (and context, but for learned positions) were refused as shape
    changes, though a resume had taken them before; the size, heads and kind of positions are refused."""
    from mmembed.config_decoder import DecoderConfig
    from mmembed.train.preflight_resume import _decoder_changes

    rotary = DecoderConfig(positional="rotary", context=128)
    for change in ({"window": 64}, {"norm_eps": 1e-6}, {"activation": "gelu_tanh"}, {"context": 256}):
        assert _decoder_changes(rotary, DecoderConfig(**{**vars(rotary), **change})) == []
    assert _decoder_changes(rotary, DecoderConfig(**{**vars(rotary), "heads": 2})) != []
    learned = DecoderConfig(positional="learned", context=128)
    assert _decoder_changes(learned, DecoderConfig(**{**vars(learned), "context": 256})) == [
        "decoder.context 128 -> 256"]


def test_a_resume_with_another_train_seed_is_refused_before_config_yaml_changes(tiny_world, tmp_path):
    """The rest of the epoch was dealt from the new seed's shuffle: some rows trained twice, others never."""
    path = tiny_config(tiny_world, tmp_path / "run", epochs=2, checkpoint_every=1, max_steps=1)
    run = train(load_config(path))
    before = (run / "config.yaml").read_text()
    with pytest.raises(UserError, match=r"^--resume: train\.seed 0 -> 1: .*resume without the change to continue"):
        train(load_config(path, ["train.seed=1", "train.max_steps=2"]), resume=True)
    assert (run / "config.yaml").read_text() == before
    train(load_config(path, ["train.max_steps=2"]), resume=True)  # the same seed continues the run
    assert load_config(run / "config.yaml").train.max_steps == 2
    assert load_config(run / "checkpoints" / "step_0000002" / "config.yaml").train.max_steps == 2


def test_a_refused_resume_leaves_config_yaml_as_it_was(tiny_world, tmp_path):
    """The align stage wrote the resume's config.yaml before its checkpoint was read, so a refused resume changed it."""
    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    path = tiny_config(world, tmp_path / "run", epochs=2, checkpoint_every=1, max_steps=1)
    run = train_align(load_config(path))
    before = (run / "config.yaml").read_text()
    lines = (world / "train.jsonl").read_text().splitlines()
    (world / "train.jsonl").write_text("\n".join(reversed(lines)) + "\n")  # refused as the checkpoint loads
    with pytest.raises(UserError, match="training rows .* are not those the checkpoint was trained on"):
        train_align(load_config(path, ["train.max_steps=2"]), resume=True)
    assert (run / "config.yaml").read_text() == before


def test_a_resume_that_adds_or_drops_the_captioner_is_one_line_before_config_yaml_changes(tiny_world, tmp_path):
    """loss.caption_weight 0 -> 1 failed as the checkpoint loaded ("Unexpected key(s) in state_dict"),
    after config.yaml had been rewritten with it."""
    path = tiny_config(tiny_world, tmp_path / "run", epochs=1, max_steps=1)
    run = train(load_config(path))
    before = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"^--resume: loss\.caption_weight 0\.0 -> 1\.0: .*resume without the change"):
        train(load_config(path, ["loss.caption_weight=1"]), resume=True)
    assert (run / "config.yaml").read_text() == before


def test_a_resume_is_held_to_the_captioners_size_not_its_weight(tmp_path):
    """The same-space check read model and tokenizer alone: another loss.captioner failed in a raw state-dict message."""
    from mmembed.train.preflight_resume import _check_same_space

    cfg = load_config(tiny_config(tmp_path, tmp_path / "run"), ["loss.caption_weight=1"])
    (tmp_path / "run").mkdir()
    save_config(cfg, tmp_path / "run" / "config.yaml")
    _check_same_space(load_config(tiny_config(tmp_path, tmp_path / "run"), ["loss.caption_weight=0.5"]))
    with pytest.raises(ConfigError, match=r"^--resume: loss\.captioner\.layers 2 -> 1: "):
        _check_same_space(load_config(tiny_config(tmp_path, tmp_path / "run"),
                                      ["loss.caption_weight=1", "loss.captioner.layers=1"]))


@pytest.fixture(scope="module")
def space_run(tiny_world, tmp_path_factory):
    """A trained tiny space, for decoder stages to copy."""
    return train(load_config(tiny_config(tiny_world, tmp_path_factory.mktemp("space") / "run", epochs=1)))


def _decoder_run(tiny_world, space_run, run):
    """A decoder stage of 2 steps on `space_run`'s copied space; returns config(**decoder.train keys)."""
    def config(**settings):
        cfg = decoder_config(tiny_world, run, train={**DECODER["train"], "max_steps": 2, "eval_every": None,
                                                     **settings})
        cfg.model.init_from = str(space_run)
        return cfg

    train(config())
    return config


def test_a_decoder_resume_with_another_seed_is_refused_before_any_work(tiny_world, space_run, tmp_path, caplog):
    """A changed decoder.train.seed went on silently: the rest of the epoch came from another shuffle."""
    config = _decoder_run(tiny_world, space_run, tmp_path / "run")
    with caplog.at_level(logging.INFO):
        with pytest.raises(UserError, match=r"^--resume: decoder\.train\.seed 0 -> 1: .*resume without the change"):
            train(config(seed=1, max_steps=3), resume=True)
    assert "embedded" not in caplog.text  # refused before the media were embedded
    train(config(max_steps=3), resume=True)  # unchanged, it continues
    assert (tmp_path / "run" / "decoder" / "checkpoints" / "step_0000003").is_dir()


def test_a_decoder_resume_with_another_shape_is_one_line_before_any_work(tiny_world, space_run, tmp_path, caplog):
    """decoder.layers=2 embedded every media item, then failed with "Missing key(s) in state_dict: decoder...."."""
    config = _decoder_run(tiny_world, space_run, tmp_path / "run")
    cfg = config(max_steps=3)
    cfg.decoder.layers = 2
    with caplog.at_level(logging.INFO):
        with pytest.raises(ConfigError, match=r"^--resume: decoder\.layers 1 -> 2: .*resume without the change"):
            train(cfg, resume=True)
    assert "embedded" not in caplog.text


def test_a_bind_run_resumes_from_its_checkpoint_after_its_source_run_moved(tiny_world, tmp_path):
    """A resumed model.init_from run read the source's weights before its checkpoint overwrote every one,
    so once the source had moved: "checkpoint file not found: <source>/model.safetensors"."""
    from safetensors.torch import load_file

    source = train(load_config(tiny_config(tiny_world, tmp_path / "source", epochs=1)))
    path = tiny_config(tiny_world, tmp_path / "bound", epochs=2, checkpoint_every=1, max_steps=4)
    bind = [f"model.init_from={source}", f"tokenizer.path={source / 'tokenizer.json'}"]
    train(load_config(path, [*bind, f"train.out_dir={tmp_path / 'whole'}"]))  # the same run, never stopped
    with pytest.raises(KeyboardInterrupt):
        train_align(load_config(path, bind), callbacks=[_stop_at(3)])
    shutil.move(source, tmp_path / "moved")
    run = train(load_config(tmp_path / "bound" / "config.yaml"), resume=True)
    assert (run / "checkpoints" / "step_0000004").is_dir()
    resumed, ran = load_file(run / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert resumed.keys() == ran.keys() and all(resumed[k].equal(ran[k]) for k in ran)


def test_a_resume_with_another_early_stop_metric_is_refused_before_config_yaml_changes(tiny_world, tmp_path):
    """The kept best value of recall@1 was compared with the new metric's: a median rank (lower is
    better, never below 0.17) never improved, and the run stopped early and shipped an old step as best."""
    path = tiny_config(tiny_world, tmp_path / "run", epochs=2, checkpoint_every=1, eval_every=1, max_steps=2)
    run = train(load_config(path))
    before = (run / "config.yaml").read_text()
    with pytest.raises(UserError, match=r"^--resume: train\.early_stop_metric 'recall@1' -> 'val/median_rank': the "
                                        r"run's best checkpoint and its patience were kept by recall@1"):
        train(load_config(path, ["train.early_stop_metric=val/median_rank", "train.max_steps=3"]), resume=True)
    assert (run / "config.yaml").read_text() == before
    train(load_config(path, ["train.early_stop_metric=val/recall@1", "train.max_steps=3"]), resume=True)  # its name


def test_a_best_is_not_beaten_by_float_rounding():
    """The mean recall of the same hits summed in another order read 0.19444444444444445 for ...442: a
    new best, which reset the early-stopping patience."""
    from mmembed.train.metrics import better

    assert not better(0.19444444444444445, 0.19444444444444442, lower=False)
    assert better(0.1945, 0.19444444444444442, lower=False) and better(0.5, None, lower=True)
    assert not better(float("nan"), None, lower=False)


def test_a_resume_with_a_lower_keep_last_prunes_before_its_first_save(tiny_world, tmp_path):
    """On a full disk the resume with train.keep_last=1 failed as the run had: the new checkpoint was
    written before the old ones were pruned. The newest and the best are always kept."""
    path = tiny_config(tiny_world, tmp_path / "run", epochs=2, checkpoint_every=1, eval_every=1, max_steps=4)
    run = train(load_config(path))
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len(steps) == 4
    seen = []

    def at_start(event, trainer, info):
        if event == "step" and not seen:  # the first step after the resume, before any save
            seen.append(sorted(p.name for p in (run / "checkpoints").iterdir()))

    from mmembed.train.state import resume_checkpoint

    best = json.loads((resume_checkpoint(run) / "trainer.json").read_text())["progress"]["best_step"]
    train_align(load_config(path, ["train.keep_last=1", "train.max_steps=5"]), resume=True, callbacks=[at_start])
    assert seen[0] == sorted({"step_0000004", f"step_{best:07d}"})


def test_a_resume_takes_augmentation_and_names_what_it_takes_from_the_next_step(tiny_world, tmp_path, caplog):
    """Turning image augmentation on was refused ("the run's weights are of its config.yaml"), though
    no weight is of it; a changed loss.kind or caption sampling was taken without a word."""
    path = tiny_config(tiny_world, tmp_path / "run", epochs=2, checkpoint_every=1, max_steps=1)
    train(load_config(path))
    changed = ["model.towers.image.preprocess.augment=true", "loss.kind=siglip", "data.caption_sampling=random",
               "train.max_steps=2"]
    with caplog.at_level(logging.WARNING):
        train(load_config(path, changed), resume=True)
    assert "--resume: data.caption_sampling 'primary' -> 'random', loss.kind 'infonce' -> 'siglip', " \
           "model.towers.image.preprocess.augment" in caplog.text and "taken from the next step on" in caplog.text
    with pytest.raises(ConfigError, match="preprocess.size"):  # what the model reads stays the run's
        train(load_config(path, [*changed, "model.towers.image.preprocess.size=16", "train.max_steps=3"]), resume=True)


def test_a_full_disk_at_a_checkpoint_names_the_run_and_the_way_on(tiny_world, tmp_path, monkeypatch, capsys):
    """It said "…/checkpoints/.step_0000006.tmp4176/trainer.safetensors: No space left on device"."""
    import errno

    from mmembed.cli import main
    from mmembed.train import checkpointing

    def full(run_dir, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", f"{run_dir}/checkpoints/.step_0000002.tmp9/x")

    monkeypatch.setattr(checkpointing, "save_checkpoint", full)
    path = tiny_config(tiny_world, tmp_path / "run", epochs=1, checkpoint_every=2)
    assert main(["train", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"mmembed: error: {tmp_path / 'run'}: no space left on the device for the checkpoint of step 2; "
                   "free some (a --resume with a lower train.keep_last prunes the older checkpoints before its first "
                   "save) and --resume"), err
