"""A search's query vectors: what `Index.search` takes as a query, checked and turned into float32
rows, and the 64-byte-aligned buffers `Index._query_matrix` (in `index.py`) normalises them into.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmembed.errors import BadInput, UserError
from mmembed.modality import Modality
from mmembed.retrieval.query import Query

_THREAD = threading.local()


def _as_query(q: Any) -> Any:
    """A prompt's media item as `generate` and `Memory.search` take it: `mm.Image` / `mm.Audio` /
    `mm.Text` becomes the `Query` of its item, a recalled `Embedded` its vector (they raised a
    TypeError from deep in numpy here)."""
    if isinstance(getattr(q, "vector", None), Tensor):  # decoder.Embedded
        return q.vector
    if isinstance(getattr(q, "modality", None), Modality) and hasattr(q, "item"):  # decoder.Media
        return Query(**{str(q.modality): q.item})
    return q


def _one_vector(q: Any, dim: int, i: int) -> np.ndarray:
    v = _check_query_vectors(q, dim, i)
    if v.shape[0] != 1:
        raise UserError(f"query {i} holds {v.shape[0]} vectors; pass one (D,) vector per query")
    return v[0]


def _check_query_vectors(q: Any, dim: int, first: int = 0) -> np.ndarray:
    """A (D,) or (Q, D) vector query -> (Q, D) float32 array; a wrong size is BadInput naming the query."""
    if isinstance(q, (str, Path)):
        raise UserError(f"query {first} is a {type(q).__name__}; wrap raw items in mm.Query(...)")
    if isinstance(q, Tensor):
        try:  # a CPU tensor that needs no grad: a view, without a torch operation (see _query_matrix)
            a = q.numpy()
        except (RuntimeError, TypeError):  # on a GPU, requiring grad, or bf16
            a = q.detach().to(device="cpu", dtype=torch.float32).numpy()
    else:
        a = np.asarray(q)
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):  # None, a dict, a list of strings
        raise UserError(f"query {first} is a {type(q).__name__}: pass a (D,) vector, an mm.Query(...), or an "
                        "mm.Image / mm.Audio / mm.Text")
    if np.iscomplexobj(a):  # astype(float32) dropped the imaginary part with a warning; `add` refuses it too
        raise BadInput(f"query {first} must be real, got {getattr(q, 'dtype', a.dtype)}")
    if a.dtype != np.float32:
        a = a.astype(np.float32)
    a = a.reshape(1, -1) if a.ndim <= 1 else a
    if a.ndim != 2 or a.shape[1] != dim:
        raise BadInput(f"query {first} has shape {tuple(a.shape)}; this index holds dimension {dim}")
    return a  # NaN and Inf are found by `Index._query_matrix` from the squared norms


def _check_finite(a: np.ndarray) -> None:
    """BadInput naming the first row of the (Q, D) queries holding NaN or Inf."""
    finite = np.isfinite(a).all(axis=1)
    if not finite.all():
        raise BadInput(f"query {int(np.flatnonzero(~finite)[0])} contains NaN or Inf")


def _one_query(dim: int) -> np.ndarray:
    """This thread's aligned (1, dim) buffer for a single normalised query: it lives until the
    backend's search returns, and `_aligned` costs about 1.5 µs of a ~100 µs HNSW query."""
    buffer = getattr(_THREAD, "query", None)
    if buffer is None or buffer.shape[1] != dim:
        buffer = _THREAD.query = _aligned((1, dim))
    return buffer


def _aligned(shape: tuple[int, ...]) -> np.ndarray:
    """An empty float32 array on a 64-byte boundary (torch's CPU allocation). numpy aligns to 16
    bytes; FAISS's IVF search ran 11% slower for one query from such an array (100k rows,
    nprobe 48: 140.7 against 124.8 ms for 256 calls, the same values re-aligned)."""
    return torch.empty(shape, dtype=torch.float32).numpy()
