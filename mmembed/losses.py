"""Contrastive losses over every pair of modalities present in a batch.

The model embeds each modality of a batch into the shared space; this module turns those unit
vectors into one scalar. It never names a modality: it pairs up whatever keys the embedding dict
holds, so adding a modality needs no change here.

Two objectives, both applied to one unordered pair (a, b) of modalities at a time:

* ``infonce`` — symmetric InfoNCE as in CLIP: ``logits = scale * za @ zb.T`` and the loss is the
  mean of the row-wise and the column-wise cross-entropy against the diagonal. Computed from one
  matmul (the column-wise term uses the transpose), where ``open_clip.loss.ClipLoss`` computes
  the logit matrix twice; values agree with it to float rounding.
* ``siglip`` — the sigmoid loss of SigLIP (Zhai et al. 2023): every cell of
  ``scale * za @ zb.T + bias`` is a binary decision, +1 on the diagonal and -1 elsewhere, and the
  sum of ``-log sigmoid(label * logit)`` is divided by the number of rows, as in the paper. The
  model owns the learnable bias; the paper initialises scale = 10 and bias = -10 so that the
  (mostly negative) cells start near their target, see ``SIGLIP_INIT_LOGIT_SCALE`` and
  ``SIGLIP_INIT_LOGIT_BIAS``. The loss is symmetric in (a, b) by construction.

Missing modalities: embeddings arrive full-batch ``(B, D)`` with a ``present`` mask per modality;
rows lacking a modality hold junk (possibly NaN). A pair uses only the rows where both sides are
present, selected by boolean indexing rather than by multiplying with the mask, so junk rows get
exactly zero gradient and NaN junk cannot leak in (0 * NaN is NaN). A pair with fewer than two
such rows has no negatives and is skipped. The total is the weighted mean over the pairs that ran.

``label_positives``: rows that share a label id (>= 0) are not negatives of each other. For
InfoNCE their off-diagonal logits are removed from the softmax denominator ("false-negative
elimination") rather than turned into soft multi-positive targets: the config promises that
same-label rows are *not negatives*, not that they must be pulled together, and masking keeps the
loss's minimum at 0 and its value comparable with the unlabelled loss (it can only lower it),
whereas soft targets put a floor of log(k) under a k-positive row. For SigLIP the same cells
simply become +1 (positive) decisions, as the sigmoid loss has no shared denominator.

Under torchrun (an initialised process group of several ranks) each rank passes its own rows
and gets its share of the global batch's loss: see ``losses_distributed.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmembed.config_train import LossConfig
from mmembed.errors import ConfigError
from mmembed.modality import Modality
from mmembed.train.distributed import current_world

# SigLIP paper, section 3.1: t' = log 10 (so the multiplier is 10) and b = -10.
SIGLIP_INIT_LOGIT_SCALE = 10.0
SIGLIP_INIT_LOGIT_BIAS = -10.0

Pair = frozenset[Modality]
PairKey = Pair | tuple[str, str] | str


@dataclass
class LossOutput:
    """What one loss evaluation returns.

    Attributes:
        total: scalar to backpropagate: weighted mean of the pair losses that ran (a zero that is
            still attached to the graph when no pair had two complete rows).
        per_pair: detached scalar per pair that ran, keyed like ``"image-text"`` (sorted names).
        n_pairs: number of batch rows each of those pairs used.
    """

    total: Tensor
    per_pair: dict[str, Tensor]
    n_pairs: dict[str, int]


def pair_name(pair: Pair) -> str:
    """``{TEXT, IMAGE}`` -> ``"image-text"``: the names sorted, so the key is order-insensitive."""
    return "-".join(sorted(m.value for m in pair))


def parse_pair(key: PairKey) -> Pair:
    """Read a pair written as ``"image-text"``, ``("text", "image")`` or a frozenset.

    Raises:
        ValueError: naming the key, for an unknown modality or anything but two distinct ones.
    """
    parts = key.split("-") if isinstance(key, str) else list(key)
    try:
        pair = frozenset(Modality.parse(p) for p in parts)
    except ValueError as e:
        raise ValueError(f"pair_weights key {key!r}: {e}") from None
    if len(parts) != 2 or len(pair) != 2:
        raise ValueError(f"pair_weights key {key!r}: expected two different modalities, like 'image-text'")
    return pair


def infonce_pair(za: Tensor, zb: Tensor, logit_scale: Tensor, same: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE between two aligned sets of embeddings (row i of each is a positive).

    Args:
        za, zb: ``(N, D)`` embeddings, N >= 2.
        logit_scale: scalar multiplier (already exponentiated).
        same: optional ``(N, N)`` bool, True where an off-diagonal cell is *not* a negative; those
            logits are dropped from both softmax denominators. The diagonal must be False.

    Returns:
        Scalar: (CE over rows + CE over columns) / 2, each a mean over the N positives.
    """
    logits = (logit_scale * za) @ zb.T  # (N, N); scaling (N, D) costs less than (N, N)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # keep the B-wide softmax / sum out of half-precision rounding
    if same is not None:
        logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def siglip_pair(
    za: Tensor, zb: Tensor, logit_scale: Tensor, logit_bias: Tensor, same: Tensor | None = None
) -> Tensor:
    """Sigmoid loss (SigLIP) between two aligned sets of embeddings.

    Args:
        za, zb: ``(N, D)`` embeddings.
        logit_scale: scalar multiplier (already exponentiated); logit_bias: scalar added to logits.
        same: optional ``(N, N)`` bool of extra positive cells (same label, off the diagonal).

    Returns:
        Scalar: ``-sum(log sigmoid(label * logit)) / N`` with label +1 on positives, -1 elsewhere.
    """
    logits = (logit_scale * za) @ zb.T + logit_bias  # (N, N)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    positive = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    if same is not None:
        positive = positive | same
    # label * logit without materialising a float label matrix
    signed = torch.where(positive, logits, -logits)
    return -F.logsigmoid(signed).sum() / logits.shape[0]


