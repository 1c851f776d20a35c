"""What the engine tells the user about how a run ended: a resumed early stop that stays
stopped (and how to continue it), the batches and non-finite steps it skipped, and why a run
took no step at all. The Trainer's loop is engine.py; its checkpoints, checkpointing.py.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from mmembed.data import SkipCounter
from mmembed.train.collectives import all_gather_objects

if TYPE_CHECKING:
    from mmembed.train.engine import Trainer

log = logging.getLogger("mmembed.train.engine")  # the engine's lines keep their logger name (as run_log.py's)


def still_stopped(trainer: Trainer) -> bool:
    """Whether a resumed early-stopped run stays stopped: the patience it ran out of is not
    larger now (a larger one, or null, trains on), which it says, and how to continue it."""
    p, patience = trainer.progress, trainer.cfg.early_stop_patience
    say = log.info if trainer.world.main else log.debug  # once, not once per rank
    if patience is None or p.evals_since_best < patience:
        say("the run had stopped early at step %d; train.early_stop_patience=%s now: training on", p.step,
            "null" if patience is None else patience)
        return False
    (log.warning if trainer.world.main else log.debug)(
        "the run had stopped early at step %d (%d evaluation(s) without a better %s than step %s's): resume "
        "with a larger train.early_stop_patience, or null, to train on", p.step, p.evals_since_best,
        trainer.cfg.early_stop_metric, p.best_step)
    return True


def report_skips(trainer: Trainer, reason: str) -> None:
    """Warn of the batches and steps the run skipped: they explain a run shorter than planned."""
    p = trainer.progress
    if not trainer.world.main:  # every rank counted the same batches and steps
        return
    # of them, global batches some process's share of which was empty (this run's part: a resumed
    # run counts those of its earlier part among the rest): they had rows, which one process trains on
    shared = min(trainer._share_empty, p.empty_batches)
    if p.empty_batches > shared:
        log.warning("%d batch(es) had no usable row or nothing to learn from (no pair of two rows) and were "
                    "skipped", p.empty_batches - shared)
    if shared:
        log.warning("%d global batch(es) were skipped by every process because one process's share of them had "
                    "no usable row (one process would have trained on the rest)", shared)
    if p.bad_steps:
        short = (f": the run took {p.step} of its {trainer.total_steps} planned steps"
                 if reason == "finished" and p.step < trainer.total_steps else "")
        log.warning("%d step(s) with a non-finite loss or gradient were skipped%s", p.bad_steps, short)


def nothing_learned(trainer: Trainer) -> str:
    """Why a run ended without a step: rows skipped (counted here), or batches with rows but no pair."""
    n = trainer.progress.empty_batches
    if trainer._share_empty:  # every process needs a usable row of each global batch
        return (f"no training step was taken: in {trainer._share_empty} of the {n} skipped batch(es) only some "
                f"process's share had no usable row ({_skipped_rows(trainer)}"
                f"); each of the {trainer.world.size} processes needs one: use fewer processes or a larger "
                "batch_size")
    if trainer._rowless:
        return (f"no training step was taken: all {n} batch(es) had no usable row or nothing to learn from "
                f"({_skipped_rows(trainer)})")
    return (f"no training step was taken: none of the {n} batch(es) had anything to learn from (no two rows "
            "of a batch with a pair of modalities the model trains on; check the manifest's column names)")


def _skipped_rows(trainer: Trainer) -> str:
    """The stage's count of the rows it skipped, every rank's (a collective): its rate-limited
    warnings may have counted only the first of them. A stage that keeps no count points there."""
    skips = getattr(trainer.stateful, "skips", None)
    if skips is None:
        return "the skipped rows are counted above"
    every = SkipCounter()
    for state in all_gather_objects(skips.state_dict()):
        every.load_state_dict(state)
    return every.summary()

