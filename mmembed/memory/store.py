"""The SQLite layer of the memory store: one file, WAL journal, one connection per process.

Durability — `journal_mode=WAL`, `synchronous=NORMAL`. `COMMIT` returns after the transaction's
pages were written (write(2)) to the `-wal` file; they sit in the OS page cache, which outlives
the process, so a writer killed with SIGKILL (or crashing) loses no committed, i.e. acknowledged,
item, and the file stays consistent (`PRAGMA integrity_check` = ok). NORMAL skips the fsync at
each commit (WAL is fsynced at checkpoints), so only an OS crash or power loss can roll back the
last few commits, and even then the database stays consistent. FULL would fsync on every commit
(milliseconds each) to cover power loss as well; a conversation memory does not need that.

Concurrency — in WAL mode readers and the writer never block each other. Every write runs in
`BEGIN IMMEDIATE`, which takes the write lock up front: two writers queue on the busy timeout
instead of both upgrading a read transaction and one failing at once with SQLITE_BUSY (which no
timeout retries). Every connection waits up to `BUSY_TIMEOUT_S` for a lock rather than raising
"database is locked". Callers embed before the transaction, so the lock covers the inserts only.

Processes — a connection never crosses fork(): `sqlite.py` closes every open Store's before a
fork, and `Store.conn` opens this process's own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from mmembed.errors import UserError
from mmembed.memory import table
from mmembed.memory.records import MemoryHit, NewItem, VectorRows
from mmembed.memory.sqlite import _FORK_WAIT_S, _OPEN, _PARKED, BUSY_TIMEOUT_S, MemoryFileError, _describe, _while_busy
from mmembed.modality import Modality

SCHEMA_VERSION = 1
log = logging.getLogger(__name__)


def _run_to_record(meta: dict[str, str], fingerprint: str | None, run: str | None) -> bool:
    """Whether the file should name `run`, the folder of the model opening it: the file's own model,
    and the file names no run or one that is gone (a pruned checkpoint, a moved run)."""
    return (run is not None and meta.get("fingerprint") == str(fingerprint)
            and ("run" not in meta or not Path(meta["run"]).is_dir()))


class Store:
    """The `items` and `meta` tables of one memory file.

    Args:
        path: the SQLite file (created when absent; its folder must exist).
        dim, fingerprint: the model's embedding size and `Model.fingerprint`; a file written
            by another model is refused. None: accept the file's own (read, delete, export only).
        run: the folder the model was loaded from, recorded with the model (kept as first recorded),
            so that a `Memory` opened without a model can load it (`Store.run`).
    """

    def __init__(self, path: str | Path, dim: int | None = None, fingerprint: str | None = None,
                 run: str | None = None):
        self.path = Path(path)
        self._file = self.path.absolute()  # what every connection opens, wherever the process has moved since
        if self.path.is_dir():
            raise MemoryFileError(f"{self.path} is a folder, not a memory file")
        if not self.path.parent.is_dir():
            why = "is a file, not a folder" if self.path.parent.exists() else "does not exist"
            raise MemoryFileError(f"cannot create memory file {self.path}: {self.path.parent} {why}")
        self._lock = threading.RLock()
        self._lock_pid = os.getpid()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._seen_version: int | None = None
        self.dim: int | None = None
        self.fingerprint: str | None = None
        self.run: str | None = None
        self._open_schema(dim, fingerprint, run)
        _OPEN.add(self)

    def _close_before_fork(self) -> None:
        """Close this process's connection before a fork (it reopens on next use), waiting for a
        transaction another thread holds; after `_FORK_WAIT_S` it leaves the connection open."""
        if not self._lock.acquire(timeout=_FORK_WAIT_S):
            log.warning("%s: a transaction held the memory file over a fork; the child must not use it", self.path)
            return
        try:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
                self._conn, self._seen_version = None, None
        finally:
            self._lock.release()

    # ---- connection --------------------------------------------------------------------------

    @property
    def conn(self) -> sqlite3.Connection:
        """This process's connection (a new one after fork)."""
        if self._conn is None or self._pid != os.getpid():
            if self._conn is not None:
                _PARKED.append(self._conn)  # the parent's: never used here, not even to close it
            self._conn = self._connect()
            self._pid = os.getpid()
            self._seen_version = None
        return self._conn

    def _connect(self) -> sqlite3.Connection:
        folder = Path(os.path.realpath(self._file)).parent  # SQLite follows a link: -wal and -shm go beside its target
        if not folder.is_dir():  # a link to a missing folder was "not writable"
            via = " (where its link leads)" if os.path.islink(self._file) else ""
            raise MemoryFileError(f"{self.path}: its folder {folder} does not exist{via}")
        if not os.access(folder, os.W_OK | os.X_OK):  # checked first: SQLite would say "readonly database"
            raise MemoryFileError(f"{self.path}: its folder {folder} is not writable, and a memory file "
                                  f"needs its -wal and -shm files beside it (even to be read)")
        with self._errors():
            conn = sqlite3.connect(self._file, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            try:  # another program's database is refused before anything is changed (WAL mode stays in its header)
                _while_busy(lambda: self._check_ours_file(conn))
            except (MemoryFileError, sqlite3.DatabaseError):
                conn.close()
                raise
            mode = _while_busy(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            if str(mode).lower() != "wal":
                raise MemoryFileError(f"{self.path}: SQLite cannot use a WAL journal here (got {mode!r})")
            conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def close(self) -> None:
        """Close this process's connection (a later call reopens it)."""
        with self._guard():
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            elif self._conn is not None:  # a parent's, inherited by fork: parked, as `conn` does
                _PARKED.append(self._conn)
            self._conn = None

    def _guard(self) -> threading.RLock:
        """This process's lock (a forked child gets a fresh one: a parent's thread may hold the old)."""
        if self._lock_pid != os.getpid():
            self._lock, self._lock_pid = threading.RLock(), os.getpid()
        return self._lock

    def others_wrote(self) -> bool:
        """True when another connection committed since the last call (or this one is new)."""
        with self._guard(), self._errors():
            version = self.conn.execute("PRAGMA data_version").fetchone()[0]
            changed = version != self._seen_version
            self._seen_version = version
            return changed

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """sqlite3 errors → one-line MemoryFileError naming the file."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            raise MemoryFileError(_describe(self.path, e)) from None
        except (UnicodeDecodeError, table.Damaged) as e:  # bytes SQLite hands back that do not decode
            raise MemoryFileError(f"{self.path} is corrupt ({e}); restore it from a copy") from None

    @contextlib.contextmanager
    def _transaction(self, write: bool) -> Iterator[sqlite3.Connection]:
        """A read snapshot (`BEGIN`) or a write (`BEGIN IMMEDIATE`), committed on success."""
        with self._guard(), self._errors():
            conn = self.conn
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLite may have rolled back already (e.g. disk full)
                    conn.execute("ROLLBACK")
                raise

    # ---- schema ------------------------------------------------------------------------------

    def _open_schema(self, dim: int | None, fingerprint: str | None, run: str | None) -> None:
        """Check the file's schema and model; create the tables / record the model when absent.

        A plain read first, so opening a file that needs no change never waits for the write lock.
        """
        with self._transaction(write=False) as conn:
            tables, meta = self._read_schema(conn)
        if not tables or (dim is not None and "dim" not in meta):
            meta = self._claim(dim, fingerprint, run)
        elif _run_to_record(meta, fingerprint, run):
            meta = self._record_run(meta, fingerprint, run)
        self._check_model(meta, dim, fingerprint)
        self._adopt(meta)

    def _claim(self, dim: int | None, fingerprint: str | None, run: str | None) -> dict[str, str]:
        """Create the tables when absent and record the opening model (dim, fingerprint, run) when the
        file has none; returns the file's meta."""
        with self._transaction(write=True) as conn:
            tables, meta = self._read_schema(conn)  # again: another process may have written meanwhile
            if not tables:
                for statement in table.SCHEMA.split(";"):  # not executescript: it would commit first
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                meta = {"schema_version": str(SCHEMA_VERSION)}
            record = {"dim": str(dim), "fingerprint": str(fingerprint)} if dim is not None and "dim" not in meta else {}
            if run is not None and (record or _run_to_record(meta, fingerprint, run)):
                record["run"] = run
            conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(record.items()))
            meta.update(record)
        return meta

    def _record_run(self, meta: dict[str, str], fingerprint: str | None, run: str) -> dict[str, str]:
        """Record the run folder of the file's own model; best effort: a file this process cannot
        write (read-only, as files written before runs were recorded may be) opens as it is."""
        try:
            with self._transaction(write=True) as conn:
                meta = self._read_schema(conn)[1]
                if _run_to_record(meta, fingerprint, run):
                    conn.execute("INSERT OR REPLACE INTO meta VALUES ('run', ?)", (run,))
                    meta["run"] = run
        except MemoryFileError as e:
            log.info("%s: its model's run folder is not recorded (%s)", self.path, e)
        return meta

    def refresh_meta(self) -> None:
        """Re-read dim and fingerprint (a file created without a model may have been claimed since)."""
        with self._transaction(write=False) as conn:
            self._adopt(self._read_schema(conn)[1])

    def _adopt(self, meta: dict[str, str]) -> None:
        self.dim = int(meta["dim"]) if "dim" in meta else None
        self.fingerprint = meta.get("fingerprint")
        self.run = meta.get("run")

    def _read_schema(self, conn: sqlite3.Connection) -> tuple[set[str], dict[str, str]]:
        """The file's tables (empty for a new file) and meta; refuses foreign files (by their tables and a
        recorded schema version: another program's `meta` and `items` are not enough) and other versions."""
        tables = table.tables(conn)
        if not tables:
            return tables, {}
        try:
            rows = conn.execute("SELECT key, value FROM meta").fetchall() if {"meta", "items"} <= tables else []
        except sqlite3.OperationalError as e:  # no such column: someone else's `meta`
            if "decode" in str(e):  # text that is not UTF-8: a damaged page
                raise MemoryFileError(f"{self.path} is corrupt (its meta table holds unreadable rows); "
                                      "restore it from a copy") from None
            rows = []
        if any(not isinstance(key, str) for key, _ in rows):  # damaged pages read back as NULL rows
            raise MemoryFileError(f"{self.path} is corrupt (its meta table holds unreadable rows); "
                                  "restore it from a copy")
        meta = dict(rows)
        if "schema_version" not in meta:
            raise MemoryFileError(f"{self.path} is an SQLite database but not an mmembed memory file")
        self._check_version(meta["schema_version"])
        if "dim" in meta and not (str(meta["dim"]).isascii() and str(meta["dim"]).isdigit() and int(meta["dim"]) > 0):
            raise MemoryFileError(f"{self.path} is corrupt (its embedding width is {meta['dim']!r}); "
                                  "restore it from a copy")
        return tables, meta

    def _check_ours_file(self, conn: sqlite3.Connection) -> None:
        """Before a connection changes anything (WAL mode): the file is new or a memory file, and, once
        this Store has adopted a model, still that model's (a file replaced since the last connection)."""
        tables, meta = self._read_schema(conn)
        if tables:
            self._check_model(meta, self.dim, self.fingerprint)

    def _check_version(self, version: str | None) -> None:
        if version != str(SCHEMA_VERSION):
            raise MemoryFileError(f"{self.path} has memory schema version {version}; this mmembed reads version "
                                  f"{SCHEMA_VERSION} (use the mmembed that wrote it, or another memory file)")

    def _check_model(self, meta: dict[str, str], dim: int | None, fingerprint: str | None) -> None:
        if dim is None or "dim" not in meta:
            return
        if int(meta["dim"]) != dim or meta.get("fingerprint") != str(fingerprint):
            raise MemoryFileError(
                f"{self.path.name} was written by model {meta.get('fingerprint')} (dim {meta['dim']}) but this model "
                f"is {fingerprint} (dim {dim}); open it with that run, or use another memory file")

    # ---- writes ------------------------------------------------------------------------------

    def insert(self, rows: Sequence[NewItem]) -> list[int]:
        """Insert rows in one transaction; returns their ids once committed."""
        if not rows:
            return []
        with self._transaction(write=True) as conn:
            return table.insert(conn, rows)

    def insert_turn(self, rows: Sequence[NewItem]) -> tuple[int, list[int]]:
        """Insert one conversation turn's rows (all of one user and session) in one transaction,
        numbered after the session's highest turn as this transaction finds it: two processes on one
        session never give two turns one number. Returns (turn, ids)."""
        user, session = rows[0].user, rows[0].session
        with self._transaction(write=True) as conn:
            found = conn.execute("SELECT max(turn) FROM items WHERE user = ? AND session = ?", (user, session))
            last = table.turn_number(found.fetchone()[0])
            if last >= 2**63 - 1:
                raise UserError(f"session {session!r} of user {user!r} is at turn {last}, the highest a turn "
                                "can be: start a new session")
            return last + 1, table.insert(conn, [replace(r, turn=last + 1) for r in rows])

    def delete(self, ids: Sequence[int], user: str | None = None) -> list[tuple[int, str]]:
        """Delete items by id (only `user`'s when given); returns the (id, user) pairs deleted."""
        deleted: list[tuple[int, str]] = []
        with self._transaction(write=True) as conn:
            for chunk in table.chunks(ids):
                where, args = table.id_filter(chunk, user)
                deleted += conn.execute(f"SELECT id, user FROM items WHERE {where}", args).fetchall()
                conn.execute(f"DELETE FROM items WHERE {where}", args)
        return deleted

    def forget(self, user: str) -> int:
        """Delete every item of `user`; returns how many."""
        with self._transaction(write=True) as conn:
            return conn.execute("DELETE FROM items WHERE user = ?", (user,)).rowcount

    # ---- reads -------------------------------------------------------------------------------

    def hits(self, ids: Sequence[int], user: str | None = None, media: bool = False) -> list[MemoryHit]:
        """The items with these ids (only `user`'s when given), in the order of `ids`; absent ids are skipped."""
        columns = table.HIT_COLUMNS + (", media" if media else "")
        found: dict[int, MemoryHit] = {}
        with self._transaction(write=False) as conn:
            for chunk in table.chunks(ids):
                where, args = table.id_filter(chunk, user)
                for row in conn.execute(f"SELECT {columns} FROM items WHERE {where}", args):
                    found[row[0]] = table.hit(row)
        return [found[int(i)] for i in ids if int(i) in found]

    def embeddings(self, ids: Sequence[int], user: str | None = None) -> dict[int, bytes]:
        """id → stored embedding bytes for the ids present (only `user`'s when given)."""
        found: dict[int, bytes] = {}
        with self._transaction(write=False) as conn:
            for chunk in table.chunks(ids):
                where, args = table.id_filter(chunk, user)
                found.update(conn.execute(f"SELECT id, embedding FROM items WHERE {where}", args).fetchall())
        return found

    def recent(self, user: str, session: str | None, limit: int, media: bool) -> list[MemoryHit]:
        """The last `limit` items of `user` (of one session when given), oldest first."""
        columns = table.HIT_COLUMNS + (", media" if media else "")
        where, args = ("user = ?", [user]) if session is None else ("user = ? AND session = ?", [user, session])
        with self._transaction(write=False) as conn:
            rows = conn.execute(f"SELECT {columns} FROM items WHERE {where} ORDER BY time DESC, id DESC LIMIT ?",
                                [*args, limit]).fetchall()
            return [table.hit(r) for r in reversed(rows)]  # inside: a damaged row is named as such

    def sessions(self, user: str) -> list[str]:
        """The user's session names, the one added to last (highest item id) last: an item's own
        time (a clock stepped back, an item dated ahead) does not say which session was used last."""
        with self._transaction(write=False) as conn:
            rows = conn.execute("SELECT session, max(id) AS i FROM items WHERE user = ? AND "
                                "session IS NOT NULL GROUP BY session ORDER BY i", (user,)).fetchall()
        return [r[0] for r in rows]

    def turns(self, user: str, session: str, first: int, stop: int) -> list[MemoryHit]:
        """The items of `user`'s `session` with `first` <= turn < `stop`, in turn order (each turn's
        items as added)."""
        with self._transaction(write=False) as conn:
            rows = conn.execute(f"SELECT {table.HIT_COLUMNS} FROM items WHERE user = ? AND session = ? AND turn >= ? "
                                "AND turn < ? ORDER BY turn, id", (user, session, first, stop)).fetchall()
            return [table.hit(r) for r in rows]

    def last_turn(self, user: str, session: str) -> int:
        """The highest turn number of `user`'s `session` (0 when it has none)."""
        with self._transaction(write=False) as conn:
            row = conn.execute("SELECT max(turn) FROM items WHERE user = ? AND session = ?", (user, session)).fetchone()
            return table.turn_number(row[0])

    def count(self, user: str | None = None) -> int:
        with self._transaction(write=False) as conn:
            if user is None:
                return conn.execute("SELECT count(*) FROM items").fetchone()[0]
            return conn.execute("SELECT count(*) FROM items WHERE user = ?", (user,)).fetchone()[0]

    def vectors_after(self, user: str, after_id: int, dim: int) -> VectorRows:
        """`user`'s rows with id > after_id (in no particular order), and the user's item count, from one snapshot."""
        # a first read walks the user's index; a later one the id range past `after_id` ("+user": not
        # the index, which would visit every row of the user to find the few new ones)
        where = "user = ?" if after_id == 0 else "id > ? AND +user = ?"
        args = (user,) if after_id == 0 else (after_id, user)
        with self._transaction(write=False) as conn:
            rows = conn.execute(f"SELECT id, modality, time, session, embedding FROM items WHERE {where}",
                                args).fetchall()
            total = conn.execute("SELECT count(*) FROM items WHERE user = ?", (user,)).fetchone()[0]
        try:
            blob = bytearray().join(r[4] for r in rows)  # writable: tensors can share it without a copy
            for modality in {r[1] for r in rows}:
                Modality.parse(modality)
            times = np.asarray([r[2] for r in rows], dtype=np.float64)  # (N,): converted once, for the cache
        except (TypeError, ValueError) as e:  # a NULL embedding, a modality no tower has, a time of text
            raise MemoryFileError(f"{self.path} is corrupt (an item of user {user!r}: {e}); restore it from a copy") \
                from None
        if len(blob) != 4 * dim * len(rows):
            raise MemoryFileError(f"{self.path}: an embedding of user {user!r} does not hold {dim} float32 values")
        vectors = np.frombuffer(blob, dtype="<f4").reshape(len(rows), dim)  # (N, D)
        return VectorRows(ids=np.array([r[0] for r in rows], dtype=np.int64), vectors=vectors,
                          modalities=[r[1] for r in rows], times=times,
                          sessions=[r[3] for r in rows], total=total)

    def iter_items(self, user: str | None = None) -> Iterator[MemoryHit]:
        """Every item (of `user` when given) with its media bytes, in id order, from one snapshot."""
        where, args = ("", []) if user is None else ("WHERE user = ?", [user])
        with self._transaction(write=False) as conn:
            for row in conn.execute(f"SELECT {table.HIT_COLUMNS}, media FROM items {where} ORDER BY id", args):
                yield table.hit(row)

    def integrity_check(self) -> str:
        """SQLite's `PRAGMA integrity_check`: "ok" for a sound file."""
        with self._guard(), self._errors():
            return "; ".join(r[0] for r in self.conn.execute("PRAGMA integrity_check").fetchall())
