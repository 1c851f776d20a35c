"""`Index`: unit vectors of any modality with metadata, searched by cosine similarity.

    index = mm.Index.build(model, "data/test.jsonl")           # every modality of the manifest
    hits = index.search(mm.Query(text="a red circle"), target="image", k=5)
    index.save("runs/demo/index"); index = mm.Index.load("runs/demo/index", model=model)

Every item gets a stable integer id (never reused, kept across save/load); `remove` marks
rows dead and the store compacts once a quarter of its rows are dead. Queries and stored rows
are unit vectors, so a score is a cosine similarity in [-1, 1]. A query's vectors are checked in
`query_vectors.py`; a save and a load go through `persist.py` (the folder) and `index_format.py`
(its files).
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmembed.errors import BadInput, CheckpointError, UserError, refuse_run_folder
from mmembed.modality import Modality
from mmembed.retrieval.backends import build_backend
from mmembed.retrieval.embed import embed_manifest, log_skipped, nothing_read, skip_summary
from mmembed.retrieval.hits import Hit
from mmembed.retrieval.index_format import STRUCTURE, metadata_text
from mmembed.retrieval.locking import Locked
from mmembed.retrieval.persist import check_target, read_index, write_index
from mmembed.retrieval.query import Query
from mmembed.retrieval.query_vectors import _query_rows, _unit_rows
from mmembed.retrieval.store import VectorStore, check_vectors, storage_dtype
from mmembed.scalars import as_integer

log = logging.getLogger(__name__)
_COMPACT_FRACTION = 0.25  # compact once this share of rows is dead
# the metadata `build` writes beside a manifest's own columns, which may not take these names
_WRITTEN = {"line": "manifest line", "item": "path or caption"}

QueryLike = Query | Tensor
Filter = Callable[[dict[str, Any]], bool] | dict[str, Any] | None


def _checked(k: Any, target: Modality | str | None) -> tuple[int, Modality | None]:
    """A search's `k` as an int and `target` as a Modality, or the error naming the bad one."""
    if (n := as_integer(k)) is None or n < 1:  # numpy's ints and 0-d tensors too
        raise BadInput(f"k must be a positive int, got {k!r}")  # a ValueError and a UserError, as Memory's
    return n, None if target is None else Modality.parse(target)


