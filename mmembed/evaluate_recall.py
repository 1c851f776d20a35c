"""Cross-modal recall@K and ranks: `retrieval_metrics` for one query/target pair of embeddings,
`pairwise_report` for every ordered pair of modalities. Zero-shot classification is
evaluate_zero_shot.py; a whole manifest's report, the tables and `mmembed eval` are evaluate.py.

A retrieval is correct when the target's key equals the query's key. With manifest row ids
as keys this is instance retrieval (the caption of row 7 must find the image of row 7); with
the `label` column it is class/scene retrieval (any image of scene "s3" counts).

Ranks are pessimistic about ties: the rank of a query is 1 + the number of *incorrect*
targets scoring at least as high as its best correct target (within 1e-6, so float rounding
never decides a tie), so a collapsed model (every score equal) gets the worst rank instead
of a perfect one.
"""

from __future__ import annotations

import itertools
import logging
import numbers
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mmembed.errors import BadInput
from mmembed.modality import Modality

log = logging.getLogger("mmembed.evaluate")  # the evaluation's lines keep their logger name
_QUERY_BLOCK = 1024  # queries scored at once, at most
# scores (and the masks made from them) of one block, block × N: ~1 GB at 1M targets a block of
# 1,024 queries held (the scores, the correct mask, a masked copy, two comparisons: ~13 bytes each)
_BLOCK_SCORES = 1 << 22
_TIE = 1e-6  # scores this close count as tied (cosines of unit vectors; float32 rounding is ~1e-7)


def retrieval_metrics(query_emb: Tensor, target_emb: Tensor, query_keys: Sequence[str],
                      target_keys: Sequence[str], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K and rank statistics of retrieving targets for queries by cosine similarity.

    Args:
        query_emb: (Q, D) unit vectors; target_emb: (N, D) unit vectors.
        query_keys / target_keys: one key per row; a target is correct iff its key equals the query's.
        ks: the K of recall@K.
    Returns:
        {"recall@K": fraction of queries with a correct target in the top K, ...,
         "median_rank", "mean_rank", "mrr" (1-based ranks of the first correct target),
         "n_queries" (with at least one correct target), "n_targets", "n_unmatched"
         (queries whose key no target has; left out of every figure)}.
    Raises:
        ValueError on mismatched lengths or dimensions, NaN/Inf embeddings, a K < 1, or when no
        query has a match.
    """
    _check_pair(query_emb, target_emb, query_keys, target_keys, ks)
    codes = {key: i for i, key in enumerate(dict.fromkeys([*target_keys, *query_keys]))}
    q_codes = torch.tensor([codes[k] for k in query_keys])  # (Q,)
    t_codes = torch.tensor([codes[k] for k in target_keys])  # (N,)
    matched = torch.isin(q_codes, t_codes)
    if not bool(matched.any()):
        raise ValueError("no query key occurs among the target keys: nothing can be retrieved correctly")
    queries, q_codes = query_emb[matched].float(), q_codes[matched]
    targets = target_emb.float()
    block = max(1, min(_QUERY_BLOCK, _BLOCK_SCORES // max(1, targets.shape[0])))
    ranks = torch.cat([
        _first_correct_rank(queries[s:s + block] @ targets.T, q_codes[s:s + block], t_codes)
        for s in range(0, queries.shape[0], block)
    ]).double()  # (Q_matched,)
    out = {f"recall@{k}": float((ranks <= k).double().mean()) for k in ks}
    out.update(median_rank=float(ranks.quantile(0.5)), mean_rank=float(ranks.mean()),
               mrr=float((1 / ranks).mean()), n_queries=int(ranks.numel()), n_targets=int(targets.shape[0]),
               n_unmatched=int((~matched).sum()))
    return out


def _first_correct_rank(scores: Tensor, q_codes: Tensor, t_codes: Tensor) -> Tensor:
    """scores (B, N) -> (B,) 1-based rank of the best correct target (ties count against it)."""
    correct = q_codes[:, None] == t_codes[None, :]  # (B, N)
    best = scores.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)  # (B, 1)
    # "at least as high" up to float rounding: one item embedded at two places of a batch differs by ~1e-8
    return 1 + ((scores >= best - _TIE) & ~correct).sum(dim=1)


def shared_files_note(rows: Sequence[Any], where: str) -> str | None:
    """A warning when rows without a label share a media file (one row per caption of one image):
    matched by row, each row counts the other's identical vector as a wrong hit, and recall collapses
    (text->image recall@1 0.000 on 60 scenes written as two rows each, 0.967 as one). None otherwise."""
    from mmembed.data.manifest import INLINE_MODALITIES

    seen: dict[tuple[Any, str], list[int]] = {}  # (modality, file) -> the rows naming it
    for i, row in enumerate(rows):
        if row.label is None:
            for modality, item in row.items.items():
                if modality not in INLINE_MODALITIES and isinstance(item, (str, os.PathLike)):
                    seen.setdefault((modality, str(item)), []).append(i)
    shared = len({i for named in seen.values() if len(named) > 1 for i in named})
    if not shared:
        return None
    return (f"{where}: {shared} rows without a label share their media file with another row, so recall matched "
            "by row counts each one's identical twin as a wrong hit (recall understated); give the rows of one "
            "item the same `label`")


def check_finite(*vectors: Tensor, what: str) -> None:
    """BadInput (a ValueError, and one line from the CLI) when any of `vectors` holds NaN or Inf: `what`
    (ranks, a classification) would be meaningless, and an argmax of NaN rows picked the first label
    for every item."""
    if not all(bool(torch.isfinite(v).all()) for v in vectors):
        raise BadInput(f"embeddings contain NaN or Inf (a diverged model?); {what} would be meaningless")


def _check_pair(q: Tensor, t: Tensor, q_keys: Sequence, t_keys: Sequence, ks: Sequence[int]) -> None:
    if q.dim() != 2 or t.dim() != 2 or q.shape[1] != t.shape[1]:
        raise ValueError(f"embeddings must be (Q, D) and (N, D) with equal D, got {tuple(q.shape)}, {tuple(t.shape)}")
    if len(q_keys) != q.shape[0] or len(t_keys) != t.shape[0]:
        raise ValueError(f"{len(q_keys)} query keys for {q.shape[0]} queries, "
                         f"{len(t_keys)} target keys for {t.shape[0]} targets")
    check_finite(q, t, what="ranks")
    if not ks or any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {list(ks)}")  # 1.5 was taken as 1, 0.5 "not positive"


def pairwise_report(embeddings: dict[Modality, Tensor], keys: dict[Modality, Sequence[str]],
                    ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict[str, float]]:
    """`retrieval_metrics` for every ordered pair of distinct modalities, e.g. "text→image".

    A pair whose keys never match (e.g. row ids of disjoint rows) is left out and logged.
    """
    report = {}
    for a, b in itertools.permutations(embeddings, 2):
        name = f"{a}→{b}"
        try:
            report[name] = retrieval_metrics(embeddings[a], embeddings[b], keys[a], keys[b], ks)
        except ValueError as e:
            if "no query key" not in str(e):
                raise
            log.info("%s: left out, %s", name, e)
    return report
