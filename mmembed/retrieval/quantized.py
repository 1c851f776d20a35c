"""int8 scalar-quantised scan with an exact fp32 re-rank: the `sq8` backend's kernel.

A few queries at a time are bound by memory bandwidth: one query reads every stored byte
once. Scanning int8 codes reads a quarter of fp32's bytes. Rows are centred on the stored rows'
mean μ first, and each dimension d gets its own scale s_d = max|x_d − μ_d| / 127, so row x is
stored as codes c = round((x − μ) / s). The approximate score of query q is q·(c ⊙ s) + q·μ;
q·μ is the same for every row, so the ranking needs only (q ⊙ s)·c: the scale folds into the
query, and the scan is one int8-weight product (`torch._weight_int8pack_mm`, bf16 query, bf16 output;
the weight-only int8 kernel behind torchao's CPU inference). The best `candidates` rows per
query by that score are then re-scored exactly in fp32 against the stored vectors, which the
store keeps: scores are exact, and a true top-k row is lost only if its approximate score falls
out of the candidates (recall@10 against fp32 is measured by B-search and tested).

So `sq8` costs 1.25× fp32's memory (codes beside the vectors) and scans a quarter of the bytes
per query (B-search: 3.9-4.7× FAISS's flat index for one query). The bf16 scores are coarse (8
bits), which is why the rows are centred: embeddings in a narrow cone (a mean cosine of 0.9
between rows, as anisotropic spaces have) would otherwise all score about q·μ, and their
differences would vanish in bf16's rounding. Data with many near-identical rows may still want
more `candidates`. For many queries at once
the product is compute-bound, where the fp32 blocked product is faster and exact: above
`max_scan_queries` queries the search takes that path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmembed.retrieval.exact import RunningTopk, exact_topk, rescore_rows, scan_blocks, span

_BLOCK_ROWS = 1 << 16
# The kernel reads a row's codes 16 at a time and reads past a shorter tail (torch 2.14 on CPU:
# NaN, Inf or a crash for D = 8, 24, 100, ...): codes are padded with zero columns to a multiple.
_KERNEL_COLUMNS = 16


class Int8Codes:
    """Per-dimension int8 codes of a store's rows, brought up to date from its vectors lazily.

    Appended rows are quantised on their own while they fit the current scales; a row outside
    them (or a compaction, which moves rows) re-quantises everything with new scales. Codes are
    (N, D') with D' the dimension rounded up to the kernel's multiple; the extra columns are 0.
    A sync replaces the fields one after another: its caller keeps other searches out meanwhile
    (`Index` searches under its lock).
    """

    def __init__(self) -> None:
        self.codes = torch.empty(0, 0, dtype=torch.int8)  # (N, D')
        self.scale = torch.empty(0)  # (D,)
        self.mean = torch.empty(0)  # (D,) μ, the centre the codes are taken around
        self.n_rows = 0
        self.version = -1

    def sync(self, vectors: Tensor, version: int) -> None:
        n = vectors.shape[0]
        if version != self.version or n < self.n_rows:
            self._rebuild(vectors, version)
            return
        if n == self.n_rows:
            return
        new = vectors[self.n_rows:].float()
        if bool(((new - self.mean).abs().amax(dim=0) > self.scale * 127).any()):
            self._rebuild(vectors, version)
            return
        self.codes = torch.cat([self.codes, self._quantise(new)])
        self.n_rows = n

    def _rebuild(self, vectors: Tensor, version: int) -> None:
        total = torch.zeros(vectors.shape[1], dtype=torch.float64)
        for start in range(0, vectors.shape[0], _BLOCK_ROWS):  # no fp32 copy of the whole store
            total += vectors[start:start + _BLOCK_ROWS].double().sum(dim=0)
        self.mean = (total / max(1, vectors.shape[0])).float()
        amax = torch.zeros(vectors.shape[1])
        for start in range(0, vectors.shape[0], _BLOCK_ROWS):
            amax = torch.maximum(amax, (vectors[start:start + _BLOCK_ROWS].float() - self.mean).abs().amax(dim=0))
        self.scale = amax.clamp_min(1e-12) / 127
        self.codes = torch.empty(vectors.shape[0], self.width, dtype=torch.int8)
        for start in range(0, vectors.shape[0], _BLOCK_ROWS):
            self.codes[start:start + _BLOCK_ROWS] = self._quantise(vectors[start:start + _BLOCK_ROWS].float())
        self.n_rows, self.version = vectors.shape[0], version

    @property
    def width(self) -> int:
        """D': the codes' columns, the dimension rounded up to the kernel's multiple."""
        return -(-self.scale.shape[0] // _KERNEL_COLUMNS) * _KERNEL_COLUMNS

    def query(self, queries: Tensor) -> Tensor:
        """(Q, D) float queries → (Q, D') bf16 with each dimension's scale folded in, zero-padded."""
        return _pad_columns(queries.float() * self.scale, self.width).to(torch.bfloat16)

    def _quantise(self, rows: Tensor) -> Tensor:
        codes = ((rows - self.mean) / self.scale).round_().clamp_(-127, 127).to(torch.int8)  # (n, D)
        return _pad_columns(codes, self.width)  # (n, D')


def _pad_columns(x: Tensor, width: int) -> Tensor:
    """(n, D) → (n, width) with zero columns after D (x itself when D is the width already)."""
    return F.pad(x, (0, width - x.shape[1])) if x.shape[1] < width else x


def sq8_topk(
    codes: Int8Codes,
    vectors: Tensor,
    queries: Tensor,
    k: int,
    mask: Tensor | None = None,
    candidates: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Best `k` rows per query: int8 scan for `candidates` rows, then exact fp32 re-rank.

    Args:
        codes: `Int8Codes` synced with `vectors`.
        vectors: (N, D) stored rows (re-rank against these).
        queries: (Q, D) float32.
        k: wanted hits (fewer when fewer rows are eligible).
        mask: (N,) bool eligible rows, or None.
        candidates: rows re-ranked per query (None: max(4k + 16, 64)).
    Returns:
        scores (Q, k') float32 exact, rows (Q, k') int64, best first.
    """
    n_q = queries.shape[0]
    lo, hi, n_valid = span(mask, vectors.shape[0])
    k_out = min(k, n_valid)
    if k_out == 0 or n_q == 0:  # (Q, k'), as every backend answers: no queries, still k' columns
        return torch.empty(n_q, k_out), torch.empty(n_q, k_out, dtype=torch.int64)
    n_cand = min(n_valid, max(k_out, candidates or max(4 * k_out + 16, 64)))
    query = codes.query(queries)  # (Q, D')
    unit = torch.ones(_BLOCK_ROWS, dtype=torch.bfloat16)  # the kernel's per-row scale

    def score(start: int, end: int) -> Tensor:
        return torch._weight_int8pack_mm(query, codes.codes[start:end], unit[: end - start]).float()  # (Q, n)

    best = RunningTopk(n_q, n_cand)
    scan_blocks(best, score, lo, hi, _BLOCK_ROWS, mask)
    _, rows = best.result()
    return rescore_rows(vectors, queries, rows, k_out)


def scan_or_exact(codes: Int8Codes, vectors: Tensor, queries: Tensor, k: int, mask: Tensor | None,
                  candidates: int | None, max_scan_queries: int) -> tuple[Tensor, Tensor]:
    """The faster path for this many queries: the int8 scan for a few, the exact product for more."""
    if queries.shape[0] > max_scan_queries:
        return exact_topk(vectors, queries, k, mask)
    return sq8_topk(codes, vectors, queries, k, mask, candidates)
