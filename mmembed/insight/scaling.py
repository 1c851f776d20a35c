"""Scaling sweeps: train a ladder of decoders, fit L = E + A·x^(−α), predict the next rung.

    world text ─► BPE ─► training rows (one fixed budget) + validation rows (another seed)
    for each size: Decoder(width, layers, heads) ─► train_lm ─► N, 6·N·D, measured FLOPs, time, val loss
    fit L(N) and L(C) ─► prediction for `next_size` ─► (--verify) train it, report the error
    ─► scaling.json, scaling.csv, scaling.png

`axis: data` keeps one model and varies the token budget instead (L(D)). Every model starts from
the same seed and sees the data in the same order, so the only thing that changes between rungs
is the axis being swept. The same ladder for the shared-space towers is `tower_scaling.py`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mmembed.checkpoint import atomic_write_text, make_output_folder
from mmembed.config import ConfigError
from mmembed.decoder.model import Decoder
from mmembed.insight.lm_data import token_rows, train_world_tokenizer
from mmembed.insight.lm_train import LMResult, Recipe, train_lm
from mmembed.insight.power_law import PowerLawFit, fit_power_law
from mmembed.insight.scaling_plots import plot_scaling
from mmembed.insight.sweep_config import MAX_TOKENS, ModelSize, RecipeConfig, ScalingConfig

log = logging.getLogger(__name__)


@dataclass
class Rung:
    """One trained point of a sweep: its label and x values beside the run's numbers."""

    label: str
    result: LMResult
    size: ModelSize


@dataclass
class SweepReport:
    axis: str
    rungs: list[Rung]
    fit: PowerLawFit  # loss against the swept axis (N or D)
    compute_fit: PowerLawFit  # loss against measured training FLOPs
    prediction: dict  # {"label", "x", "val_loss"}; with --verify also "trained", "error"
    files: dict[str, str]
    data_unit: str = "tokens"  # what D counts
    loss_unit: str = "nats/token"
    note: str = ""  # printed under the table

    def summary(self) -> str:
        lines = [f"{'rung':<22}{'N (non-emb.)':>13}{'N (total)':>11}{self.data_unit:>11}{'6ND':>10}"
                 f"{'FLOPs meas.':>12}{'time':>8}{'val loss':>10}"]
        for r in self.rungs:
            x = r.result
            lines.append(f"{r.label:<22}{x.params:>13,}{x.params_total:>11,}{x.tokens:>11,}{x.flops_estimate:>10.2e}"
                         f"{x.flops_measured:>12.2e}{x.seconds:>7.0f}s{x.val_loss:>10.4f}")
        if self.note:
            lines.append(self.note)
        lines.append(f"fit against {'N' if self.axis == 'params' else 'D'}: {self.fit}")
        lines.append(f"fit against compute C: {self.compute_fit}")
        p = self.prediction
        line = f"prediction for {p['label']} ({p['x']:,}): val loss {p['val_loss']:.4f} ({self.loss_unit})"
        if "trained" in p:
            line += f"; trained: {p['trained']:.4f} (error {100 * p['error']:+.1f}%)"
        lines.append(line)
        return "\n".join(lines)


def size_label(s: ModelSize) -> str:
    return f"w{s.width} L{s.layers} h{s.heads}"


