"""The learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural
Networks"; fastai's `lr_find`): a short run whose learning rate grows geometrically every step,
from far too small to far too large, recording the loss.

    config ─► the align stage's model, data and loss ─► steps at lr_min · (lr_max / lr_min)^(i / (n-1))
           ─► smoothed loss vs lr ─► {out_dir}-find-lr/: lr_find.json, lr_find.png, a suggested train.lr

Too small a rate leaves the loss flat, a good one makes it fall fastest, too large a one makes
it stall and then blow up, or collapse a tower (a pair's contrastive loss settles back at chance,
ln(rows), from below: InfoNCE starts above chance, as random vectors at the initial logit scale
are confidently wrong, so a collapse need not bring the total back to its start; the
captioner's loss, with `loss.caption_weight`, need not follow either). The suggestion is the
steepest descent of the smoothed loss before its minimum, the usual reading of the curve; the
`ceiling` is the rate at which the loss has climbed `CLIMB_BACK` of the way back to its start,
passes `DIVERGED` × its minimum, an InfoNCE pair sits at chance for `AT_CHANCE_STEPS` steps
after having been `BELOW_CHANCE` under it, or a tower's outputs collapse (`collapse_patience`
steps in a row, or fewer at the test's end after the monitor's warning): the test stops there,
training fails above it. The suggestion and the lowest loss are read from the zero-lag
(`centred`) curve, the lowest below the ceiling.
Nothing of the run itself is written: `train.out_dir` stays as it was, the curve goes to a
sibling folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmembed.checkpoint import atomic_write_text
from mmembed.config import Config
from mmembed.data import SkipCounter
from mmembed.errors import UserError
from mmembed.losses import build_loss, parse_pair, same_label_mask
from mmembed.model import build_model
from mmembed.train.align import seed_everything
from mmembed.train.align_data import train_loader_factory, trained_modalities
from mmembed.train.align_step import one_process_step
from mmembed.train.collapse import CollapseMonitor, TowerCollapsed
from mmembed.train.data_setup import prepare_data, prepare_tokenizer, read_train_manifest
from mmembed.train.distributed import current_world, resolve_device
from mmembed.train.engine import precision_context
from mmembed.train.optim import build_optimizer, set_lr
from mmembed.train.preflight import check_config

log = logging.getLogger(__name__)

SMOOTHING = 0.9  # exponential moving average of the loss, debiased (as fastai)
DIVERGED = 4.0  # stop once the smoothed loss exceeds this multiple of its minimum
# Half the way back to the start is a failure: a collapsed tower's contrastive loss returns all the
# way to ln(batch), but beside the captioner's loss (which keeps some of what it learnt) the total
# came back three quarters of the way on the demo at 7e-2, where every tower had collapsed; 0.9 put the
# failure at 0.38, ten times past it.
CLIMB_BACK = 0.5
# A pair's InfoNCE loss over its chance level ln(rows) (1: chance). Back at chance for this many
# steps in a row, within this fraction, after a median of three steps this far below it, is a
# failure: a collapsed tower (or a logit scale driven to nothing) sat at 1.000 ± 0.002 on the tiny
# world from 7e-2 on, where the total had fallen only 2% below chance and never climbed half-way back
# to its start (3.56 against ln 16 = 2.77), while a learning pair's steps scatter by several percent.
AT_CHANCE_STEPS, AT_CHANCE, BELOW_CHANCE = 3, 0.01, 0.05


@dataclass
class LRFinding:
    lrs: list[float]  # one per step taken
    losses: list[float]  # the raw training loss at each step
    smoothed: list[float]
    suggested: float | None  # steepest descent of the smoothed loss before its minimum
    lowest: float  # the rate at the minimum of the zero-lag smoothed loss below the ceiling (`lowest_rate`)
    # where the loss came back to its start or blew up, or a tower collapsed (the test stopped there)
    ceiling: float | None
    folder: Path | None = None


def suggest(lrs: list[float], smoothed: list[float], skip: int = 3) -> float | None:
    """The rate where the smoothed loss falls fastest per unit of log(lr), before its minimum;
    None when it never falls. The first `skip` points (the average still settling) are ignored.
    `smoothed` should be `centred`: a one-sided moving average lags the rate by ~10 steps, which
    put the suggestion 2.6x (100 steps) to 4.6x (20 steps) above the steepest fall."""
    if len(smoothed) <= skip + 1:  # too few points to read a fall from (a first loss that overflowed)
        return None
    lowest = int(np.argmin(smoothed))
    if lowest <= skip:
        return None
    log_lr, loss = np.log(np.asarray(lrs[skip:lowest + 1])), np.asarray(smoothed[skip:lowest + 1])
    slope = np.gradient(loss, log_lr)
    return float(np.exp(log_lr[int(np.argmin(slope))]))


def lowest_rate(lrs: list[float], losses: list[float], ceiling: float | None = None) -> float:
    """The rate at the minimum of `centred(losses)` below `ceiling` (a collapsed tower's plateau
    at ln(batch) can be the lowest loss of a test that barely fell). The one-sided moving average
    (`smoothed`) lags as it does for `suggest`: its minimum came ~3x past the loss's (3.3e-3 for
    a minimum at 1e-3 over 100 steps). The first rate when no loss is left."""
    below = [x for lr, x in zip(lrs, centred(losses)) if ceiling is None or lr < ceiling]  # a prefix: rates rise
    return lrs[int(np.argmin(below))] if below else lrs[0]


def warned_collapse(monitor: CollapseMonitor, lrs: list[float]) -> float | None:
    """The rate where a collapse began that the monitor warned about but the test ended before
    stopping on (it ran out of steps within `stop_after`); None when no tower ends collapsed."""
    streak = max(monitor.streak.values(), default=0)
    return lrs[max(0, len(lrs) - streak)] if lrs and streak >= monitor.patience else None


def collapse_patience(collapse_steps: int, steps: int) -> int:
    """Collapsed steps in a row that end a range test of `steps` steps: a tenth of them (at least
    3, at most `train.collapse_steps`), so the test stops at about the same rate whatever its
    length. `collapse_steps` (10) alone outlasted a 30-step test: its towers collapsed from 3.6e-2,
    warned, and the collapsed plateau was reported as the lowest loss with no ceiling."""
    return min(collapse_steps, max(3, steps // 10))


def centred(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """A zero-lag smoothing of the finite losses: the debiased moving average run forward, then
    the same backward over its result (as filtfilt does); a final non-finite loss is left out."""
    finite = list(losses)
    while finite and not math.isfinite(finite[-1]):
        finite.pop()

    def one_way(xs: list[float]) -> list[float]:
        out, average = [], 0.0
        for i, x in enumerate(xs, 1):
            average = beta * average + (1 - beta) * x
            out.append(average / (1 - beta ** i))
        return out

    return one_way(one_way(finite)[::-1])[::-1]


def _failed(losses: list[float], smoothed: list[float], chance: list[dict[str, float]] = (), skip: int = 3) -> bool:
    """The newest loss is non-finite, or the median of the last three (the moving average lags
    by a decade of rates here) is past `DIVERGED` × the smoothed minimum or, after a fall of at
    least 10%, has climbed back `CLIMB_BACK` of the way to the smoothed start; or a pair of
    `chance` (per step: pair → InfoNCE loss / its chance level) is `back_at_chance`."""
    if not math.isfinite(losses[-1]):
        return True
    last, low = float(np.median(losses[-3:])), min(smoothed)
    if last > DIVERGED * low:
        return True
    newest = chance[-1] if chance else {}
    if any(back_at_chance([step[pair] for step in chance if pair in step]) for pair in newest):
        return True
    start = smoothed[min(skip, len(smoothed) - 1)]
    return low < 0.9 * start and smoothed.index(low) < len(smoothed) - 1 and last >= low + CLIMB_BACK * (start - low)


def back_at_chance(ratios: list[float]) -> bool:
    """Whether a pair's loss / chance ratios end with `AT_CHANCE_STEPS` within `AT_CHANCE` of 1,
    after a median of three earlier ones `BELOW_CHANCE` under it (a pair still falling through
    chance from its start above it is not back)."""
    recent, earlier = ratios[-AT_CHANCE_STEPS:], ratios[:-AT_CHANCE_STEPS]
    if len(recent) < AT_CHANCE_STEPS or any(abs(r - 1) > AT_CHANCE for r in recent):
        return False
    return any(np.median(earlier[i:i + 3]) <= 1 - BELOW_CHANCE for i in range(len(earlier) - 2))


def chance_ratios(metrics: dict[str, float], batch, label_positives: bool) -> dict[str, float]:
    """Each InfoNCE pair's loss over its chance level: the mean over the pair's rows of ln(its
    candidates), the rows with both modalities less those of its label (`loss.label_positives`),
    which is ln(rows) without labels. A collapsed tower scores every candidate alike: ratio 1."""
    out = {}
    for key, loss in metrics.items():
        if not key.startswith("loss/"):
            continue
        a, b = parse_pair(key.removeprefix("loss/"))
        both = batch.present[a] & batch.present[b]
        candidates = torch.full((int(both.sum()),), float(both.sum()))
        if label_positives:
            candidates -= same_label_mask(batch.labels[both]).sum(dim=1)
        level = float(candidates.log().mean()) if len(candidates) >= 2 else 0.0
        if level > 0:  # (0: every row's only candidate is its own, no negatives)
            out[key] = loss / level
    return out


def find_lr(cfg: Config, steps: int = 100, lr_min: float = 1e-6, lr_max: float = 1.0) -> LRFinding:
    """Run the range test on the align stage of `cfg` and write its curve next to `train.out_dir`."""
    if steps < 8 or not 0 < lr_min < lr_max:
        raise UserError(f"--find-lr needs at least 8 steps and 0 < lr_min < lr_max (got {steps}, {lr_min}, {lr_max})")
    # the process group is not set up for --find-lr, so torchrun's variables are what tell
    if current_world().active or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--find-lr runs in one process: start it without torchrun")
    # as `mmembed train` checks its align stage: a misspelt key was found after the world and the tokenizer were made
    check_config(dataclasses.replace(cfg, decoder=None))
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    root = prepare_data(cfg.data)
    manifest = read_train_manifest(cfg, root)
    tokenizer = prepare_tokenizer(cfg, root, None, manifest)
    space = build_model(cfg, tokenizer).space.to(device)
    loss_fn = build_loss(cfg.loss)
    skips = SkipCounter()
    make_loader, _, _ = train_loader_factory(cfg, root, tokenizer, trained_modalities(loss_fn, space), skips, manifest)
    # the objective the align stage trains (the captioner's loss too, with loss.caption_weight); a
    # collapsed tower is a failure the loss cannot show: it settles at ln(batch), below its start
    monitor = CollapseMonitor(stop_after=collapse_patience(cfg.train.collapse_steps, steps))
    trained, step_fn = one_process_step(cfg, space, loss_fn, tokenizer, device, skips, monitor)
    optimizer = build_optimizer(trained, lr_min, cfg.train.weight_decay, cfg.train.betas)
    trained.train()

    lrs, losses, smoothed, chance, average, ceiling, unlearned = [], [], [], [], 0.0, None, 0
    epoch = 0
    while len(lrs) < steps and ceiling is None:
        taken = len(lrs)
        for batch in make_loader(epoch, 0):
            if len(lrs) == steps:
                break
            lr = lr_min * (lr_max / lr_min) ** (len(lrs) / (steps - 1))
            set_lr(optimizer, lr)
            try:
                out = _forward_backward(step_fn, batch, device, cfg.train.precision)
            except TowerCollapsed as e:  # the rate of its first collapsed step (this one is its last)
                began = len(lrs) - (e.steps - 1)
                ceiling = ([*lrs, lr])[max(0, began)]
                log.warning("the %s tower collapsed: the range test stops at lr %.3g", e.modality, ceiling)
                break
            if out is None or not out.learned:  # no pair and no caption to learn from (a batch of one row)
                unlearned += out is not None
                optimizer.zero_grad(set_to_none=True)
                continue
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(trained.parameters(), cfg.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            space.clamp_()
            loss = float(out.loss.detach())
            average = SMOOTHING * average + (1 - SMOOTHING) * loss
            lrs.append(lr)
            losses.append(loss)
            smoothed.append(average / (1 - SMOOTHING ** len(lrs)))
            if loss_fn.kind == "infonce":  # SigLIP's loss at chance depends on its bias, not on ln(rows)
                chance.append(chance_ratios(out.metrics, batch, cfg.loss.label_positives))
            if _failed(losses, smoothed, chance):
                ceiling = lr
                break
        if len(lrs) == taken and ceiling is None:  # a whole epoch without one usable batch: it never will
            if unlearned:
                raise UserError(f"--find-lr: no batch had anything to learn from ({unlearned} of one row or without "
                                "a pair of modalities): raise train.batch_size")
            raise UserError(f"--find-lr: no batch of the training data could be used "
                            f"({skips.summary() or 'no row read'}); check data.root and the manifest")
        epoch += 1
    if ceiling is None:
        ceiling = warned_collapse(monitor, lrs)
    zero_lag = centred(losses)
    finding = LRFinding(lrs, losses, smoothed, suggest(lrs[:len(zero_lag)], zero_lag),
                        lowest_rate(lrs, losses, ceiling), ceiling)
    finding.folder = _write(finding, Path(cfg.train.out_dir).resolve())  # "." has no name to extend
    return finding


def _forward_backward(step_fn, batch, device: torch.device, precision: str):
    """The step's output, its loss's gradients taken (when it has something to learn), under the
    autocast the engine trains with (`Trainer._forward_backward`): in fp32 the test found rates
    for another numeric regime than the bf16 run it was asked about."""
    with precision_context(device, precision):
        out = step_fn(batch)
        if out is not None and out.learned:
            out.loss.backward()
    return out


def _write(f: LRFinding, out_dir: Path) -> Path:
    folder = out_dir.with_name(out_dir.name + "-find-lr")
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"lr": lr, "loss": loss, "smoothed": s} for lr, loss, s in zip(f.lrs, f.losses, f.smoothed)]
    summary = {"suggested_lr": f.suggested, "lowest_loss_lr": f.lowest, "ceiling_lr": f.ceiling, "steps": rows}
    atomic_write_text(folder / "lr_find.json", json.dumps(summary, indent=1))  # a full disk keeps the last one whole
    try:
        _plot(f, folder / "lr_find.png")
    except Exception as e:  # plotting is a convenience; a missing backend must not fail the test
        log.warning("could not draw the range test: %s", e)
    return folder


def _plot(f: LRFinding, path: Path) -> None:
    from mmembed.insight.plotting import pyplot, save_png

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(f.lrs, f.losses, alpha=0.3, label="loss")
    ax.plot(f.lrs, f.smoothed, label="smoothed")
    if f.suggested is not None:
        ax.axvline(f.suggested, color="tab:green", linestyle="--", label=f"suggested {f.suggested:.2g}")
    if f.ceiling is not None:
        ax.axvline(f.ceiling, color="tab:red", linestyle=":", label=f"fails above {f.ceiling:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    start = [s for s in f.smoothed[:3] if math.isfinite(s)]
    if start:  # the blow-up at the end would flatten everything else
        ax.set_ylim(top=1.3 * max(start))
    ax.legend()
    ax.grid(alpha=0.3)
    save_png(fig, path)
