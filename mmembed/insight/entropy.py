"""Entropy view: how sure the decoder is at each token, and how temperature changes what it writes.

Two entropies, both in nats (log V for a uniform choice among V tokens, 0 for a certain one):

    drawn   H(softmax(z / T)) after top-k/top-p: the distribution each token was drawn from, what
            `Generation.entropy` holds. Greedy (T = 0) draws from a point mass: 0.
    model   H(softmax(z)): the model's own uncertainty at that step, whatever the temperature.
            Recomputed by one teacher-forced forward over prompt + answer.

A temperature sweep samples N answers at each temperature from one prompt (one batch, seeded) and
reports both entropies (means over every generated token of the N answers) and distinct-n:
unique n-grams / total n-grams over the N answers (n-grams within an answer, <eos> left out).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mmembed.decoder.answer import Generation, Stops
from mmembed.decoder.generate import generate
from mmembed.decoder.prompt import Resolved
from mmembed.decoder.sampling import Sampling
from mmembed.decoder.score import MAX_COPIES, per_token
from mmembed.insight.plotting import pyplot, save_png, token_labels
from mmembed.scalars import as_integer, as_real

if TYPE_CHECKING:
    from mmembed.decoder import PromptModel


def entropy(probs: Tensor) -> Tensor:
    """H(p) = -Σ p log p over the last dimension, in nats (0 log 0 = 0). probs: (..., V) → (...)."""
    return -torch.where(probs > 0, probs * probs.log(), torch.zeros_like(probs)).sum(dim=-1)


def logits_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature) in nats; temperature 0 is a point mass: 0.
    logits: (..., V) → (...); -inf logits are tokens never drawn. The temperature is any real
    number (numpy's and 0-d tensors too, not a bool); ValueError for one that is not a finite
    number >= 0. A row holding NaN or +inf gives NaN (it was 0: "certain")."""
    t = _real(temperature)
    if t is None or not (math.isfinite(t) and t >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    # float64, the best logit shifted to 0 first: z / T past float32's range (a tiny T, huge
    # logits) gave inf - inf = NaN, which the sum below then counted as 0 nats
    z = logits.double()
    bad = (z.isnan() | (z == math.inf)).any(dim=-1) | (z == -math.inf).all(dim=-1)
    if t == 0:  # a broken row is no point mass at T = 0 either (it read 0: "certain")
        return torch.zeros(logits.shape[:-1], device=logits.device).masked_fill(bad, math.nan)
    logp = ((z - z.amax(dim=-1, keepdim=True)) / t).log_softmax(dim=-1)
    terms = torch.where(logp == -math.inf, torch.zeros_like(logp), logp.exp() * logp)  # 0 log 0 = 0
    return (-terms.sum(dim=-1)).masked_fill(bad, math.nan).float()


def _real(value) -> float | None:
    """`value` as a float when it is a real number (np.float32(0.5), torch.tensor(0.5) included:
    they were refused as "not a finite number >= 0"); None for a bool or anything else."""
    value = as_real(value)  # the sampler's reading of a number
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def model_entropy(pm: PromptModel, prompt: Resolved, answers: Sequence[Sequence[int]]) -> list[list[float]]:
    """The model's own entropy H(softmax(z)) at every token of each answer, teacher-forced.

    Args:
        pm: the decoder stage.
        prompt: the prompt the answers follow.
        answers: generated ids per answer (`Generation.token_ids`).

    Returns:
        One list per answer, as long as it: entry t is the entropy of the distribution over token t.
    """
    if not any(answers):
        return [[] for _ in answers]
    return per_token(pm.lm, pm.fmt, prompt, answers, lambda logits, ids: logits_entropy(logits))


@dataclass
class TokenEntropy:
    """Per-token entropies of one generation: `labels` (the tokens' text), `drawn` (the
    distribution each was drawn from) and `model` (the model's own, at T = 1); nats."""

    labels: list[str]
    drawn: list[float]
    model: list[float]

    def plot(self, out_png: str | Path) -> Path:
        """A bar per generated token (drawn), the model's entropy as a line; returns the PNG's path."""
        fig = pyplot().figure(figsize=(max(5.0, 0.3 * len(self.labels) + 1.5), 3.4))
        ax = fig.gca()
        x = range(len(self.labels))
        ax.bar(x, self.drawn, color="tab:blue", alpha=0.7, label="drawn from: softmax(z/T), top-k/p")
        ax.plot(x, self.model, color="tab:orange", marker=".", label="model: softmax(z)")
        ax.set_xticks(x, self.labels, rotation=90, fontsize=8)
        ax.set_ylabel("entropy (nats)")
        ax.set_title(f"per-token entropy (mean drawn {_mean(self.drawn):.2f}, model {_mean(self.model):.2f})",
                     fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        return save_png(fig, out_png)


def token_entropy(pm: PromptModel, prompt: Resolved, generation: Generation) -> TokenEntropy:
    """The entropy view of one generation of `prompt` (see `TokenEntropy`)."""
    (model,) = model_entropy(pm, prompt, [generation.token_ids])
    return TokenEntropy(token_labels(pm.fmt, generation.token_ids), list(generation.entropy), model)


@dataclass
class SweepRow:
    """One temperature of a sweep: mean entropies (nats) over every generated token of `samples`
    answers, distinct-1/2 over those answers, and `tokens` generated in all."""

    temperature: float
    drawn_entropy: float
    model_entropy: float
    distinct_1: float
    distinct_2: float
    samples: int
    tokens: int


def temperature_sweep(pm: PromptModel, prompt: Resolved, temperatures: Sequence[float], device: torch.device,
                      samples: int = 8, max_new_tokens: int = 32, seed: int | None = 0, top_k: int | None = None,
                      top_p: float | None = None, stops: Stops = Stops()) -> list[SweepRow]:
    """Sample `samples` answers to one prompt at each temperature (one batch each, same seed).

    `temperatures`: a list of them, or one number.

    Returns:
        One `SweepRow` per temperature, in the order given. Raises ValueError for a bad
        temperature, top_k, top_p or max_new_tokens, or samples < 1.
    """
    if (n := as_integer(samples)) is None or not 1 <= n <= MAX_COPIES:  # numpy's ints too
        raise ValueError(f"samples must be an integer in [1, {MAX_COPIES}], got {samples!r}")
    if isinstance(as_real(temperatures), (int, float)):  # one temperature (any kind of number) is a list of one
        temperatures = [temperatures]
    elif isinstance(temperatures, (str, bytes)) or not isinstance(temperatures, Iterable):
        raise ValueError(f"temperatures must be a number or a list of numbers, got {temperatures!r:.80}")
    settings = [Sampling(t, top_k, top_p) for t in temperatures]  # validate them all before any work
    if not settings:  # as the command line refuses an empty sweep
        raise ValueError("temperatures is empty: give at least one")
    rows = []
    for sampling in settings:
        outs = generate(pm.lm, pm.fmt, [prompt] * samples, max_new_tokens, sampling, stops, seed, device)
        model = model_entropy(pm, prompt, [o.token_ids for o in outs])
        texts = [o.token_ids[:-1] if o.finish_reason == "eos" else o.token_ids for o in outs]
        rows.append(SweepRow(abs(float(sampling.temperature)),  # "-0" is 0: no row labelled -0
                             _mean([h for o in outs for h in o.entropy]),
                             _mean([h for m in model for h in m]), distinct_n(texts, 1), distinct_n(texts, 2),
                             samples, sum(len(o.token_ids) for o in outs)))
    return rows


def distinct_n(answers: Sequence[Sequence[int]], n: int) -> float:
    """Unique n-grams / total n-grams over the answers (n-grams never cross answers); 0 when
    no answer has n tokens."""
    grams = [tuple(a[i:i + n]) for a in answers for i in range(len(a) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def sweep_table(rows: Sequence[SweepRow]) -> str:
    """A Markdown table of a sweep."""
    lines = ["| temperature | entropy drawn (nats) | entropy model (nats) | distinct-1 | distinct-2 | tokens |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r.temperature:g} | {r.drawn_entropy:.3f} | {r.model_entropy:.3f} | {r.distinct_1:.3f} | "
              f"{r.distinct_2:.3f} | {r.tokens} |" for r in rows]
    return "\n".join(lines)


def sweep_json(rows: Sequence[SweepRow]) -> str:
    """The sweep's rows as a JSON list of objects."""
    return json.dumps([asdict(r) for r in rows])


def plot_sweep(rows: Sequence[SweepRow], out_png: str | Path) -> Path:
    """Mean entropies and distinct-n against temperature, side by side; returns the PNG's path."""
    fig = pyplot().figure(figsize=(9.0, 3.4))
    left, right = fig.subplots(1, 2)
    t = [r.temperature for r in rows]
    left.plot(t, [r.drawn_entropy for r in rows], marker="o", label="drawn from: softmax(z/T)")
    left.plot(t, [r.model_entropy for r in rows], marker="s", label="model: softmax(z)")
    left.set_ylabel("mean entropy per token (nats)")
    right.plot(t, [r.distinct_1 for r in rows], marker="o", label="distinct-1")
    right.plot(t, [r.distinct_2 for r in rows], marker="s", label="distinct-2")
    right.set_ylim(0, 1.05)
    right.set_ylabel(f"unique / total n-grams ({rows[0].samples if rows else 0} answers)")
    for ax in (left, right):
        ax.set_xlabel("temperature")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("temperature sweep", fontsize=10)
    return save_png(fig, out_png)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0

