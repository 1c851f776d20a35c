"""The engine's checkpoints and validation: each evaluation tracks the best `early_stop_metric`
(early stopping; its checkpoint is restored at the end), rank 0 writes checkpoints holding every
rank's RNG and stage state, and a resume continues the latest on any number of processes.

These are the Trainer's steps around its loop (engine.py); the checkpoint folder itself is
state.py's, and what the run reports when it ends is engine_reports.py's.
"""

from __future__ import annotations

import errno
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from mmembed.errors import UserError
from mmembed.train.collectives import all_gather_objects, broadcast_object
from mmembed.train.metrics import better, lower_is_better, same_value
from mmembed.train.optim import hyperparameters, restore_hyperparameters
from mmembed.train.state import (Progress, checkpoint_dir, load_checkpoint, prune_checkpoints, restore_best,
                                 resume_checkpoint, rng_state, save_checkpoint)

if TYPE_CHECKING:
    from mmembed.train.engine import Trainer

log = logging.getLogger("mmembed.train.engine")  # the engine's lines keep their logger name (as run_log.py's)


def evaluate_and_check(trainer: Trainer) -> tuple[bool, bool]:
    """Evaluate, log, track the best value. Returns (improved, stop): a new best, which the
    caller checkpoints (before anything else moves), and whether early stopping triggers."""
    if trainer.evaluate is None:
        return False, False
    trainer.progress.last_eval_step = trainer.progress.step
    if trainer.sharded is not None:  # running a sharded unit is a collective: every rank evaluates
        with trainer.sharded.gathered():
            metrics = trainer.evaluate()
    else:
        metrics = broadcast_object(trainer.evaluate() if trainer.world.main else None)  # rank 0 evaluates
    trainer.metrics.append({"step": trainer.progress.step, "epoch": trainer.progress.epoch,
                            **{f"val/{k}": v for k, v in metrics.items()}})
    name, p = trainer.cfg.early_stop_metric, trainer.progress
    value = metrics.get(name.removeprefix("val/"))  # as metrics.jsonl names it, too
    if value is None:
        if not trainer._warned_metric:
            trainer._warned_metric = True
            log.warning("train.early_stop_metric %r is not among the validation metrics (%s): no best "
                        "checkpoint is kept and the last weights are saved", name, ", ".join(sorted(metrics)))
        return False, False
    p.last_metric = value = float(value)
    # A tie goes to the lower validation loss: an exact-answer accuracy stays at 0 for a while
    # on long answers, and the first evaluation's weights were kept and the run stopped early.
    loss = metrics.get("loss") if name.removeprefix("val/") != "loss" else None
    loss = float(loss) if loss is not None and math.isfinite(loss) else None
    tie_won = same_value(value, p.best_metric) and loss is not None and better(loss, p.best_loss, lower=True)
    if better(value, p.best_metric, lower_is_better(name)) or tie_won:
        p.best_metric, p.best_step, p.best_loss, p.evals_since_best = value, p.step, loss, 0
        p.best_of = name.removeprefix("val/")
        improved = True
    else:
        p.evals_since_best += 1
        improved = False
    patience = trainer.cfg.early_stop_patience
    return improved, patience is not None and p.evals_since_best >= patience


def restore_best_weights(trainer: Trainer) -> int:
    """With `restore_best`, load the best checkpoint's weights into the module and record it.
    Returns the step whose weights the module now holds."""
    p, name = trainer.progress, trainer.cfg.early_stop_metric
    if p.best_step is None:  # no validation (or not this metric): the last weights
        return p.step
    weights_step = restore_best(trainer.run_dir, p, name, trainer.cfg.restore_best, trainer.module, trainer.sharded)
    trainer.metrics.append({"step": p.step, "epoch": p.epoch, "best_step": p.best_step,
                            f"best/{name}": p.best_metric, "weights_step": weights_step})
    return weights_step


def checkpoint(trainer: Trainer) -> Path:
    """Rank 0 writes the checkpoint (with every rank's RNG state); every rank gets its path."""
    trainer.progress.world_size = trainer.world.size
    trainer.progress.batch_size, trainer.progress.accum_steps = trainer.cfg.batch_size, trainer.cfg.accum_steps
    trainer.progress.seconds = trainer._seconds()  # a resumed run's clock (and time budget) go on from here
    stage = trainer.stateful.state_dict() if trainer.stateful is not None else None
    # every rank's stage state rides with its RNG state: what a rank counts alone (the rows it
    # skipped) is merged into the checkpoint, which held rank 0's alone
    rng, stages = zip(*all_gather_objects((rng_state(), stage)))
    if trainer.stateful is not None:
        merged = getattr(trainer.stateful, "merged", None)
        trainer.progress.extra["stage"] = merged(list(stages)) if merged is not None else stage
    state = trainer.sharded.full_state(trainer.optimizer) if trainer.sharded is not None else None  # collective
    if not trainer.world.main:
        return checkpoint_dir(trainer.run_dir, trainer.progress.step)
    try:
        path = save_checkpoint(trainer.run_dir, trainer.module, trainer.optimizer, trainer.progress,
                               trainer.extra_files, rank_rng=list(rng), state=state)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        # it named a hidden temporary file: say whose checkpoint failed and how a resume goes on
        raise OSError(e.errno, f"no space left on the device for the checkpoint of step {trainer.progress.step}; "
                      "free some (a --resume with a lower train.keep_last prunes the older checkpoints before "
                      "its first save) and --resume", str(trainer.run_dir)) from None
    best = trainer.progress.best_step
    prune_checkpoints(trainer.run_dir, trainer.cfg.keep_last,
                      keep={checkpoint_dir(trainer.run_dir, best)} if best is not None else set())
    for cb in trainer.callbacks:
        cb("checkpoint", trainer, {"path": path})
    return path


