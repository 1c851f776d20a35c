"""The learning-rate range test: geometric rates, a suggestion read from the curve, a stop
where training fails, nothing written into the run folder, and the CLI's one line."""

import json
import math

import numpy as np
import pytest

from mmembed.cli import main
from mmembed.config import load_config
from mmembed.errors import UserError
from mmembed.train.find_lr import SMOOTHING, _failed, centred, find_lr, suggest
from tests.conftest import tiny_config


def test_suggest_is_the_steepest_fall_before_the_minimum():
    lrs = list(np.logspace(-6, 0, 61))
    # a logistic fall centred on 1e-3 (steepest there), a minimum at 1e-2, then a climb
    loss = [4 - 2 / (1 + math.exp(-3 * (math.log10(lr) + 3))) + (max(0.0, math.log10(lr) + 2) ** 2) for lr in lrs]
    assert suggest(lrs, loss) == pytest.approx(1e-3, rel=0.01)
    assert suggest(lrs, [5.0 - 0.01 * i for i in range(3)] + [6.0] * 10) is None  # lowest in the settling steps
    assert suggest(lrs[:1], []) is None and suggest(lrs[:2], [3.0, 2.0]) is None  # a first loss that overflowed


@pytest.mark.parametrize("steps", [20, 40, 100])
def test_the_suggestion_is_read_from_a_curve_without_lag(steps):
    """The one-sided moving average lags ~10 steps: read from it, the steepest fall of a curve
    falling fastest at 3.2e-4 came out 2.6x (100 steps) to 4.6x (20 steps) too high."""
    lrs = list(np.logspace(-6, 0, steps))
    loss = [4 - 2 / (1 + math.exp(-2 * (math.log10(lr) + 3.5))) for lr in lrs]
    one_sided, average = [], 0.0
    for i, x in enumerate(loss, 1):
        average = SMOOTHING * average + (1 - SMOOTHING) * x
        one_sided.append(average / (1 - SMOOTHING ** i))
    assert suggest(lrs, one_sided) > 2 * 10**-3.5  # the lag
    assert suggest(lrs, centred(loss)) == pytest.approx(10**-3.5, rel=0.35)  # within a step's factor
    assert len(centred([*loss, float("nan")])) == steps  # a final non-finite loss is left out


def test_the_test_stops_where_the_loss_climbs_back_or_blows_up():
    falling = [5.0, 4.9, 4.8, 4.0, 3.0, 2.0]
    assert not _failed(falling, falling)
    back = falling + [4.7, 4.8, 4.8]  # 90% of the way back to 4.0's start (4.0 at index 3)
    assert _failed(back, falling + [2.5, 3.0, 3.5])
    assert not _failed(falling + [4.7, 2.0, 2.0], falling + [2.2, 2.2, 2.2])  # one noisy step is not a failure
    assert _failed(falling + [float("nan")], falling + [float("nan")])
    assert _failed(falling + [9.0, 9.0, 9.0], falling + [3.0, 4.0, 5.0])  # > 4x the minimum
    # half the way back is a failure: beside the captioner's loss a collapse brings the total back
    # only part of the way (the demo's failure was read at 0.38, ten times past its collapse)
    assert _failed(falling + [3.3, 3.3, 3.3], falling + [2.2, 2.5, 2.8])


def test_find_lr_on_the_tiny_world_writes_its_curve_beside_the_run_folder(tiny_world, tmp_path):
    cfg = load_config(tiny_config(tiny_world, tmp_path / "run", epochs=1))
    f = find_lr(cfg, steps=12, lr_min=1e-5, lr_max=1e-1)
    assert 8 <= len(f.lrs) <= 12 and f.lrs[0] == pytest.approx(1e-5)
    ratios = np.diff(np.log(f.lrs))
    assert np.allclose(ratios, math.log(1e4) / 11)  # geometric: one factor per step, across epochs
    assert len(f.losses) == len(f.smoothed) == len(f.lrs) and all(math.isfinite(x) for x in f.losses)
    assert f.suggested is None or 1e-5 <= f.suggested <= 1e-1
    assert not (tmp_path / "run").exists()  # the run folder is untouched: a fresh run can still use it
    saved = json.loads((tmp_path / "run-find-lr" / "lr_find.json").read_text())
    assert [row["lr"] for row in saved["steps"]] == pytest.approx(f.lrs) and saved["suggested_lr"] == f.suggested
    assert (tmp_path / "run-find-lr" / "lr_find.png").stat().st_size > 0
    with pytest.raises(UserError, match="at least 8 steps"):
        find_lr(cfg, steps=3)