def same_label_mask(labels: Tensor) -> Tensor:
    """``(N,)`` long label ids (-1 = none) -> ``(N, N)`` bool, True off the diagonal where equal."""
    same = (labels[:, None] == labels[None, :]) & (labels >= 0)[:, None]
    return same.fill_diagonal_(False)


class ContrastiveLoss(nn.Module):
    """InfoNCE or SigLIP over every present pair of modalities (or only pairs with an anchor).

    Holds no parameters: the model owns ``logit_scale`` (and ``logit_bias`` for SigLIP) and
    passes them in, so the loss can be swapped without touching checkpoints.

    Args:
        kind: ``"infonce"`` (symmetric CLIP loss) or ``"siglip"`` (sigmoid loss, needs a bias).
        mode: ``"all_pairs"`` uses every unordered pair of modalities in the batch;
            ``"anchor"`` only the pairs (anchor, m) for every other m (ImageBind); a batch
            without the anchor modality then has no pair and a zero loss.
        anchor: the anchor modality, required for ``mode="anchor"`` and refused otherwise.
        pair_weights: weight per pair, keys like ``"image-text"`` (order-insensitive), a tuple or
            a frozenset; unlisted pairs weigh 1. A weight of 0 switches a pair off.
        label_positives: rows sharing a label id >= 0 are not negatives of each other.

    Raises:
        ValueError: naming the argument or key, for any inconsistent combination.
    """

    def __init__(
        self,
        kind: Literal["infonce", "siglip"] = "infonce",
        mode: Literal["all_pairs", "anchor"] = "all_pairs",
        anchor: Modality | str | None = None,
        pair_weights: dict[PairKey, float] | None = None,
        label_positives: bool = False,
    ) -> None:
        super().__init__()
        if kind not in ("infonce", "siglip"):
            raise ValueError(f"kind {kind!r}: valid: infonce, siglip")
        if mode not in ("all_pairs", "anchor"):
            raise ValueError(f"mode {mode!r}: valid: all_pairs, anchor")
        if mode == "anchor" and anchor is None:
            raise ValueError("anchor: mode=anchor needs an anchor modality")
        if mode == "all_pairs" and anchor is not None:
            raise ValueError(f"anchor {anchor!r}: only used with mode=anchor")
        self.kind = kind
        self.mode = mode
        try:
            self.anchor = None if anchor is None else Modality.parse(anchor)
        except ValueError as e:
            raise ValueError(f"anchor {anchor!r}: {e}") from None
        self.label_positives = label_positives
        self.pair_weights: dict[Pair, float] = {}
        for key, weight in (pair_weights or {}).items():
            pair = parse_pair(key)
            if pair in self.pair_weights:
                raise ValueError(f"pair_weights key {key!r}: pair {pair_name(pair)} given twice")
            if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
                raise ValueError(f"pair_weights key {key!r}: weight must be a number >= 0, got {weight!r}")
            if self.anchor is not None and self.anchor not in pair:
                raise ValueError(f"pair_weights key {key!r}: never used, mode=anchor pairs only {self.anchor}")
            self.pair_weights[pair] = float(weight)

    def pairs(self, modalities: list[Modality]) -> list[tuple[Modality, Modality, float]]:
        """The pairs this loss evaluates among `modalities`, with their weights (zero dropped)."""
        ordered = sorted(modalities, key=lambda m: m.value)
        if self.mode == "anchor":
            has_anchor = self.anchor in ordered
            candidates = [(self.anchor, m) for m in ordered if has_anchor and m != self.anchor]
        else:
            candidates = list(combinations(ordered, 2))
        weighted = [(a, b, self.pair_weights.get(frozenset((a, b)), 1.0)) for a, b in candidates]
        return [(a, b, w) for a, b, w in weighted if w > 0]

    def forward(
        self,
        embeddings: dict[Modality, Tensor],
        present: dict[Modality, Tensor],
        logit_scale: Tensor,
        labels: Tensor | None = None,
        logit_bias: Tensor | None = None,
    ) -> LossOutput:
        """Loss over the batch.

        Args:
            embeddings: per modality, ``(B, D)`` full-batch embeddings (junk where absent).
            present: per modality, ``(B,)`` bool, True where the row has that modality; a
                modality without an entry counts as present in every row.
            logit_scale: scalar multiplier, already exponentiated (and clamped by the model).
            labels: ``(B,)`` long label ids, -1 = no label; used with ``label_positives``.
            logit_bias: scalar, required for ``kind="siglip"``, ignored otherwise.

        Returns:
            LossOutput with the weighted-mean total, detached per-pair losses and row counts.
        """
        # plain-string keys ("image") are accepted; names in the output come from the enum
        embeddings = {Modality.parse(m): z for m, z in embeddings.items()}
        present = {Modality.parse(m): p for m, p in present.items()}
        batch = self._check(embeddings, present, logit_scale, labels, logit_bias)
        world = current_world()
        glob = None
        if world.active:  # torchrun: this rank's share of the global batch's loss
            from mmembed.losses_distributed import GlobalBatch

            glob = GlobalBatch.collect(world, embeddings, present, labels, batch,
                                       with_embeddings=self.kind == "infonce")
        per_pair: dict[str, Tensor] = {}
        n_pairs: dict[str, int] = {}
        weighted_sum, weight_sum = None, 0.0
        # distributed, the pairs of the modalities any rank holds (every rank runs every pair's collectives)
        for a, b, weight in self.pairs(list(embeddings if glob is None else glob.local)):
            if glob is None:
                loss, n = self._pair_loss(a, b, embeddings, present, batch, logit_scale, labels, logit_bias)
            else:
                loss, n = self._pair_share(glob, a, b, logit_scale, logit_bias)
            if loss is None:
                continue
            name = pair_name(frozenset((a, b)))
            per_pair[name], n_pairs[name] = loss.detach(), n
            weighted_sum = weight * loss if weighted_sum is None else weighted_sum + weight * loss
            weight_sum += weight
        if weighted_sum is None:
            # No pair had two complete rows: a zero still attached to the graph, so that the
            # caller's backward() works; an empty slice keeps NaN junk out of it.
            total = sum(z[:0].sum() for z in embeddings.values())
        else:
            total = weighted_sum / weight_sum
        if glob is not None:
            total = total + glob.anchor()
        return LossOutput(total=total, per_pair=per_pair, n_pairs=n_pairs)

    def _pair_share(self, glob, a, b, logit_scale, logit_bias):
        """Distributed: this rank's share of one pair's loss over the global batch (see
        losses_distributed.py), and the pair's global row count; (None, n) if n < 2."""
        from mmembed.losses_distributed import infonce_share, siglip_share

        n = int(glob.rows(a, b).sum())
        if n < 2:
            return None, n
        if self.kind == "siglip":
            return siglip_share(glob, a, b, logit_scale, logit_bias, self.label_positives), n
        return infonce_share(glob, a, b, logit_scale, self.label_positives), n

    def _pair_loss(self, a, b, embeddings, present, batch, logit_scale, labels, logit_bias):
        """One pair on the rows where both are present: (loss, rows used), or (None, n) if n < 2."""
        za, zb = embeddings[a], embeddings[b]
        pa, pb = present.get(a), present.get(b)
        if pa is None and pb is None:
            rows, n = None, batch
        else:
            both = pa if pb is None else pb if pa is None else pa & pb
            n = int(both.sum())  # one host sync per pair; boolean indexing would sync anyway
            rows = None if n == batch else both  # fast path: a full pair needs no gather
        if n < 2:
            return None, n
        if rows is not None:
            za, zb = za[rows], zb[rows]  # (n, D): junk rows receive exactly zero gradient
        same = None
        if self.label_positives and labels is not None:
            same = same_label_mask(labels if rows is None else labels[rows])
        if self.kind == "siglip":
            return siglip_pair(za, zb, logit_scale, logit_bias, same), n
        return infonce_pair(za, zb, logit_scale, same), n

    def _check(self, embeddings, present, logit_scale, labels, logit_bias) -> int:
        """Shapes agree: returns B. Programmer errors, so plain ValueError naming the input."""
        if not embeddings:
            raise ValueError("embeddings: empty dict, nothing to contrast")
        shapes = {m: tuple(z.shape) for m, z in embeddings.items()}
        first = next(iter(shapes.values()))
        if len(first) != 2 or any(s != first for s in shapes.values()):
            raise ValueError(f"embeddings: expected (B, D) tensors of one shape, got {shapes}")
        batch = first[0]
        for m, p in present.items():
            if m in embeddings and (p.dtype != torch.bool or tuple(p.shape) != (batch,)):
                raise ValueError(f"present[{m}]: expected ({batch},) bool, got {tuple(p.shape)} {p.dtype}")
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale: expected a scalar, got shape {tuple(logit_scale.shape)}")
        if labels is not None and tuple(labels.shape) != (batch,):
            raise ValueError(f"labels: expected ({batch},), got {tuple(labels.shape)}")
        if self.kind == "siglip" and logit_bias is None:
            raise ValueError("logit_bias: kind=siglip needs the model's learnable bias (SigLIP init -10)")
        return batch


def build_loss(config: LossConfig) -> ContrastiveLoss:
    """Turn the ``loss:`` config block into a ContrastiveLoss.

    Raises:
        ConfigError: naming the offending key (unknown modality, unused pair weight, ...).
    """
    try:
        return ContrastiveLoss(
            kind=config.kind,
            mode=config.mode,
            anchor=config.anchor,
            pair_weights=dict(config.pair_weights),
            label_positives=config.label_positives,
        )
    except ValueError as e:
        raise ConfigError(f"loss.{e}") from None
