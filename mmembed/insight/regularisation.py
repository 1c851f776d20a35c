"""Overfitting and regularisation, measured: one model, a small subset, many epochs, a grid of
dropout × weight decay.

    world text ─► a subset of `train_tokens` (small enough to memorise) + validation rows
    for each (dropout, weight decay): same seed, same rows ─► train_lm for `epochs` epochs
    ─► train and validation loss every `eval_every` steps (eval mode: dropout off for both)
    ─► generalisation gap (val − train) at the end, and the step early stopping would pick
       (lowest validation loss) with the loss it would keep

A model that memorises drives its training loss down while its validation loss turns back up:
the gap grows. Dropout (random units zeroed during training) and weight decay (weights pulled
toward zero each step) both make memorising harder; this study shows by how much on the same
data, and what early stopping alone would have saved.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mmembed.checkpoint import atomic_write_text, make_output_folder
from mmembed.config import ConfigError
from mmembed.insight.lm_train import LMResult, train_lm
from mmembed.insight.plotting import pyplot, save_png
from mmembed.insight.scaling import build_decoder, recipe_of, world_text
from mmembed.insight.sweep_config import ScalingConfig

log = logging.getLogger(__name__)


@dataclass
class Setting:
    dropout: float
    weight_decay: float
    result: LMResult

    @property
    def gap(self) -> float:
        """Generalisation gap at the end of training: validation − training loss."""
        return self.result.val_loss - self.result.train_loss

    def to_dict(self) -> dict:
        best = self.result.best
        return {"dropout": self.dropout, "weight_decay": self.weight_decay, "train_loss": self.result.train_loss,
                "val_loss": self.result.val_loss, "gap": self.gap, "early_stop_step": best["step"],
                "early_stop_val_loss": best["val_loss"], "curve": self.result.curve}


@dataclass
class RegularisationReport:
    settings: list[Setting]
    tokens: int
    epochs: int
    files: dict[str, str]

    def summary(self) -> str:
        lines = [f"{self.tokens:,} training tokens × {self.epochs} epochs; losses in nats/token, eval mode",
                 f"{'dropout':>8}{'w. decay':>9}{'train':>8}{'val':>8}{'gap':>8}{'early stop':>12}{'val there':>10}"]
        for s in self.settings:
            best = s.result.best
            lines.append(f"{s.dropout:>8.2f}{s.weight_decay:>9.2f}{s.result.train_loss:>8.3f}{s.result.val_loss:>8.3f}"
                         f"{s.gap:>8.3f}{best['step']:>12}{best['val_loss']:>10.3f}")
        plain = next((s for s in self.settings if s.dropout == 0 and s.weight_decay == 0), None)
        best = min(self.settings, key=lambda s: abs(s.gap))  # a validation loss below the training loss is noise
        without = f"gap without regularisation {plain.gap:.3f}; " if plain is not None else ""
        lines.append(f"{without}smallest gap {best.gap:.3f} (dropout {best.dropout}, weight decay {best.weight_decay})")
        return "\n".join(lines)


def run_regularisation(config: ScalingConfig, progress: Callable[[str], None] = log.info) -> RegularisationReport:
    """Train every (dropout, weight decay) setting of `config.regularisation`; write
    regularisation.json and regularisation.png to `config.out_dir`."""
    rc = config.regularisation
    if config.trained_tokens(rc.train_tokens) < 1:  # train_lm said so after the tokenizer, naming no key
        raise ConfigError(f"regularisation.train_tokens={rc.train_tokens} is less than one batch "
                          f"({config.recipe.batch_size} rows of {config.context} tokens)")
    out = Path(config.out_dir)
    make_output_folder(out)  # a file above it is one line, before any training
    vocab, train, val = world_text(config, rc.train_tokens, progress)
    grid = [(d, w) for d in rc.dropouts for w in rc.weight_decays]
    settings = []
    for i, (dropout, wd) in enumerate(grid):
        progress(f"[{i + 1}/{len(grid)}] dropout {dropout}, weight decay {wd}")
        torch.manual_seed(config.seed)
        model = build_decoder(rc.size, vocab, config.context, dropout)
        recipe = recipe_of(config.recipe, config.seed, epochs=rc.epochs, weight_decay=wd, eval_every=rc.eval_every)
        settings.append(Setting(dropout, wd, train_lm(model, train, val, recipe)))
        progress(f"    gap {settings[-1].gap:.3f} (train {settings[-1].result.train_loss:.3f}, "
                 f"val {settings[-1].result.val_loss:.3f})")
    report = RegularisationReport(settings, tokens=settings[0].result.tokens // rc.epochs, epochs=rc.epochs, files={})
    atomic_write_text(out / "regularisation.json", json.dumps(
        {"tokens": report.tokens, "epochs": rc.epochs, "settings": [s.to_dict() for s in settings]}, indent=2))
    report.files = {"json": str(out / "regularisation.json"),
                    "png": str(plot_regularisation(report, out / "regularisation.png"))}
    return report


def plot_regularisation(report: RegularisationReport, out: Path) -> Path:
    """One panel per setting: training and validation loss against step, early stopping marked."""
    plt = pyplot()
    n = len(report.settings)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, sharey=True)
    for ax, s in zip(axes.flat, report.settings):
        curve = s.result.curve
        steps = [c["step"] for c in curve]
        ax.plot(steps, [c["train_loss"] for c in curve], label="train")
        ax.plot(steps, [c["val_loss"] for c in curve], label="validation")
        best = s.result.best
        ax.axvline(best["step"], color="grey", ls=":", label=f"early stop ({best['step']})")
        ax.set_title(f"dropout {s.dropout}, weight decay {s.weight_decay}: gap {s.gap:.2f}", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes.flat[n:]:
        ax.axis("off")
    # the first evaluations sit far above the rest: zoom on where the curves part
    low = min(c["train_loss"] for s in report.settings for c in s.result.curve)
    high = max(s.result.val_loss for s in report.settings)
    axes[0][0].set_ylim(0.9 * low, 1.5 * high)
    axes[0][0].set_ylabel("loss (nats/token)")
    axes[0][0].legend(fontsize=7)
    return save_png(fig, out)
