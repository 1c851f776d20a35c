"""The align stage end to end on a tiny world: kill/resume exactness, crash-safe checkpoints,
logit-scale clamp, collapse warning, determinism, and a run directory that `mm.load` opens."""

import copy
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from mmembed.checkpoint import load_tensors
from mmembed.config import load_config
from mmembed.data.collate import Batch
from mmembed.modality import Modality
from mmembed.space import SharedSpace, Tower
from mmembed.train.align import train_align
from mmembed.train.align_data import embed_dataset
from mmembed.train.state import latest_checkpoint
from tests.conftest import TINY_MODEL, tiny_config

RUNNER = textwrap.dedent("""
    import json, os, signal, sys
    import mmembed.train.align as align
    from mmembed.config import load_config

    config_path, rows_path, kill_at, resume = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
    inner = align.make_step_fn

    def recording(*args, **kwargs):
        step = inner(*args, **kwargs)
        def wrapped(batch):
            with open(rows_path, "a") as f:
                f.write(json.dumps(batch.rows.tolist()) + "\\n")
            return step(batch)
        return wrapped

    align.make_step_fn = recording

    def killer(event, trainer, info):
        if event == "step" and trainer.progress.step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    align.train_align(load_config(config_path), resume=resume, callbacks=[killer])
""")


def _run(config, rows, kill_at=-1, resume=False):
    return subprocess.run([sys.executable, "-c", RUNNER, str(config), str(rows), str(kill_at), "1" if resume else "0"],
                          capture_output=True, text=True, timeout=600)


