"""The learning-rate range test: geometric rates, a suggestion read from the curve, a stop
where training fails, nothing written into the run folder, and the CLI's one line."""

import json
import math

import numpy as np
import pytest

from mmembed.cli import main
from mmembed.config import load_config
from mmembed.errors import UserError
from mmembed.train.find_lr import (SMOOTHING, _failed, centred, chance_ratios, collapse_patience, find_lr,
                                   lowest_rate, suggest)
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


def _collapse_after(monkeypatch, healthy: int) -> None:
    """From step `healthy` + 1 on, the image tower gives one vector for every input."""
    import torch

    import mmembed.train.align_step as align_module  # the range test's step is built there (one_process_step)
    from mmembed.modality import Modality

    real = align_module.make_step_fn
    calls = []

    def collapsing(space, loss_fn, device, skips, monitor, *rest):
        def seen(embeddings, present):
            calls.append(1)
            if len(calls) > healthy:
                embeddings = {**embeddings, Modality.IMAGE: torch.zeros_like(embeddings[Modality.IMAGE])}
            monitor(embeddings, present)

        return real(space, loss_fn, device, skips, seen, *rest)

    monkeypatch.setattr(align_module, "make_step_fn", collapsing)


def test_a_collapsed_tower_ends_the_test_where_the_collapse_began(tiny_world, tmp_path, monkeypatch):
    """A collapse settles the loss at ln(batch), below its start: the loss alone never flagged it,
    and the test reported the collapsed plateau as its lowest loss and "no failure"."""
    _collapse_after(monkeypatch, 5)
    cfg = load_config(tiny_config(tiny_world, tmp_path / "run", epochs=1), ["train.collapse_steps=4"])
    f = find_lr(cfg, steps=40, lr_min=1e-5, lr_max=1e-1)
    assert len(f.lrs) == 8 and f.ceiling == pytest.approx(f.lrs[5])  # steps 6–9 collapsed; the 9th raised


def test_a_short_test_stops_at_a_collapse_it_warned_about(tiny_world, tmp_path, monkeypatch):
    """train.collapse_steps (10) collapsed steps outlasted a 30-step test: the towers collapsed,
    the warning fired, and the test reported no ceiling and the collapsed plateau as the lowest loss."""
    _collapse_after(monkeypatch, 23)
    cfg = load_config(tiny_config(tiny_world, tmp_path / "run", epochs=1))  # collapse_steps 10, the default
    f = find_lr(cfg, steps=30, lr_min=1e-5, lr_max=1e-1)
    assert len(f.lrs) == 25 and f.ceiling == pytest.approx(f.lrs[23])  # a tenth of 30 steps: the 3rd raised
    assert collapse_patience(10, 30) == 3 and collapse_patience(10, 100) == 10 and collapse_patience(4, 1000) == 4
    assert f.lowest < f.ceiling  # not the collapsed plateau


def test_a_collapse_the_test_ends_inside_is_its_ceiling(tiny_world, tmp_path, monkeypatch):
    """A collapse warned about in the last steps, too few to stop the test, left it without a ceiling."""
    _collapse_after(monkeypatch, 37)
    cfg = load_config(tiny_config(tiny_world, tmp_path / "run", epochs=1))
    f = find_lr(cfg, steps=40, lr_min=1e-6, lr_max=1e-3)  # 4 collapsed steps stop it: 3 are warned about
    assert len(f.lrs) == 40 and f.ceiling == pytest.approx(f.lrs[37]) and f.lowest < f.ceiling


def test_the_lowest_loss_is_read_from_a_curve_without_lag():
    """"lowest loss at" was the one-sided moving average's minimum, which lags: 3.3e-3 for a loss
    whose minimum is at 1e-3 (the suggestion beside it was already read without the lag)."""
    lrs = list(np.logspace(-6, 0, 100))
    loss = [2 + (math.log10(lr) + 3) ** 2 / 4 for lr in lrs]
    one_sided, average = [], 0.0
    for i, x in enumerate(loss, 1):
        average = SMOOTHING * average + (1 - SMOOTHING) * x
        one_sided.append(average / (1 - SMOOTHING ** i))
    assert lrs[int(np.argmin(one_sided))] > 3e-3  # the lag
    assert lowest_rate(lrs, loss) == pytest.approx(1e-3, rel=0.15)  # within a step's factor (1.15)
    assert lowest_rate(lrs[:3], [3.0, 2.0, float("inf")]) == lrs[1] and lowest_rate(lrs[:1], [math.nan]) == lrs[0]
    assert lowest_rate(lrs, loss, ceiling=lrs[40]) == lrs[39]  # a collapsed plateau above the ceiling is no minimum


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


def _first_failure(curve: list[float], rows: int = 16) -> int | None:
    """The step at which the range test stops on an InfoNCE pair's loss `curve` (None: never), with
    the smoothing and the chance ratios the test keeps."""
    losses, smoothed, chance, average = [], [], [], 0.0
    for i, loss in enumerate(curve):
        average = SMOOTHING * average + (1 - SMOOTHING) * loss
        losses.append(loss)
        smoothed.append(average / (1 - SMOOTHING ** (i + 1)))
        chance.append({"loss/image-text": loss / math.log(rows)})
        if _failed(losses, smoothed, chance):
            return i
    return None


