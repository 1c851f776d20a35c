"""Keep the best: with validation, a run ends with the best checkpoint's weights (bit for bit),
that checkpoint survives pruning and resume, and without validation nothing changes.

The toy runs script their validation metric by step, peaking early and then falling — the
overfitting curve the feature exists for (recall@1 0.989 at epoch 15, 0.936 at epoch 60)."""

import json
import logging
import math

import pytest
import torch

from mmembed.checkpoint import load_tensors, save_tensors
from mmembed.config_train import TrainConfig
from mmembed.train.engine import StepOutput, Trainer
from mmembed.train.metrics import lower_is_better
from mmembed.train.state import CKPT_DIR, checkpoint_dir
from tests.train.test_engine import BS, N, Toy, _data, _make_loader

STEPS = 2 * N // BS  # two epochs of the toy problem


def peak_at_4(step: int) -> float:
    return 0.9 - 0.05 * abs(step - 4)  # 0.8 at step 2, 0.9 at 4, then down to 0.3 at step 16


def _fit(run_dir, script=peak_at_4, metric="recall@1", validate=True, resume=False, callbacks=(), key=None,
         also=lambda step: {}, **cfg):
    """Train the toy for two epochs, evaluating every 2 steps (`script(step)` under `key`, by
    default the early-stop metric); returns (module, trainer, result)."""
    torch.manual_seed(0)
    model = Toy()
    x, y = _data()

    def step(batch):
        xb, yb, _ = batch
        return StepOutput(((model(xb) - yb) ** 2).mean(), {}, samples=len(xb))

    config = TrainConfig(**{"batch_size": BS, "epochs": 2, "lr": 3e-2, "warmup_steps": 2, "eval_every": 2, "checkpoint_every": 3,
                            "keep_last": 1, "log_every": 1, "early_stop_metric": metric, "early_stop_patience": None,
                            **cfg})
    trainer = Trainer(model, step, _make_loader(x, y), N // BS, config, run_dir, callbacks=list(callbacks))
    if validate:
        trainer.evaluate = lambda: {key or metric: script(trainer.progress.step), "other": 0.5,
                                    **also(trainer.progress.step)}
    return model, trainer, trainer.fit(resume=resume)


def _weights(module, path) -> bytes:
    """The module's weights as the stage would save them (save_tensors of the state dict)."""
    save_tensors(path, module.state_dict())
    return path.read_bytes()


def _ckpt(run_dir, step) -> bytes:
    return (checkpoint_dir(run_dir, step) / "model.safetensors").read_bytes()


def _folders(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / CKPT_DIR).iterdir())


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def test_a_run_that_peaks_early_ends_with_the_best_weights_and_keeps_that_checkpoint(tmp_path, caplog):
    run = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="mmembed.train"):
        model, _, result = _fit(run)
    assert (result.stopped_because, result.progress.step) == ("finished", STEPS)
    assert (result.best_step, result.best_metric, result.weights_step) == (4, 0.9, 4)
    # keep_last=1: the last checkpoint, plus the best one that pruning would otherwise delete
    assert _folders(run) == ["step_0000004", f"step_{STEPS:07d}"]
    final = _weights(model, tmp_path / "final.safetensors")
    assert final == _ckpt(run, 4)  # bit-identical to the best checkpoint
    assert final != _ckpt(run, STEPS)  # and not the last weights, which the last checkpoint keeps
    assert "restored the best checkpoint: step 4, recall@1 = 0.9 (last: 0.3)" in caplog.text
    rows = _rows(run)
    assert [r["step"] for r in rows if "val/recall@1" in r] == list(range(2, STEPS + 1, 2))
    assert rows[-1] == {"step": STEPS, "epoch": 2, "best_step": 4, "best/recall@1": 0.9, "weights_step": 4}


def test_early_stopping_restores_the_best_not_the_step_it_stopped_at(tmp_path):
    model, _, result = _fit(tmp_path / "run", early_stop_patience=3)
    # evaluations at steps 6, 8 and 10 are worse than step 4's: stop at 10, end with step 4
    assert (result.stopped_because, result.progress.step, result.weights_step) == ("early stop", 10, 4)
    assert _folders(tmp_path / "run") == ["step_0000004", "step_0000010"]
    assert _weights(model, tmp_path / "final.safetensors") == _ckpt(tmp_path / "run", 4)
    # resuming it (as `mmembed train --resume` does when a later stage crashed) trains no further
    rows = _rows(tmp_path / "run")
    model, _, again = _fit(tmp_path / "run", early_stop_patience=3, resume=True)
    assert (again.stopped_because, again.progress.step, again.weights_step) == ("early stop", 10, 4)
    assert _weights(model, tmp_path / "again.safetensors") == _ckpt(tmp_path / "run", 4)
    assert _rows(tmp_path / "run") == rows


