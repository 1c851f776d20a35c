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

from mmembed.scalars import as_integer, as_real


@dataclass(frozen=True)
class Sampling:
    """Validated sampling settings.

    Args:
        temperature: 0 = greedy; otherwise a finite positive number.
        top_k: keep the k most likely tokens, and any tied with the k-th as transformers does (>= 1;
            larger than the vocabulary = all of it).
        top_p: keep the smallest set of tokens whose probability reaches top_p, and any tied with
            the last of them, in (0, 1].

    Numbers of any type are taken: numpy's and 0-d tensors too (an integer one for top_k).

    Raises:
        ValueError: negative or non-finite temperature, top_k < 1, top_p outside (0, 1].
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperature", as_real(self.temperature))
        object.__setattr__(self, "top_p", as_real(self.top_p))
        object.__setattr__(self, "top_k", self.top_k if (k := as_integer(self.top_k)) is None else k)
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


_TINY_TEMPERATURE = 1e-30  # above it, logits up to 1e8 stay finite when divided by the temperature
_HUGE_TEMPERATURE = 1e30  # below it, the temperature itself is a float32 number
NUCLEUS_CANDIDATES = 4096  # top-p alone first looks for its tokens among this many (a top-k, not a sort)


def filtered_logits(logits: Tensor, sampling: Sampling) -> tuple[Tensor, Tensor | None]:
    """Temperature, then top-k, then top-p.

    Args:
        logits: (B, V).

    Returns:
        (scores, index): scores (B, V') with removed tokens at -inf, and index (B, V') mapping
        each column to its token id — None when the columns are the vocabulary itself. With top-k
        or top-p the columns are sorted by score and V' is at most the most tokens a row keeps.
    """
    scores = logits.float()
    t = sampling.temperature
    if t < _TINY_TEMPERATURE:  # z / T could pass float32's range: shift the row's
        scores = scores - scores.amax(dim=-1, keepdim=True)  # best to 0 first (softmax is the same)
    if t < _TINY_TEMPERATURE or t > _HUGE_TEMPERATURE:  # T itself may round to 0 or inf in float32
        scores = (scores.double() / t).float()
    else:
        scores = scores / t
    vocab = scores.shape[-1]
    top_k = sampling.top_k if sampling.top_k is not None and sampling.top_k < vocab else None
    top_p = sampling.top_p if sampling.top_p is not None and sampling.top_p < 1 else None
    if top_k is not None:
        scores, index = _top_k(scores, top_k)  # sorted, descending
        if top_p is None:
            return scores, index
        return _nucleus(scores, index, scores.double().logsumexp(dim=-1, keepdim=True), top_p)
    if top_p is None:
        return scores, None
    # a nucleus is usually far smaller than the vocabulary: look among the best few thousand (a
    # top-k costs a fifth of a sort of 50k), and sort everything only for a row whose nucleus is wider
    log_total = scores.double().logsumexp(dim=-1, keepdim=True)  # (B, 1) normaliser of the whole row
    if vocab > NUCLEUS_CANDIDATES:
        top, index = scores.topk(NUCLEUS_CANDIDATES, dim=-1)
        found = _nucleus(top, index, log_total, top_p)
        if found[0].shape[1] < NUCLEUS_CANDIDATES:  # every row's nucleus closed among the candidates
            return found
    top, index = scores.sort(dim=-1, descending=True)
    return _nucleus(top, index, log_total, top_p)


def _top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k best scores of each row, sorted, and every token tied with the k-th (as transformers'
    warper keeps them: which of the tied ones `topk` returns would otherwise depend on the kernel).
    Columns past a row's own count are at -inf."""
    top, index = scores.topk(min(k + 1, scores.shape[-1]), dim=-1)  # one more: is the k-th tied?
    kth = top[:, k - 1:k]  # (B, 1)
    if top.shape[1] == k or not bool(((top[:, k:] == kth) & (kth > float("-inf"))).any()):
        return top[:, :k], index[:, :k]  # no tie past the k-th (the usual case: one top-k, no full pass)
    tied = torch.where(kth > float("-inf"), (scores >= kth).sum(dim=-1, keepdim=True), k)  # (B, 1)
    top, index = scores.topk(int(tied.max()), dim=-1)
    return top.masked_fill(top < kth, float("-inf")), index


