"""FAISS backends (the optional `faiss` extra): IndexFlatIP, IVF-Flat and HNSW-Flat.

FAISS holds its own fp32 copy of the rows, keyed by row position in the `VectorStore`; the
store stays the source of truth. A save keeps an IVF's or an HNSW's structure beside the store
(`structure`, `restore`), so a search in a later process neither builds it nor gets another one.
Syncing is lazy: appended rows are added at the next search, and a compaction (which moves
rows) drops the FAISS structure so the next search rebuilds it. So a search changes the backend,
and two at once corrupt it (crashes, wrong hits): `Index` runs them one at a time, under its lock.

Removal and filters: FAISS HNSW cannot delete, so removed rows stay in the structure as
tombstones and every search passes an `IDSelectorBitmap` of eligible rows (alive, target
modality, metadata filter). `Index.remove` compacts once a quarter of the rows are dead. Without a
filter the mask is the store's cached one, the same object until rows change, and its count, rows
and bitmap selector are kept with it: a search after a removal or with a `target` costs the
selector's checks inside FAISS, not an (N,) count and pack per query (0.43 ms against 0.14 for IVF
at 100k rows).
A selective filter (few eligible rows) is answered by an exact scan of just those rows: it
is cheaper than a filtered graph walk and exact. A query whose walk or probed cells reach fewer
eligible rows than k asks for (k near N) is answered again by an exact scan, so k > N returns N.

Per-call cost: one HNSW query takes a few hundred µs and evicts the caches; after it a torch
call costs 10-25 µs on a 2-core CPU, a numpy one a few µs, and building a FAISS parameter
object ~10 µs. So backends take and return numpy arrays (`Backend.search`), and an unfiltered
search reuses its parameter object while the structure and the option values stay the same
(`benchmarks/bench_ann.py` measures the whole path).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmembed.errors import UserError
from mmembed.retrieval.exact import exact_topk
from mmembed.retrieval.store import VectorStore, padded

log = logging.getLogger(__name__)
_BRUTE_FORCE_ROWS = 20_000  # an eligible set this small is scanned exactly (a few ms)
_BRUTE_FORCE_FRACTION = 0.02
_SELECTIONS = 8  # masks whose selections are kept: one per target, a few filters' ((N,) bytes + a bitmap each)


def import_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise UserError("this index backend needs FAISS: pip install 'mmembed[faiss]' (faiss-cpu)") from None
    return faiss


class _FaissBackend:
    name = "faiss"
    exact = False

    def __init__(self) -> None:
        self._faiss = import_faiss()  # fail at construction, not at the first search
        self._index: Any = None
        self._synced = 0  # rows of the store already in `_index`
        self._version = -1  # store.version the structure was built against
        self._plain: tuple[Any, Any] | None = None  # (options, parameters) of an unfiltered search
        self._selections: dict[int, _Selection] = {}  # by id of their mask, least recently used first

    # a pickle or deep copy (an Index sent to a worker process) carries the built structure as
    # FAISS's own serialisation, so the copy answers exactly as the original (an HNSW graph built
    # again could differ); the module and the parameter objects are made again on the other side
    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("_faiss", "_index", "_plain", "_selections")}
        state["_index"] = None if self._index is None else self._faiss.serialize_index(self._index)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._faiss = import_faiss()
        self._plain, self._selections = None, {}
        if self._index is not None:
            self._index = self._faiss.deserialize_index(self._index)

    # subclasses: create an empty (trained) FAISS index for these rows, search parameters, and
    # the option values those parameters are built from
    def _create(self, vectors: np.ndarray) -> Any:
        raise NotImplementedError

    def _params(self, selector: Any) -> Any:
        return self._faiss.SearchParameters(sel=selector) if selector is not None else None

    def _options(self) -> Any:
        return None

    def _unfiltered_params(self) -> Any:
        """`_params(None)`, kept while the structure and the options stay the same: building a
        FAISS parameter object costs about as much as the rest of the wrapper."""
        options = self._options()
        if self._plain is None or self._plain[0] != options:
            self._plain = (options, self._params(None))
        return self._plain[1]

    def _stale(self, store: VectorStore) -> bool:
        return self._index is None or store.version != self._version

    def _sync(self, store: VectorStore) -> None:
        if self._stale(store):
            self._index, self._synced, self._plain, self._selections = None, 0, None, {}
        if store.n_rows > self._synced:
            new = store.vectors[self._synced:].float().contiguous().numpy()  # (n, D)
            if self._index is None:
                self._index = self._create(store.vectors.float().numpy())
            self._index.add(new)
            self._synced, self._version = store.n_rows, store.version

    def search(self, store: VectorStore, queries: np.ndarray, k: int, mask: Tensor | None
               ) -> tuple[np.ndarray, np.ndarray]:
        chosen = None if mask is None else self._selected(mask)
        n_valid = store.n_rows if chosen is None else chosen.n_valid
        if n_valid == 0:
            return np.empty((queries.shape[0], 0), np.float32), np.empty((queries.shape[0], 0), np.int64)
        if chosen is not None and n_valid <= max(_BRUTE_FORCE_ROWS, _BRUTE_FORCE_FRACTION * store.n_rows):
            return _scan_subset(store, queries, k, chosen.rows())
        self._sync(store)
        chosen = None if mask is None else self._selected(mask)  # (a rebuild in `_sync` dropped it)
        params = self._unfiltered_params() if chosen is None else chosen.params(self)
        scores, rows = self._search(queries, min(k, n_valid), params)
        if padded(rows):  # FAISS pads a short answer with -1 after its sorted hits
            _rescan_short(store, queries, mask, scores, rows)
        return scores, rows  # tied hits in FAISS's order: sorting them cost ~4% of an HNSW query at Q = 1

    def _selected(self, mask: Tensor) -> _Selection:
        chosen = self._selections.pop(id(mask), None)  # a kept selection holds its mask: the id is its own
        if chosen is None:
            chosen = _Selection(mask)
            if len(self._selections) >= _SELECTIONS:
                del self._selections[next(iter(self._selections))]
        self._selections[id(mask)] = chosen
        return chosen

    def _search(self, queries: np.ndarray, k: int, params: Any) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's `search_c` into fresh (Q, k) arrays: what `index.search` does after checks the
        caller has made (float32 rows of the index's dimension), minus ~2 µs of Python per call."""
        queries = np.ascontiguousarray(queries)  # search_c reads raw memory: a no-op for our queries
        n, ptr = queries.shape[0], self._faiss.swig_ptr
        scores, rows = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
        self._index.search_c(n, ptr(queries), k, ptr(scores), ptr(rows), params)
        return scores, rows

    def config(self) -> dict[str, Any]:
        return {}

    # what a save keeps of the built structure (False: nothing worth keeping, it is rebuilt at once),
    # and the FAISS index type it must be
    _saved = False
    _kind = ""

    def structure(self, store: VectorStore) -> tuple[Callable[[Callable[[bytes], Any]], None], dict[str, Any]] | None:
        """A writer of the structure for all of `store`'s rows in FAISS's own serialisation (built
        first if it is stale) — `write(sink)` hands `sink` the bytes piece by piece, no copy of the
        whole in memory — and the state a load needs with it; None for a backend whose structure is
        cheap to build. A search in a later process then reads it instead of building it (an HNSW
        graph of 20k rows took 2.8 s in every `mmembed search`, and one built again could answer
        otherwise)."""
        if not self._saved or store.n_rows == 0:
            return None
        if self._stale(store) or store.n_rows > self._synced:
            log.info("building the %s structure of %d rows to save with the index", self.name, store.n_rows)
        self._sync(store)
        index, faiss = self._index, self._faiss
        return (lambda sink: faiss.write_index(index, faiss.PyCallbackIOWriter(sink))), self._state()

    def restore(self, read: Callable[[int], bytes], state: dict[str, Any], store: VectorStore, where: str) -> bool:
        """Take the structure that `read(n)` gives, saved for `store`'s rows; False (with a warning
        naming `where`; it is built again from the vectors at the first search) when FAISS cannot read
        it (a damaged file, another FAISS's format) or it is not this backend's for these rows: another
        index type or parameters (a hand-edited header), another row count, rows unlike the store's."""
        try:
            index = self._faiss.read_index(self._faiss.PyCallbackIOReader(read))  # (of its own type already)
        except (RuntimeError, TypeError) as e:  # FAISS's own read errors
            log.warning("%s: FAISS cannot read it (%s): building the structure again from the vectors", where,
                        str(e).splitlines()[-1][:200])
            return False
        problem = self._unlike(index, state, store)
        if problem:
            log.warning("%s: %s: building the structure again from the vectors", where, problem)
            return False
        self._index, self._synced, self._version = index, store.n_rows, store.version
        self._plain, self._selections = None, {}
        self._restore_state(state)
        return True

    def _unlike(self, index: Any, state: dict[str, Any], store: VectorStore) -> str | None:
        """What makes `index` not this backend's structure for `store`'s rows, else None."""
        if type(index).__name__ != self._kind or index.metric_type != self._faiss.METRIC_INNER_PRODUCT:
            return f"it is a {type(index).__name__}, not the {self._kind} (inner product) of {self.name}"
        if index.ntotal != store.n_rows or index.d != store.dim:
            return f"it holds {index.ntotal} rows of {index.d}, the index {store.n_rows} of {store.dim}"
        if problem := self._other_parameters(index, state):
            return problem
        rows = sorted({0, store.n_rows - 1, *range(0, store.n_rows, max(1, store.n_rows // 6))})
        got = self._rows_of(index, rows)
        want = store.vectors[rows].float().numpy()
        if not np.allclose(got, want, atol=1e-6):  # (a structure of other vectors answered with scores of 1e28)
            return "its rows are not the index's vectors"
        return None

    def _other_parameters(self, index: Any, state: dict[str, Any]) -> str | None:
        return None

    def _rows_of(self, index: Any, rows: list[int]) -> np.ndarray:
        return np.stack([index.reconstruct(r) for r in rows])

    def _state(self) -> dict[str, Any]:
        return {}

    def _restore_state(self, state: dict[str, Any]) -> None:
        pass


class _Selection:
    """What searches derive from one eligibility mask: its count, its rows and FAISS parameters
    with its bitmap, each made at first use. It holds the mask, so no other mask gets that id while
    it is kept; the store never changes a mask it handed out (read-only)."""

    def __init__(self, mask: Tensor) -> None:
        self.mask = mask
        self.n_valid = int(mask.sum())
        self._rows: Tensor | None = None
        self._params: tuple[Any, ...] | None = None  # (options, parameters, selector, bitmap)

    def rows(self) -> Tensor:
        if self._rows is None:
            self._rows = self.mask.nonzero().squeeze(1)  # (n_valid,)
        return self._rows

    def params(self, backend: _FaissBackend) -> Any:
        options = backend._options()
        if self._params is None or self._params[0] != options:
            bitmap = np.packbits(self.mask.numpy(), bitorder="little")  # bit r = row r eligible
            selector = backend._faiss.IDSelectorBitmap(bitmap)  # reads `bitmap`, kept beside it
            self._params = (options, backend._params(selector), selector, bitmap)
        return self._params[1]


class FaissFlat(_FaissBackend):
    """Exact brute force with FAISS's IndexFlatIP (the anchor the `exact` backend is tested against)."""

    name = "faiss_flat"
    exact = True

    def __init__(self) -> None:
        super().__init__()

    def _create(self, vectors: np.ndarray) -> Any:
        return self._faiss.IndexFlatIP(vectors.shape[1])


class FaissIVF(_FaissBackend):
    """Inverted lists over k-means cells: search visits `nprobe` of `nlist` cells.

    The quantizer is trained on the rows present at the first search; with `nlist=None`
    (4·sqrt(N) cells) it is retrained once the index has grown 4× since, so an index filled in
    small steps does not keep a quantizer fitted to its first hundred rows.
    """

    name = "faiss_ivf"

    def __init__(self, nlist: int | None = None, nprobe: int = 16):
        super().__init__()
        if (nlist is not None and nlist < 1) or nprobe < 1:
            raise UserError(f"faiss_ivf needs nlist >= 1 and nprobe >= 1, got nlist={nlist}, nprobe={nprobe}")
        self.nlist, self.nprobe = nlist, nprobe
        self._trained_on = 0

    def _stale(self, store: VectorStore) -> bool:
        grown = self.nlist is None and store.n_rows >= 4 * self._trained_on
        return super()._stale(store) or (grown and store.n_rows > self._synced)

    def _cells(self, n: int) -> int:
        """The cells of a quantizer trained on `n` rows: `nlist`, or 4·sqrt(n), at most n / 39."""
        nlist = self.nlist or max(1, int(4 * math.sqrt(n)))
        return max(1, min(nlist, n // 39 or 1))  # k-means wants >= 39 points per centroid

    def _create(self, vectors: np.ndarray) -> Any:
        n, dim = vectors.shape
        nlist = self._cells(n)
        sample = vectors
        if n > 256 * nlist:  # what FAISS would subsample to anyway; seeded so builds repeat
            pick = np.random.default_rng(0).choice(n, 256 * nlist, replace=False)
            sample = vectors[np.sort(pick)]
        quantizer = self._faiss.IndexFlatIP(dim)
        index = self._faiss.IndexIVFFlat(quantizer, dim, nlist, self._faiss.METRIC_INNER_PRODUCT)
        index.train(np.ascontiguousarray(sample))
        self._trained_on = n
        return index

    def _params(self, selector: Any) -> Any:
        nprobe = min(self.nprobe, self._index.nlist)
        if selector is None:
            return self._faiss.SearchParametersIVF(nprobe=nprobe)
        return self._faiss.SearchParametersIVF(nprobe=nprobe, sel=selector)

    def _options(self) -> Any:
        return self.nprobe  # nlist is fixed for a structure

    def config(self) -> dict[str, Any]:
        return {"nlist": self.nlist, "nprobe": self.nprobe}

    _saved, _kind = True, "IndexIVFFlat"

    def _state(self) -> dict[str, Any]:
        return {"trained_on": self._trained_on}  # when an index grown 4x since retrains its cells

    def _restore_state(self, state: dict[str, Any]) -> None:
        self._trained_on = _trained_on(state, self._synced)

    def _other_parameters(self, index: Any, state: dict[str, Any]) -> str | None:
        n = _trained_on(state, index.ntotal)
        nlist = self._cells(n)  # as `_create` chose it
        return None if index.nlist == nlist else f"it has {index.nlist} cells, where nlist={self.nlist} gives {nlist}"

    def _rows_of(self, index: Any, rows: list[int]) -> np.ndarray:
        index.make_direct_map()  # an IVF finds a row's list through it (dropped again: memory)
        try:
            return super()._rows_of(index, rows)
        finally:
            index.set_direct_map_type(self._faiss.DirectMap.NoMap)


class FaissHNSW(_FaissBackend):
    """Hierarchical navigable small-world graph (HNSW32 by default): fast, approximate."""

    name = "faiss_hnsw"

    def __init__(self, m: int = 32, ef_search: int = 128, ef_construction: int = 40):
        super().__init__()
        if m < 2 or ef_search < 1 or ef_construction < 1:
            raise UserError(f"faiss_hnsw needs m >= 2, ef_search >= 1, ef_construction >= 1; "
                            f"got m={m}, ef_search={ef_search}, ef_construction={ef_construction}")
        self.m, self.ef_search, self.ef_construction = m, ef_search, ef_construction

    def _create(self, vectors: np.ndarray) -> Any:
        index = self._faiss.IndexHNSWFlat(vectors.shape[1], self.m, self._faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.ef_construction
        return index

    def _params(self, selector: Any) -> Any:
        if selector is None:
            return self._faiss.SearchParametersHNSW(efSearch=self.ef_search)
        return self._faiss.SearchParametersHNSW(efSearch=self.ef_search, sel=selector)

    def _options(self) -> Any:
        return self.ef_search

    def config(self) -> dict[str, Any]:
        return {"m": self.m, "ef_search": self.ef_search, "ef_construction": self.ef_construction}

    _saved, _kind = True, "IndexHNSWFlat"

    def _other_parameters(self, index: Any, state: dict[str, Any]) -> str | None:
        m, ef = index.hnsw.nb_neighbors(1), index.hnsw.efConstruction  # (level 0 holds 2m)
        if (m, ef) != (self.m, self.ef_construction):
            return f"its graph has m={m}, ef_construction={ef}, the index m={self.m}, ef_construction={self.ef_construction}"
        return None


def _trained_on(state: dict[str, Any], default: int) -> int:
    trained_on = state.get("trained_on")
    return trained_on if isinstance(trained_on, int) and not isinstance(trained_on, bool) and trained_on > 0 else default


def _rescan_short(store: VectorStore, queries: np.ndarray, mask: Tensor | None, scores: np.ndarray,
                  rows: np.ndarray) -> None:
    """Answer the queries that came up short again by an exact scan, in place. A graph walk or the
    probed cells can reach fewer eligible rows than k holds (k near N: HNSW found 979 of 1,000,
    IVF 656), while `Index.search` promises min(k, eligible) hits."""
    short = np.flatnonzero(rows[:, -1] < 0)  # (S,) queries whose answer is padded
    k = rows.shape[1]  # min(k, eligible): the exact scan fills every column
    fill_s, fill_r = exact_topk(store.vectors, torch.from_numpy(queries[short]), k, mask)
    scores[short], rows[short] = fill_s.numpy(), fill_r.numpy()


def _scan_subset(store: VectorStore, queries: np.ndarray, k: int, rows: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Exact scan of the eligible rows only (gathered), mapped back to store rows."""
    scores, local = exact_topk(store.vectors.index_select(0, rows), torch.from_numpy(queries), k)
    return scores.numpy(), rows[local].numpy()
