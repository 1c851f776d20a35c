"""AdamW with decoupled weight decay on matrices only, and a warm-up + cosine learning rate.

Weight decay pulls weights toward zero to fight overfitting; applied to LayerNorm gains,
biases, embedding tables or the logit scale it only hurts (it shrinks a temperature or a
norm's gain that the model needs), so those parameters go in a group with decay 0 — the
same split nanoGPT and open_clip make.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

log = logging.getLogger(__name__)


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters: ≥2-D weights of Linear/Conv/attention decay, the rest do not."""
    no_decay_types = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.Embedding)
    no_decay_ids = set()
    for mod in module.modules():
        if isinstance(mod, no_decay_types):
            no_decay_ids.update(id(p) for p in mod.parameters(recurse=False))
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        # 1-D tensors are biases, norm gains and scalars such as the logit scale; names ending in
        # "embedding" cover positional/cls parameters that are not nn.Embedding modules.
        if p.ndim < 2 or id(p) in no_decay_ids or "embed" in name.rsplit(".", 1)[-1] or "token" in name.rsplit(".", 1)[-1]:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(module: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    groups = param_groups(module, weight_decay)
    if not any(g["params"] for g in groups):
        raise ValueError("nothing to train: every parameter is frozen")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-6)


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_ratio: float,
          time_progress: float = 0.0) -> float:
    """Linear warm-up to `base_lr` over `warmup_steps`, then cosine decay to `base_lr * min_ratio`
    at `total_steps`. `step` counts optimizer steps from 0. `time_progress`: the fraction of a
    time budget spent; after the warm-up the cosine follows whichever of the two is further on,
    so the decay ends at the budget when steps come slower than planned; the warm-up likewise
    ends at its share of the budget (warmup_steps / total_steps of it) if that comes first (a
    budget spent inside a step-counted warm-up stopped at a fraction of `base_lr`, never
    annealed). A warm-up longer than half the run is cut to half of it, so a short run still
    reaches `base_lr` and anneals."""
    warmup_steps = min(warmup_steps, total_steps // 2)
    share = warmup_steps / total_steps if total_steps > 0 else 0.0  # of the time budget
    if warmup_steps > 0 and step < warmup_steps and time_progress < share:
        return base_lr * max((step + 1) / warmup_steps, time_progress / share)
    span = max(1, total_steps - warmup_steps)
    # the cosine's share of the budget starts where the warm-up's ends: on plan (step s at s / total
    # of the time) both agree; the raw fraction ran the whole decay ahead by the warm-up's share
    after_warmup = (time_progress - share) / (1 - share) if share < 1 else 1.0
    progress = min(1.0, max((step - warmup_steps) / span, after_warmup))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return base_lr * (min_ratio + (1 - min_ratio) * cosine)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[tuple[float, tuple[float, float]]]:
    """Each group's weight decay and betas (JSON may have brought the betas back as a list)."""
    return [(float(g["weight_decay"]), tuple(float(b) for b in g["betas"])) for g in optimizer.param_groups]


def restore_hyperparameters(optimizer: torch.optim.Optimizer, wanted: list[tuple[float, tuple[float, float]]]) -> None:
    """Set each group's weight decay and betas back to `wanted` (this run's config): a resumed
    optimizer's groups come back as its checkpoint had them (the learning rate is set every step)."""
    for group, have, (decay, betas) in zip(optimizer.param_groups, hyperparameters(optimizer), wanted):
        if have != (decay, betas):
            log.info("resume: weight_decay %s, betas %s as configured (the checkpoint had %s, %s)",
                     decay, betas, *have)
            group["weight_decay"], group["betas"] = decay, betas
