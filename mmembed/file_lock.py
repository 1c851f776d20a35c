"""An exclusive advisory lock on a file or a folder, for what one process at a time writes.

flock, so the kernel releases it when the holder dies (a killed process never leaves a stale
lock). The lock is its taker's alone: a forked child closes its copies of the descriptors at once,
since flock belongs to the open file and a child's copy held it after its parent was killed (a
killed `data synth` left its render workers keeping the world locked). A lock file names the
holder's pid for the message a second process gets (a folder locked as itself holds no extra
file, and its holder goes unnamed). Re-entrant within one thread, so a step may take it inside a
pipeline that already holds it; another thread of the process waits or is refused as another
process is. A lock is exclusive (a writer's) or shared (`shared`: readers, who exclude writers
but not each other).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from mmembed.errors import UserError

_held: dict[tuple[Path, int], int] = {}  # (lock path, thread) → nesting depth
_shared: set[tuple[Path, int]] = set()  # the held locks that are shared ones
_fds: dict[tuple[Path, int], int] = {}  # (lock path, thread) → the descriptor holding the lock


def _close_in_child() -> None:
    # close, never LOCK_UN: unlocking a shared open file would release the parent's lock too
    for fd in _fds.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _fds.clear()
    _held.clear()
    _shared.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def exclusive(path: Path, busy: Callable[[str], str], wait: float = 0.0) -> contextlib.AbstractContextManager:
    """Hold the lock on `path`: an existing folder, or a file (created with its folder if
    missing). While another holds it, wait up to `wait` seconds; then a UserError whose message
    is `busy(holder)`, holder being "pid N" as a lock file records it, else "another process"."""
    return _lock(path, busy, wait, shared=False)


def shared(path: Path, busy: Callable[[str], str], wait: float = 0.0) -> contextlib.AbstractContextManager:
    """Hold a shared lock on the existing folder or file `path`: any number of processes hold one
    at once, and none while another holds `exclusive` (then `busy(holder)`, as there). A thread that
    holds it and asks for the exclusive one is refused (flock's upgrade drops the shared lock first,
    and other readers may hold it too)."""
    return _lock(path, busy, wait, shared=True)


@contextlib.contextmanager
def _lock(path: Path, busy: Callable[[str], str], wait: float, shared: bool) -> Iterator[None]:
    path = Path(path).resolve()
    key = (path, threading.get_ident())
    if key in _held:
        if key in _shared and not shared:
            raise UserError(busy("this process, which reads it"))
        _held[key] += 1
        try:
            yield
        finally:
            if key in _held:  # a forked child unwinding its parent's block holds nothing
                _held[key] -= 1
        return
    folder = path.is_dir()
    if not folder and not shared:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY) if folder or shared else os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    _fds[key] = fd
    try:
        _acquire(fd, path, busy, wait, shared)
        if not folder and not shared:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        _held[key] = 1
        if shared:
            _shared.add(key)
        yield
    finally:
        _held.pop(key, None)
        _shared.discard(key)
        if _fds.pop(key, None) is not None:  # a forked child closed its copy already
            os.close(fd)  # closing releases the lock


def _acquire(fd: int, path: Path, busy: Callable[[str], str], wait: float, shared: bool = False) -> None:
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory lock, but still one clear owner file
        return
    end = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= end:
                break
            time.sleep(0.05)
    pid = "" if path.is_dir() else path.read_text(encoding="utf-8", errors="replace").strip()
    raise UserError(busy(_holder(pid))) from None


def holder(path: Path) -> str | None:
    """The holder of the lock on the file `path` ("pid N" as the file records it, else "another
    process") while another process holds it; None when none does or there is no such file.
    Read-only: a shared lock tried and released at once, so asking never writes."""
    try:
        import fcntl

        fd = os.open(path, os.O_RDONLY)
    except (ImportError, OSError):  # no lock file (or not POSIX): no holder to name
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None  # closing the file releases it
    except BlockingIOError:
        return _holder(os.read(fd, 64).decode(errors="replace").strip())
    finally:
        os.close(fd)


def _holder(pid: str) -> str:
    return f"pid {pid}" if pid else "another process"
