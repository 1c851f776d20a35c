"""`Memory`: a persistent, per-user store of text, images and sounds, searched by meaning.

    mem = mm.Memory("memory.db", model=model)
    i = mem.add(user="ada", item=mm.Image("x.png"), text="my bike", session="s1")
    hits = mem.search(user="ada", query="a red bicycle", k=5)       # best first, cosine scores

Every item is embedded once, at `add` (see `embedding.py`), and stored with its file bytes in one
SQLite file (see `store.py` for durability and concurrency). Search scans the user's vectors in
memory (see `cache.py`); users never see each other's items.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import threading
import time as _time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmembed.decoder.prompt import Media, Text
from mmembed.errors import BadInput, UserError
from mmembed.memory.cache import UserVectors
from mmembed.memory.checks import (check_ids, check_int, check_list, check_model, check_optional_str, check_role,
                                   check_user, meta_json, parse_modality, storable, timestamp)
from mmembed.memory.embedding import _checked_parts, _embed, _new_items, _recorded_model
from mmembed.memory.export import export_items
from mmembed.memory.items import Entry, ItemLike, Pending, StoreMedia, to_entries, to_entry
from mmembed.memory.records import MemoryHit, NewItem
from mmembed.memory.sqlite import MemoryFileError
from mmembed.memory.store import Store
from mmembed.modality import Modality
from mmembed.retrieval.store import check_vectors

log = logging.getLogger(__name__)

# vectors kept in memory across users (4·D bytes each: 2 GB at D = 512); the least recently
# searched users are dropped first, and the one being searched is always kept
MAX_CACHED_ROWS = 1_000_000
QueryLike = Media | str | Tensor | np.ndarray


class Memory:
    """A persistent multimodal memory in one SQLite file.

    Args:
        path: the memory file; created when absent (its folder must exist), reopened otherwise.
        model: the model (`mm.load(run)`) that embeds items and queries. A file remembers the
            model that wrote it (dim, fingerprint and run folder) and refuses any other. Without
            a model, the memory is read, searched by a (D,) vector, deleted from and exported as
            it is; the first `add` or search by content loads the run the file names (a
            UserError when it names none, or that run now holds other weights).
    Raises:
        MemoryFileError (a UserError) when the file is not a memory file, is corrupt, has
        another schema version, or was written by another model.
    """

    def __init__(self, path: str | Path, model: Any = None):
        check_model(model)
        self.model = model
        dim = None if model is None else int(model.embed_dim)
        run = getattr(model, "run_dir", None)
        self._store = Store(path, dim, None if model is None else str(model.fingerprint),
                            None if run is None else str(run))
        self._vectors: OrderedDict[str, UserVectors] = OrderedDict()
        self._lock = threading.RLock()
        self._pid = os.getpid()

    @property
    def path(self) -> Path:
        return self._store.path

    # ---- writing -----------------------------------------------------------------------------

    def add(self, user: str, item: ItemLike = None, text: str | None = None, meta: dict[str, Any] | None = None,
            *, session: str | None = None, turn: int | None = None, role: str = "user", time: float | None = None,
            store_media: StoreMedia = "bytes") -> int:
        """Embed and store one item; returns its id once committed (an acknowledged item survives a crash).

        Args:
            user: whose memory (searches are always scoped to one user).
            item: `mm.Image`, `mm.Audio`, `mm.Text` or a str (text); None with `text=` stores the text.
            text: a caption or the turn's words, kept with a media item (not embedded).
            meta: any JSON-able dict kept with the item.
            session, turn, role: where the item comes from in a conversation ("user" / "assistant").
            time: unix seconds (default now).
            store_media: "bytes" keeps the file bytes in the memory; "path" keeps only the
                absolute path of a media item given as a file path.
        """
        self._require_model("add items")
        entry = to_entry(item, text, store_media)
        return self._add([entry], user, [meta], session, [turn], role, time)[0]

    def add_many(self, user: str, items: Sequence[ItemLike], *, texts: Sequence[str | None] | None = None,
                 metas: Sequence[dict[str, Any] | None] | None = None, session: str | None = None,
                 turn: int | None = None, role: str = "user", time: float | None = None,
                 store_media: StoreMedia = "bytes") -> list[int]:
        """`add` for many items: embedded in batches per modality, stored in one transaction (all or none).

        `items` is a list or tuple (a lone item, a str above all, is refused); `texts` and `metas`,
        when given, hold one entry per item. Returns the ids in item order.
        """
        self._require_model("add items")
        items = check_list(items, "items")
        texts = [None] * len(items) if texts is None else check_list(texts, "texts", "str or None")
        metas = [None] * len(items) if metas is None else check_list(metas, "metas", "dicts or None")
        if not (len(texts) == len(metas) == len(items)):
            raise UserError(f"add_many got {len(items)} items, {len(texts)} texts and {len(metas)} metas")
        entries = to_entries(items, texts, store_media)
        return self._add(entries, user, metas, session, [turn] * len(entries), role, time)

    def prepare(self, items: Sequence[ItemLike], *, role: str = "user") -> Pending:
        """Check and embed items without storing them: a conversation's turn, stored with its
        answer by `add_turn`, so a turn killed before it is answered leaves nothing behind."""
        model = self._require_model("add items")
        check_role(role)
        items = check_list(items, "items")
        entries = to_entries(items, [None] * len(items))
        return Pending(entries, _embed(model, entries, self._store.dim), role, str(model.fingerprint))

    def add_turn(self, user: str, session: str, parts: Sequence[Pending], time: float | None = None
                 ) -> tuple[int, list[int]]:
        """Store a conversation turn's prepared items (the user's, then the answer) in one
        transaction, numbered after the session's highest turn as that transaction finds it: two
        processes on one session never give two turns one number. Returns (turn, ids)."""
        check_user(user)
        if not isinstance(session, str):
            raise UserError(f"session must be a str, got {session!r}")
        check_optional_str(session, "session")
        parts = check_list(parts, "parts", "Memory.prepare results")  # a lone Pending is refused, as a lone item is
        if bad := [p for p in parts if not isinstance(p, Pending)]:
            raise UserError(f"parts must hold Memory.prepare results, got {type(bad[0]).__name__}")
        if not any(p.entries for p in parts):
            raise UserError("a turn needs at least one item (Memory.prepare)")
        parts = _checked_parts(self._store, parts)
        when = _time.time() if time is None else timestamp(time, "time")
        rows = [row for p in parts for row in _new_items(p, user, session, [None] * len(p.entries), when,
                                                          ["{}"] * len(p.entries))]
        with self._guard():
            turn, ids = self._store.insert_turn(rows)
            self._cached_rows(user, ids, torch.cat([p.vectors for p in parts]), rows)
        return turn, ids

    def _add(self, entries: list[Entry], user: str, metas: Sequence[dict[str, Any] | None], session: str | None,
             turns: Sequence[int | None], role: str, time: float | None) -> list[int]:
        check_user(user)
        check_optional_str(session, "session")
        check_role(role)
        turns = [None if t is None else check_int(t, "turn", -2**63, 2**63, "an int (64-bit)") for t in turns]
        when = _time.time() if time is None else timestamp(time, "time")
        metas_json = [meta_json(m) for m in metas]
        # (N, D), before the write transaction: the lock covers inserts only
        vectors = _embed(self._require_model("add items"), entries, self._store.dim)
        rows = _new_items(Pending(entries, vectors, role, self._store.fingerprint), user, session, turns, when,
                          metas_json)
        with self._guard():
            ids = self._store.insert(rows)
            self._cached_rows(user, ids, vectors, rows)
        return ids

    def _cached_rows(self, user: str, ids: list[int], vectors: Tensor, rows: list[NewItem]) -> None:
        """Rows just stored join the user's search vectors when they are in memory."""
        cached = self._vectors.get(user)
        if cached is not None:
            cached.append(ids, vectors, [r.modality for r in rows], [r.time for r in rows], [r.session for r in rows])

    def delete(self, ids: Sequence[int] | int, *, user: str | None = None) -> int:
        """Delete items by id (only `user`'s when given); unknown ids are ignored. Returns how many went."""
        ids = check_ids(ids)
        if user is not None:
            check_user(user)
        with self._guard():
            deleted = self._store.delete(storable(ids), user)
            for owner in {u for _, u in deleted}:
                if owner in self._vectors:
                    self._vectors[owner].remove([i for i, u in deleted if u == owner])
        return len(deleted)

    def forget(self, user: str) -> int:
        """Delete every item of `user`; returns how many."""
        check_user(user)
        with self._guard():
            n = self._store.forget(user)
            self._vectors.pop(user, None)
        return n

    # ---- reading -----------------------------------------------------------------------------

    def search(self, user: str, query: QueryLike, k: int = 5, modality: Modality | str | None = None,
               since: float | dt.datetime | None = None, session: str | None = None,
               exclude_session: str | None = None) -> list[MemoryHit]:
        """The `k` items of `user` most similar to `query`, best first, with cosine scores.

        Args:
            query: `mm.Image`, `mm.Audio`, `mm.Text`, a str (text), or a (D,) vector (or (1, D),
                as `embed` returns one item).
            k: hits wanted; fewer come back when fewer items pass the filters.
            modality: only items of this modality.
            since: only items at or after this time (unix seconds or a datetime).
            session / exclude_session: only items of / not of this session.
        """
        check_user(user)
        k = check_int(k, "k", 1, None, "a positive int")
        modality = None if modality is None else parse_modality(modality)
        since = None if since is None else timestamp(since, "since")
        check_optional_str(session, "session")
        check_optional_str(exclude_session, "exclude_session")
        q = self._query_vector(query)  # (1, D)
        if q is None:
            return []
        with self._guard():
            found = self._user_vectors(user).search(q, k, modality, since, session, exclude_session)
            hits = self._store.hits([i for i, _ in found], user=user)
        scores = dict(found)
        return [replace(h, score=scores[h.id]) for h in hits]

    def get(self, ids: Sequence[int] | int, *, user: str | None = None) -> list[MemoryHit]:
        """Items by id (only `user`'s when given), with their media bytes; absent ids are skipped."""
        ids = check_ids(ids)
        if user is not None:
            check_user(user)
        with self._guard():
            return self._store.hits(storable(ids), user=user, media=True)

    def vectors(self, ids: Sequence[int] | int, *, user: str | None = None) -> Tensor:
        """The stored embeddings of items, (N, D) float32 unit rows in the order of `ids`.

        Raises UserError naming the ids that are absent (or not `user`'s, when given).
        """
        ids = check_ids(ids)
        if user is not None:
            check_user(user)
        with self._guard():
            found = self._store.embeddings(storable(ids), user)
        missing = [i for i in ids if i not in found]
        if missing:
            whose = "" if user is None else f" of user {user!r}"
            raise UserError(f"no item{whose} with id {', '.join(map(str, missing[:5]))} in {self.path.name}")
        if self._store.dim is None:  # opened without a model before a writer claimed the file
            self._store.refresh_meta()
        dim = self._store.dim or 0
        if bad := [i for i in ids if len(found[i]) != 4 * dim]:
            raise MemoryFileError(f"{self.path}: the embedding of item {bad[0]} does not hold {dim} float32 values "
                                  "(the file is damaged; restore it from a copy)")
        out = np.frombuffer(bytearray().join(found[i] for i in ids), dtype="<f4").reshape(len(ids), dim)
        return torch.from_numpy(out.astype(np.float32))  # (N, D)

    def recent(self, user: str, session: str | None = None, limit: int = 20, *, media: bool = False
               ) -> list[MemoryHit]:
        """The user's last `limit` items (of one session when given), oldest first."""
        check_user(user)
        check_optional_str(session, "session")
        limit = check_int(limit, "limit", 1, 2**63, "a positive int (below 2**63)")
        with self._guard():
            return self._store.recent(user, session, limit, media)

    def turns(self, user: str, session: str, first: int, stop: int) -> list[MemoryHit]:
        """The items of `user`'s `session` from turn `first` up to (not including) turn `stop`, in
        turn order: what a conversation's history shows, whatever the items' times."""
        check_user(user)
        check_optional_str(session, "session")
        first, stop = (check_int(value, name, -2**63, 2**63, "an int (a turn number)")
                       for name, value in (("first", first), ("stop", stop)))
        with self._guard():
            return self._store.turns(user, session, first, stop)

    def sessions(self, user: str) -> list[str]:
        """The user's session names, the one added to last last."""
        check_user(user)
        with self._guard():
            return self._store.sessions(user)

    def last_turn(self, user: str, session: str) -> int:
        """The highest turn number stored in `user`'s `session` (0 when none): where it continues."""
        check_user(user)
        check_optional_str(session, "session")
        with self._guard():
            return self._store.last_turn(user, session)

    def count(self, user: str | None = None) -> int:
        """Items stored (of `user` when given)."""
        if user is not None:
            check_user(user)
        with self._guard():
            return self._store.count(user)

    def export(self, path: str | Path, user: str | None = None) -> Path:
        """Write the memory (of `user` when given) as a manifest folder; returns `memory.jsonl`'s path.

        The folder (new or empty) gets `memory.jsonl` — one row per item: `image` / `audio`
        paths of media files written under `media/`, `text`, and `id, user, session, turn, role,
        time, modality, meta` — which `mmembed index` / `eval` and `read_manifest` read.
        """
        if user is not None:
            check_user(user)
        with self._guard():
            if self._store.count(user) == 0:
                raise UserError(f"nothing to export: {self.path.name} holds no items"
                                + (f" of user {user!r}" if user is not None else ""))
            # closed here whatever happens: a half-read snapshot kept alive by a failure's traceback
            # would hold the store's read transaction (and lock) open, and every later write would fail
            with contextlib.closing(self._store.iter_items(user)) as items:
                return export_items(items, Path(path))

    def integrity_check(self) -> str:
        """SQLite's `PRAGMA integrity_check` of the file: "ok" when sound."""
        with self._guard():
            return self._store.integrity_check()

    def close(self) -> None:
        """Close the connection and drop the cached vectors (reopened on next use)."""
        with self._guard():
            self._store.close()
            self._vectors.clear()

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Memory({str(self.path)!r}, dim={self._store.dim}, fingerprint={self._store.fingerprint})"

    # ---- internals ---------------------------------------------------------------------------

    def _guard(self) -> threading.RLock:
        """The lock of this process (a forked child gets a fresh one: the parent's may be held)."""
        if self._pid != os.getpid():
            self._lock, self._pid = threading.RLock(), os.getpid()
        return self._lock

    def _require_model(self, what: str) -> Any:
        with self._guard():
            if self.model is None:
                self.model = _recorded_model(self._store, what)
            return self.model

    def _query_vector(self, query: QueryLike) -> Tensor | None:
        """Query → (1, D) float32 unit row; None when the file holds no vectors yet."""
        if isinstance(query, str):
            query = Text(query)
        if isinstance(query, Media):
            model = self._require_model("search by text or media")
            return check_vectors(model.embed(query.modality, [query.item]), int(model.embed_dim), "query")
        if not isinstance(query, (Tensor, np.ndarray)):
            raise UserError(f"cannot search with a {type(query).__name__}: pass mm.Image, mm.Audio, mm.Text, "
                            "a str or a (D,) vector")
        if self._store.dim is None:
            self._store.refresh_meta()
        if self._store.dim is None:
            return None
        shape = tuple(query.shape)
        if query.ndim == 2 and query.shape[0] == 1:  # (1, D), as `embed` returns one item: Index.search takes it
            query = query[0]
        if query.ndim != 1 or query.shape[0] != self._store.dim:
            raise BadInput(f"a query vector must have shape ({self._store.dim},), the memory's dimension; got {shape}")
        return check_vectors(query, self._store.dim, "query vector")  # a reversed array too

    def _user_vectors(self, user: str) -> UserVectors:
        """The user's cached vectors, brought up to date with the file."""
        if self._store.others_wrote():
            for cached in self._vectors.values():
                cached.stale = True
        cached = self._vectors.pop(user, None) or UserVectors(self._store.dim or 0)
        self._vectors[user] = cached  # most recently used last
        if cached.stale:
            self._refresh(user, cached)
        while len(self._vectors) > 1 and sum(v.rows.n_rows for v in self._vectors.values()) > MAX_CACHED_ROWS:
            self._vectors.popitem(last=False)
        return self._vectors[user]

    def _refresh(self, user: str, cached: UserVectors) -> None:
        """Read the rows added since the last refresh; reload all when rows were deleted elsewhere."""
        for attempt in range(2):
            new = self._store.vectors_after(user, cached.synced_id, cached.dim)
            cached.append(new.ids, torch.from_numpy(new.vectors), new.modalities, new.times, new.sessions)
            if len(new.ids):
                cached.synced_id = int(new.ids.max())
            if len(cached) == new.total or attempt == 1:  # a full read is one snapshot: it always matches
                break
            log.debug("memory %s: rows of user %r were deleted elsewhere; reloading", self.path, user)
            cached = UserVectors(cached.dim)
            self._vectors[user] = cached
        cached.stale = False
