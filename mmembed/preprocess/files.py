"""Helpers every file-reading preprocessor shares."""

from __future__ import annotations

import os
import stat
import unicodedata
from pathlib import Path

from mmembed.errors import BadInput


def as_path(item: str | Path) -> Path:
    """A path item → Path; an empty or blank one → BadInput (Path("") is ".", "not a file: ." named no item)."""
    if not str(item).strip():
        raise BadInput(f"empty path {ascii(str(item))}: give the file's path")
    return Path(item)


def check_file(path: Path) -> None:
    """Missing, not a regular file, or empty → BadInput (one stat call)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise BadInput(f"missing file {shown(path)}{normalisation_hint(path)}") from None
    except (OSError, ValueError, UnicodeError) as e:  # ValueError: NUL byte; UnicodeError: lone surrogate
        raise BadInput(f"unreadable file {ascii(str(path))} ({type(e).__name__}: {e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise BadInput(f"not a file: {shown(path)}")
    if st.st_size == 0:
        raise BadInput(f"empty file (0 bytes): {shown(path)}")


def shown(path: Path | str) -> str:
    """A path as a message prints it: quoted by ascii() when whitespace at an end or a control
    character inside would be invisible ("s005700.png\n" read as naming a file that exists)."""
    name = str(path)
    return ascii(name) if name != name.strip() or not name.isprintable() else name


def normalisation_hint(path: Path, named_by: str = "the manifest entry") -> str:
    """A hint when the folder holds the same name in another Unicode normalisation ("café" typed
    as NFC, saved as NFD by macOS): the two print alike, and the miss looks impossible."""
    name = path.name
    if name.isascii():
        return ""
    forms = {unicodedata.normalize(f, name) for f in ("NFC", "NFD")}
    try:
        near = [n for n in os.listdir(path.parent) if n != name and unicodedata.normalize("NFC", n) in forms]
    except OSError:
        return ""
    return (f" (the folder has {ascii(near[0])}, the same name in another Unicode normalisation; "
            f"rename the file or {named_by} to one form)") if near else ""