class Index(Locked):
    """Vectors of any modality with metadata; exact (default) or FAISS-backed search.

    Safe to share between threads: every call that reads or changes the items, and every search
    (its backend brings its own structures up to date lazily), runs under the index's lock, one
    at a time; a `Query` is embedded before the lock is taken.

    Args:
        dim: D, the dimension of every vector.
        fingerprint: identity of the model that made the vectors (`model.fingerprint`);
            checked when a model is attached, so vectors of two models never get compared.
        backend: "exact" (blocked matmul + top-k), "sq8" (int8 scan + exact fp32 re-rank, ~2× faster
            for one query), "faiss_flat", "faiss_ivf" or "faiss_hnsw".
        storage: "fp32", or "fp16" (half the memory; scores exact for the fp16-rounded vectors:
            recall@10 vs fp32 1.0 on random unit vectors, 0.94 in a cone of mean cosine 0.99, where
            the rounding reorders near-ties; "sq8" re-ranks in fp32 and keeps ≥ 0.99 there).
        **backend_args: the backend's options (see `mmembed.retrieval.backends`).
    """

    def __init__(self, dim: int, fingerprint: str | None = None, backend: str = "exact", storage: str = "fp32",
                 **backend_args: Any):
        if (n := as_integer(dim)) is None or n < 1:  # np.int64(512) too, as k takes it
            raise UserError(f"Index dim must be a positive int, got {dim!r}")
        self.dim = n
        self.fingerprint = fingerprint
        self.storage = storage
        self.backend_name = backend
        self._store = VectorStore(dim, storage_dtype(storage))
        self._backend = build_backend(backend, backend_args)
        self._model: Any = None
        self.info: dict[str, Any] = {}  # provenance (manifest, counts), saved in index.json (a Path as a str)
        self.skipped: list[tuple[int, str, str]] = []  # (line, modality, reason) from `build`
        Locked.__init__(self)  # reentrant: a search's filter may search this index

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def build(cls, model: Any, manifest_path: str | Path, *, modalities: Iterable[Modality | str] | None = None,
              batch_size: int = 64, progress: bool = True, backend: str = "exact", storage: str = "fp32",
              **backend_args: Any) -> Index:
        """Embed every modality present in a manifest (one entry per row and modality).

        Metadata of each entry: the manifest's extra columns, plus `line` (manifest line),
        `label` and `item` (the path or caption): a manifest with a `line` or `item` column is
        refused (UserError). Unreadable items are skipped and listed in `index.skipped` as
        (line, modality, reason).
        """
        refuse_run_folder(model)
        index = cls(int(model.embed_dim), fingerprint=model.fingerprint, backend=backend, storage=storage,
                    **backend_args)
        index.model = model
        emb = embed_manifest(model, manifest_path, modalities=modalities, batch_size=batch_size, progress=progress,
                             reserved=_WRITTEN)
        unsaveable = []
        for modality, part in emb.by_modality.items():
            keep, texts = [], []
            for i, row in enumerate(part.rows):
                entry = {**row.meta, "line": row.line, "label": row.label, "item": str(row.items[modality])}
                try:  # a row whose columns no save can write is skipped, not found after all the embedding
                    texts.append(metadata_text(entry, "one of its columns"))
                except UserError as e:
                    unsaveable.append((row.line, str(modality), _unsaveable(row.items[modality], e)))
                    continue
                keep.append(i)
            if texts:  # `add` less its metadata check, made above
                with index._lock:
                    index._store.append(check_vectors(part.vectors[keep], index.dim), modality, texts)
        log_skipped(unsaveable, emb.path)  # after embedding: the embedder's warnings did not count them
        index.skipped = emb.skipped + unsaveable
        if emb.by_modality and not len(index):  # (a distributed job's other ranks hold no part)
            raise nothing_read(emb.path, index.skipped)
        # absolute: a saved index is opened from other folders (`mmembed serve --index` finds media by it)
        rows = sum(what == "row" for _, what, _ in index.skipped)  # whole rows, as the log counts them apart
        index.info = {"manifest": os.path.abspath(emb.path), "rows": emb.n_rows, "skipped": len(index.skipped),
                      "skipped_items": len(index.skipped) - rows, "skipped_rows": rows}
        if getattr(model, "run_dir", None) is not None:  # `mm.load`'s: `mmembed search` finds the run by it
            index.info["run_dir"] = str(Path(model.run_dir).resolve())
        log.info("indexed %d items from %s (%s skipped)", len(index), emb.path, skip_summary(index.skipped))
        return index

    @property
    def model(self) -> Any:
        """The model used to embed `Query` items; must match the index's dim and fingerprint."""
        return self._model

    @model.setter
    def model(self, model: Any) -> None:
        if model is not None:
            self.check_model(model)
        self._model = model

    def check_model(self, model: Any) -> None:
        """UserError unless `model` embeds into this index's space (same dim and fingerprint)."""
        refuse_run_folder(model)
        dim, fp = int(model.embed_dim), getattr(model, "fingerprint", None)
        if dim != self.dim or (self.fingerprint is not None and fp != self.fingerprint):
            built, given = self.info.get("run_dir"), getattr(model, "run_dir", None)
            raise UserError(f"index was built with model {self.fingerprint} (dim {self.dim}"
                            f"{f', run {built}' if built else ''}), this model is {fp} (dim {dim}"
                            f"{f', run {given}' if given is not None else ''}): search it with the model that built "
                            "it, or build the index again with this one")

    # ---- items -------------------------------------------------------------------------------

    def add(self, vectors: Tensor, modality: Modality | str,
            metadata: Sequence[dict[str, Any]] | dict[str, Any] | None = None) -> list[int]:
        """Add (N, D) vectors of one modality; returns their new stable ids.

        `metadata` is one dict per row (a lone dict for a single vector); the index keeps copies as a
        save writes them (a 0-d tensor or numpy scalar its number, a tuple a list, a Path a str).
        Rows are normalised to unit length (rows unit-norm to float32 rounding are stored as given).
        Raises BadInput (a ValueError) naming the row for NaN/Inf or zero rows and for a
        wrong dimension; nothing is added then.
        """
        modality = Modality.parse(modality)
        v = check_vectors(vectors, self.dim)  # (N, D) float32
        if isinstance(metadata, dict):  # list() of it made its keys the rows ("metadata[0] must be a dict, got str")
            if v.shape[0] != 1:
                raise UserError(f"metadata is one dict for {v.shape[0]} vectors; give a list of dicts, one per vector")
            metadata = [metadata]
        meta = [{} for _ in range(v.shape[0])] if metadata is None else list(metadata)
        if len(meta) != v.shape[0]:
            raise UserError(f"{len(meta)} metadata dicts for {v.shape[0]} vectors")
        # what a save cannot write is refused now, not at the save; kept as the text a save writes (a
        # copy: the caller's later edits stay theirs)
        meta = [metadata_text(m, f"metadata[{i}]") for i, m in enumerate(meta)]
        with self._lock:
            return self._store.append(v, modality, meta)

    def remove(self, ids: int | Iterable[int]) -> None:
        """Remove items by id, one or several (an unknown id raises UserError and removes nothing)."""
        with contextlib.suppress(TypeError):  # one id, of any integer type (numpy's, a 0-d tensor); True removed item 1
            ids = [ids if isinstance(ids, bool) else operator.index(ids)]
        if isinstance(ids, (str, bytes, bytearray)) or not isinstance(ids, Iterable):  # "12" removed ids 1 and 2
            raise UserError(f"remove takes an item id or a sequence of them, got {ids!r:.40}")
        with self._lock:
            self._store.remove(ids)
            if self._store.n_dead > _COMPACT_FRACTION * self._store.n_rows:
                self._store.compact()

    def compact(self) -> None:
        """Drop removed rows now (FAISS backends rebuild at the next search)."""
        with self._lock:
            self._store.compact()

    # `len` and `in` read one dict, which a change replaces or updates in one step: no lock needed
    def __len__(self) -> int:
        return self._store.n_alive

    def __contains__(self, item_id: object) -> bool:
        """Whether an item id is live; any integer type counts (numpy's, as `search_ids` returns)."""
        if isinstance(item_id, bool):
            return False
        try:
            return self._store.has(operator.index(item_id))
        except TypeError:
            return False

    def ids(self) -> list[int]:
        """Ids of the live items, in storage order."""
        with self._lock:
            return self._store.ids[self._store.alive].tolist()

    def counts(self) -> dict[str, int]:
        """Live items per modality."""
        with self._lock:
            alive = self._store.alive
            counts = {m.value: int((self._store.modality_mask(m) & alive).sum()) for m in Modality}
        return {name: n for name, n in counts.items() if n}

    def items(self, ids: Sequence[int] | None = None) -> tuple[Tensor, list[Modality], list[dict[str, Any]]]:
        """Every live item in storage order (that of `ids()`), or the items of `ids` in their order:
        vectors (N, D) float32, their modalities and metadata, read in one pass."""
        with self._lock:
            store = self._store
            rows = store.alive.nonzero().squeeze(1).tolist() if ids is None else [store.row_of(i) for i in ids]
            return (store.vectors[rows].float(), [store.modality_of(r) for r in rows],
                    [store.metadata[r] for r in rows])  # each decoded afresh: an edit never reaches the index

    def vector(self, item_id: int) -> Tensor:
        """The stored (D,) vector of an item, as float32."""
        with self._lock:
            return self._store.vectors[self._store.row_of(item_id)].float().clone()

    def metadata(self, item_id: int) -> dict[str, Any]:
        """A copy of an item's metadata (nested values too: editing it leaves the index as it was)."""
        with self._lock:
            return self._store.metadata[self._store.row_of(item_id)]  # decoded afresh: the caller's

    # ---- search ------------------------------------------------------------------------------

    def search(self, query: QueryLike, *, target: Modality | str | None = None, k: int = 10, filter: Filter = None,
               model: Any = None) -> list[Hit]:
        """Best `k` items for one query, best first.

        Args:
            query: a `Query` (embedded with `model`, else the index's model) or a (D,) vector.
            target: search only items of this modality (None: all).
            k: hits wanted (>= 1); fewer come back when fewer items are eligible.
            filter: a predicate on an item's metadata, or a dict of required values
                (`{"label": "s3"}`; a list value means any of them).
            model: overrides the index's model for embedding a `Query`.
        Returns:
            Up to k `Hit`s. A zero query vector scores every item 0.0 (never NaN). Equal scores come
            in id order, and of items tied at the k-th score the lowest ids are kept ("exact", "sq8",
            whatever the batch or filter), so the top k is the start of the top k + 1; the FAISS
            backends give tied hits in FAISS's own order.
        """
        if isinstance(query, Tensor) and query.dim() == 2 and query.shape[0] != 1:
            raise UserError(f"search takes one query, got {query.shape[0]}; use search_batch for (Q, D)")
        return self.search_batch([query], target=target, k=k, filter=filter, model=model)[0]

    def search_batch(self, queries: Tensor | np.ndarray | Sequence[QueryLike], *,
                     target: Modality | str | None = None, k: int = 10, filter: Filter = None,
                     model: Any = None) -> list[list[Hit]]:
        """`search` for many queries at once: a (Q, D) tensor or array, or a list of queries -> Q hit lists."""
        k, target = _checked(k, target)  # before a Query's embedding: a bad argument costs no model run
        a = _query_rows(queries, self.dim, self._embedding_model, model)  # a model's time taken outside the lock
        with self._lock:  # rows are read back as the search found them
            scores, rows = self._search_rows(a, target, k, filter)
            if rows.size == 0:
                return [[] for _ in range(rows.shape[0])]
            return self._hits(scores, rows)

    def search_ids(self, queries: Tensor | np.ndarray | Sequence[QueryLike], *, target: Modality | str | None = None,
                   k: int = 10, filter: Filter = None, model: Any = None) -> tuple[Tensor, Tensor]:
        """`search_batch` without `Hit` objects, for bulk use: (Q, k') ids int64 and (Q, k') scores
        float32, best first, k' = min(k, eligible items) (an id of -1 would pad a backend's short answer;
        the FAISS backends complete theirs by an exact scan)."""
        k, target = _checked(k, target)  # before a Query's embedding: a bad argument costs no model run
        a = _query_rows(queries, self.dim, self._embedding_model, model)  # a model's time taken outside the lock
        with self._lock:  # rows are read back as ids as the search found them
            scores, rows = self._search_rows(a, target, k, filter)
            ids = self._store.ids_of_rows(rows)
        return torch.from_numpy(ids), torch.from_numpy(scores)

    def _search_rows(self, queries: np.ndarray, target: Modality | None, k: int, filter: Filter
                     ) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) float32 queries -> (Q, k') scores and store rows, numpy (see `Backend.search`); the
        caller holds the lock (and `filter` runs under it: it may search this index itself, but must
        not wait for another thread that uses it)."""
        # the mask first: a filter may search this index, and one query's rows live in a per-thread
        # buffer (`_one_query`) that its search would overwrite
        mask = self._mask(target, filter)
        q = _unit_rows(queries)  # (Q, D) float32
        if self._store.n_alive == 0 or (mask is not None and not mask.numpy().any()):  # numpy's stops early
            return np.empty((q.shape[0], 0), np.float32), np.empty((q.shape[0], 0), np.int64)
        return self._backend.search(self._store, q, k, mask)  # (Q, k'), (Q, k')

    def _query_matrix(self, queries: Tensor | np.ndarray | Sequence[QueryLike], model: Any) -> np.ndarray:
        """Queries -> (Q, D) float32 unit rows, as the backend gets them (see `_unit_rows`)."""
        return _unit_rows(_query_rows(queries, self.dim, self._embedding_model, model))

    def _embedding_model(self, model: Any, query: Query) -> Any:
        if model is not None:
            self.check_model(model)
            return model
        if query.needs_model and self._model is None:
            raise UserError("this query holds raw items: pass model=..., or attach one (Index.load(dir, model=...))")
        return self._model

    def _mask(self, target: Modality | None, filter: Filter) -> Tensor | None:
        """(N,) bool of eligible rows, or None when every stored row is eligible; without a filter,
        the store's cached mask (read-only: backends keep what they derive from it by identity)."""
        store = self._store
        mask = store.eligible(target)
        if filter is not None:
            by_meta = store.metadata_mask(filter)
            mask = by_meta if mask is None else mask & by_meta
        return mask

    def _hits(self, scores: np.ndarray, rows: np.ndarray) -> list[list[Hit]]:
        """(Q, k) scores and rows -> Q hit lists; the ids and modalities are read once per batch."""
        store = self._store
        safe = np.maximum(rows, 0)
        ids, modalities = store.ids_of_rows(safe).tolist(), store.modalities_of(safe)
        return [[Hit(i, s, m, store.metadata[r]) for s, r, i, m in zip(s_row, r_row, i_row, m_row) if r >= 0]
                for s_row, r_row, i_row, m_row in zip(scores.tolist(), rows.tolist(), ids, modalities)]

    # ---- persistence -------------------------------------------------------------------------

    def save(self, directory: str | Path, *, run_dir: str | Path | None = None) -> Path:
        """Write `index.json`, `vectors.safetensors` and `metadata.jsonl` as the folder `directory`,
        and with a `faiss_ivf` or `faiss_hnsw` backend its built structure (`structure.faiss`, built
        now if no search has yet), which a load takes instead of building it again.

        The folder is replaced as a whole (a kill mid-save leaves the old or the new index, never
        a mix), so a folder holding other files is refused with UserError.

        `run_dir`: the model's run folder, remembered in `info["run_dir"]` so a later search can
        load the model that made the vectors without being told (`build` records a loaded model's own).
        """
        with self._lock:  # an add during the write made vectors and header disagree (a folder load refused)
            self._store.compact()
            if run_dir is not None:
                self.info["run_dir"] = str(Path(run_dir).resolve())
            header = {"fingerprint": self.fingerprint, "backend": self.backend_name,
                      "backend_args": self._backend.config(), "storage": self.storage, "info": self.info}
            keep = getattr(self._backend, "structure", None)  # an IVF's or HNSW's: built now if it is not yet
            if keep is not None:
                check_target(directory)  # before the build: a graph of 100k rows took 12 s, then the save was refused
            return write_index(directory, self._store, header, keep(self._store) if keep is not None else None)

    @classmethod
    def load(cls, directory: str | Path, model: Any = None) -> Index:
        """Load a saved index; with `model`, check it made the vectors (dim and fingerprint).

        Raises UserError naming both models on a mismatch, CheckpointError on damaged files.
        """
        saved = read_index(directory)
        h = saved.header
        try:
            index = cls(h["dim"], fingerprint=h.get("fingerprint"), backend=h["backend"], storage=h["storage"],
                        **h.get("backend_args", {}))
        except UserError as e:  # a hand-edited backend or argument (a ConfigError or a backend's UserError)
            raise CheckpointError(f"{Path(directory) / 'index.json'}: {e}") from None
        index._store = saved.store
        if saved.structure is not None:
            file, state = saved.structure
            with file:
                if hasattr(index._backend, "restore"):  # (one not for these rows is built again)
                    index._backend.restore(file.read, state, saved.store, str(Path(directory) / STRUCTURE))
        index.info = h.get("info", {})
        if model is not None:
            index.model = model
        return index

    def __repr__(self) -> str:
        counts = ", ".join(f"{m}={n}" for m, n in self.counts().items()) or "empty"
        return f"Index(dim={self.dim}, {counts}, backend={self.backend_name!r}, storage={self.storage!r})"


def _unsaveable(item: Any, error: UserError) -> str:
    """Why an entry cannot be saved: its file's name when that is not UTF-8 (another encoding's
    bytes, which Python keeps as lone surrogates), else what the save said."""
    from mmembed.checkpoint import utf8_name

    if isinstance(item, Path) and not utf8_name(item):
        return (f"its file name {str(item)!a} is not UTF-8, which an index cannot save: "
                "rename the file (and its manifest entry) to a UTF-8 name")
    return str(error)
