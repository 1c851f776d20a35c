"""`torchrun -m mmembed train` on 2 CPU processes (gloo): same training as one process at the
same global batch; a killed rank stops the other with one clear line; the run resumes on 2 and 1."""

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from mmembed.checkpoint import load_tensors
from mmembed.train.state import latest_checkpoint
from tests.conftest import TINY_MODEL, tiny_config
from tests.distributed.workers import free_env, rank_pids

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="torch.distributed with gloo is not available"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks' processes through /proc"),
]


def _torchrun(nproc, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "mmembed", *map(str, args)]


def _run(cmd, timeout=300):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=free_env())
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _no_dropout():
    model = copy.deepcopy(TINY_MODEL)
    model["towers"]["text"]["encoder_args"]["dropout"] = 0.0  # ranks draw different masks
    return model


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def one_process(tiny_world, tmp_path_factory):
    """The align stage on one process, global batch 16, 2 epochs."""
    out = tmp_path_factory.mktemp("one") / "run"
    _run([sys.executable, "-m", "mmembed", "train", tiny_config(tiny_world, out, _no_dropout(), batch_size=16,
                                                                    epochs=2)])
    return out


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_train_as_one_at_the_same_global_batch(tiny_world, tmp_path, one_process, fsdp):
    two = tiny_config(tiny_world, tmp_path / "two", _no_dropout(), batch_size=8, epochs=2, fsdp=fsdp)
    r = _run(_torchrun(2, "train", two))
    assert r.stdout.count("run: ") == 1  # rank 0 alone reports
    a, b = _losses(one_process), _losses(tmp_path / "two")
    assert len(a) == len(b) == 6  # 3 global batches of 16 per epoch
    assert b == pytest.approx(a, abs=1e-4)
    # the checkpoint (weights and optimizer state) has the single-process format and values
    for name in ("model.safetensors", "trainer.safetensors"):
        wa = load_tensors(latest_checkpoint(one_process) / name)
        wb = load_tensors(latest_checkpoint(tmp_path / "two") / name)
        keys = [k for k in wa if not k.startswith("rng.")]
        assert keys == [k for k in wb if not k.startswith("rng.")]
        for k in keys:
            torch.testing.assert_close(wb[k], wa[k], atol=1e-4, rtol=1e-4, msg=k)
    # the saved model too (under FSDP, gathered from the shards into a whole copy)
    saved_a = load_tensors(one_process / "model.safetensors")
    saved_b = load_tensors(tmp_path / "two" / "model.safetensors")
    assert saved_a.keys() == saved_b.keys()
    for k in saved_a:
        torch.testing.assert_close(saved_b[k], saved_a[k], atol=1e-4, rtol=1e-4, msg=k)


@pytest.mark.slow  # 35 s of two processes, three runs: the default suite took 10:06 in a slow stretch
def test_a_sharded_run_resumes_exactly_and_on_one_process(tiny_world, tmp_path):
    """FSDP: stop at step 3, resume to 6 on 2 sharded processes = 6 steps in one go; the same
    checkpoint resumes on a single process too (the format is the single-process one)."""
    def cfg(name, steps, **extra):
        return tiny_config(tiny_world, tmp_path / name, _no_dropout(), batch_size=8, epochs=4, max_steps=steps,
                           min_lr_ratio=1.0, warmup_steps=1, fsdp=True, **extra)
        # a flat schedule, and a warm-up within half of the shortest run: max_steps moves no lr

    _run(_torchrun(2, "train", cfg("whole", 6)))
    stopped = cfg("stopped", 3)
    _run(_torchrun(2, "train", stopped))
    shutil.copytree(tmp_path / "stopped", tmp_path / "single")
    _run(_torchrun(2, "train", stopped, "train.max_steps=6", "--resume"))
    wa = load_tensors(latest_checkpoint(tmp_path / "whole") / "model.safetensors")
    wb = load_tensors(latest_checkpoint(tmp_path / "stopped") / "model.safetensors")
    assert latest_checkpoint(tmp_path / "stopped").name == "step_0000006"
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-5, msg=k)
    _run([sys.executable, "-m", "mmembed", "train", stopped, f"train.out_dir={tmp_path / 'single'}",
          "train.max_steps=6", "train.fsdp=false", "--resume"])
    assert latest_checkpoint(tmp_path / "single").name == "step_0000006"


@pytest.mark.slow  # 11-20 s of two processes: the default suite stays under 10 minutes
def test_a_one_process_run_resumed_on_two_trains_the_rest_of_its_epoch_and_all_of_the_next(tiny_world, tmp_path):
    """Its place in the epoch was 9 batches of 4 rows (36 of 51), counted as if they were batches
    of two processes: the resumed run skipped the epoch's last rows and stopped half-way through
    the next epoch (the step budget counted the steps taken as two-process steps)."""
    cfg = tiny_config(tiny_world, tmp_path / "run", batch_size=4, epochs=2, max_steps=9, checkpoint_every=9)
    _run([sys.executable, "-m", "mmembed", "train", cfg])
    r = _run(_torchrun(2, "train", cfg, "--resume", "train.max_steps=null"))
    assert "16 steps in all" in r.stderr  # it planned 17: the rest of the epoch as 6 - 36 // 8 steps
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = {r["step"]: r["epoch"] for r in rows if "loss" in r}
    # 15 rows were left: one step of 2 x 4; then 51 // 8 = 6 steps of epoch 1
    assert [epochs[s] for s in range(10, 17)] == [0] + [1] * 6 and max(epochs) == 16