class _Crash(Exception):
    pass


def test_a_crashed_run_resumes_with_its_best_and_ends_as_the_uninterrupted_run(tmp_path):
    ref_model, _, _ = _fit(tmp_path / "ref")
    ref = _weights(ref_model, tmp_path / "ref.safetensors")

    def crash(event, trainer, info):
        if event == "checkpoint" and trainer.progress.step == 9:
            raise _Crash

    run = tmp_path / "run"
    with pytest.raises(_Crash):
        _fit(run, callbacks=[crash])
    assert _folders(run) == ["step_0000004", "step_0000009"]  # the best survived pruning before the crash
    model, _, result = _fit(run, resume=True)
    assert (result.best_step, result.best_metric, result.weights_step) == (4, 0.9, 4)
    assert _folders(run) == ["step_0000004", f"step_{STEPS:07d}"]  # and after the resume
    assert _weights(model, tmp_path / "final.safetensors") == ref == _ckpt(run, 4)
    assert _rows(run)[-1] == _rows(tmp_path / "ref")[-1]
    assert sum("weights_step" in r for r in _rows(run)) == 1


def test_a_run_stopped_by_max_steps_resumes_from_its_last_weights_and_still_restores_the_best(tmp_path):
    run = tmp_path / "run"
    model, _, first = _fit(run, max_steps=10)
    assert (first.stopped_because, first.weights_step) == ("step budget", 4)
    assert _weights(model, tmp_path / "first.safetensors") == _ckpt(run, 4)
    # the last checkpoint holds the last weights (a resume continues training from them), not the best
    assert _ckpt(run, 10) != _ckpt(run, 4)
    model, _, result = _fit(run, resume=True)  # more steps: the whole two epochs
    assert (result.progress.step, result.best_step, result.weights_step) == (STEPS, 4, 4)
    assert _folders(run) == ["step_0000004", f"step_{STEPS:07d}"]
    assert _weights(model, tmp_path / "final.safetensors") == _ckpt(run, 4)
    rows = _rows(run)
    assert [r["step"] for r in rows if "weights_step" in r] == [STEPS]  # the first run's end row was replaced
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))


def test_restore_best_off_keeps_the_last_weights_but_still_keeps_the_best_checkpoint(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="mmembed.train"):
        model, _, result = _fit(tmp_path / "run", restore_best=False)
    assert (result.best_step, result.weights_step) == (4, STEPS)
    assert _folders(tmp_path / "run") == ["step_0000004", f"step_{STEPS:07d}"]
    assert _weights(model, tmp_path / "final.safetensors") == _ckpt(tmp_path / "run", STEPS)
    assert f"kept the last weights (step {STEPS}, recall@1 = 0.3); the best was step 4" in caplog.text


def test_pruning_keeps_the_newest_and_the_best_and_orders_by_step(tmp_path):
    """keep_last=0 keeps the best and the newest (a resume starts there); past step 9,999,999 the
    folder names grow a digit and must still sort by step."""
    from mmembed.train.state import latest_checkpoint, prune_checkpoints

    def folder(step):
        path = checkpoint_dir(tmp_path, step)
        path.mkdir(parents=True)
        for name in ("model.safetensors", "trainer.safetensors", "trainer.json"):
            (path / name).write_text("x")
        return path

    best = folder(20)
    for step in (10, 30, 9_999_000, 10_000_000):
        folder(step)
    assert latest_checkpoint(tmp_path).name == "step_10000000"
    prune_checkpoints(tmp_path, keep_last=0, keep={best})
    assert _folders(tmp_path) == ["step_0000020", "step_10000000"]


def test_without_validation_the_last_weights_and_only_the_last_checkpoints(tmp_path):
    model, _, result = _fit(tmp_path / "run", validate=False, keep_last=2)
    assert (result.best_step, result.best_metric, result.weights_step) == (None, None, STEPS)
    assert _folders(tmp_path / "run") == [f"step_{STEPS - 1:07d}", f"step_{STEPS:07d}"]
    assert _weights(model, tmp_path / "final.safetensors") == _ckpt(tmp_path / "run", STEPS)
    assert not any("weights_step" in r for r in _rows(tmp_path / "run"))


