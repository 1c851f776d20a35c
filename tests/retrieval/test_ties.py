"""Tied scores: ordered by (score descending, row ascending), the lowest rows kept at the k-th score,
whatever k, the blocking, the query batch, the mask or the storage (exact and sq8 backends)."""

import numpy as np
import pytest
import torch

from mmembed.retrieval import Index
from mmembed.retrieval.exact import exact_topk
from mmembed.retrieval.quantized import Int8Codes, sq8_topk

D = 8


def tied_rows(n_dup: int, n_other: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n_dup` copies of one row spread among `n_other` random ones (every score of a copy ties), and
    that row (1, D) as a query. Components are multiples of 1/4, so every score is exact in float32
    and float16 whatever the kernel sums first (with several threads, random floats gave copies
    scores one ulp apart, which are not ties)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (n_dup + n_other, D), generator=g).float() / 4
    spots = torch.randperm(n_dup + n_other, generator=g)[:n_dup]
    x[spots] = x[spots[0]].clone()
    return x, x[spots[:1]].clone()


def expected(x: torch.Tensor, q: torch.Tensor, k: int, mask=None) -> list[list[int]]:
    """The reference: rows by (float64 score descending, row ascending), copies scored alike."""
    scores = (q.double() @ x.double().T).tolist()
    eligible = range(x.shape[0]) if mask is None else mask.nonzero().squeeze(1).tolist()
    return [sorted(eligible, key=lambda r: (-s[r], r))[:k] for s in scores]


@pytest.mark.parametrize("block_rows", [None, 7, 64, 1000])
@pytest.mark.parametrize("n_q", [1, 3, 20])
def test_exact_ties_go_to_the_lowest_rows_whatever_the_blocking_and_batch(block_rows, n_q):
    """Tied rows came back in an arbitrary order that changed with k, batching and blocking."""
    x, copy = tied_rows(300, 2700, 0)
    q = copy.repeat(n_q, 1)  # every copy scores 1.0: 300 ties
    q[1:] += torch.randint(-1, 2, (n_q - 1, D), generator=torch.Generator().manual_seed(1)).float() / 4
    for k in (1, 2, 3, 10, 40):
        _, rows = exact_topk(x, q, k, block_rows=block_rows)
        assert rows.tolist() == expected(x, q, k)


@pytest.mark.parametrize("n_q", [1, 4])
def test_top_k_is_a_prefix_of_top_k_plus_one_with_a_mask_and_fp16(n_q):
    """The top k was not a prefix of the top k + 1 (paging), and a filter reordered the ties."""
    x, copy = tied_rows(200, 1800, 2)
    q = copy.repeat(n_q, 1)
    mask = torch.rand(2000, generator=torch.Generator().manual_seed(3)) < 0.7
    for vectors in (x, x.half()):
        pages = [exact_topk(vectors, q, k, mask=mask)[1] for k in range(1, 12)]
        for k, rows in enumerate(pages, 1):
            assert rows.tolist() == expected(vectors.float(), q, k, mask)
            assert k == 11 or torch.equal(pages[k][:, :k], rows)  # the top k starts the top k + 1


def test_sq8_ties_are_ordered_by_row():
    """sq8's candidates and re-rank kept tied rows in an arbitrary order."""
    x, copy = tied_rows(100, 900, 4)
    codes = Int8Codes()
    codes.sync(x, 0)
    for q in (copy, x[:3]):
        _, rows = sq8_topk(codes, x, q, 10)
        assert rows.tolist() == expected(x, q, 10)


@pytest.mark.parametrize("backend", ["exact", "sq8"])
def test_every_exact_backend_orders_ties_by_id(backend):
    """Ten copies of one vector came back as [4, 3, 2, 1, 0] unfiltered and [1, 7, 6, 5, 3] filtered.
    (FAISS backends keep FAISS's order of tied hits: sorting each answer cost ~4% of an HNSW query.)"""
    x = torch.nn.functional.normalize(torch.randn(1, D, generator=torch.Generator().manual_seed(5)), dim=1)
    idx = Index(D, backend=backend)
    idx.add(x.repeat(10, 1), "text")
    q = torch.randn(3, D, generator=torch.Generator().manual_seed(6))
    for ids in (idx.search_ids(q, k=5)[0], idx.search_ids(q[:1], k=5)[0], idx.search_ids(q, k=5, target="text")[0]):
        for line in ids.tolist():
            assert line == [0, 1, 2, 3, 4]
    hits = idx.search(q[0], k=10, filter=lambda m: True)
    assert [h.id for h in hits] == list(range(10)) and np.ptp([h.score for h in hits]) == 0
