"""Search backends behind one interface, chosen by name from a plain-dict registry.

A backend answers "best k eligible rows for these queries" over a `VectorStore`. The store
owns the vectors (they are what `Index.save` writes); a backend either scans them directly
(`exact`) or keeps a FAISS structure over row positions that it brings up to date lazily, at
the next search after rows were appended or moved.

| name        | kind                               | arguments                                 |
|-------------|------------------------------------|-------------------------------------------|
| exact       | blocked matmul + top-k (default)   | block_rows                                |
| faiss_flat  | FAISS IndexFlatIP (exact)          | -                                         |
| faiss_ivf   | FAISS IndexIVFFlat (approximate)   | nlist (None: 4·sqrt(N)), nprobe           |
| faiss_hnsw  | FAISS IndexHNSWFlat (approximate)  | m, ef_search, ef_construction             |
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from torch import Tensor

from mmembed.config import check_kwargs
from mmembed.errors import UserError
from mmembed.retrieval.exact import exact_topk
from mmembed.retrieval.faiss_backend import FaissFlat, FaissHNSW, FaissIVF
from mmembed.retrieval.store import VectorStore


class Backend(Protocol):
    name: str
    exact: bool  # True: results equal a brute-force scan

    def search(self, store: VectorStore, queries: Tensor, k: int, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """queries (Q, D) float32 -> scores (Q, k') float32, rows (Q, k') int64, best first.

        `mask` (N,) bool marks eligible rows (None: all). Rows of -1 pad answers that came up
        short (approximate backends); callers drop them.
        """
        ...

    def config(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this backend (saved in `index.json`)."""
        ...


class ExactBackend:
    """Brute force over the store's own vectors: nothing to build, nothing to keep in sync."""

    name = "exact"
    exact = True

    def __init__(self, block_rows: int | None = None):
        """Args: block_rows: rows scored per block (None: sized from the query count)."""
        if block_rows is not None and block_rows < 1:
            raise UserError(f"block_rows must be >= 1, got {block_rows}")
        self.block_rows = block_rows

    def search(self, store: VectorStore, queries: Tensor, k: int, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        return exact_topk(store.vectors, queries, k, mask, self.block_rows)

    def config(self) -> dict[str, Any]:
        return {} if self.block_rows is None else {"block_rows": self.block_rows}


BACKENDS: dict[str, Callable[..., Backend]] = {
    "exact": ExactBackend,
    "faiss_flat": FaissFlat,
    "faiss_ivf": FaissIVF,
    "faiss_hnsw": FaissHNSW,
}


def build_backend(name: str, args: dict[str, Any]) -> Backend:
    """Look up `name` and validate `args` against its builder (unknown keys name the valid ones)."""
    if name not in BACKENDS:
        raise UserError(f"unknown index backend {name!r} (valid: {', '.join(BACKENDS)})")
    builder = BACKENDS[name]
    return builder(**check_kwargs(builder, args, where="", source=f"Index(backend={name!r})"))