def test_a_metric_the_evaluation_does_not_return_warns_once_and_keeps_the_last_weights(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mmembed.train.engine"):
        model, _, result = _fit(tmp_path / "run", key="recall@5")
    assert (result.best_step, result.weights_step) == (None, STEPS)
    assert caplog.text.count("'recall@1' is not among the validation metrics (other, recall@5)") == 1
    assert _weights(model, tmp_path / "final.safetensors") == _ckpt(tmp_path / "run", STEPS)


def test_a_loss_metric_is_minimised_and_a_nan_value_is_never_the_best(tmp_path):
    def valley_at_6(step):  # NaN first (a NaN best would block every later value), then a valley
        return math.nan if step == 2 else 0.2 + 0.05 * abs(step - 6)

    model, _, result = _fit(tmp_path / "run", script=valley_at_6, metric="loss")
    assert (result.best_step, result.weights_step) == (6, 6)
    assert result.best_metric == pytest.approx(0.2)
    assert _weights(model, tmp_path / "final.safetensors") == _ckpt(tmp_path / "run", 6)
    assert [lower_is_better(m) for m in ("loss", "val_loss", "loss/text-image", "median_rank", "mean_rank",
                                         "recall@1", "answer_accuracy", "image-text/recall@1")
            ] == [True] * 5 + [False] * 3


def test_align_and_decoder_stages_save_their_best_checkpoints_weights(tiny_world, tmp_path, monkeypatch):
    """Both stages through the real pipeline, their validation scripted to peak early: the run's
    model.safetensors and decoder.safetensors are the best checkpoints' tensors, bit for bit."""
    import mmembed as mm
    import mmembed.train.align as align
    import mmembed.train.decoder as decoder
    from mmembed.decoder import DECODER_DIR, DECODER_WEIGHTS
    from mmembed.train import train
    from tests.train.test_decoder_stage import DECODER, decoder_config

    recalls = iter([0.7, 0.9, 0.6])  # align: epoch ends at steps 3, 6, 9
    monkeypatch.setattr(align, "mean_recall", lambda report: {"recall@1": next(recalls)})
    accuracies = iter([0.3, 0.7, 0.5, 0.2])  # decoder: steps 2, 4, 6, 8
    monkeypatch.setattr(decoder, "evaluate_answers", lambda *a, **k: {"answer_accuracy": next(accuracies)})
    run = tmp_path / "run"
    cfg = decoder_config(tiny_world, run, train={**DECODER["train"], "eval_every": 2, "checkpoint_every": 3,
                                                 "keep_last": 1})
    cfg.train.epochs, cfg.train.keep_last = 3, 1
    train(cfg)

    assert _folders(run) == ["step_0000006", "step_0000009"]
    assert (run / "model.safetensors").read_bytes() == _ckpt(run, 6)
    assert (run / "model.safetensors").read_bytes() != _ckpt(run, 9)
    assert _rows(run)[-1]["weights_step"] == 6

    dec = run / DECODER_DIR
    assert _folders(dec) == ["step_0000004", "step_0000008"]
    saved, best, last = (load_tensors(p) for p in (run / DECODER_WEIGHTS, checkpoint_dir(dec, 4) / "model.safetensors",
                                                   checkpoint_dir(dec, 8) / "model.safetensors"))
    assert saved.keys() <= best.keys() and all(_bitwise_equal(saved[k], best[k]) for k in saved)
    assert not all(_bitwise_equal(saved[k], last[k]) for k in saved)
    assert _rows(dec)[-1]["weights_step"] == 4
    assert mm.load(run).prompt_model is not None  # the run with its restored weights loads


def test_a_resume_does_not_evaluate_the_last_evaluated_step_again(tmp_path):
    """The step a checkpoint follows the evaluation of was evaluated again after a resume: one more
    evaluation without improvement, so early stopping came sooner than in an uninterrupted run."""
    def trainer(run, callbacks=()):
        torch.manual_seed(0)
        model = Toy()
        x, y = _data()
        state = {}

        def step(b):
            xb, yb, _ = b
            return StepOutput(((model(xb) - yb) ** 2).mean(), {}, samples=len(xb))

        def evaluate():  # worse at every evaluation after the first: it never improves
            return {"recall@1": 1.0 / (1 + state["t"].progress.step)}

        cfg = TrainConfig(batch_size=BS, epochs=3, lr=3e-2, warmup_steps=2, checkpoint_every=4, eval_every=4,
                          early_stop_patience=100, log_every=1, keep_last=100)
        state["t"] = Trainer(model, step, _make_loader(x, y), N // BS, cfg, run, evaluate=evaluate,
                             callbacks=list(callbacks))
        return state["t"]

    whole = trainer(tmp_path / "a").fit()

    def crash(event, t, info):
        if event == "checkpoint" and t.progress.step == whole.progress.step:  # after the last step's evaluation
            raise _Crash

    with pytest.raises(_Crash):
        trainer(tmp_path / "b", [crash]).fit()
    resumed = trainer(tmp_path / "b").fit(resume=True)

    def evaluated(run):
        return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if "val/recall@1" in line]

    assert evaluated(tmp_path / "b") == evaluated(tmp_path / "a")
    assert resumed.progress.evals_since_best == whole.progress.evals_since_best