def _rows(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def _final_state(run_dir):
    ckpt = latest_checkpoint(run_dir)
    return load_tensors(ckpt / "model.safetensors"), load_tensors(ckpt / "trainer.safetensors")


def test_sigkill_then_resume_matches_uninterrupted(tiny_world, tmp_path):
    steps_total = 3 * (51 // 16)  # 3 epochs of the tiny world's training split
    kill_at = random.Random(os.getpid()).randint(3, steps_total - 2)
    # SpecAugment on: its masks (drawn after the cache) must be redrawn identically after resume.
    model = copy.deepcopy(TINY_MODEL)
    model["towers"]["audio"]["preprocess"] |= {"spec_augment": True, "freq_mask": 8, "time_mask": 8}
    ref_cfg = tiny_config(tiny_world, tmp_path / "ref", model, epochs=3)
    r = _run(ref_cfg, tmp_path / "ref_rows.jsonl")
    assert r.returncode == 0, r.stderr[-2000:]

    cfg = tiny_config(tiny_world, tmp_path / "killed", model, epochs=3, checkpoint_every=1)
    r = _run(cfg, tmp_path / "rows.jsonl", kill_at=kill_at)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    # Killed inside step `kill_at`, before its checkpoint: the last complete one is the step before.
    assert latest_checkpoint(tmp_path / "killed").name == f"step_{kill_at - 1:07d}"
    seen_before_kill = len(_rows(tmp_path / "rows.jsonl"))
    r = _run(cfg, tmp_path / "rows.jsonl", resume=True)
    assert r.returncode == 0, r.stderr[-2000:]

    ref_rows, rows = _rows(tmp_path / "ref_rows.jsonl"), _rows(tmp_path / "rows.jsonl")
    # Resuming redoes step `kill_at` with the very batch the uninterrupted run used, and so on.
    assert seen_before_kill == kill_at and rows[:kill_at] == ref_rows[:kill_at]
    assert rows[seen_before_kill:] == ref_rows[kill_at - 1:]
    (m_ref, t_ref), (m, t) = _final_state(tmp_path / "ref"), _final_state(tmp_path / "killed")
    assert m_ref.keys() == m.keys() and t_ref.keys() == t.keys()
    for k in m_ref:
        assert torch.equal(m_ref[k], m[k]), k
    for k in t_ref:
        assert torch.equal(t_ref[k], t[k]), k


def test_crash_during_checkpoint_write_keeps_previous(tiny_world, tmp_path, monkeypatch):
    import mmembed.train.state as state

    cfg = load_config(tiny_config(tiny_world, tmp_path / "run", epochs=1, checkpoint_every=1))
    real = state.save_tensors
    calls = {"n": 0}

    def dying_save(path, tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] == 5:  # third checkpoint, its first file: write half of it, then "die"
            path.write_bytes(b"partial")
            raise KeyboardInterrupt
        return real(path, tensors, metadata)

    monkeypatch.setattr(state, "save_tensors", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train_align(cfg)
    run = tmp_path / "run"
    assert latest_checkpoint(run).name == "step_0000002"
    assert not (run / "checkpoints" / "step_0000003").exists()
    # the failed save removed its torn temporary folder itself; a SIGKILL leaves one, which the next
    # start removes
    assert not [p.name for p in (run / "checkpoints").iterdir() if "0000003" in p.name]
    torn = run / "checkpoints" / ".step_0000003.tmp999999"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"partial")
    from mmembed.train.state import remove_partial_checkpoints

    remove_partial_checkpoints(run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000001", "step_0000002"]
    import mmembed as mm

    model = mm.load(latest_checkpoint(run))
    z = model.embed("text", ["a small red circle on the left"])
    assert z.shape == (1, 32) and torch.allclose(z.norm(dim=-1), torch.ones(1))


def test_logit_scale_clamped_every_step(tiny_world, tmp_path, monkeypatch):
    """The raw parameter (not the clamping `logit_scale` property) is back at ln 100 after every
    step, while every step's gradient pushes it past the bound."""
    import mmembed.train.align as align

    inner = align.make_step_fn

    def pushing(space, *args, **kwargs):
        step = inner(space, *args, **kwargs)

        def wrapped(batch):
            out = step(batch)
            # This term raises the raw log scale every step (its gradient bypasses the property's
            # clamp), so only clamp_ stops it. Its gradient, -1000, outweighs InfoNCE's whatever the
            # embeddings (on a GPU too): |dL/d log s| <= 2s = 200 for each pair's loss, as cosines
            # lie in [-1, 1], and the total is the mean over the pairs.
            out.loss = out.loss - 1000.0 * space.log_logit_scale
            return out

        return wrapped

    monkeypatch.setattr(align, "make_step_fn", pushing)
    raw = []

    def record(event, trainer, info):
        if event == "step":
            raw.append(trainer.module.log_logit_scale.item())

    cfg = load_config(tiny_config(tiny_world, tmp_path / "run", epochs=2, lr=0.5, warmup_steps=0))
    cfg.model.init_logit_scale = 99.5
    run = train_align(cfg, callbacks=[record])
    bound = math.log(100.0)
    assert len(raw) == 2 * (51 // 16)  # one reading per optimizer step
    assert max(raw) <= bound + 1e-6, raw
    # pushed against the bound on every step (ln 99.5 + one Adam step of 0.5 is far past it)
    assert min(raw) >= bound - 1e-6, raw
    state = load_tensors(run / "model.safetensors")
    assert abs(state["log_logit_scale"].item() - bound) <= 1e-6


def _collapse_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "mmembed.train.collapse" and r.levelno == logging.WARNING and "collapsed" in r.getMessage()]


def test_collapse_monitor_warns_once_per_collapsed_tower(caplog):
    from mmembed.modality import Modality
    from mmembed.train.collapse import CollapseMonitor

    caplog.set_level(logging.WARNING, logger="mmembed.train.collapse")
    gen = torch.Generator().manual_seed(0)
    every = torch.ones(8, dtype=torch.bool)
    varied = torch.nn.functional.normalize(torch.randn(8, 16, generator=gen), dim=-1)  # (B, D)
    constant = varied[:1].expand(8, -1)  # every row the same unit vector

    monitor = CollapseMonitor(patience=3)
    for _ in range(2):  # one call short of the patience: silent
        monitor({Modality.IMAGE: constant, Modality.TEXT: varied}, {Modality.IMAGE: every, Modality.TEXT: every})
    assert _collapse_warnings(caplog) == []
    for _ in range(5):  # the third call warns, later ones do not repeat it
        monitor({Modality.IMAGE: constant, Modality.TEXT: varied}, {Modality.IMAGE: every, Modality.TEXT: every})
    warnings = _collapse_warnings(caplog)
    assert len(warnings) == 1 and "the image tower" in warnings[0] and "for 3 steps" in warnings[0]

    # a varied batch breaks the streak; rows absent from the batch (zeros) do not count as variety
    caplog.clear()
    monitor = CollapseMonitor(patience=3)
    half = torch.tensor([True] * 4 + [False] * 4)
    with_absent = torch.cat([constant[:4], torch.zeros(4, 16)])  # (B, D): present rows constant
    for batch in (constant, constant, varied, constant, constant):
        monitor({Modality.AUDIO: batch}, {Modality.AUDIO: every})
    assert _collapse_warnings(caplog) == []
    monitor({Modality.AUDIO: with_absent}, {Modality.AUDIO: half})  # third constant call in a row
    warnings = _collapse_warnings(caplog)
    assert len(warnings) == 1 and "the audio tower" in warnings[0]

    caplog.clear()
    monitor = CollapseMonitor(patience=3)
    for _ in range(10):
        monitor({m: varied for m in Modality}, {m: every for m in Modality})
    assert _collapse_warnings(caplog) == []

    # collapsed is relative to an even spread (1 / sqrt(D)): deviations of 1e-3 around one vector
    # (what a tower at a ruinous learning rate gave, its loss at ln(batch)) passed an absolute 1e-4;
    # a tenth of an even spread is a narrow batch, not a collapsed one
    noise = torch.randn(8, 16, generator=gen)
    for scale, collapsed in ((1e-3, True), (0.1 / 16**0.5, False)):
        caplog.clear()
        monitor = CollapseMonitor(patience=3)
        batch = torch.nn.functional.normalize(constant + scale * noise, dim=-1)
        for _ in range(3):
            monitor({Modality.IMAGE: batch}, {Modality.IMAGE: every})
        assert len(_collapse_warnings(caplog)) == collapsed


def test_collapse_warned_during_training(tiny_world, tmp_path, caplog):
    """Every training image the same file: the image tower's outputs cannot vary, and training
    says so within the monitor's patience; the towers whose inputs vary are not named."""
    import shutil

    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    rows = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()]
    (world / "train.jsonl").write_text("".join(json.dumps(r | {"image": rows[0]["image"]}) + "\n" for r in rows))
    caplog.set_level(logging.WARNING, logger="mmembed.train.align")
    steps = []
    cfg = load_config(tiny_config(world, tmp_path / "run", epochs=2))
    train_align(cfg, callbacks=[lambda event, trainer, info: steps.append(info["step"]) if event == "step" else None])
    warnings = _collapse_warnings(caplog)
    assert len(steps) == 6
    assert len(warnings) == 1 and "the image tower" in warnings[0] and "for 3 steps" in warnings[0]


def test_same_seed_same_loss_curve_and_loadable_run(tiny_world, tmp_path):
    curves = []
    for name in ("a", "b"):
        run = train_align(load_config(tiny_config(tiny_world, tmp_path / name, epochs=1)))
        curves.append([json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in l])
    assert len(curves[0]) == 51 // 16 and curves[0] == curves[1]
    import mmembed as mm

    model = mm.load(tmp_path / "a")
    for modality, items in [("text", ["a large blue star on the right"]),
                            ("image", [str(next((tiny_world / "images").glob("*.png")))]),
                            ("audio", [str(next((tiny_world / "audio").glob("*.wav")))])]:
        z = model.embed(modality, items)
        assert z.shape == (1, 32) and torch.allclose(z.norm(dim=-1), torch.ones(1), atol=1e-5)


def test_collapse_monitor_stops_after_its_limit_naming_the_tower_and_the_fix():
    from mmembed.modality import Modality
    from mmembed.train.collapse import CollapseMonitor, TowerCollapsed

    every = torch.ones(8, dtype=torch.bool)
    varied = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    constant = varied[:1].expand(8, -1)
    monitor = CollapseMonitor(patience=3, stop_after=5, lr=3e-3, warmup=30)
    for batch in (constant, constant, varied, constant, constant, constant, constant):  # a streak of 4
        monitor({Modality.IMAGE: batch, Modality.TEXT: varied}, {Modality.IMAGE: every, Modality.TEXT: every})
    with pytest.raises(TowerCollapsed) as caught:
        monitor({Modality.IMAGE: constant, Modality.TEXT: varied}, {Modality.IMAGE: every, Modality.TEXT: every})
    message = str(caught.value)
    assert "the image tower collapsed" in message and "5 batches in a row (by batch 8" in message
    assert "train.lr=0.003" in message and "Fix: train.lr=0.001" in message and "\n" not in message


def _collapse_on(monkeypatch, attempts: set[int], after: int = 1, streak: int | None = None) -> list[float]:
    """Make the align stage's monitor report a collapse `after` batches into each attempt in
    `attempts` (0 = the first), collapsed for its last `streak` batches (default: all of them);
    returns the learning rate of every attempt."""
    import mmembed.train.align as align
    from mmembed.modality import Modality
    from mmembed.train.collapse import CollapseMonitor, TowerCollapsed

    lrs: list[float] = []

    class Scripted(CollapseMonitor):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.attempt = len(lrs)
            lrs.append(kwargs["lr"])

        def __call__(self, embeddings, present):
            super().__call__(embeddings, present)
            if self.attempt in attempts and self.batches == after:
                raise TowerCollapsed(Modality.IMAGE, self.batches, streak or self.batches, 0.0, self.lr, self.warmup)

    monkeypatch.setattr(align, "CollapseMonitor", Scripted)
    return lrs


def test_a_run_that_collapses_before_its_first_checkpoint_restarts_at_a_third_of_the_lr(
        tiny_world, tmp_path, monkeypatch, caplog):
    lrs = _collapse_on(monkeypatch, attempts={0, 1})
    caplog.set_level(logging.WARNING, logger="mmembed.train.collapse")
    cfg = load_config(tiny_config(tiny_world, tmp_path / "run", epochs=1, lr=9e-3))
    run = train_align(cfg)
    assert lrs == pytest.approx([9e-3, 3e-3, 1e-3])
    restarts = [r.getMessage() for r in caplog.records if "restarting the stage" in r.getMessage()]
    assert len(restarts) == 2 and "train.lr=0.003 (restart 1 of at most 2)" in restarts[0]
    assert load_config(run / "config.yaml").train.lr == pytest.approx(1e-3)  # what the saved model was trained with
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 1 and steps == sorted(steps)  # one clean run's rows, not the failed attempts'
    assert (run / "model.safetensors").is_file()


def test_a_collapse_after_a_checkpoint_or_out_of_restarts_stops_with_one_line(tiny_world, tmp_path, monkeypatch):
    from mmembed.train.collapse import TowerCollapsed

    # checkpoint_every=2: steps 2 and 4 are saved; the collapse begins at batch 6, which step 4's weights ran
    _collapse_on(monkeypatch, attempts={0}, after=6, streak=1)
    cfg = load_config(tiny_config(tiny_world, tmp_path / "late", epochs=3))
    with pytest.raises(TowerCollapsed, match=r"image tower collapsed.*step_0000004.*--resume and a lower train.lr"):
        train_align(cfg)

    _collapse_on(monkeypatch, attempts={0, 1, 2})
    cfg = load_config(tiny_config(tiny_world, tmp_path / "always", epochs=1, collapse_restarts=1))
    with pytest.raises(TowerCollapsed, match=r"train.lr=0.001, .*Fix: train.lr=0.00033"):  # attempt 2 ran at 1e-3
        train_align(cfg)


class _NormedLinear(nn.Module):
    """A tower encoder with batch statistics, which a frozen tower must not update."""

    width = 8

    def __init__(self):
        super().__init__()
        self.lin, self.norm = nn.Linear(3, 8), nn.BatchNorm1d(8)

    def pooled(self, x, mask=None):
        return self.norm(self.lin(x))


def test_validation_leaves_a_frozen_tower_in_eval_mode():
    """The align stage keeps frozen towers in eval mode between steps; embedding the validation set
    restores each submodule's own mode, not the whole space's, so the next step does not update the
    frozen tower's BatchNorm statistics."""
    text, image = Modality.TEXT, Modality.IMAGE
    torch.manual_seed(0)
    space = SharedSpace({m: Tower(_NormedLinear(), nn.Linear(8, 8)) for m in (text, image)}, 8)
    space.train()
    frozen = space.towers["image"].eval()
    every = torch.ones(4, dtype=torch.bool)
    batch = Batch(inputs={text: torch.randn(4, 3), image: torch.randn(4, 3)}, masks={text: None, image: None},
                  present={text: every, image: every}, labels=torch.full((4,), -1), rows=torch.arange(4),
                  keys=[None] * 4)
    embed_dataset(space, [batch], torch.device("cpu"))
    assert space.training and space.towers["text"].training and not frozen.training
    stats = frozen.encoder.norm.running_mean.clone()
    space(batch.inputs, batch.masks, batch.present)
    assert torch.equal(frozen.encoder.norm.running_mean, stats)


def test_validation_keys_rows_as_mmembed_eval_does(caplog):
    """Labels are the keys only when every row has one (as `mmembed eval` decides): a manifest
    labelled in part was keyed by label for some rows and by line for others, so validation and
    `mmembed eval` scored the same rows differently."""
    text, image = Modality.TEXT, Modality.IMAGE
    torch.manual_seed(0)
    space = SharedSpace({m: Tower(_NormedLinear(), nn.Linear(8, 8)) for m in (text, image)}, 8).eval()
    every = torch.ones(4, dtype=torch.bool)

    def batch(keys):
        return Batch(inputs={text: torch.randn(4, 3), image: torch.randn(4, 3)}, masks={text: None, image: None},
                     present={text: every, image: every}, labels=torch.full((4,), -1), rows=torch.arange(4) + 1,
                     keys=keys)

    with caplog.at_level(logging.INFO, logger="mmembed.train.align"):
        _, keys = embed_dataset(space, [batch(["s1", "s1", None, "s2"])], torch.device("cpu"))
        assert keys[text] == keys[image] == ["line1", "line2", "line3", "line4"]
        _, keys = embed_dataset(space, [batch(["s1", "s1", "s3", "s2"])], torch.device("cpu"))
        assert keys[text] == ["s1", "s1", "s3", "s2"]
    said = [r.message for r in caplog.records if r.message.startswith("validation: recall matched by")]
    assert said[0].startswith("validation: recall matched by row") and said[1].startswith(  # the figures differ:
        "validation: recall matched by label")  # it said neither (`mmembed eval`'s table says which)


@pytest.mark.parametrize("tower, key, value, match", [
    ("text", "preprocess", {"max_length": 80}, "exceeds max_len"),
    ("image", "preprocess", {"size": 40}, "expected 32x32 images"),
])
def test_a_preprocess_the_encoder_cannot_take_is_refused_before_training(tiny_world, tmp_path, tower, key, value,
                                                                         match):
    """The sizes were never compared: training ran until the first caption (or clip) longer than
    the encoder takes, maybe hours in, and failed with a ValueError traceback."""
    import copy

    from mmembed.errors import ConfigError
    from tests.conftest import TINY_MODEL

    model = copy.deepcopy(TINY_MODEL)
    model["towers"][tower][key] = {**model["towers"][tower].get(key, {}), **value}
    cfg = load_config(tiny_config(tiny_world, tmp_path / "run", model=model, epochs=1))
    with pytest.raises(ConfigError, match=f"model.towers.{tower}: the encoder refuses the largest input .*{match}"):
        train_align(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_validation_rows_that_cannot_be_read_are_named_once(tiny_world, tmp_path, caplog):
    """They were dropped from every evaluation without a word, and the recall that early stopping
    and restore_best go by was measured on fewer rows."""
    import json
    import logging

    world = tmp_path / "world"
    world.mkdir()
    for entry in tiny_world.iterdir():
        (world / entry.name).symlink_to(entry)
    rows = [json.loads(line) for line in (tiny_world / "val.jsonl").read_text().splitlines()]
    rows[1]["image"] = "images/missing.png"
    (world / "val.jsonl").unlink()
    (world / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tiny_config(world, tmp_path / "run", epochs=1, eval_every=1)
    with caplog.at_level(logging.WARNING, logger="mmembed.train.align"):
        train_align(load_config(path))
    warned = [r.message for r in caplog.records if r.message.startswith("validation:")]
    evaluations = sum('"val/' in line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    assert evaluations >= 2 and len(warned) == 1
    assert "1 row(s) could not be read" in warned[0] and "missing.png" in warned[0]
    # the CLI prints the logger's name: the stage's lines keep theirs wherever their code lives
    assert {r.name for r in caplog.records if r.message.startswith("validation:")} == {"mmembed.train.align"}
