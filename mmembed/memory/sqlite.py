"""SQLite below the memory file's `Store` (`store.py`): waiting out a lock SQLite will not wait
for, an SQLite error as one line naming the file, and every open Store's connection closed
before this process forks.

Processes — an SQLite connection must never cross fork(): SQLite's per-process table of open
files and their locks would be copied into the child, whose new connection would then take no
locks of its own, and once the parent closed the file (checkpointing and deleting the WAL) the
child's acknowledged writes would go to a deleted file. So every open Store closes its connection
just before this process forks (`os.register_at_fork`), and reopens it lazily after; `Store.conn`
also notices that `os.getpid()` changed and opens a connection of its own, and a parent's
connection that did cross is parked and never used in the child (not even closed).
"""

from __future__ import annotations

import os
import sqlite3
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmembed.errors import UserError

if TYPE_CHECKING:
    from mmembed.memory.store import Store

BUSY_TIMEOUT_S = 60.0
_PARKED: list[sqlite3.Connection] = []  # parents' connections inherited by a fork: kept, never closed
_OPEN: weakref.WeakSet[Store] = weakref.WeakSet()  # every Store of this process, closed before a fork
_FORK_WAIT_S = 30.0


class MemoryFileError(UserError):
    """The memory file cannot be used: not SQLite, corrupt, another schema, or another model's."""


def _while_busy(op: Callable[[], Any], timeout_s: float = BUSY_TIMEOUT_S) -> Any:
    """`op()`, retried while SQLite answers "database is locked", for up to `timeout_s`.

    Turning a new file to WAL needs an exclusive lock, and SQLite answers that request with
    SQLITE_BUSY at once, without its busy handler, when another process holds the file open (as
    when several processes open a new memory file together); the busy timeout never applies.
    """
    deadline, delay = time.monotonic() + timeout_s, 0.001
    while True:
        try:
            return op()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(2 * delay, 0.05)


def _describe(path: Path, e: sqlite3.DatabaseError) -> str:
    text = str(e)
    if "file is not a database" in text:
        return f"{path} is not an mmembed memory file (not an SQLite database)"
    if "too big" in text:  # SQLite's length limit (1e9 bytes) on one value: the item, not the file
        return f"an item is too large for {path} (SQLite: {text}); store a path to its media instead"
    if "malformed" in text or isinstance(e, sqlite3.DataError):
        return f"{path} is corrupt (SQLite: {text}); restore it from a copy"
    if "locked" in text or "busy" in text:
        return f"{path} stayed locked by another process for {BUSY_TIMEOUT_S:.0f} s ({text})"
    return f"{path}: SQLite error ({text})"


def _close_all_before_fork() -> None:
    for store in list(_OPEN):
        store._close_before_fork()


os.register_at_fork(before=_close_all_before_fork)