def test_a_copied_checkpoint_folder_is_not_a_checkpoint(tmp_path):
    """`step_0000004.bak` beside the checkpoints was int("0000004.bak"): resume and every prune crashed."""
    import shutil

    from mmembed.train.state import latest_checkpoint, prune_checkpoints

    root = tmp_path / CKPT_DIR
    for step in (2, 4):
        folder = root / f"step_{step:07d}"
        folder.mkdir(parents=True)
        for name in ("model.safetensors", "trainer.safetensors", "trainer.json"):
            (folder / name).write_text("x")
    shutil.copytree(root / "step_0000004", root / "step_0000004.bak")
    assert latest_checkpoint(tmp_path).name == "step_0000004"
    prune_checkpoints(tmp_path, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["step_0000004", "step_0000004.bak"]


def test_a_stages_own_state_is_checkpointed_and_restored(tmp_path):
    """The collapse monitor's streaks were not in the checkpoint: a run killed mid-streak and resumed
    trained past the step where an uninterrupted one stops."""
    from mmembed.modality import Modality
    from mmembed.train.collapse import CollapseMonitor

    monitor = CollapseMonitor(stop_after=6)
    flat = {Modality.TEXT: torch.zeros(4, 3)}
    for _ in range(4):
        monitor(flat, {Modality.TEXT: torch.ones(4, dtype=torch.bool)})
    again = CollapseMonitor(stop_after=6)
    again.load_state_dict(json.loads(json.dumps(monitor.state_dict())))  # through trainer.json
    assert (again.streak, again.warned, again.batches) == (monitor.streak, monitor.warned, monitor.batches)

    class Counter:
        def __init__(self):
            self.n = 0

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, state):
            self.n = state["n"]

    def trainer(counter, callbacks=()):
        torch.manual_seed(0)
        model = Toy()
        x, y = _data()

        def step(b):
            counter.n += 1
            xb, yb, _ = b
            return StepOutput(((model(xb) - yb) ** 2).mean(), {}, samples=len(xb))

        cfg = TrainConfig(batch_size=BS, epochs=1, lr=1e-2, warmup_steps=1, checkpoint_every=3, log_every=1)
        return Trainer(model, step, _make_loader(x, y), N // BS, cfg, tmp_path, stateful=counter,
                       callbacks=list(callbacks))

    def crash(event, t, info):
        if event == "checkpoint" and t.progress.step == 6:
            raise _Crash

    with pytest.raises(_Crash):
        trainer(Counter(), [crash]).fit()
    resumed = Counter()
    trainer(resumed).fit(resume=True)
    assert resumed.n == N // BS  # 6 counted before the crash, restored, then the last 2


def test_a_tied_metric_goes_to_the_lower_validation_loss(tmp_path):
    """The decoder's exact-answer accuracy stays at 0 for a while on long answers: every tie lost to
    the first evaluation, whose weights were kept (the worst by validation loss), and patience ran
    out while the loss was still falling."""
    def loss(step: int) -> dict[str, float]:
        return {"loss": 5.0 - 0.2 * step if step <= 8 else 3.4 + 0.1 * (step - 8)}  # lowest at step 8

    model, _, result = _fit(tmp_path / "run", script=lambda step: 0.0, metric="answer_accuracy", also=loss,
                            early_stop_patience=3)
    assert (result.stopped_because, result.progress.step) == ("early stop", 14)  # 10, 12, 14: no lower loss
    assert (result.best_step, result.best_metric, result.weights_step) == (8, 0.0, 8)
    assert result.progress.best_loss == pytest.approx(3.4)
    assert _weights(model, tmp_path / "final.safetensors") == _ckpt(tmp_path / "run", 8)
    _, _, result = _fit(tmp_path / "no-loss", script=lambda step: 0.0, metric="answer_accuracy")
    assert result.best_step == 2  # without a loss to break it, the first of the ties stays