def test_a_loss_settling_back_at_chance_from_below_is_a_failure():
    """InfoNCE starts above ln(batch) (3.56 against ln 16 = 2.77) and a collapse settles at ln(batch):
    never half-way back to the start, so 20 steps at chance were reported as "no failure up to 1"."""
    rng = np.random.default_rng(0)
    chance = math.log(16)
    fall = list(np.linspace(3.56, 2.45, 30) + rng.normal(0, 0.05, 30))  # through chance, then below it
    collapsed = fall + [chance + rng.normal(0, 0.002) for _ in range(20)]
    assert _first_failure(collapsed) == 32  # the third step back at chance
    assert _first_failure(fall + list(np.linspace(2.45, 1.5, 20) + rng.normal(0, 0.05, 20))) is None  # still falling
    # a pair falling slowly through chance from its start above it has not come back to it
    assert _first_failure(list(np.linspace(2.85, 2.70, 30))) is None
    # the loss alone missed it: the total never climbed back half-way to its start
    smoothed = centred(collapsed)
    assert not _failed(collapsed, smoothed)


def test_the_chance_ratio_of_a_collapsed_pair_is_one():
    """The level a collapsed pair's InfoNCE loss settles at, read by the range test: ln(rows with
    both modalities), less the candidates that share a row's label with loss.label_positives."""
    import torch

    from mmembed.data.collate import Batch
    from mmembed.losses import ContrastiveLoss
    from mmembed.modality import Modality

    text, image = Modality.TEXT, Modality.IMAGE
    torch.manual_seed(0)
    present = {text: torch.ones(12, dtype=torch.bool), image: torch.arange(12) % 4 != 0}  # 9 rows with both
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, -1])
    # scores all alike, where a collapsed pair settles (the repro's sat at ln 16 ± 0.001)
    embeddings = {m: torch.nn.functional.normalize(torch.ones(12, 8), dim=-1) for m in (text, image)}
    batch = Batch(inputs={}, masks={}, present=present, labels=labels, rows=torch.arange(12), keys=[None] * 12)
    for label_positives in (False, True):
        out = ContrastiveLoss(label_positives=label_positives)(embeddings, present, torch.tensor(14.3), labels)
        metrics = {f"loss/{k}": float(v) for k, v in out.per_pair.items()}
        ratios = chance_ratios(metrics, batch, label_positives)
        assert ratios == {"loss/image-text": pytest.approx(1.0, abs=1e-5)}
    assert float(out.per_pair["image-text"]) < math.log(9) - 0.05  # label positives lower the chance level


@pytest.mark.parametrize("override, message", [
    ("model.towers.text.encoder_args.widht=64", r"model\.towers\.text\.encoder_args.*widht"),
    ("model.init_towers=[imag]", r"^model\.init_towers: 'imag' is not one of model\.towers"),
    ("model.towers.text.encoder_args.heads=3", r"^model\.towers\.text: width 32 is not divisible by heads=3$"),
])
def test_find_lr_checks_the_config_before_any_work(tiny_world, tmp_path, monkeypatch, override, message):
    """--find-lr skipped the preflight: a misspelt key was found after the world was made and the tokenizer
    trained, and init_towers=[imag] was taken without a word."""
    import mmembed.train.find_lr as find_lr_module
    from mmembed.errors import ConfigError

    monkeypatch.setattr(find_lr_module, "prepare_data", lambda *a, **k: pytest.fail("worked past a bad config"))
    with pytest.raises(ConfigError, match=message):
        find_lr(load_config(tiny_config(tiny_world, tmp_path / "run", epochs=1), [override]), steps=8)


def test_find_lr_and_a_sweeps_rungs_check_the_align_stage_alone(tiny_world, tmp_path, monkeypatch):
    """The range test and a towers sweep train the align stage only: a config whose decoder section names
    an instruction manifest not written yet was refused by them (it ran before the preflight grew)."""
    import mmembed.train.find_lr as find_lr_module
    from mmembed.insight import tower_scaling

    class Reached(Exception):
        pass

    def reached(*args, **kwargs):
        raise Reached

    decoder = ["decoder={width: 32, layers: 1, heads: 2, context: 96}", "decoder.data.train=not-yet.jsonl"]
    cfg = load_config(tiny_config(tiny_world, tmp_path / "run", epochs=1), decoder)
    monkeypatch.setattr(find_lr_module, "prepare_data", reached)
    monkeypatch.setattr(tower_scaling, "prepare_data", reached)
    for run in (lambda: find_lr(cfg, steps=8), lambda: tower_scaling.check_data(cfg)):
        with pytest.raises(Reached):  # past the checks, to the data
            run()


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_the_range_test_steps_under_the_runs_precision(tiny_world, tmp_path, monkeypatch, precision):
    """train.precision=bf16 trains under bf16 autocast, yet the range test stepped in fp32."""
    import torch

    import mmembed.train.find_lr as find_lr_module

    real, seen = find_lr_module.one_process_step, []

    def recording(*args, **kwargs):
        trained, step_fn = real(*args, **kwargs)

        def step(batch):
            on = torch.is_autocast_enabled("cpu")
            seen.append((on, torch.get_autocast_dtype("cpu") if on else None))
            return step_fn(batch)

        return trained, step

    monkeypatch.setattr(find_lr_module, "one_process_step", recording)
    cfg = load_config(tiny_config(tiny_world, tmp_path / "run", epochs=1), [f"train.precision={precision}"])
    f = find_lr(cfg, steps=8, lr_min=1e-6, lr_max=1e-4)
    assert len(seen) >= 8 and all(math.isfinite(x) for x in f.losses)
    assert set(seen) == ({(True, torch.bfloat16)} if precision == "bf16" else {(False, None)})
