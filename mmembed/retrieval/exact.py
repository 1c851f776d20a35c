"""Exact inner-product top-k over stored rows: blocked matrix products and a running top-k merge.

Why blocked: the score matrix of Q queries against N rows is Q·N floats (1 GB for 256 × 1M);
scoring one block of rows at a time keeps it to a few MB that stay in cache while `topk` reads
them, and the per-block winners are merged into a running (Q, k) best list. One query uses a
matrix-vector product, which streams the rows once at memory bandwidth.

fp16 storage halves the bytes streamed. A single fp16 query is scored with fp16 `mv` (fp32
accumulation, fp16 output), so the top `4k + 16` candidates are re-scored in fp32 against the
stored fp16 vectors; several queries convert each block to fp32 and score it exactly. Scores
are therefore exact for the *stored* fp16 vectors, which differ from the original fp32 ones by
fp16 rounding (relative 2^-11 per coordinate): a documented approximation (recall ≥ 0.99).
"""

from __future__ import annotations

import torch
from torch import Tensor

_SCORE_BLOCK_BYTES = 16 << 20  # scores of one block (Q × rows × 4 bytes): about half the L3 cache
_MIN_BLOCK_ROWS = 4096


def exact_topk(
    vectors: Tensor,
    queries: Tensor,
    k: int,
    mask: Tensor | None = None,
    block_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Best `k` rows per query by inner product.

    Args:
        vectors: (N, D) float32 or float16 rows.
        queries: (Q, D) float32.
        k: wanted hits per query (>= 1); fewer come back when fewer rows are eligible.
        mask: (N,) bool, True = eligible row; None = every row.
        block_rows: rows scored per block (None: sized so Q × rows scores take ~16 MB).
    Returns:
        scores (Q, k') float32 and rows (Q, k') int64, best first, k' = min(k, eligible rows).
    """
    n_q = queries.shape[0]
    lo, hi, n_valid = _span(mask, vectors.shape[0])
    k_out = min(k, n_valid)
    if k_out == 0 or n_q == 0:
        return torch.empty(n_q, 0), torch.empty(n_q, 0, dtype=torch.int64)
    rescore = vectors.dtype != torch.float32 and n_q == 1
    k_search = min(n_valid, 4 * k_out + 16) if rescore else k_out
    if block_rows is None:
        block_rows = max(_MIN_BLOCK_ROWS, _SCORE_BLOCK_BYTES // (4 * n_q))
        if vectors.dtype != torch.float32 and n_q > 1:  # the fp32 copy of a block is bounded too
            block_rows = min(block_rows, max(_MIN_BLOCK_ROWS, _SCORE_BLOCK_BYTES // (4 * vectors.shape[1])))
    scorer = _BlockScorer(vectors, queries, block_rows)
    best_s = torch.full((n_q, k_search), float("-inf"))
    best_r = torch.zeros((n_q, k_search), dtype=torch.int64)
    for start in range(lo, hi, block_rows):
        end = min(start + block_rows, hi)
        block_mask = None if mask is None else mask[start:end]
        if block_mask is not None and not bool(block_mask.any()):
            continue  # e.g. a block holding only another modality's rows
        scores = scorer.score(start, end)  # (Q, end - start)
        if block_mask is not None and not bool(block_mask.all()):
            scores.masked_fill_(~block_mask, float("-inf"))
        best_s, best_r = _merge(best_s, best_r, scores, start, k_search)
    if rescore:
        return _rescore(vectors, queries, best_r, k_out)
    return best_s[:, :k_out], best_r[:, :k_out]


class _BlockScorer:
    """Scores row blocks into one preallocated buffer (and one fp32 conversion buffer for fp16)."""

    def __init__(self, vectors: Tensor, queries: Tensor, block_rows: int):
        self.vectors = vectors
        self.n_q = queries.shape[0]
        self.single = self.n_q == 1
        self.fp32 = vectors.dtype == torch.float32
        rows = min(block_rows, vectors.shape[0])
        # an fp16 single query stays in fp16 (fast fp16 mv); otherwise blocks are scored in fp32
        self.query = queries[0].to(vectors.dtype) if self.single else queries.float()
        out_dtype = vectors.dtype if self.single else torch.float32
        self.out = torch.empty(self.n_q * rows, dtype=out_dtype)
        self.convert = None if (self.fp32 or self.single) else torch.empty(rows, vectors.shape[1])

    def score(self, start: int, end: int) -> Tensor:
        n = end - start
        block = self.vectors[start:end]  # (n, D)
        if self.single:
            out = self.out[:n]
            torch.mv(block, self.query, out=out)  # (n,)
            return out.float().unsqueeze(0) if out.dtype != torch.float32 else out.unsqueeze(0)
        if self.convert is not None:
            block = self.convert[:n].copy_(block)  # fp16 -> fp32, in cache
        out = self.out[: self.n_q * n].view(self.n_q, n)
        return torch.mm(self.query, block.T, out=out)  # (Q, n)


def _merge(best_s: Tensor, best_r: Tensor, scores: Tensor, offset: int, k: int) -> tuple[Tensor, Tensor]:
    """Fold one block's scores (Q, n) into the running best (Q, k)."""
    top_s, top_i = torch.topk(scores, min(k, scores.shape[1]), dim=1)  # (Q, k_b)
    cand_s = torch.cat([best_s, top_s], dim=1)
    cand_r = torch.cat([best_r, top_i + offset], dim=1)
    merged_s, pick = torch.topk(cand_s, k, dim=1)  # (Q, k)
    return merged_s, cand_r.gather(1, pick)


def _rescore(vectors: Tensor, queries: Tensor, rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Re-score candidate rows (Q, C) in fp32 and keep the best k."""
    cand = vectors[rows.reshape(-1)].float().view(*rows.shape, -1)  # (Q, C, D)
    scores = torch.einsum("qcd,qd->qc", cand, queries.float())  # (Q, C)
    top_s, pick = torch.topk(scores, k, dim=1)
    return top_s, rows.gather(1, pick)


def _span(mask: Tensor | None, n: int) -> tuple[int, int, int]:
    """[lo, hi) enclosing every eligible row, and how many rows are eligible."""
    if mask is None:
        return 0, n, n
    n_valid = int(mask.sum())
    if n_valid == 0:
        return 0, 0, 0
    as_int = mask.to(torch.uint8)
    lo = int(as_int.argmax())
    hi = n - int(as_int.flip(0).argmax())
    return lo, hi, n_valid