def resume_latest(trainer: Trainer) -> None:
    ckpt = resume_checkpoint(trainer.run_dir)
    configured = hyperparameters(trainer.optimizer)
    trainer.progress = load_checkpoint(ckpt, trainer.module, trainer.optimizer, rank=trainer.world.rank,
                                       sharded=trainer.sharded)
    _check_same_metric(trainer.progress, trainer.cfg.early_stop_metric)  # before the stage writes config.yaml
    restore_hyperparameters(trainer.optimizer, configured)  # the config's, not the checkpoint's
    if trainer.stateful is not None and "stage" in trainer.progress.extra:
        trainer.stateful.load_state_dict(trainer.progress.extra["stage"])
    if trainer.progress.samples_in_epoch is None:  # a checkpoint from before samples were counted
        trainer.progress.samples_in_epoch = trainer.progress.batch_in_epoch * trainer.cfg.batch_size
    p, cfg = trainer.progress, trainer.cfg
    if p.world_size != trainer.world.size or p.batch_size not in (None, cfg.batch_size) \
            or p.accum_steps not in (None, cfg.accum_steps):
        _rescale_to_world(trainer)
    trainer.metrics.truncate(trainer.progress.step, evaluated=trainer.progress.last_eval_step == trainer.progress.step)
    if trainer.world.main:  # train.keep_last as now configured, before the first save: a lowered one frees the
        best = p.best_step  # room a full disk refused that save (it pruned only after writing it, which failed)
        prune_checkpoints(trainer.run_dir, cfg.keep_last, keep={checkpoint_dir(trainer.run_dir, best)} if best is not None
                          else set())
    log.info("resumed from %s (step %d, epoch %d, batch %d)", ckpt, trainer.progress.step,
             trainer.progress.epoch, trainer.progress.batch_in_epoch)


def _check_same_metric(p: Progress, metric: str) -> None:
    """UserError when a resume changes the early-stop metric the run's best was kept by: its best value
    was compared with the new metric's (a median rank never beat the old recall@1 of 0.17, and the
    run stopped early and shipped step 3 as best). Checkpoints from before the metric was recorded
    are not checked."""
    if p.best_of is not None and p.best_of != metric.removeprefix("val/"):
        raise UserError(f"--resume: train.early_stop_metric {p.best_of!r} -> {metric!r}: the run's best checkpoint "
                        f"and its patience were kept by {p.best_of}; resume without the change, or start over "
                        "(--overwrite, or another train.out_dir)")


def _rescale_to_world(trainer: Trainer) -> None:
    """A checkpoint of another number of processes, batch size or accumulation counts its
    place in the epoch in that run's batches (9 batches of 4 rows in one process are 36 rows,
    4.5 batches of two): the place becomes this run's batches, and the step budget the steps
    taken plus what is left of the data in this run's steps (it counted the steps taken as this
    run's: a run resumed on more processes, or with a larger batch, skipped the rest of its
    epoch and stopped short of its last)."""
    p, cfg = trainer.progress, trainer.cfg
    p.batch_in_epoch = p.samples_in_epoch // (cfg.batch_size * trainer.world.size)
    # the batches the loader deals from the rows left (a partial one dropped), as far as
    # `_run_epoch` takes them; the whole epoch's steps less those taken counted one too many
    # where the rows left end in a partial batch
    batches = len(trainer.make_loader(p.epoch, p.samples_in_epoch))
    left = max(0, min(batches, trainer.steps_per_epoch * cfg.accum_steps - p.batch_in_epoch)) // cfg.accum_steps
    trainer.total_steps = p.step + left + trainer.steps_per_epoch * max(0, cfg.epochs - p.epoch - 1)
    if cfg.max_steps is not None:
        trainer.total_steps = min(trainer.total_steps, cfg.max_steps)
    log.info("resuming a run of %d process(es) x batch %s x %s micro-batch(es) on %d x %d x %d: the rest of "
             "epoch %d (%d rows done) is dealt anew, %d steps in all (the learning-rate schedule now ends there)",
             p.world_size, p.batch_size or "?",
             p.accum_steps or "?", trainer.world.size, cfg.batch_size, cfg.accum_steps, p.epoch, p.samples_in_epoch,
             trainer.total_steps)

