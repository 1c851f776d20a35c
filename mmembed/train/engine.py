"""The training engine every stage uses: steps, guards, schedule, checkpoints, evaluation.

A stage hands the engine a module, a `step_fn(batch) -> StepOutput` (the forward pass and
loss), a way to make each epoch's loader, and optionally an evaluation function. The engine
owns everything users expect from a long run: AdamW + warm-up/cosine, accumulation, clipping,
bf16 autocast, non-finite guards, time and step budgets, early stopping, JSONL metrics, a
progress bar, and atomic checkpoints that resume exactly (model, optimizer, RNGs, data position).

With validation, every new best value of `early_stop_metric` is checkpointed; pruning never
deletes that checkpoint, and at the end (`restore_best`) its weights are copied back into the
module, so the stage saves the best model rather than the last one. The last checkpoint keeps
the last weights: `--resume` with a larger budget continues training from where it stopped (an
early-stopped run, with a larger `early_stop_patience` or none).

Under torchrun every rank runs this loop on its shard of each global batch (see
distributed.py). Every decision that ends or branches the loop — a batch with no usable row on
some rank, a non-finite step, a budget, early stopping — is taken from values all ranks share,
so no rank is left waiting in a collective. Rank 0 evaluates (the metrics are broadcast), logs,
and writes checkpoints, which hold every rank's RNG state; the data position is stored as the
number of the epoch's samples consumed, so a run resumes on any number of processes.

This file holds the loop (epochs, micro-batches, the optimizer step and its guards); evaluation,
checkpoints and resume are checkpointing.py's, and the end-of-run reports engine_reports.py's.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mmembed.config_train import TrainConfig
from mmembed.errors import ConfigError, UserError
from mmembed.train.checkpointing import checkpoint, evaluate_and_check, restore_best_weights, resume_latest
from mmembed.train.collectives import all_reduce_values, any_rank, barrier
from mmembed.train.distributed import current_world, no_sync
from mmembed.train.engine_reports import nothing_learned, report_skips, still_stopped
from mmembed.train.fsdp import sharded_of
from mmembed.train.metrics import StepOutput, step_totals
from mmembed.train.optim import build_optimizer, lr_at, set_lr
from mmembed.train.run_log import MetricsLog, ProgressLine
from mmembed.train.state import Progress, remove_partial_checkpoints

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    progress: Progress
    stopped_because: str
    last_checkpoint: Path | None  # holds the last weights (and everything needed to resume)
    best_step: int | None = None  # the step with the best validation `early_stop_metric` (None: no validation)
    best_metric: float | None = None  # that value
    weights_step: int = 0  # the step whose weights the module holds now: best_step when restored, else the last


class NonFiniteLossError(UserError):
    """Raised after `max_bad_steps` consecutive non-finite steps."""


class Trainer:
    """Runs `step_fn` over epochs with the guards and bookkeeping described in the module doc.

    Args:
        module: the parameters to train (frozen ones are skipped by the optimizer).
        step_fn: batch → StepOutput (forward + loss), or None for a batch with nothing to learn
            from (every row skipped: counted, no step taken); runs under autocast when precision=bf16.
        make_loader: (epoch, start_sample) → sized iterable of this rank's batches (of
            `config.batch_size` rows: the position is counted in them) for that epoch,
            after the first `start_sample` samples of the epoch's order (consumed by all ranks
            together), without touching them (exact resume depends on it); see EpochBatchSampler.
            Its length (the batches it will give) plans a resume on another number of processes.
        steps_per_epoch: batches per epoch (per rank), for the schedule and progress bar.
        config: the `train` section of the config.
        run_dir: where checkpoints/, metrics.jsonl and curves go.
        evaluate: () → metrics dict, called every `eval_every` steps / epoch end; its
            `early_stop_metric` picks the best checkpoint, restored at the end (`restore_best`).
        after_step: called after each optimizer step (the shared space clamps its logit scale).
        callbacks: called as cb(event, trainer, info) on "step" and "checkpoint" events.
        extra_files: files copied into every checkpoint (config.yaml, tokenizer.json) so each
            checkpoint folder is itself loadable.
        net: the module `step_fn` calls when it is not `module` itself — its DDP wrapper
            (`distributed.parallelize`), whose gradient sync accumulation skips until the last
            micro-batch, or its sharded (FSDP) form: then every rank evaluates, and checkpoints
            are gathered into the single-process format.
        stateful: the stage's own state, checkpointed as JSON: `state_dict()` (on every rank),
            `load_state_dict(state)`, and optionally `merged(states)`, every rank's states (in
            rank order) as the one the checkpoint keeps (default: rank 0's), and `skips`, the
            stage's SkipCounter, whose count a run that took no step gives in its error.
        on_skipped: called with a batch every rank skips because some rank's share of it has no
            row: `step_fn` never sees it, so whatever it counts of a batch (its bad rows) is
            counted here.
        idle: called once per optimizer step on every rank (it may be a collective): the
            parameters no batch of the step, on any rank, learned from. One process leaves their
            gradients None and AdamW leaves them alone; DDP and FSDP fill them with zeros, which
            AdamW's momentum, weight decay and step count act on: their gradients are dropped.
    """

    def __init__(self, module: nn.Module, step_fn: Callable[[Any], StepOutput],
                 make_loader: Callable[[int, int], Iterable], steps_per_epoch: int, config: TrainConfig,
                 run_dir: Path, evaluate: Callable[[], dict[str, float]] | None = None,
                 after_step: Callable[[], None] | None = None, callbacks: list[Callable] = (),
                 extra_files: dict[str, Path] | None = None, device: torch.device | None = None,
                 net: nn.Module | None = None, stateful: Any = None,
                 on_skipped: Callable[[Any], None] | None = None,
                 idle: Callable[[], Iterable[nn.Parameter]] | None = None):
        self.module, self.step_fn, self.make_loader = module, step_fn, make_loader
        self.on_skipped, self.idle = on_skipped, idle
        self.net = net if net is not None else module
        self.sharded = sharded_of(self.net)
        self.world = current_world()
        self.cfg, self.run_dir = config, Path(run_dir)
        self.evaluate, self.after_step, self.callbacks = evaluate, after_step, list(callbacks)
        self.extra_files = extra_files or {}
        self.stateful = stateful
        self.device = device or torch.device("cpu")
        if steps_per_epoch < config.accum_steps:
            processes = f" in each of {self.world.size} processes" if self.world.size > 1 else ""
            raise UserError(f"an epoch gives {steps_per_epoch} batch(es) of {config.batch_size} rows{processes}, "
                            f"fewer than accum_steps={config.accum_steps}: no optimizer step could be taken "
                            "(lower batch_size or accum_steps, or give more rows)")
        self.steps_per_epoch = steps_per_epoch // config.accum_steps
        self.total_steps = self.steps_per_epoch * config.epochs
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        if config.schedule_by == "time" and config.max_minutes is None:
            raise ConfigError("train.schedule_by=time needs a time budget: set train.max_minutes")
        self.optimizer = build_optimizer(module, config.lr, config.weight_decay, config.betas)
        self.progress = Progress()
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", write=self.world.main)
        self._bad_in_a_row = 0
        self._rowless = 0  # batches (of this fit) skipped for want of a usable row, of `progress.empty_batches`
        self._share_empty = 0  # of those, batches with rows on some rank: one process's share had none
        self._last: dict[str, Any] = {}
        self._warned_metric = False
        self._clock = (time.monotonic(), 0.0)  # set again by fit()

    # --- public -------------------------------------------------------------------------

    def full_weights(self) -> dict[str, Tensor]:
        """The module's full weights (collective under FSDP; on rank 0 there, empty elsewhere)."""
        if self.sharded is None:
            return self.module.state_dict()
        return self.sharded.full_weights()

    def fit(self, resume: bool = False) -> FitResult:
        """Train until the epochs, a budget or early stopping end the run (`resume`: continue the
        latest checkpoint). With validation and `restore_best`, the module ends holding the best
        checkpoint's weights; the last checkpoint keeps the last ones, to resume from."""
        if self.world.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_checkpoints(self.run_dir)
            if not resume:
                self.metrics.clear()
        barrier()  # the other ranks read checkpoints only once rank 0 has tidied them
        reason = None
        if resume:
            resume_latest(self)
            # a run that ended is continued only where a budget (epochs, steps, minutes, patience)
            # was raised since. Its last model was evaluated before it ended.
            ended, self.progress.stopped = self.progress.stopped, None
            if ended is not None:
                self.progress.last_eval_step = self.progress.step
            if ended == "early stop" and still_stopped(self):
                reason = ended
        if self.cfg.max_minutes is not None and self.progress.seconds >= 60 * self.cfg.max_minutes:
            reason = reason or "time budget"
        start = time.monotonic()
        self._clock = (start, self.progress.seconds)  # this fit's start, and the seconds trained before it
        bar = tqdm(total=self.total_steps, initial=self.progress.step, desc="train", unit="step",
                   dynamic_ncols=True, disable=None if self.world.main else True)
        # no terminal (a log file, CI, nohup): no bar, so a progress line now and then instead
        self._progress_line = (ProgressLine(self.total_steps, self.cfg.progress_every_s)
                               if bar.disable and self.world.main else None)
        try:
            while reason is None and self.progress.epoch < self.cfg.epochs:
                reason = self._run_epoch(bar)
                if reason is None:  # the epoch ran to its end
                    self.progress.epoch += 1
                    self.progress.batch_in_epoch = self.progress.samples_in_epoch = 0
                    # (a resumed epoch's leftover batches take no step: its model was evaluated)
                    if self.cfg.eval_every is None and self.progress.last_eval_step != self.progress.step:
                        improved, stop = evaluate_and_check(self)
                        if improved:
                            checkpoint(self)
                        reason = "early stop" if stop else None
            if self.progress.step == 0 and self.progress.empty_batches:  # a "finished" untrained model otherwise
                raise UserError(nothing_learned(self))
            if self.progress.last_eval_step != self.progress.step and reason != "early stop":
                evaluate_and_check(self)  # the final model always gets a validation row
            # the last weights (also when they are the best), and why the run ended, for a --resume
            self.progress.stopped = reason = reason or "finished"
            last_ckpt = checkpoint(self)
            barrier()  # every checkpoint is on disk before any rank restores the best one
        finally:
            bar.close()
        report_skips(self, reason)
        log.info("training stopped (%s) at step %d", reason, self.progress.step)
        p = self.progress
        return FitResult(p, reason, last_ckpt, p.best_step, p.best_metric, restore_best_weights(self))

    # --- one epoch ----------------------------------------------------------------------

    def _run_epoch(self, bar: tqdm) -> str | None:
        """Run (the rest of) one epoch. Returns why it stopped early, or None at its end."""
        cfg = self.cfg
        loader = self.make_loader(self.progress.epoch, self.progress.samples_in_epoch)
        # an epoch's last batches % accum_steps never make a step (steps_per_epoch counts whole
        # accumulations): their gradients go here, not into the next epoch's first step
        self.optimizer.zero_grad(set_to_none=True)
        accum: list[StepOutput] = []
        # a step's time runs from its first micro-batch's fetch to its update; data_time is the
        # part spent waiting for batches (it was added twice, and only the last micro-batch counted)
        data_t0 = step_t0 = time.perf_counter()
        data_time = 0.0
        for batch in loader:
            data_time += time.perf_counter() - data_t0
            if self.progress.batch_in_epoch >= self.steps_per_epoch * cfg.accum_steps:
                break  # the epoch's leftover batches (fewer than accum_steps) never make a step
            if self.progress.step >= self.total_steps:
                return "step budget"
            self.progress.batch_in_epoch += 1
            self.progress.samples_in_epoch += cfg.batch_size * self.world.size
            out = self._forward_backward(batch, last_micro=len(accum) + 1 == cfg.accum_steps)
            if out is None:  # every row of the batch was skipped: nothing to learn from
                self.progress.empty_batches += 1
                self._rowless += 1
                data_t0 = time.perf_counter()
                continue
            accum.append(out)
            if len(accum) < cfg.accum_steps:
                data_t0 = time.perf_counter()
                continue
            step_time = time.perf_counter() - step_t0
            stepped = self._optimizer_step(accum, data_time, step_time)
            accum, data_time = [], 0.0
            if not stepped:
                data_t0 = step_t0 = time.perf_counter()
                continue
            bar.update(1)
            bar.set_postfix(loss=f"{self._last['loss']:.3f}", scale=f"{self._last.get('logit_scale', 0):.1f}",
                            sps=f"{self._last['samples_per_s']:.0f}")
            if self._progress_line is not None:
                self._progress_line.update(self.progress.step, self._last["loss"], self._last["samples_per_s"])
            for cb in self.callbacks:
                cb("step", self, self._last)
            improved = False
            if cfg.eval_every and self.progress.step % cfg.eval_every == 0:
                improved, stop = evaluate_and_check(self)
                if stop:
                    return "early stop"  # fit() checkpoints the last step
            if improved or self.progress.step % cfg.checkpoint_every == 0:
                checkpoint(self)
            if cfg.max_minutes is not None and self._agree_any(self._seconds() >= 60 * cfg.max_minutes):
                return "time budget"
            data_t0 = step_t0 = time.perf_counter()
        return None

    def _forward_backward(self, batch: Any, last_micro: bool) -> StepOutput | None:
        some_empty, some_not = self._agree_empty(batch) if self.world.active else (False, True)
        if some_empty:
            # some rank has nothing to learn from: every rank skips the batch together
            self._share_empty += some_not
            if self.on_skipped is not None:
                self.on_skipped(batch)
            return None
        with precision_context(self.device, self.cfg.precision), (nullcontext() if last_micro else no_sync(self.net)):
            out = self.step_fn(batch)
            if out is None:
                return None
            # Distributed, backward always runs (it holds the gradient all-reduce the other ranks
            # wait in); a non-finite loss then gives non-finite averaged gradients on every rank,
            # which the step's guard skips everywhere alike.
            if self.world.active or torch.isfinite(out.loss.detach()):
                # a weighted loss goes back as its sum: `_optimizer_step` divides by the step's total
                (out.loss * out.weight if out.weight is not None else out.loss / self.cfg.accum_steps).backward()
        return out

    def _optimizer_step(self, accum: list[StepOutput], data_time: float, step_time: float) -> bool:
        """One optimizer step from accumulated gradients; False when the step was skipped."""
        cfg, p = self.cfg, self.progress
        params = [q for g in self.optimizer.param_groups for q in g["params"]]
        totals = step_totals(accum)
        for q in self.idle() if self.idle is not None else ():
            q.grad = None  # before the norm: a step's every rank calls `idle` alike
        if not totals.learned:  # no micro-batch of any rank had anything to learn from
            self.optimizer.zero_grad(set_to_none=True)
            p.empty_batches += len(accum)
            return False
        loss, metrics, samples = totals.loss, totals.metrics, totals.samples
        grads = [q.grad for q in params if q.grad is not None]
        if grads and totals.grad_scale != 1.0:  # sums went back: the mean over every unit (DDP averaged the ranks' sums)
            torch._foreach_mul_(grads, totals.grad_scale)
        if self.sharded is not None:  # norms of shards, summed over the ranks
            grad_norm = self.sharded.clip_grads(params, cfg.grad_clip or None)
        elif cfg.grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:  # the norm is still needed for the non-finite guard and the log, not the rescale
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
        if not (math.isfinite(loss) and torch.isfinite(grad_norm)):
            # Skip: parameters and optimizer state stay exactly as they were.
            self.optimizer.zero_grad(set_to_none=True)
            self._bad_in_a_row += 1
            p.bad_steps += 1
            log.warning("non-finite loss or gradient at step %d: step skipped (%d in a row)",
                        p.step, self._bad_in_a_row)
            if self._bad_in_a_row >= cfg.max_bad_steps:
                checkpoint(self)
                fp32 = " or train.precision=fp32" if cfg.precision != "fp32" else ""
                raise NonFiniteLossError(
                    f"{self._bad_in_a_row} non-finite steps in a row at step {p.step}: stopping "
                    f"(try a lower train.lr{fp32}); last good state is checkpointed")
            return False
        self._bad_in_a_row = 0
        p.seconds = self._seconds()
        time_progress = 0.0
        if cfg.schedule_by == "time":  # ranks agree on the clock, hence on the rate
            seconds = all_reduce_values([p.seconds], "max")[0] if self.world.active else p.seconds
            time_progress = seconds / (60 * cfg.max_minutes)
        lr = lr_at(p.step, cfg.lr, cfg.warmup_steps, self.total_steps, cfg.min_lr_ratio, time_progress)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.after_step is not None:
            self.after_step()
        p.step += 1
        p.samples += samples
        self._last = {"step": p.step, "epoch": p.epoch, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                      "samples_per_s": samples / max(step_time, 1e-9), "data_time": data_time,
                      "step_time": step_time, **metrics}
        if p.step % self.cfg.log_every == 0 or p.step == 1:
            self.metrics.append(self._last)
        return True

    def _seconds(self) -> float:
        """Wall seconds of training over every fit of this run, up to now."""
        return self._clock[1] + time.monotonic() - self._clock[0]

    def _agree_empty(self, batch: Any) -> tuple[bool, bool]:
        """(whether some rank's share of the batch has no row, whether some rank's has rows): one collective."""
        some_empty, some_not = any_rank([_rows(batch) == 0, _rows(batch) > 0])
        return some_empty, some_not

    def _agree_any(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank (every rank gets the same answer)."""
        return any_rank([flag])[0]


def precision_context(device: torch.device, precision: str) -> Any:
    """What a step runs under: bf16 autocast on `device` when `precision` is bf16, else nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def _rows(batch: Any) -> int:
    """Rows in a batch (1 for a batch without a length)."""
    try:
        return len(batch)
    except TypeError:
        return 1
