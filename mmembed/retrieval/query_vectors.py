"""A search's query vectors: what `Index.search` takes as a query, checked and turned into float32
rows, normalised into 64-byte-aligned buffers (`_unit_rows`) for `Index`'s search (in `index.py`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmembed.errors import BadInput, UserError
from mmembed.modality import Modality
from mmembed.retrieval.query import Query

_THREAD = threading.local()
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _as_query(q: Any) -> Any:
    """A prompt's media item as `generate` and `Memory.search` take it: `mm.Image` / `mm.Audio` /
    `mm.Text` becomes the `Query` of its item, a recalled `Embedded` its vector (they raised a
    TypeError from deep in numpy here)."""
    if isinstance(getattr(q, "vector", None), Tensor):  # decoder.Embedded
        return q.vector
    if isinstance(getattr(q, "modality", None), Modality) and hasattr(q, "item"):  # decoder.Media
        return Query(**{str(q.modality): q.item})
    return q


def _query_rows(queries: Tensor | np.ndarray | Sequence[Any], dim: int, pick: Callable[[Any, Query], Any],
                model: Any) -> np.ndarray:
    """Queries -> (Q, D) float32 rows as given, a `Query` embedded by `pick(model, query)` (the model
    given, else the index's). In numpy, with one torch call for a tensor's view (see `Backend.search`)."""
    if isinstance(queries, Tensor) or (isinstance(queries, np.ndarray) and queries.dtype != object):
        return _check_query_vectors(queries, dim)  # a (D,) array is one query, not D of one number
    if isinstance(queries, (list, tuple)) and queries and all(isinstance(x, (int, float)) for x in queries):
        return _check_query_vectors(queries, dim)  # one vector as a list (`z.tolist()`): "query 0 has shape (1, 1)"
    if isinstance(_as_query(queries), Query):  # one Query (or mm.Text, ...): "'Query' object is not iterable"
        raise UserError(f"queries must be a list of them (or a (Q, D) tensor), got one {type(queries).__name__}: "
                        "wrap it in [ ], or use search for one query")
    queries = [_as_query(q) for q in queries]
    rows = [_one_vector(q.embed(pick(model, q)), dim, i) if isinstance(q, Query)
            else _one_vector(q, dim, i) for i, q in enumerate(queries)]  # a Query(vector=) is checked too
    return np.stack(rows) if rows else np.zeros((0, dim), dtype=np.float32)  # (Q, D)


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


def _unit_rows(a: np.ndarray) -> np.ndarray:
    """(Q, D) float32 queries -> rows of unit length; a zero row stays zero (scores 0.0, never NaN).
    One query comes back in this thread's buffer (`_one_query`), overwritten by its next single query."""
    # squares in float64 cannot overflow from float32 rows: NaN or Inf there means NaN or Inf in a query
    if a.shape[0] == 1:  # one query, the latency-bound case: three numpy calls, then Python scalars
        wide = a.astype(np.float64)
        norm = math.sqrt(float(np.dot(wide[0], wide[0])))
        if not math.isfinite(norm):
            _check_finite(a)  # raises BadInput naming the query
        if norm > _FLOAT32_MAX:
            return np.divide(wide, norm, out=_one_query(a.shape[1]), casting="same_kind")
        return np.divide(a, norm or 1.0, out=_one_query(a.shape[1]))
    squares = np.vecdot(a, a, dtype=np.float64)  # (Q,)
    if not math.isfinite(squares.max(initial=0.0)):
        _check_finite(a)
    norms = np.sqrt(squares)[:, None]  # (Q, 1)
    norms[norms == 0] = 1.0  # a zero row stays zero
    return np.divide(a, norms, out=_aligned(a.shape), casting="same_kind")


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
