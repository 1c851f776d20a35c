"""Train one decoder as a plain language model on packed rows, recording the curves a scaling or
regularisation study needs.

    rows (R, T+1) ─► shuffled batches ─► Decoder ─► next-token cross-entropy ─► AdamW (warm-up + cosine)
                 every `eval_every` steps: loss on a fixed slice of the training rows and on the
                 validation rows, both in eval mode (no dropout), so their gap is the
                 generalisation gap and not a dropout artefact
                 (every validation row: the last evaluation's is the number a sweep reports and fits)

The optimiser, its parameter groups (no decay on norms, biases, embeddings) and the schedule are
the training engine's (`mmembed.train.optim`): a sweep measures the recipe users train with.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from mmembed.decoder.model import Decoder
from mmembed.errors import UserError
from mmembed.insight.flops import estimated_training_flops, measured_flops
from mmembed.train.optim import build_optimizer, lr_at, set_lr


@dataclass(frozen=True)
class Recipe:
    """How one model is trained.

    Attributes:
        batch_size: rows per step.
        epochs: passes over the training rows (1 = every token once).
        lr: peak learning rate; warmup_steps of linear warm-up, then cosine to lr · min_lr_ratio.
        weight_decay: decoupled, on matrices only.
        eval_every: steps between evaluations (the last step is always evaluated).
        eval_rows: training rows scored per evaluation (the training loss of the curve); the
            validation loss scores every validation row at every evaluation.
        seed: initialisation and shuffling.
    """

    batch_size: int = 32
    epochs: int = 1
    lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    eval_every: int = 50
    eval_rows: int = 128
    seed: int = 0


@dataclass
class LMResult:
    """One trained model's numbers.

    Attributes:
        params: non-embedding parameters (N of the scaling-law papers).
        params_total: every parameter, embeddings included.
        tokens: training tokens processed (D; epochs × training rows × context).
        flops_estimate: 6 · N · D.
        flops_measured: FLOPs counted by torch.utils.flop_counter for one step × steps.
        seconds: wall time of the training loop (evaluations included).
        train_loss: the last evaluation's, on `eval_rows` training rows (nats per token, eval mode).
        val_loss: the trained model's on every validation row (nats per token, eval mode): the
            number a sweep fits; `val_tokens` sets how many.
        curve: every evaluation (`eval_rows` training rows, every validation row): step, tokens,
            train_loss, val_loss, seconds; its last val_loss is `val_loss`, and its lowest
            (`best`, where early stopping stops) is on the same rows.
    """

    params: int
    params_total: int
    tokens: int
    flops_estimate: int
    flops_measured: int
    seconds: float
    train_loss: float
    val_loss: float
    curve: list[dict] = field(default_factory=list)

    @property
    def best(self) -> dict:
        """The evaluation with the lowest validation loss: where early stopping would stop."""
        return min(self.curve, key=lambda p: p["val_loss"])

    def to_dict(self) -> dict:
        return asdict(self) | {"best_step": self.best["step"], "best_val_loss": self.best["val_loss"]}


def lm_loss(decoder: Decoder, rows: Tensor) -> Tensor:
    """Mean next-token cross-entropy of (B, T+1) rows: inputs are ids[:, :-1], targets ids[:, 1:]."""
    logits = decoder(rows[:, :-1])  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten())


@torch.no_grad()
def mean_loss(decoder: Decoder, rows: Tensor, batch_size: int) -> float:
    """Token-weighted mean loss over `rows` in eval mode (every row has the same length)."""
    was = decoder.training
    decoder.eval()
    total = sum(float(lm_loss(decoder, rows[i:i + batch_size])) * len(rows[i:i + batch_size])
                for i in range(0, len(rows), batch_size))
    decoder.train(was)
    return total / len(rows)


def train_lm(decoder: Decoder, train_rows: Tensor, val_rows: Tensor, recipe: Recipe) -> LMResult:
    """Train `decoder` in place on `train_rows` and score it on `val_rows`.

    Args:
        decoder: a freshly initialised model (its dropout is the model's own setting).
        train_rows, val_rows: (R, T+1) long ids from `lm_data.token_rows`.
        recipe: optimisation settings.

    Returns:
        The run's `LMResult`: its curve scores `eval_rows` training rows and every validation row.
    """
    r = recipe
    if len(train_rows) < r.batch_size:
        raise UserError(f"{len(train_rows)} training rows, fewer than batch_size={r.batch_size}: give more tokens")
    per_epoch = len(train_rows) // r.batch_size
    steps = per_epoch * r.epochs
    context = train_rows.shape[1] - 1
    generator = torch.Generator().manual_seed(r.seed)
    optimizer = build_optimizer(decoder, r.lr, r.weight_decay, (0.9, 0.95))
    step_flops = measured_flops(lambda: lm_loss(decoder, train_rows[: r.batch_size]))
    optimizer.zero_grad(set_to_none=True)
    # every validation row at every evaluation: the reported loss and the curve's lowest (the study's
    # early stop) are then on the same rows (the first 128 rows of 64 tokens scored 8,192 of the
    # shipped 32,768 validation tokens, whatever val_tokens said)
    train_probe = train_rows[: r.eval_rows]
    curve: list[dict] = []
    start = time.perf_counter()
    decoder.train()
    step = 0
    for _ in range(r.epochs):
        order = torch.randperm(len(train_rows), generator=generator)
        for b in range(per_epoch):
            set_lr(optimizer, lr_at(step, r.lr, r.warmup_steps, steps, r.min_lr_ratio))
            loss = lm_loss(decoder, train_rows[order[b * r.batch_size:(b + 1) * r.batch_size]])
            if not math.isfinite(value := loss.item()):
                raise UserError(f"loss became {value} at step {step} of a {r.lr:g} learning rate: lower "
                                "recipe.lr (or raise recipe.warmup_steps)")
            loss.backward()
            if r.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(decoder.parameters(), r.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % r.eval_every == 0 or step == steps:
                curve.append({"step": step, "tokens": step * r.batch_size * context,
                              "train_loss": mean_loss(decoder, train_probe, r.batch_size),
                              "val_loss": mean_loss(decoder, val_rows, r.batch_size),
                              "seconds": time.perf_counter() - start})
    tokens = steps * r.batch_size * context
    n = decoder.num_parameters(non_embedding=True)
    return LMResult(params=n, params_total=decoder.num_parameters(non_embedding=False), tokens=tokens,
                    flops_estimate=estimated_training_flops(n, tokens), flops_measured=step_flops * steps,
                    seconds=time.perf_counter() - start, train_loss=curve[-1]["train_loss"],
                    val_loss=curve[-1]["val_loss"], curve=curve)
