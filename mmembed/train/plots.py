"""Training curves as PNG: loss, learning rate, logit scale and validation metrics vs step."""

from __future__ import annotations

import json
from pathlib import Path

CURVES = [("loss", "train loss"), ("lr", "learning rate"), ("logit_scale", "logit scale"),
          ("val/recall@1", "val recall@1 (mean over pairs)"), ("val/loss", "val loss"),
          ("val/answer_accuracy", "val exact answers (teacher-forced)")]


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn line from a killed run
    return rows


def plot_curves(metrics_path: Path, out_dir: Path) -> Path:
    """Draw every curve present in metrics.jsonl into `out_dir/curves.png`."""
    from mmembed.insight.plotting import pyplot, save_png

    plt = pyplot()

    rows = read_metrics(metrics_path)
    present = [(k, t) for k, t in CURVES if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(present)), figsize=(4 * max(1, len(present)), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], present):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return save_png(fig, Path(out_dir) / "curves.png")
