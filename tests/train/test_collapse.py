"""The collapse error's advice: which checkpoint to resume, counted in the monitor's batches."""

import pytest

from mmembed.config import load_config
from mmembed.train.align import train_align
from mmembed.train.collapse import TowerCollapsed
from tests.conftest import tiny_config
from tests.train.test_align import _collapse_on


def _advice(monkeypatch, tiny_world, out_dir, after: int, streak: int, **train) -> str:
    """The error of a run whose image tower collapsed for the last `streak` of its first `after`
    batches. The tiny world's 51 rows make 3 batches of 16 an epoch; a checkpoint every step."""
    _collapse_on(monkeypatch, attempts={0}, after=after, streak=streak)
    cfg = load_config(tiny_config(tiny_world, out_dir, **{"epochs": 3, "checkpoint_every": 1, **train}))
    with pytest.raises(TowerCollapsed) as caught:
        train_align(cfg)
    message = str(caught.value)
    assert "image tower collapsed" in message and "\n" not in message
    return message


def test_the_collapse_error_names_the_newest_checkpoint_from_before_the_collapse(tiny_world, tmp_path, monkeypatch):
    """It advised resuming the last checkpoint, saved mid-streak: that run collapsed again and got the same advice."""
    # batches 4..7 collapsed: step 2's weights ran batch 3 (fine), those of steps 3 to 6 collapsed ones
    message = _advice(monkeypatch, tiny_world, tmp_path / "mid", after=7, streak=4)
    assert "step_0000002: move the later ones (step_0000003, step_0000004, step_0000005, step_0000006)" in message
    assert "--resume and a lower train.lr" in message


def test_the_collapse_error_says_to_start_over_when_every_checkpoint_is_collapsed(tiny_world, tmp_path, monkeypatch):
    """A run collapsed since its first batch was told to resume its (collapsed) last checkpoint."""
    message = _advice(monkeypatch, tiny_world, tmp_path / "all", after=7, streak=7)
    assert "start over with --overwrite and a lower train.lr" in message
    assert "--resume" not in message and "step_0000" not in message


def test_the_collapse_advice_counts_micro_batches_under_accumulation(tiny_world, tmp_path, monkeypatch):
    """The monitor counts micro-batches, checkpoints count steps: with accum_steps=2, step 4 ends at batch 8."""
    # one step (2 batches) an epoch: step s ends at batch 2s. Batches 6..9 collapsed, so steps 1 and 2
    # predate the collapse; read as batches, steps 3 and 4 would too
    message = _advice(monkeypatch, tiny_world, tmp_path / "accum", after=9, streak=4, accum_steps=2, epochs=5)
    assert "step_0000002: move the later ones (step_0000003, step_0000004)" in message
