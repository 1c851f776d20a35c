"""Choosing the next token: temperature, top-k, top-p (nucleus), and the entropy of the choice.

Logits z become the distribution p_i = softmax(z / T)_i. A low temperature T sharpens it toward
the most likely token (T = 0 is greedy: argmax), a high one flattens it. Top-k keeps the k most
likely tokens; top-p keeps the smallest set whose probability reaches p. What is left is
renormalised and sampled from, and that distribution is the one reported: the chosen token's
log-probability and the entropy H = -Σ p log p in nats (0 for greedy, which is a point mass;
log V for a uniform choice among V tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Sampling:
    """Validated sampling settings.

    Args:
        temperature: 0 = greedy; otherwise a finite positive number.
        top_k: keep the k most likely tokens (>= 1; larger than the vocabulary = all of it).
        top_p: keep the smallest set of tokens whose probability reaches top_p, in (0, 1].

    Raises:
        ValueError: negative or non-finite temperature, top_k < 1, top_p outside (0, 1].
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"top_k must be an integer >= 1 or None, got {k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise ValueError(f"top_p must be in (0, 1] or None, got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Choice:
    """One step's pick for every row: token ids, their log-probabilities and the entropies (B,)."""

    tokens: Tensor
    logprobs: Tensor
    entropy: Tensor


def filtered_logits(logits: Tensor, sampling: Sampling) -> tuple[Tensor, Tensor | None]:
    """Temperature, then top-k, then top-p.

    Args:
        logits: (B, V).

    Returns:
        (scores, index): scores (B, V') with removed tokens at -inf, and index (B, V') mapping
        each column to its token id — None when the columns are the vocabulary itself.
    """
    scores = logits.float() / sampling.temperature
    index = None
    vocab = scores.shape[-1]
    if sampling.top_k is not None and sampling.top_k < vocab:
        scores, index = scores.topk(sampling.top_k, dim=-1)  # sorted, descending
    if sampling.top_p is not None and sampling.top_p < 1:
        if index is None:
            scores, index = scores.sort(dim=-1, descending=True)
        probs = scores.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        before = probs.cumsum(dim=-1) - probs
        scores = scores.masked_fill(before >= sampling.top_p, float("-inf"))
    return scores, index


def choose(logits: Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> Choice:
    """Pick the next token of each row.

    Args:
        logits: (B, V) next-token logits.
        sampling: the settings.
        generator: the random stream (seeded for reproducible samples); unused when greedy.

    Returns:
        A `Choice` of (B,) tensors.
    """
    if sampling.greedy:
        tokens = logits.argmax(dim=-1)
        zeros = torch.zeros(tokens.shape, dtype=torch.float32, device=logits.device)
        return Choice(tokens, zeros, zeros.clone())
    scores, index = filtered_logits(logits, sampling)
    logp = scores.log_softmax(dim=-1)  # (B, V')
    probs = logp.exp()
    pick = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
    tokens = pick if index is None else index.gather(-1, pick)
    entropy = -torch.where(probs > 0, probs * logp, torch.zeros_like(probs)).sum(dim=-1)
    return Choice(tokens.squeeze(-1), logp.gather(-1, pick).squeeze(-1), entropy)

