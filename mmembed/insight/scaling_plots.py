"""Scaling plots: loss against the swept axis and against compute on log–log axes, with the fit,
its prediction for the next rung (and the trained value after --verify), and every rung's curve."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmembed.insight.plotting import pyplot, save_png


def plot_scaling(report, out: Path) -> Path:
    """Three panels: L(N) or L(D) with the fit; L(C) against measured FLOPs; validation loss against
    tokens for every rung. Returns `out`."""
    plt = pyplot()
    rungs = report.rungs
    name = "N (non-embedding parameters)" if report.axis == "params" else f"D (training {report.data_unit})"
    loss_label = f"validation loss ({report.loss_unit})"
    xs = np.array([r.result.params if report.axis == "params" else r.result.tokens for r in rungs], dtype=float)
    ys = np.array([r.result.val_loss for r in rungs])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))

    ax = axes[0]
    p = report.prediction
    grid = np.geomspace(xs.min() / 1.3, max(xs.max(), p["x"]) * 1.3, 200)
    ax.plot(grid, report.fit.predict(grid), color="C0", alpha=0.6, label=_fit_label(report.fit))
    ax.scatter(xs, ys, color="C0", zorder=3, label="trained")
    ax.scatter([p["x"]], [p["val_loss"]], marker="x", s=70, color="C3", zorder=4, label=f"predicted: {p['label']}")
    if "trained" in p:
        ax.scatter([p["x"]], [p["trained"]], marker="o", facecolors="none", edgecolors="C3", s=90, zorder=4,
                   label=f"trained: error {100 * p['error']:+.1f}%")
    _loglog(ax, name, loss_label)
    ax.set_title("loss against " + ("model size" if report.axis == "params" else "data"))

    ax = axes[1]
    cs = np.array([r.result.flops_measured for r in rungs], dtype=float)
    grid = np.geomspace(cs.min() / 1.3, cs.max() * 1.3, 200)
    ax.plot(grid, report.compute_fit.predict(grid), color="C1", alpha=0.6, label=_fit_label(report.compute_fit))
    ax.scatter(cs, ys, color="C1", zorder=3)
    _loglog(ax, "C (training FLOPs, measured)", loss_label)
    ax.set_title("loss against compute")

    ax = axes[2]
    for i, r in enumerate(rungs):
        curve = r.result.curve
        colour = plt.cm.viridis(i / max(1, len(rungs) - 1))
        ax.plot([c["tokens"] for c in curve], [c["val_loss"] for c in curve], color=colour, label=r.label,
                marker="o" if len(curve) == 1 else None)  # a rung evaluated once is a point, not a line
    _loglog(ax, f"{report.data_unit} seen", loss_label)
    ax.set_title("learning curves")
    return save_png(fig, out)


def _fit_label(fit) -> str:
    return f"{fit.E:.3f} + {fit.A:.3g}·x^−{fit.alpha:.3f} (R²={fit.r2:.3f})"


def _loglog(ax, xlabel: str, ylabel: str) -> None:
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # a decade spans few points: minor labels collide
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
