"""Export a memory as a manifest folder that every other mmembed command reads.

    export/
      memory.jsonl         one row per item, in id order
      media/12.png         the stored bytes of each media item, named by id

A row: the media path under its modality's column (`"image": "media/12.png"`), the item's
`text` (a text item's words, a media item's caption), and `id, user, session, turn, role,
time, modality, meta`. `memory.jsonl` is written last, under a temporary name then renamed, so
an export that fails half way leaves no manifest and no media: the folder is as it was, or gone
when the export made it. Items stored with `store_media="path"` get their file copied when it
still exists; otherwise the row is written without it (and without any column at all it is left
out), with a warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmembed.errors import UserError
from mmembed.memory.items import file_suffix
from mmembed.memory.records import MemoryHit

log = logging.getLogger(__name__)

MANIFEST = "memory.jsonl"
MEDIA_DIR = "media"


def export_items(items: Iterable[MemoryHit], folder: Path) -> Path:
    """Write `items` (with media bytes) into `folder`, which must be new or empty; returns the manifest path."""
    try:
        _check_target(folder)
        return _write(items, folder)
    except OSError as e:  # a full disk, no permission: one line naming the folder
        raise UserError(f"cannot export to {folder}: {e.strerror or e}") from None


def _write(items: Iterable[MemoryHit], folder: Path) -> Path:
    made = _new_folders(folder)
    final = folder / MANIFEST
    tmp = folder / f".{MANIFEST}.tmp"
    written, missing = 0, 0
    try:
        (folder / MEDIA_DIR).mkdir(parents=True, exist_ok=True)
        with tmp.open("w", encoding="utf-8") as f:
            for item in items:
                row = _row(item, folder)
                if row is None:
                    missing += 1
                    continue
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                written += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:  # the folder was new or empty: leave it so (or gone), and a retry can use it
        _undo(folder, made)
        raise
    if missing:
        log.warning("export %s: %d item(s) left out: their media file (store_media='path') is gone", folder, missing)
    log.info("exported %d item(s) to %s", written, final)
    return final


def _new_folders(folder: Path) -> list[Path]:
    """The folders the export creates, deepest first; refused when one would go under a file."""
    new: list[Path] = []
    while not folder.exists():
        new.append(folder)
        folder = folder.parent
    if new and not folder.is_dir():
        raise UserError(f"cannot export to {new[0]}: {folder} is a file, not a folder")
    return new


def _undo(folder: Path, made: list[Path]) -> None:
    """Remove what a failed export wrote, and the folders it made (rmdir: only while empty)."""
    with contextlib.suppress(OSError):
        (folder / f".{MANIFEST}.tmp").unlink(missing_ok=True)
    shutil.rmtree(folder / MEDIA_DIR, ignore_errors=True)
    for made_folder in made:
        try:
            made_folder.rmdir()
        except OSError:  # something else was put in it meanwhile: leave it
            break


def _check_target(folder: Path) -> None:
    """A new or empty folder; or one holding only what a killed export left (its temporary
    manifest and its media: no manifest yet), which is cleared: a retry blocked on it otherwise."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"cannot export to {folder}: it is a file, not a folder")
    if not folder.is_dir():
        return
    left = {p.name for p in folder.iterdir()}
    media = folder / MEDIA_DIR
    ours = (f".{MANIFEST}.tmp" in left or (media.is_dir() and not any(media.iterdir())))  # never a user's media/
    if left and left <= {f".{MANIFEST}.tmp", MEDIA_DIR} and ours:
        (folder / f".{MANIFEST}.tmp").unlink(missing_ok=True)
        shutil.rmtree(media, ignore_errors=True)
        log.info("export %s: cleared what an interrupted export left", folder)
        return
    if left:
        raise UserError(f"cannot export to {folder}: the folder is not empty (pick a new or empty one)")


def _row(item: MemoryHit, folder: Path) -> dict[str, Any] | None:
    """The manifest row of one item; None when it has nothing left to show."""
    row: dict[str, Any] = {"id": item.id, "user": item.user, "session": item.session, "turn": item.turn,
                           "role": item.role, "time": item.time, "modality": str(item.modality)}
    media = item.media if item.media is not None else _read_media_path(item.media_path)
    if media is not None:
        name = f"{MEDIA_DIR}/{item.id}{file_suffix(media)}"
        (folder / name).write_bytes(media)
        row[str(item.modality)] = name
    elif item.media_path is not None:
        log.warning("export: media file of item %d is gone: %s", item.id, item.media_path)
    if item.text is not None:
        row["text"] = item.text
    if str(item.modality) not in row and "text" not in row:
        return None
    row["meta"] = item.meta
    return row


def _read_media_path(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError:
        return None
