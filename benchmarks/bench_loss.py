"""B-loss: symmetric InfoNCE forward + backward, ours vs `open_clip.loss.ClipLoss`.

Same unit-norm features, same logit scale, B in {256, 1024}, D = 512, 2 threads. Reports the
median time of each, `ratio` = anchor_time / our_time (> 1: we are faster), the largest absolute
difference of the loss and of the gradients (`max_abs_diff`; a row is `correct` when it is at most
TOLERANCE = 1e-6, about 100x what the two compute today), and our fraction of the measured matmul
peak (the work is three B x B x D matmuls: logits forward, then the two gradient matmuls).

A second row per B has 10% of the rows missing one modality: ours is handed the full batch and
its presence masks, the anchor the same batch with the complete rows indexed out inside its timed
step (a gather forward, a scatter backward, as open_clip's user would do); so the row compares our
masking with that compaction, not masking against a free one.

    python -m benchmarks.bench_loss
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from benchmarks.common import matmul_peak_flops, median_time, quick_main, ratio_report, setup
from mmembed.losses import ContrastiveLoss
from mmembed.modality import Modality

D = 512
TOLERANCE = 1e-6  # max_abs_diff of a correct row: the loss agrees exactly, the gradients to ~1e-8


def _features(b: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    za = F.normalize(torch.randn(b, d), dim=-1).requires_grad_()
    zb = F.normalize(torch.randn(b, d), dim=-1).requires_grad_()
    return za, zb


def _fwd_bwd(loss_fn, za: torch.Tensor, zb: torch.Tensor):
    """One timed step: the loss, then the gradients of both feature sets."""

    def step() -> tuple[torch.Tensor, ...]:
        loss = loss_fn()
        return (loss.detach(), *torch.autograd.grad(loss, (za, zb)))

    return step


def _max_abs_diff(xs: tuple[torch.Tensor, ...], ys: tuple[torch.Tensor, ...]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(xs, ys))


def bench_batch(b: int, repeats: int, peak: float, missing: float = 0.0) -> dict:
    """Time ours vs ClipLoss at batch size `b`; `missing` = fraction of rows lacking modality b."""
    za, zb = _features(b, D)
    scale = torch.tensor(1 / 0.07)
    present = {Modality.IMAGE: torch.ones(b, dtype=torch.bool), Modality.TEXT: torch.ones(b, dtype=torch.bool)}
    present[Modality.TEXT][torch.randperm(b)[: int(missing * b)]] = False
    keep = present[Modality.TEXT]
    ours_loss, clip_loss = ContrastiveLoss(), ClipLoss()

    ours = _fwd_bwd(lambda: ours_loss({Modality.IMAGE: za, Modality.TEXT: zb}, present, scale).total, za, zb)
    if missing:
        anchor = _fwd_bwd(lambda: clip_loss(za[keep], zb[keep], scale), za, zb)
    else:
        anchor = _fwd_bwd(lambda: clip_loss(za, zb, scale), za, zb)

    diff = _max_abs_diff(ours(), anchor())
    # interleave the two so that machine noise hits both alike
    t_ours, t_anchor = [], []
    for _ in range(3):
        t_ours.append(median_time(ours, repeats=repeats))
        t_anchor.append(median_time(anchor, repeats=repeats))
    t_ours_m, t_anchor_m = sorted(t_ours)[1], sorted(t_anchor)[1]
    n = int(keep.sum())
    flops = 6 * n * n * D
    name = f"B-loss B={b}" + (f" missing={missing:.0%}" if missing else "")
    return ratio_report(
        name, t_ours_m, t_anchor_m, unit="s", higher_is_better=False,
        correct=diff <= TOLERANCE, correct_if=f"max_abs_diff <= {TOLERANCE:g}",
        max_abs_diff=diff, rows=n, dim=D, peak_fraction=flops / t_ours_m / peak,
    )


def run(quick: bool = False) -> dict:
    """Run B-loss; `quick` uses B=256 only and fewer repeats. Returns one JSON-able dict."""
    setup(threads=2, seed=0)
    peak = matmul_peak_flops()
    sizes = (256,) if quick else (256, 1024)
    repeats = 3 if quick else 7
    rows = []
    for b in sizes:
        rows.append(bench_batch(b, repeats, peak))
        rows.append(bench_batch(b, repeats, peak, missing=0.1))
    return {
        "benchmark": "B-loss",
        "goal": "max_abs_diff <= 1e-6 and ratio >= 1.0 (ratio = anchor_time / our_time)",
        "matmul_peak_gflops": peak / 1e9,
        "results": rows,
    }


if __name__ == "__main__":
    quick_main(run, __doc__, "small sizes")  # --help printed nothing and ran the benchmark
