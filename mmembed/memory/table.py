"""What the memory file's tables hold and how rows go in and out of them: the schema, a stored
row read back as a `MemoryHit` (a value that does not decode is `Damaged`, which the store turns
into the file's one-line "is corrupt" error), inserts with their consecutive ids, and lookups by id
in chunks SQLite accepts. `store.Store` runs these inside its transactions."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any

from mmembed.memory.records import MemoryHit, NewItem
from mmembed.modality import Modality

_CHUNK = 900  # ids per `IN (...)`: under SQLite's oldest limit of 999 bound variables

# Small columns first and the media bytes last: SQLite reads a row's columns in order, so the
# embedding (read by every cache load) never walks the overflow pages of a large image or clip.
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user TEXT NOT NULL,
    session TEXT,
    turn INTEGER,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    time REAL NOT NULL,
    modality TEXT NOT NULL,
    embedding BLOB NOT NULL,
    text TEXT,
    meta TEXT NOT NULL DEFAULT '{}',
    media_path TEXT,
    media BLOB
);
CREATE INDEX items_user_time ON items (user, time);
CREATE INDEX items_user_session_turn ON items (user, session, turn);
"""
HIT_COLUMNS = "id, user, session, turn, role, time, modality, text, meta, media_path"


class Damaged(ValueError):
    """A row whose stored values do not decode (a damaged file); `Store._errors` names the file."""


def tables(conn: sqlite3.Connection) -> set[str]:
    """The file's tables (SQLite's own sqlite_sequence aside): empty for a new file."""
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} - {"sqlite_sequence"}


def turn_number(value: Any) -> int:
    """A session's highest turn as stored (0 for none); Damaged unless an integer (SQLite keeps any type)."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise Damaged(f"a turn number is {value!r}")
    return value


def hit(row: Sequence[Any]) -> MemoryHit:
    media = row[10] if len(row) > 10 else None
    try:
        modality, meta = Modality.parse(row[6]), json.loads(row[8])
    except (TypeError, ValueError) as e:
        raise Damaged(f"item {row[0]}: {e}") from None
    for name, value in (("user", row[1]), ("session", row[2]), ("role", row[4]), ("text", row[7]),
                        ("media_path", row[9])):  # SQLite keeps whatever type was written
        if value is not None and not isinstance(value, str):
            raise Damaged(f"item {row[0]}: its {name} is {type(value).__name__}, not text")
    if media is not None and not isinstance(media, bytes):
        raise Damaged(f"item {row[0]}: its media is {type(media).__name__}, not bytes")
    return MemoryHit(id=row[0], score=None, user=row[1], session=row[2], turn=row[3], role=row[4], time=row[5],
                     modality=modality, text=row[7], meta=meta, media=media, media_path=row[9])


def insert(conn: sqlite3.Connection, rows: Sequence[NewItem]) -> list[int]:
    """Insert rows inside the caller's write transaction; returns their ids."""
    conn.executemany(
        "INSERT INTO items (user, session, turn, role, time, modality, embedding, text, meta, media_path, "
        "media) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(r.user, r.session, r.turn, r.role, r.time, r.modality, r.embedding, r.text, r.meta, r.media_path,
          r.media) for r in rows])
    last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
    # AUTOINCREMENT under the write lock: this transaction's ids are consecutive, ending at the last
    # one (counted back from it, not on from sqlite_sequence: a file whose counter row was deleted or
    # damaged, which SQLite itself gets past, failed an assert with a traceback)
    first = last - len(rows) + 1
    found = conn.execute("SELECT count(*) FROM items WHERE id BETWEEN ? AND ?", (first, last)).fetchone()[0]
    if found != len(rows):
        raise Damaged(f"{len(rows)} items written, but ids {first}-{last} hold {found}")
    return list(range(first, last + 1))


def chunks(ids: Sequence[int]) -> Iterator[list[int]]:
    ids = [int(i) for i in ids]
    for start in range(0, len(ids), _CHUNK):
        yield ids[start:start + _CHUNK]


def id_filter(ids: list[int], user: str | None) -> tuple[str, list[Any]]:
    where = f"id IN ({', '.join('?' * len(ids))})"
    # "+user": look rows up by id; SQLite would otherwise pick the user index and scan all the user's rows
    return (where, list(ids)) if user is None else (f"{where} AND +user = ?", [*ids, user])
