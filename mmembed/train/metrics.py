"""What a training step reports, and how a run compares its metrics.

A stage's `step_fn` returns a `StepOutput` (the loss and named values); the engine averages each
value over the micro-batches and ranks that measured it, and keeps the best checkpoint by
`early_stop_metric`, minimising losses and ranks and maximising everything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import Tensor

from mmembed.train.collectives import all_reduce_values
from mmembed.train.distributed import current_world


@dataclass
class StepOutput:
    loss: Tensor  # scalar, differentiable
    # logged as their mean over the step's micro-batches and ranks (per-pair losses, ...): the same
    # keys on every rank, NaN for a value this batch has none of (left out of the mean)
    metrics: dict[str, float] = field(default_factory=dict)
    samples: int = 0
    # `loss` is a mean over this many units (answer tokens): the step's gradient is then the mean
    # over every unit of its micro-batches and ranks, not the mean of their means. None: micro-
    # batches (and ranks) weigh alike, as for losses already scaled to the global batch.
    weight: float | None = None
    # False: the batch held nothing to learn from (no pair with two rows). Its backward still runs
    # (several processes wait in it), but a step whose every micro-batch learned nothing is skipped.
    learned: bool = True


def lower_is_better(metric: str) -> bool:
    """Losses and ranks are minimised (`loss`, `val_loss`, `loss/text-image`, `median_rank`); every
    other metric (recall, accuracy) is maximised."""
    return any(part.endswith(("loss", "rank")) for part in metric.split("/"))


def better(value: float, best: float | None, lower: bool) -> bool:
    """Whether `value` beats `best` by more than float rounding (a mean recall of the same hits summed
    in another order read 0.19444444444444445 for ...442, a new best that reset the patience); a
    non-finite value never does (a NaN best would block every later one)."""
    if not math.isfinite(value):
        return False
    return best is None or ((value < best if lower else value > best) and not same_value(value, best))


def same_value(a: float, b: float | None) -> bool:
    """`a` and `b` equal up to float rounding."""
    return b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def metric_sums(outs: list[StepOutput]) -> tuple[dict[str, float], dict[str, int]]:
    """Each metric's sum over the micro-batches that measured it (a finite value), and their count:
    a value a micro-batch lacks is left out of its mean, not counted as 0."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for out in outs:
        for key, value in out.metrics.items():
            finite = math.isfinite(value)
            sums[key] = sums.get(key, 0.0) + (value if finite else 0.0)
            counts[key] = counts.get(key, 0) + finite
    return sums, counts


@dataclass
class StepTotals:
    """One optimizer step's values over its micro-batches and every rank (the same on each)."""

    loss: float  # the mean over micro-batches, or over their units (`StepOutput.weight`)
    samples: int
    metrics: dict[str, float]  # each value's mean over the micro-batches that measured it
    learned: bool  # some micro-batch of some rank had something to learn from
    grad_scale: float  # what the accumulated gradients are multiplied by: 1 / units when weighted


def step_totals(accum: list[StepOutput]) -> StepTotals:
    weighted = accum[0].weight is not None  # one step_fn: every micro-batch alike
    loss_sum = sum(float(o.loss.detach()) * (o.weight if weighted else 1.0) for o in accum)
    weight = sum(o.weight for o in accum) if weighted else float(len(accum))
    learned = float(any(o.learned for o in accum))
    sums, counts = metric_sums(accum)
    samples = sum(o.samples for o in accum)
    world = current_world()
    if world.active:  # rank means (all_reduce_values): the ratios below are global
        keys = sorted(sums)  # the same on every rank (`StepOutput.metrics`)
        loss_sum, weight, learned, samples_sum, *values = all_reduce_values(
            [loss_sum, weight, learned, samples, *(sums[k] for k in keys), *(counts[k] for k in keys)])
        samples = round(samples_sum * world.size)
        sums, counts = dict(zip(keys, values[:len(keys)])), dict(zip(keys, values[len(keys):]))
    return StepTotals(loss=loss_sum / weight if weight else math.nan, samples=samples,
                      metrics={k: sums[k] / counts[k] for k in sums if counts[k]},
                      learned=bool(learned) and weight > 0,
                      grad_scale=1.0 / weight if weighted and weight else 1.0)
