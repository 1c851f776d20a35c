"""A lock per object that copies, pickles and forks well: what makes `Index` safe to share
between threads. A copy (always a deep one) or an unpickled object gets a lock of its own (a lock
cannot be pickled, and a copy must not share its original's), and after a fork the child gets fresh locks, since one
that another thread of the parent held would stay held for ever in the child.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import weakref
from typing import Any

# every locked object of this process, by id (a subclass may make its objects unhashable)
_LIVE: weakref.WeakValueDictionary[int, Locked] = weakref.WeakValueDictionary()


class Locked:
    """`self._lock`, a reentrant lock of this object's own."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        _LIVE[id(self)] = self

    def locked(self) -> contextlib.AbstractContextManager:
        """`with obj.locked():` holds the lock across several calls, so what they read is one state
        (other threads wait; the calls themselves take the lock again, which is reentrant)."""
        return self._lock

    def __copy__(self) -> Locked:
        """A deep copy: a shallow one shared the original's items under a lock of its own, so an `add`
        to the copy changed the original and threads on the two raced (broadcast errors in searches)."""
        return copy.deepcopy(self)

    def __getstate__(self) -> Any:
        state = super().__getstate__()  # (dict, slots) for a subclass with __slots__
        attrs, slots = state if isinstance(state, tuple) else (state, None)
        attrs = {name: value for name, value in (attrs or {}).items() if name != "_lock"}
        return (attrs, slots) if slots else attrs

    def __setstate__(self, state: Any) -> None:
        attrs, slots = state if isinstance(state, tuple) else (state, None)
        self.__dict__.update(attrs or {})
        for name, value in (slots or {}).items():
            setattr(self, name, value)
        Locked.__init__(self)


def _fresh_locks() -> None:
    for obj in list(_LIVE.values()):
        obj._lock = threading.RLock()


os.register_at_fork(after_in_child=_fresh_locks)