def run_sweep(config: ScalingConfig, verify: bool = False,
              progress: Callable[[str], None] = log.info) -> SweepReport:
    """Train the ladder, fit, predict (and with `verify` train the predicted rung); write the files.

    Returns:
        The `SweepReport`; scaling.json, scaling.csv and scaling.png are in `config.out_dir` (a
        previous sweep's are removed as this one starts).
    """
    plan = _plan(config)
    # the budget --verify would train, with or without it: validation leaves out every document of
    # this budget, so --verify must not change the validation rows (nor the fit it checks)
    budget = max(t for _, _, t in [*plan, _next(config)])
    if budget > MAX_TOKENS:  # axis=data's next rung is twice the largest budget
        raise ConfigError(f"axis=data builds 2 x max(data_tokens) = {budget:,} tokens (the budget --verify trains, "
                          f"whose documents validation leaves out), more than {MAX_TOKENS:,} (the world's text is "
                          "built in memory): lower data_tokens")
    out = Path(config.out_dir)
    make_output_folder(out)  # a file above it is one line, before any training
    vocab, train, val = world_text(config, budget, progress)

    def train_one(label: str, size: ModelSize, tokens: int) -> LMResult:
        torch.manual_seed(config.seed)  # every rung starts from the same seed, sees the same rows
        model = build_decoder(size, vocab, config.context, config.recipe.dropout)
        result = train_lm(model, train[: -(-tokens // config.context)], val, recipe_of(config.recipe, config.seed))
        progress(f"    {label}: N = {result.params:,}, val loss {result.val_loss:.4f} in {result.seconds:.0f} s")
        return result

    rungs = []
    for i, (label, size, tokens) in enumerate(plan):
        progress(f"[{i + 1}/{len(plan)}] {label}: {tokens:,} tokens")
        rungs.append(Rung(label, train_one(label, size, tokens), size))
        save_progress(rungs, out)
    losses = [r.result.val_loss for r in rungs]
    fit = fit_power_law([_x(config, r.result) for r in rungs], losses, bootstrap=config.bootstrap, seed=config.seed)
    compute_fit = fit_power_law([r.result.flops_measured for r in rungs], losses, bootstrap=config.bootstrap,
                                seed=config.seed)
    label, size, tokens = _next(config)
    rows = -(-tokens // config.context)
    trained_tokens = rows // config.recipe.batch_size * config.recipe.batch_size * config.context  # as train_lm counts
    x_next = (build_decoder(size, vocab, config.context, 0.0).num_parameters() if config.axis == "params"
              else trained_tokens)  # the untrained rung's N, or its token budget
    prediction = {"label": label, "x": x_next, "val_loss": float(fit.predict(x_next))}
    if verify:
        progress(f"[verify] {label}: {tokens:,} tokens")
        trained = train_one(label, size, tokens)
        prediction |= {"trained": trained.val_loss,
                       "error": (prediction["val_loss"] - trained.val_loss) / trained.val_loss,
                       "result": trained.to_dict()}
    report = SweepReport(config.axis, rungs, fit, compute_fit, prediction, files={})
    report.files = write_report(report, out)
    return report


def world_text(config: ScalingConfig, train_tokens: int, progress: Callable[[str], None] = log.info
               ) -> tuple[int, Tensor, Tensor]:
    """The sweep's tokenizer vocabulary size, training rows and validation rows (three seeds of
    their own; the validation rows skip every document of the training rows: a simple scene
    recurs across seeds)."""
    tokenizer = train_world_tokenizer(config.vocab_size, seed=config.seed + 1)
    progress(f"world text: {train_tokens:,} training tokens, {config.val_tokens:,} validation tokens, "
             f"BPE vocabulary {tokenizer.vocab_size}")
    trained: set[int] = set()
    train = token_rows(tokenizer, train_tokens, config.context, seed=config.seed + 2, seen=trained)
    val = token_rows(tokenizer, config.val_tokens, config.context, seed=config.seed + 3, exclude=trained)
    return tokenizer.vocab_size, train, val


def _plan(config: ScalingConfig) -> list[tuple[str, ModelSize, int]]:
    if config.axis == "params":
        return [(size_label(s), s, config.tokens) for s in config.sizes]
    return [(f"{size_label(config.data_size)} D={d:,}", config.data_size, d) for d in config.data_tokens]


def _next(config: ScalingConfig) -> tuple[str, ModelSize, int]:
    if config.axis == "params":
        if config.next_size is None:
            raise ValueError("next_size is not set: nothing to predict")
        return size_label(config.next_size), config.next_size, config.tokens
    d = 2 * max(config.data_tokens)  # past every budget trained, whatever their order
    return f"{size_label(config.data_size)} D={d:,}", config.data_size, d


def build_decoder(size: ModelSize, vocab_size: int, context: int, dropout: float) -> Decoder:
    return Decoder(vocab_size, size.width, size.layers, size.heads, max_len=context, dropout=dropout)


def _x(config: ScalingConfig, result: LMResult) -> int:
    return result.params if config.axis == "params" else result.tokens


REPORT_FILES = ("scaling.json", "scaling.csv", "scaling.png")


def save_progress(rungs: list[Rung], out: Path) -> None:
    """After each rung: an interrupted or failing sweep keeps the rungs it finished. The previous
    sweep's report goes as the first is written (not at the start: a sweep stopped before it had a
    rung to show lost the earlier sweep's fit for nothing)."""
    if len(rungs) == 1:
        clear_report(out)
    write_rungs(rungs, out)


def clear_report(out: Path) -> None:
    """Remove a previous sweep's report from `out`: a new sweep that stopped at a rung left its
    scaling.csv beside the old scaling.json and scaling.png (a fit the CSV does not support)."""
    for name in REPORT_FILES:
        (out / name).unlink(missing_ok=True)


def write_report(report: SweepReport, out: Path) -> dict[str, str]:
    """scaling.json, scaling.csv and scaling.png of a sweep in `out`; returns their paths by kind."""
    write_rungs(report.rungs, out)
    doc = {"axis": report.axis, "rungs": [r.result.to_dict() | {"label": r.label} for r in report.rungs],
           "fit": report.fit.to_dict(), "compute_fit": report.compute_fit.to_dict(),
           "prediction": report.prediction}
    atomic_write_text(out / "scaling.json", json.dumps(doc, indent=2))
    png = plot_scaling(report, out / "scaling.png")
    return {"json": str(out / "scaling.json"), "csv": str(out / "scaling.csv"), "png": str(png)}


def write_rungs(rungs: list[Rung], out: Path) -> Path:
    """scaling.csv: one row per trained rung (written atomically after each rung and before any
    fit: an interruption, a later rung's failure or a fit that fails loses no finished training)."""
    rows = [{"rung": r.label, "width": r.size.width, "layers": r.size.layers, "heads": r.size.heads,
             **{k: v for k, v in r.result.to_dict().items() if k != "curve"}} for r in rungs]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "scaling.csv", text.getvalue())
    return out / "scaling.csv"


def recipe_of(rc: RecipeConfig, seed: int, epochs: int = 1, weight_decay: float | None = None,
              eval_every: int | None = None) -> Recipe:
    return Recipe(batch_size=rc.batch_size, epochs=epochs, lr=rc.lr, warmup_steps=rc.warmup_steps,
                  min_lr_ratio=rc.min_lr_ratio, weight_decay=rc.weight_decay if weight_decay is None else weight_decay,
                  eval_every=eval_every or rc.eval_every, eval_rows=rc.eval_rows, seed=seed)
