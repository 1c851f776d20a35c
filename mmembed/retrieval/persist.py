"""Saving and loading an index folder: replaced as a whole by every save, read consistently.

What the three files hold, and their cross-checks, is `index_format.py`.

A save holds an exclusive lock named by the index's path in the temporary folder (one save of an
index at a time; a second waits its turn) and writes the files into a sibling folder
`<name>.tmp-<pid>-<hex>` (each file fsynced), then
swaps it in: the old folder is renamed to `<name>.old-<pid>-<hex>`, the new one renamed to
`<name>`, the old one deleted. A kill at any point leaves a loadable index: before the swap the
old folder is untouched; between the two renames `read_index` reads the `.old` folder, and the
next save renames it back. The next save also deletes leftover temporary folders; reading never
writes. A reader whose files come from two saves (a swap mid-read: the header's generation
changed) reads again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from mmembed.checkpoint import file_above, fsync_dir, read_json, unwritable_above
from mmembed.errors import CheckpointError, UserError
from mmembed.file_lock import exclusive
from mmembed.retrieval.index_format import (HEADER, METADATA, STRUCTURE, VECTORS, SavedIndex, Structure, _read_folder,
                                            _writable_header, _write_files)
from mmembed.retrieval.store import VectorStore

log = logging.getLogger(__name__)

_LEFTOVER = re.compile(r"\.(tmp|old)-\d+-[0-9a-f]{8}")  # suffix of a save's sibling folders
# atomic_write's temporary files, left in the index folder by a save killed in older versions
_PARTIAL_FILE = re.compile(r"\.(?:%s)\.\w+\.tmp" % "|".join(map(re.escape, (HEADER, VECTORS, METADATA, STRUCTURE))))


def write_index(directory: str | Path, store: VectorStore, header: dict[str, Any],
                structure: Structure | None = None) -> Path:
    """Write a compacted store and its header as the folder `directory`, replacing any index there;
    `structure`: a FAISS backend's writer of its built structure for the store's rows, and its state.

    Raises UserError when `directory` holds anything besides an index (it would be deleted).
    """
    if store.n_dead:
        raise RuntimeError("compact the store before writing it")  # Index.save does
    header = _writable_header(header)  # before anything is written: the old index stays as it was
    directory = Path(directory)
    target = directory.resolve()  # through a symlink: the swap renames the real folder
    text = store.metadata.text()  # the rows' JSON, as `Index.add` and a load checked it
    check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # one save of an index at a time: a second one's recovery deleted the first's staging folder
    # mid-write, and the two swaps could leave no index at all. A second save waits its turn.
    with exclusive(_lock_file(target), lambda holder: f"{holder} has been saving {target} for "
                                                      f"{_SAVE_WAIT:.0f} s; save again when it is done",
                   wait=_SAVE_WAIT):
        _recover(target)
        _check_replaceable(target)
        staging = _sibling(target, "tmp")
        os.mkdir(staging)  # mode 0777 & ~umask (tempfile.mkdtemp would make it 0700)
        try:
            _write_files(staging, store, header, text, structure)
            _swap(staging, target)
        except BaseException:  # Ctrl-C too: it left the whole staged index beside the target
            _recover(target)  # a kill skips this; the next save does it
            raise
    return directory


def check_target(target: str | Path) -> None:
    """UserError unless an index can be saved as `target`: it is absent, an index or an empty
    folder, and every existing folder above it is a folder (checked before any work, so a
    mistyped --out costs no embedding)."""
    if not str(target).strip():  # Path("") is the working directory: `--out ""` wrote the index there
        raise UserError("the index folder's name is empty (--out \"\"): name the folder to write")
    target = Path(target).resolve()
    if (parent := file_above(target)) is not None:
        raise UserError(f"cannot save an index as {target}: {parent} is a file, not a folder")
    if (parent := unwritable_above(target)) is not None:
        raise UserError(f"cannot save an index as {target}: {parent} cannot be written (read-only, or no permission)")
    if (outer := next((p for p in target.parents if (p / HEADER).is_file() and (p / VECTORS).is_file()), None)):
        # there it would be deleted by the next save of that index, which replaces its folder (it refused)
        raise UserError(f"cannot save an index as {target}: it is inside the index folder {outer}, which a save "
                        "of that index replaces whole; save it beside it")
    _check_replaceable(target)


def read_index(directory: str | Path) -> SavedIndex:
    """Read and cross-check the three files; any inconsistency is a CheckpointError.

    A save that swaps the folder in mid-read makes the files disagree for a moment: when the
    header's generation (or the folder read) changed meanwhile, the read is tried again
    (`_READ_TRIES` times in all). (The folder's inode could not tell: a file system reuses them.)"""
    directory = Path(directory)
    for attempt in range(_READ_TRIES):
        before = _version(directory)
        try:
            return _read_folder(_live_folder(directory))
        except (CheckpointError, OSError) as e:
            # a folder no save touched meanwhile is as it will stay: its error is real (retrying a
            # corrupt index re-read and re-hashed it, 5x slower to refuse)
            if attempt == _READ_TRIES - 1 or _version(directory) == before:
                raise e if isinstance(e, CheckpointError) else CheckpointError(f"{directory}: {e}") from None
            time.sleep(0.02 * (attempt + 1))
    raise AssertionError("unreachable")


def _version(directory: Path) -> tuple[str, str | None]:
    """Which folder a read would take and the generation its header names: a save changes one."""
    try:
        live = _live_folder(directory)
        return str(live), read_json(live / HEADER).get("generation")
    except (UserError, CheckpointError, OSError, AttributeError):
        return "", None


_READ_TRIES = 4


def _swap(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`; an existing `target` is moved aside first, since rename
    cannot replace a non-empty folder."""
    old = None
    if target.exists():
        old = _sibling(target, "old")
        os.rename(target, old)
    os.rename(staging, target)
    fsync_dir(target.parent)  # the new index is durable before the old one goes
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _recover(target: Path) -> None:
    """Undo what an interrupted save left beside `target`: put the old index back if the save
    stopped between its two renames, then delete the leftover folders."""
    leftovers = _leftovers(target)
    previous = _previous(target)
    if previous is not None and not target.exists():
        os.rename(previous, target)
        leftovers.remove(previous)
    for folder in leftovers:
        shutil.rmtree(folder, ignore_errors=True)


def _check_replaceable(target: Path) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise UserError(f"cannot save an index as {target}: it is a file")
    foreign = sorted(p.name for p in target.iterdir()
                     if p.name not in (HEADER, VECTORS, METADATA, STRUCTURE) and not _PARTIAL_FILE.fullmatch(p.name))
    if foreign:
        raise UserError(f"cannot save an index into {target}: it holds other files ({', '.join(foreign[:5])}), "
                        "and a save replaces the whole folder; choose a new or empty folder")


def _live_folder(directory: Path) -> Path:
    """`directory`, or the previous index while a save is between its two renames (or died there)."""
    if directory.is_dir():
        return directory
    previous = _previous(directory.resolve())
    if previous is None:
        if directory.exists():  # a manifest given where the index goes
            raise UserError(f"{directory} is a file, not an index folder")
        raise UserError(f"index folder not found: {directory}")
    log.warning("%s: a save was interrupted; reading the previous index from %s", directory, previous)
    return previous


_SAVE_WAIT = 120.0  # seconds a save waits for another save of the same index


def _lock_file(target: Path) -> Path:
    """The lock of saves of `target`: a file named by the hash of its real path in the temporary
    folder (every process of this machine finds the same one, and the user's folder gets none)."""
    name = hashlib.sha256(str(target.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return Path(tempfile.gettempdir()) / f"mmembed-{_user()}" / "index-saves" / f"{name}.lock"


def _user() -> str:
    return str(os.getuid()) if hasattr(os, "getuid") else "user"


def _sibling(target: Path, kind: str) -> Path:
    return target.with_name(f"{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _leftovers(target: Path, kind: str | None = None) -> list[Path]:
    if not target.parent.is_dir():
        return []
    found = []
    for path in target.parent.iterdir():
        match = path.name.startswith(target.name) and _LEFTOVER.fullmatch(path.name[len(target.name):])
        if match and kind in (None, match.group(1)):
            found.append(path)
    return sorted(found)


def _previous(target: Path) -> Path | None:
    """The index a save moved aside; there is at most one unless saves were interrupted twice."""
    olds = _leftovers(target, "old")
    return max(olds, key=lambda p: p.stat().st_mtime_ns) if olds else None