def test_find_lr_tests_the_objective_the_stage_trains(tiny_world, tmp_path):
    """With loss.caption_weight the align stage trains the captioner's loss too; the range test
    measured the contrastive loss alone (3.77 at the first step, where training logged 9.51)."""
    plain = find_lr(load_config(tiny_config(tiny_world, tmp_path / "a", epochs=1)), steps=8, lr_min=1e-7,
                    lr_max=1e-6)
    captioned = load_config(tiny_config(tiny_world, tmp_path / "b", epochs=1),
                            ["loss.caption_weight=1.0", "loss.captioner={width: 16, layers: 1, heads: 2, soft_tokens: 2}"])
    with_captions = find_lr(captioned, steps=8, lr_min=1e-7, lr_max=1e-6)
    assert with_captions.losses[0] > plain.losses[0] + 1.0  # the caption loss, ln(300 tokens) at the start


def test_batches_with_nothing_to_learn_are_one_line(tiny_world, tmp_path):
    """Batches of one row have no pair: 100 steps of loss 0.0 and "the loss never fell"."""
    with pytest.raises(UserError, match="no batch had anything to learn from .*raise train.batch_size"):
        find_lr(load_config(tiny_config(tiny_world, tmp_path / "a", epochs=1, batch_size=1)), steps=8)


def test_cli_find_lr_prints_one_line(tiny_world, tmp_path, capsys):
    path = tiny_config(tiny_world, tmp_path / "cli", epochs=1)
    assert main(["train", str(path), "--find-lr", "--find-lr-steps", "10"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and ("suggested train.lr=" in out[0] or "never fell" in out[0]) and "lr_find.png" in out[0]


def test_a_collapsed_tower_ends_the_test_where_the_collapse_began(tiny_world, tmp_path, monkeypatch):
    """A collapse settles the loss at ln(batch), below its start: the loss alone never flagged it,
    and the test reported the collapsed plateau as its lowest loss and "no failure"."""
    import torch

    import mmembed.train.align as align_module  # the range test's step is built there (one_process_step)
    from mmembed.modality import Modality

    real = align_module.make_step_fn
    calls = []

    def collapsing_after_five(space, loss_fn, device, skips, monitor, *rest):
        def seen(embeddings, present):  # from the 6th step on, the image tower gives one vector for all
            calls.append(1)
            if len(calls) > 5:
                embeddings = {**embeddings, Modality.IMAGE: torch.zeros_like(embeddings[Modality.IMAGE])}
            monitor(embeddings, present)

        return real(space, loss_fn, device, skips, seen, *rest)

    monkeypatch.setattr(align_module, "make_step_fn", collapsing_after_five)
    cfg = load_config(tiny_config(tiny_world, tmp_path / "run", epochs=1), ["train.collapse_steps=4"])
    f = find_lr(cfg, steps=30, lr_min=1e-5, lr_max=1e-1)
    assert len(f.lrs) == 8 and f.ceiling == pytest.approx(f.lrs[5])  # steps 6–9 collapsed; the 9th raised


def test_data_that_yields_no_batch_is_one_error_not_a_hang(tiny_world, tmp_path):
    import shutil

    world = tmp_path / "world"
    shutil.copytree(tiny_world, world, ignore=shutil.ignore_patterns("images", "audio"))  # a wrong data.root
    cfg = load_config(tiny_config(world, tmp_path / "run", epochs=1))
    with pytest.raises(UserError, match="no batch of the training data could be used"):
        find_lr(cfg, steps=10)


def test_an_out_dir_of_dot_is_resolved(tiny_world, tmp_path, monkeypatch):
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    cfg = load_config(tiny_config(tiny_world, tmp_path / "unused", epochs=1), ["train.out_dir=."])
    f = find_lr(cfg, steps=8)  # was ValueError: PosixPath('.') has an empty name, after the whole sweep
    assert f.folder == tmp_path / "here-find-lr" and (f.folder / "lr_find.json").is_file()