def test_a_refused_start_is_one_line_on_every_rank(tiny_world, one_process):
    """A fresh run into a trained folder: rank 1 said it had lost contact with another process and
    pointed at the old run's checkpoint; --find-lr under torchrun ran the range test twice."""
    cfg = one_process.parent / f"{one_process.name}.yaml"
    r = subprocess.run(_torchrun(2, "train", cfg), capture_output=True, text=True, timeout=300, env=free_env())
    assert r.returncode != 0
    # torchrun stops the other rank once one has failed: one line or two, never a lost contact
    assert "already holds a run" in r.stderr and "lost contact" not in r.stderr, r.stderr[-3000:]
    r = subprocess.run(_torchrun(2, "train", cfg, "--find-lr"), capture_output=True, text=True, timeout=300,
                       env=free_env())
    assert r.returncode != 0 and "--find-lr runs in one process" in r.stderr, r.stderr[-3000:]
    assert not (one_process.parent / f"{one_process.name}-find-lr").exists()


def _wait_for(predicate, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_killed_rank_stops_the_other_and_the_run_resumes_on_two_and_on_one(tiny_world, tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(tiny_world, run, batch_size=8, epochs=50, checkpoint_every=1)
    proc = subprocess.Popen(_torchrun(2, "train", cfg), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=free_env())
    try:
        _wait_for(lambda: (run / "checkpoints" / "step_0000004").is_dir(), 120, "step 4's checkpoint")
        pids = rank_pids(proc.pid)
        assert set(pids) == {0, 1}, pids
        os.kill(pids[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=60)  # the other rank must not hang
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("mmembed: error: rank 0:")]
    assert lines, err[-3000:]
    assert "--resume" in lines[0] and "checkpoints/step_" in lines[0]
    stopped_at = int(latest_checkpoint(run).name.split("_")[1])
    assert stopped_at >= 4

    copy_dir = tmp_path / "copy"
    shutil.copytree(run, copy_dir)
    end = stopped_at + 3
    r = _run(_torchrun(2, "train", cfg, "--resume", f"train.max_steps={end}"))
    assert f"step {stopped_at}" in r.stderr and latest_checkpoint(run).name == f"step_{end:07d}"
    r = _run([sys.executable, "-m", "mmembed", "train", cfg, f"train.out_dir={copy_dir}", f"train.max_steps={end}",
              "--resume"])
    assert "resuming a run of 2 process(es) x batch 8 x 1 micro-batch(es) on 1 x 8 x 1" in r.stderr
    assert latest_checkpoint(copy_dir).name == f"step_{end:07d}"


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_the_decoder_stage_trains_on_two_processes(tiny_world, tmp_path, fsdp):
    """align (2 processes) then the decoder (2 processes, DDP or FSDP over projector and decoder),
    both with activation checkpointing: rank 0 saves a run that generates."""
    import yaml

    import mmembed as mm
    from tests.train.test_decoder_stage import DECODER, first

    cfg = tiny_config(tiny_world, tmp_path / "run", batch_size=8, epochs=1, grad_checkpointing=True, fsdp=fsdp)
    raw = yaml.safe_load(cfg.read_text())
    raw["decoder"] = {**DECODER, "train": {**DECODER["train"], "batch_size": 8, "grad_checkpointing": True,
                                           "fsdp": fsdp}}
    cfg.write_text(yaml.safe_dump(raw))
    err = _run(_torchrun(2, "train", cfg)).stderr
    # each process read the same rows: their skips and validation's left-out rows were said twice
    said = [line for line in err.splitlines() if "validation:" in line and "left out" in line or "bad row(s)" in line]
    assert len(said) == 2 and sum("left out" in line for line in said) == 1, err[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "decoder" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert any("val/answer_accuracy" in r for r in rows)
    out = mm.load(tmp_path / "run").generate(["Describe", mm.Image(first(tiny_world, "image"))], max_new_tokens=4)
    assert 1 <= len(out.token_ids) <= 4


@pytest.mark.slow  # 11-20 s of two processes: the default suite stays under 10 minutes
def test_a_sharded_run_whose_batches_lack_a_modality_trains_as_one_process(tiny_world, tmp_path):
    """Under FSDP a process whose batch had no audio row skipped the audio tower while the other
    ran it: running a sharded block is a collective, so both hung in mismatched collectives until
    the timeout. Every process now runs every tower (and the captioner for every modality), a
    lacking one on a blank example with weight 0: the losses are one process's."""
    import yaml

    rows = (tiny_world / "train.jsonl").read_text().splitlines()
    sparse = [json.loads(line) for line in rows]
    for i, row in enumerate(sparse):
        if i % 8:  # audio in 1 row of 8: most per-process batches of 8 have none
            row.pop("audio", None)
    (tmp_path / "world").mkdir()
    for entry in tiny_world.iterdir():
        (tmp_path / "world" / entry.name).symlink_to(entry)
    (tmp_path / "world" / "train.jsonl").unlink()
    (tmp_path / "world" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sparse))

    def config(name, **train):
        path = tiny_config(tmp_path / "world", tmp_path / name, _no_dropout(), epochs=1, **train)
        raw = yaml.safe_load(path.read_text())
        raw["loss"] = {"caption_weight": 1.0, "captioner": {"width": 16, "layers": 1, "heads": 2, "soft_tokens": 2}}
        raw["data"]["val"] = None
        path.write_text(yaml.safe_dump(raw))
        return path

    _run([sys.executable, "-m", "mmembed", "train", config("one", batch_size=16)])
    _run(_torchrun(2, "train", config("two", batch_size=8, fsdp=True, dist_timeout_minutes=1.0)), timeout=240)
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) >= 2 and b == pytest.approx(a, abs=1e-4)


def _junk_world(tiny_world, tmp_path):
    """`tiny_world` where two rows in three point at an unreadable image."""
    (tmp_path / "world").mkdir()
    for entry in tiny_world.iterdir():
        (tmp_path / "world" / entry.name).symlink_to(entry)
    (tmp_path / "world" / "junk.png").write_bytes(b"not a picture")
    rows = [json.loads(line) for line in (tiny_world / "train.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        if i % 3:
            row["image"] = "junk.png"
    (tmp_path / "world" / "train.jsonl").unlink()
    (tmp_path / "world" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "world"


def _junk_config(world, out_dir, **train):
    import yaml

    path = tiny_config(world, out_dir, epochs=1, **train)
    raw = yaml.safe_load(path.read_text())
    raw["data"]["val"] = None
    path.write_text(yaml.safe_dump(raw))
    return path


def _skipped(stderr):
    return re.findall(r"skipped rows during training: skipped (\d+) row", stderr)


@pytest.mark.slow  # 11-20 s of two processes: the default suite stays under 10 minutes
def test_rows_skipped_in_batches_the_ranks_skip_together_are_counted_as_on_one_process(tiny_world, tmp_path):
    """Two rows in three have an unreadable image: a batch some rank's share of which had no
    usable row was skipped before its bad rows were counted (8 rows counted of one process's 32),
    and every rank printed the empty-batch summary."""
    world = _junk_world(tiny_world, tmp_path)
    one = _run([sys.executable, "-m", "mmembed", "train", _junk_config(world, tmp_path / "one", batch_size=4)]).stderr
    two = _run(_torchrun(2, "train", _junk_config(world, tmp_path / "two", batch_size=2))).stderr
    assert len(_skipped(one)) == 1 and int(_skipped(one)[0]) > 20, one[-3000:]
    assert _skipped(two) == _skipped(one), two[-3000:]
    assert two.count("batch(es) had no usable row") == 1, two[-3000:]  # rank 0 alone says it
    # a global batch one process's share of which was empty is said apart (it was counted as having no row:
    # "8 batch(es) had no usable row" where one process said 5)
    assert two.count("global batch(es) were skipped by every process because one process's share") == 1, two[-3000:]


@pytest.mark.slow  # 11-20 s of two processes: the default suite stays under 10 minutes
def test_a_resumed_run_counts_every_ranks_skipped_rows_of_its_first_part_once(tiny_world, tmp_path):
    """The checkpoint held rank 0's skipped rows only: a 2-process run stopped at step 2 and
    resumed reported 20 skipped rows where the uninterrupted run reported 32."""
    world = _junk_world(tiny_world, tmp_path)
    one = _run([sys.executable, "-m", "mmembed", "train", _junk_config(world, tmp_path / "one", batch_size=4)]).stderr
    stopped = _junk_config(world, tmp_path / "two", batch_size=2, max_steps=2, checkpoint_every=100)
    _run(_torchrun(2, "train", stopped))
    shutil.copytree(tmp_path / "two", tmp_path / "single")
    two = _run(_torchrun(2, "train", stopped, "train.max_steps=null", "--resume")).stderr
    # on one process at the same global batch (4 rows), from the 2-process checkpoint
    single = _run([sys.executable, "-m", "mmembed", "train", stopped, f"train.out_dir={tmp_path / 'single'}",
                   "train.max_steps=null", "train.batch_size=4", "--resume"]).stderr
    assert len(_skipped(one)) == 1 and int(_skipped(one)[0]) > 20, one[-3000:]
    assert _skipped(two) == _skipped(one), two[-3000:]
    assert _skipped(single) == _skipped(one), single[-3000:]
