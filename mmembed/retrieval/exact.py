"""Exact inner-product top-k over stored rows: blocked matrix products and a running top-k merge.

Per block of rows, scores are one matrix product laid out queries × rows, `(Q, D) @ (n, D)ᵀ`,
through `encoders.linear.linear` (oneDNN on the CPU: on an AMD EPYC twice as fast as MKL's
`torch.mm` for Q = 256 and 3.6× for one query, the whole of a 100k × 512 matrix-vector product
at 3.1 against 11.2 ms); for 17-64 queries oneDNN is faster the other way round, so those
blocks are computed rows × queries and read through a transposed view.

Selecting each query's best k without sorting all n scores is the rest of the cost, and what
separated the first version from FAISS: `topk` costs about the same per element it reads as
the product spends per score, so it may only ever see a few elements per query. The block's
rows are cut into groups of `GROUP` consecutive rows and one vectorised max per group gives
(Q, n / GROUP) group maxima. Until a query holds k rows, its candidates are the rows of its k
groups of highest maximum (exact: a row of the true top k lies in a group whose maximum is at
least that row's score, and fewer than k other groups can beat that without k+1 rows beating
the k-th score; a tie between maxima goes to the lower group, as one between rows to the lower
row). After that, only rows above the query's k-th best score can enter, and only groups
whose maximum beats that score hold them: from the second block on a few hundred, then a few
dozen of the block's Q·G (group, query) pairs, whose rows above the score are merged as a
flat list (`RunningTopk._add_above`). At Q = 256 over 1M rows the selection went from ~14%
of the search (group maxima over rows × queries scores, `topk` and two sorts per block) to ~8%,
of which the group maxima — one pass over the block's 16 MB of scores, memory-bound once they
have left the cache — are more than half.

One query is a matrix-vector product, which streams the rows once.

fp16 storage halves the bytes stored. A single fp16 query is scored by an fp16 product (fp16
output), so the top `4k + 16` candidates are re-scored in fp32 against the stored fp16 vectors;
several queries convert each block to fp32 in cache and score it exactly. When the pool cannot
be shown to hold the exact top k (its k-th exact score is not above its last fp16 score plus the
product's error: near-ties in a narrow cone of vectors), the single query is scored the exact way
too. Scores are therefore exact for the *stored* fp16 vectors, which differ from the original
fp32 ones by fp16 rounding (relative 2^-11 per coordinate): on random unit vectors recall@10
against fp32 is 1.0; in a cone of mean cosine 0.96–0.99 fp16 storage itself costs some (0.98).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from encoders.linear import linear

GROUP = 32  # rows per group for the group-max preselection
_SCORE_BLOCK_BYTES = 16 << 20  # scores of one block (rows × Q × 4 bytes): about half the L3 cache
_CONVERT_BLOCK_BYTES = 8 << 20  # the fp32 copy of an fp16 block
_SINGLE_BLOCK_ROWS = 1 << 16  # one query: rows per matrix-vector product
_MIN_BLOCK_ROWS = 4096
# queries searched together: more would make a block of _MIN_BLOCK_ROWS rows outgrow the score
# bytes (Q × 4,096 × 4 bytes: 16 GB of scores for an all-against-all pass over 1M rows), so larger batches
# are searched in parts of this many (50k rows of 128, 10k queries, one thread: 2.0-2.1 against
# 2.9-3.1 s, 24-46 against 260-267 MB more at the peak)
_MAX_QUERIES = _SCORE_BLOCK_BYTES // (4 * _MIN_BLOCK_ROWS)
# query counts whose scores are computed rows × queries and read through a transposed view:
# oneDNN's queries × rows product for 17-64 queries ran at 0.65-0.8× of it (AMD EPYC, 100k rows)
_ROWS_FIRST_QUERIES = range(17, 65)


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
        block_rows: rows scored per block (None: sized from Q so a block's scores take ~16 MB;
            more than 1,024 queries are searched 1,024 at a time).
    Returns:
        scores (Q, k') float32 and rows (Q, k') int64, best first, k' = min(k, eligible rows).
    """
    n_q = queries.shape[0]
    if n_q > _MAX_QUERIES:  # one block's scores would outgrow its bytes
        parts = [exact_topk(vectors, queries[s:s + _MAX_QUERIES], k, mask, block_rows)
                 for s in range(0, n_q, _MAX_QUERIES)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    lo, hi, n_valid = span(mask, vectors.shape[0])
    k_out = min(k, n_valid)
    if k_out == 0 or n_q == 0:
        return torch.empty(n_q, k_out), torch.empty(n_q, k_out, dtype=torch.int64)
    rescore = vectors.dtype != torch.float32 and n_q == 1
    k_search = min(n_valid, 4 * k_out + 16) if rescore else k_out
    scorer = _BlockScorer(vectors, queries, block_rows or _block_rows(vectors, n_q))
    best = RunningTopk(n_q, k_search)
    scan_blocks(best, scorer.score, lo, hi, scorer.block_rows, mask)
    scores, rows = best.result()  # (Q, k_search)
    if not rescore:
        return scores[:, :k_out], rows[:, :k_out]
    exact = rescored(vectors, queries, rows)  # (1, k_search)
    top, top_rows = best_first(exact, rows, k_out)
    if k_search == n_valid or _pool_holds_top_k(scores, exact, top[:, -1]):
        return top, top_rows
    # near-ties past the pool's cut (a narrow cone of vectors): the fp16 product cannot tell
    # them apart, so the query is scored exactly, block by block, as several queries are
    scorer = _BlockScorer(vectors, queries, _block_rows(vectors, 2), exact=True)
    best = RunningTopk(n_q, k_out)
    scan_blocks(best, scorer.score, lo, hi, scorer.block_rows, mask)
    return best.result()


def _pool_holds_top_k(approx: Tensor, exact: Tensor, kth: Tensor) -> bool:
    """Whether the pool of one query's best fp16-product scores (`approx`, (1, C), best first) surely
    holds the exact top k, whose k-th exact score is `kth`: a row left out scored at most the pool's
    last fp16 score, so its exact score is below that plus the product's error, here twice the
    largest error seen in the pool (at least 2^-10: the query's and the output's fp16 rounding for
    unit vectors)."""
    error = max(2 * float((approx.float() - exact).abs().max()), 2.0**-10)
    return bool((kth > approx[:, -1].float() + error).all())


def _block_rows(vectors: Tensor, n_q: int) -> int:
    if n_q == 1:
        return _SINGLE_BLOCK_ROWS
    rows = max(_MIN_BLOCK_ROWS, _SCORE_BLOCK_BYTES // (4 * n_q))
    if vectors.dtype != torch.float32:  # the fp32 copy of a block is bounded too
        rows = min(rows, max(_MIN_BLOCK_ROWS, _CONVERT_BLOCK_BYTES // (4 * vectors.shape[1])))
    return rows


class _BlockScorer:
    """Scores row blocks, (Q, n) each; fp16 blocks of several queries go through one fp32
    conversion buffer first."""

    def __init__(self, vectors: Tensor, queries: Tensor, block_rows: int, exact: bool = False):
        self.vectors = vectors
        self.block_rows = block_rows
        self.single = queries.shape[0] == 1 and not exact  # exact: fp16 blocks converted, as for several
        self.fp32 = vectors.dtype == torch.float32
        rows = min(block_rows, vectors.shape[0])
        # an fp16 single query stays in fp16 (one fp16 product, then re-scored)
        self.query = (queries.to(vectors.dtype) if self.single else queries.float()).contiguous()  # (Q, D)
        self.convert = None if (self.fp32 or self.single) else torch.empty(rows, vectors.shape[1])
        self.rows_first = queries.shape[0] in _ROWS_FIRST_QUERIES

    def score(self, start: int, end: int) -> Tensor:
        block = self.vectors[start:end]  # (n, D)
        if self.convert is not None:
            block = self.convert[:end - start].copy_(block)  # fp16 -> fp32, in cache
        if self.rows_first:
            return linear(block, self.query).T  # (Q, n), a view of the (n, Q) product
        return linear(self.query, block)  # (Q, n); one query: a matrix-vector product over the block


def scan_blocks(best: RunningTopk, score: Callable[[int, int], Tensor], lo: int, hi: int, block_rows: int,
                mask: Tensor | None) -> None:
    """Score rows [lo, hi) block by block (`score(start, end)` -> (Q, n)) into `best`; masked
    rows score -inf and blocks without an eligible row are not scored at all."""
    for start in range(lo, hi, block_rows):
        end = min(start + block_rows, hi)
        block_mask = None if mask is None else mask[start:end]
        if block_mask is not None and not bool(block_mask.any()):
            continue  # e.g. a block holding only another modality's rows
        scores = score(start, end)  # (Q, end - start)
        if block_mask is not None and not bool(block_mask.all()):
            scores.masked_fill_(~block_mask, float("-inf"))
        best.add(scores, start)
        # freed before the next block's scores are allocated: with two ~16 MB blocks alive, glibc
        # gave each new one fresh pages (8k page faults per 100k rows; 100 queries 38.5 against
        # 29.4 ms, AMD EPYC)
        del scores


class RunningTopk:
    """The best k (score, row) pairs per query over blocks of scores laid out (Q, rows)."""

    def __init__(self, n_q: int, k: int):
        self.k = k
        self.scores = torch.full((n_q, 0), float("-inf"))  # (Q, k or fewer)
        self.rows = torch.empty((n_q, 0), dtype=torch.int64)
        self.kth = torch.full((n_q,), float("-inf"))  # each query's k-th best score once it holds k
        self._offsets = torch.arange(GROUP)

    def add(self, scores: Tensor, offset: int) -> None:
        """Fold one block's scores (Q, n), whose column 0 is row `offset`, into the running best."""
        n_q, n = scores.shape
        n_groups = n // GROUP
        if n_groups <= 2 * self.k:  # too few groups for a selection by groups to save anything
            self._merge(scores, torch.arange(offset, offset + n).expand(n_q, n))
            return
        head = n_groups * GROUP
        grouped = scores[:, :head].view(n_q, n_groups, GROUP)
        if scores.stride(1) == 1:
            group_max = grouped.amax(dim=2)  # (Q, G): one pass over the block's scores
        else:  # a transposed (n, Q) product: reduce it in its own layout, rows apart
            group_max = scores.T[:head].view(n_groups, GROUP, n_q).amax(dim=1).T
        if not (self.scores.shape[1] == self.k and self._add_above(grouped, group_max, offset)):
            # ties between group maxima go to the lower group, which holds the lower rows
            _, groups = _best(group_max, torch.arange(n_groups).expand(n_q, n_groups), self.k)  # (Q, k)
            cand_s = grouped.gather(1, groups.unsqueeze(2).expand(n_q, self.k, GROUP)).view(n_q, -1)
            cand_r = (groups.unsqueeze(2) * GROUP + (self._offsets + offset)).view(n_q, -1)
            self._merge(cand_s, cand_r)
        if head < n:  # the rows that fill no whole group compete as they are
            self._merge(scores[:, head:], torch.arange(offset + head, offset + n).expand(n_q, n - head))

    def _add_above(self, grouped: Tensor, group_max: Tensor, offset: int) -> bool:
        """Once every query holds k rows, only rows above its k-th best score can enter, and only
        groups whose maximum beats that score hold such rows: after the first blocks a few dozen
        (group, query) pairs of the block's Q·G, and about as many rows. Those rows are merged as
        a flat list, without a `topk` over the block (whose cost grows with every element it
        reads). Returns False, having done nothing, when too many pairs pass for that to pay
        (rows sorted by score, say)."""
        queries, groups = (group_max > self.kth.unsqueeze(1)).nonzero(as_tuple=True)  # (P,) by query
        if queries.shape[0] > group_max.numel() // 8:  # an eighth of the pairs: the flat path costs more
            return False
        cand = grouped[queries, groups]  # (P, GROUP)
        pair, member = (cand > self.kth[queries].unsqueeze(1)).nonzero(as_tuple=True)  # (E,) entering rows
        if pair.shape[0]:
            self._merge_rows(cand[pair, member], groups[pair] * GROUP + member + offset, queries[pair])
        return True

    def _merge(self, cand_s: Tensor, cand_r: Tensor) -> None:
        """Merge candidates (Q, C), scores and rows, into the running best: one `topk` over each
        query's k + C."""
        pool_s = torch.cat([self.scores, cand_s.to(self.scores.dtype)], dim=1)
        pool_r = torch.cat([self.rows, cand_r], dim=1)
        self._keep_best(pool_s, pool_r)

    def _merge_rows(self, cand_s: Tensor, cand_r: Tensor, cand_q: Tensor) -> None:
        """Merge flat candidates (E,) — score, row, query, sorted by query — into the running
        best: each query's candidates take the next free places of a (Q, held + most per query)
        pool."""
        n_q, k = self.scores.shape
        counts = torch.bincount(cand_q, minlength=n_q)  # (Q,)
        place = k + torch.arange(cand_q.shape[0]) - (torch.cumsum(counts, 0) - counts)[cand_q]
        width = k + int(counts.max())
        pool_s = torch.full((n_q, width), float("-inf"), dtype=self.scores.dtype)
        pool_r = torch.zeros((n_q, width), dtype=torch.int64)
        pool_s[:, :k] = self.scores
        pool_r[:, :k] = self.rows
        pool_s[cand_q, place] = cand_s.to(pool_s.dtype)
        pool_r[cand_q, place] = cand_r
        self._keep_best(pool_s, pool_r)

    def _keep_best(self, pool_s: Tensor, pool_r: Tensor) -> None:
        keep = min(self.k, pool_s.shape[1])
        self.scores, self.rows = _best(pool_s, pool_r, keep)  # (Q, keep)
        if keep == self.k:
            self.kth = self.scores.amin(dim=1)

    def result(self) -> tuple[Tensor, Tensor]:
        """scores (Q, k) and rows (Q, k), best first (ties: the lower row first)."""
        return _ordered(self.scores, self.rows)


# Ties. Rows are in id order (ids only grow, and a compaction or a load keeps the order), so a tie
# between equal scores goes to the lower row: the answer is ordered by (score descending, row
# ascending), and of rows tied at the k-th score the lowest are kept, whatever the blocking, the
# query batch or the mask (a top k is then a prefix of the top k + 1). Blocks are scanned in row
# order, so a later row tied with the k-th score never enters (`_add_above`'s strict >).


def best_first(scores: Tensor, rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The best k of candidates (Q, C), scores and rows: (Q, k) by score descending, then row ascending."""
    return _ordered(*_best(scores, rows, k))


def _best(scores: Tensor, rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The best k of candidates (Q, C), in no order; of candidates tied at the k-th score, the lowest
    rows. One `topk`, which keeps any of the tied ones: the queries where one was left out (duplicate
    rows) are chosen again by sorting their candidates."""
    top_s, pick = torch.topk(scores, k, dim=1, sorted=False)  # (Q, k)
    top_r = rows.gather(1, pick)
    kth = top_s.amin(dim=1, keepdim=True)  # (Q, 1)
    # -inf ties are masked rows, which a full answer never holds: not worth a sort
    left_out = ((scores == kth).sum(dim=1) > (top_s == kth).sum(dim=1)) & (kth[:, 0] > float("-inf"))
    if bool(left_out.any()):
        tied = left_out.nonzero().squeeze(1)  # (T,)
        again_s, again_r = _ordered(scores[tied], rows[tied])
        top_s[tied], top_r[tied] = again_s[:, :k], again_r[:, :k]
    return top_s, top_r


def _ordered(scores: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Candidates (Q, C) sorted by score descending, then row ascending (two sorts, the second stable)."""
    rows, by_row = torch.sort(rows, dim=1)
    scores, by_score = torch.sort(scores.gather(1, by_row), dim=1, descending=True, stable=True)
    return scores, rows.gather(1, by_score)


def rescore_rows(vectors: Tensor, queries: Tensor, rows: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Re-score candidate rows (Q, C) in fp32 against `vectors` and keep the best k, best first."""
    return best_first(rescored(vectors, queries, rows), rows, k)


def rescored(vectors: Tensor, queries: Tensor, rows: Tensor) -> Tensor:
    """The fp32 scores (Q, C) of candidate rows (Q, C) against `vectors`."""
    cand = vectors[rows.reshape(-1)].float().view(*rows.shape, -1)  # (Q, C, D)
    return torch.einsum("qcd,qd->qc", cand, queries.float())


def span(mask: Tensor | None, n: int) -> tuple[int, int, int]:
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