def _nucleus(top: Tensor, index: Tensor, log_total: Tensor, top_p: float) -> tuple[Tensor, Tensor]:
    """Top-p over a row's best tokens, sorted descending (B, n), whose whole row has the log-sum-exp
    `log_total` (B, 1): the smallest prefix reaching top_p and any token tied with its last, cut to
    the longest such prefix."""
    # drop a token when the tokens before it already reach top_p (the first always stays), in
    # float64: in float32 a sum over a whole vocabulary drifts by ~1e-5, while the edge token's own
    # margin can be 1e-7 (transformers, summing the small tail, mostly gets it right)
    probs = (top.double() - log_total).exp()
    drop = probs.cumsum(dim=-1) - probs >= top_p
    # and keep every token tied with the last one kept, as top-k does with the k-th: which of equal
    # scores the sort put first depends on the kernel (transformers keeps those it put first)
    edge = top.gather(-1, (~drop).sum(dim=-1, keepdim=True) - 1)  # (B, 1) the last kept score
    drop &= (top != edge) | (edge == float("-inf"))
    # the kept tokens are a prefix of each sorted row: what follows (softmax, sampling, entropy)
    # reads the longest one, hundreds of columns rather than the vocabulary
    keep = int((~drop).sum(dim=-1).max())
    return top[:, :keep].masked_fill(drop[:, :keep], float("-inf")), index[:, :keep]


def distribution(logits: Tensor, sampling: Sampling) -> Tensor:
    """The distribution `choose` samples from, over the whole vocabulary: (B, V), 0 for every
    token the filters removed (not meaningful for greedy, a point mass)."""
    scores, index = filtered_logits(logits, sampling)
    probs = scores.softmax(dim=-1)
    return probs if index is None else probs.new_zeros(logits.shape).scatter_(-1, index, probs)


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
        # one pass: max propagates a NaN (which argmax picked, often <eos>: an empty answer) and
        # returns argmax's index; -inf marks suppressed tokens, a row of them alone is no choice
        best, tokens = logits.max(dim=-1)
        if not torch.isfinite(best).all():
            raise ValueError("cannot decode: a row's logits hold NaN or inf (are the decoder's weights finite?)")
        zeros = torch.zeros(tokens.shape, dtype=torch.float32, device=logits.device)
        return Choice(tokens, zeros, zeros.clone())
    scores, index = filtered_logits(logits, sampling)
    logp = scores.log_softmax(dim=-1)  # (B, V')
    probs = logp.exp()
    pick = draw(probs, generator)  # (B, 1)
    tokens = pick if index is None else index.gather(-1, pick)
    entropy = torch.special.entr(probs).sum(dim=-1)  # -p log p, 0 where p = 0
    return Choice(tokens.squeeze(-1), logp.gather(-1, pick).squeeze(-1), entropy)


def draw(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One column per row of (B, V) probabilities: inverse transform sampling, a uniform draw
    placed in the row's running sum. The same distribution as `torch.multinomial(probs, 1)`, whose
    per-row setup makes it 35× slower over 50k columns on the CPU. A column of probability 0 is
    never drawn: the first running sum above u is one that grew there.

    Returns:
        (B, 1) int64 column indices.
    """
    cdf = probs.cumsum(dim=-1)  # (B, V)
    total = cdf[:, -1:]  # (B, 1), 1 up to rounding
    if not bool((total > 0).all()):  # NaN from inf or NaN logits: searchsorted would point past the row
        raise ValueError("cannot sample: a row's probabilities are not finite (its logits hold NaN or inf)")
    u = torch.rand(total.shape, generator=generator, dtype=total.dtype, device=total.device) * total
    u = torch.minimum(u, total.nextafter(torch.zeros_like(total)))  # rounding must not reach the total
    return torch.searchsorted(cdf, u, right=True)

