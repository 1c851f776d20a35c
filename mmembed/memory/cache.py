"""One user's vectors held in memory, searched with mmembed's retrieval backend.

The rows live in a retrieval `VectorStore` (vectors, ids, modality codes, tombstones) with two
more columns aligned to its rows: the item's time and a session code. Filters (modality, since,
session) become one boolean mask of eligible rows that the backend honours exactly.

Backend: the `exact` blocked matrix-vector scan, at every size. A memory search is one query,
and for one query the scan is bound by memory bandwidth (100k × 512 fp32 rows = 200 MB, ~40 ms
on 2 busy cores). The FAISS backends do not beat it here: `faiss_flat` parallelises over
queries, so one query runs on one thread (measured 110 ms vs 39 ms at 100k); HNSW / IVF answer
in ~1 ms but take minutes to build at 100k on 2 cores (HNSW32: ~3 min), and a cache is rebuilt
whenever another process deletes rows. `Backend` is the retrieval protocol, so swapping one
in is a one-line change once a user's memory outgrows a scan.

Sync: the cache remembers the largest id it read from the file (`synced_id`); a refresh reads
rows with larger ids and compares the user's count, reloading from scratch only when rows were
deleted elsewhere. Ids only grow: AUTOINCREMENT under SQLite's single write lock.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from mmembed.modality import Modality
from mmembed.retrieval.backends import Backend, ExactBackend
from mmembed.retrieval.store import VectorStore

_COMPACT_FRACTION = 0.25  # compact once this share of rows is dead
_NO_SESSION = -1


class _Column:
    """A growable 1-D tensor (capacity doubling), so single appends stay O(1) amortised."""

    def __init__(self, dtype: torch.dtype):
        self._data = torch.empty(1024, dtype=dtype)
        self.n = 0

    @property
    def values(self) -> Tensor:
        return self._data[: self.n]

    def extend(self, values: Tensor) -> None:
        end = self.n + values.numel()
        if end > self._data.numel():
            grown = torch.empty(max(end, 2 * self._data.numel()), dtype=self._data.dtype)
            grown[: self.n] = self.values
            self._data = grown
        self._data[self.n:end] = values
        self.n = end

    def keep(self, rows: Tensor) -> None:
        kept = self.values.index_select(0, rows)
        self._data[: kept.numel()] = kept
        self.n = kept.numel()


class UserVectors:
    """The vectors of one user's items, with what the search filters need.

    Args:
        dim: D, the embedding size.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.rows = VectorStore(dim)
        self.times = _Column(torch.float64)
        self.session_codes = _Column(torch.int32)
        self._codes: dict[str, int] = {}
        self.synced_id = 0  # largest id read from the file
        self.stale = True  # True: refresh from the file before the next search
        self.backend: Backend = ExactBackend()

    def __len__(self) -> int:
        return self.rows.n_alive

    def append(self, ids: Sequence[int] | np.ndarray, vectors: Tensor, modalities: Sequence[str],
               times: Sequence[float], sessions: Sequence[str | None]) -> None:
        """Add rows (vectors (N, D) float32 unit rows); ids already held are skipped."""
        ids = np.asarray(ids, dtype=np.int64)
        keep = np.ones(len(ids), dtype=bool)
        if self.rows.n_rows:  # a refresh may re-read rows this process wrote and appended itself
            keep = np.fromiter((not self.rows.has(int(i)) for i in ids), dtype=bool, count=len(ids))
        modalities = np.asarray(modalities, dtype=str)
        times_col = torch.from_numpy(np.asarray(times, dtype=np.float64))
        codes = torch.from_numpy(np.fromiter(map(self._session_code, sessions), dtype=np.int32, count=len(ids)))
        for modality in np.unique(modalities[keep]):  # VectorStore appends one modality at a time
            pick = np.flatnonzero(keep & (modalities == modality))
            rows = torch.from_numpy(pick)
            self.rows.append(vectors[rows], Modality.parse(modality), ["{}"] * len(pick), ids=ids[pick].tolist())
            self.times.extend(times_col[rows])
            self.session_codes.extend(codes[rows])

    def remove(self, ids: Sequence[int]) -> None:
        """Drop rows by id (ids not held are ignored); compacts once a quarter of rows are dead."""
        held = [int(i) for i in ids if self.rows.has(int(i))]
        if not held:
            return
        self.rows.remove(held)
        if self.rows.n_dead > _COMPACT_FRACTION * self.rows.n_rows:
            keep = self.rows.alive.nonzero().squeeze(1)  # (N_alive,)
            self.rows.compact()
            self.times.keep(keep)
            self.session_codes.keep(keep)

    def search(self, query: Tensor, k: int, modality: Modality | None = None, since: float | None = None,
               session: str | None = None, exclude_session: str | None = None) -> list[tuple[int, float]]:
        """Best k (id, cosine) pairs for one (1, D) unit query, among rows passing every filter."""
        if self.rows.n_alive == 0 or (session is not None and session not in self._codes):
            return []
        mask = self._mask(modality, since, session, exclude_session)
        if mask is not None and not bool(mask.any()):
            return []
        q = np.ascontiguousarray(query.detach().float().numpy())  # backends take numpy (Backend.search)
        scores, rows = self.backend.search(self.rows, q, k, mask)  # (1, k'), (1, k')
        ids = self.rows.ids_of_rows(rows)[0].tolist()
        return [(i, s) for s, r, i in zip(scores[0].tolist(), rows[0].tolist(), ids) if r >= 0]

    def _mask(self, modality: Modality | None, since: float | None, session: str | None,
              exclude_session: str | None) -> Tensor | None:
        """(N,) bool of eligible rows; None when every stored row is."""
        rows = self.rows
        mask = rows.alive.clone() if rows.n_dead else None
        parts = []
        if modality is not None:
            parts.append(rows.modality_mask(modality))
        if since is not None:
            parts.append(self.times.values >= since)
        if session is not None:
            parts.append(self.session_codes.values == self._codes[session])
        if exclude_session is not None and exclude_session in self._codes:
            parts.append(self.session_codes.values != self._codes[exclude_session])
        for part in parts:
            mask = part if mask is None else mask & part
        return mask

    def _session_code(self, session: str | None) -> int:
        if session is None:
            return _NO_SESSION
        return self._codes.setdefault(session, len(self._codes))

