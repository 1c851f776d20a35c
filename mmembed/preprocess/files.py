"""Helpers every file-reading preprocessor shares."""

from __future__ import annotations

import stat
from pathlib import Path

from mmembed.errors import BadInput


def check_file(path: Path) -> None:
    """Missing, not a regular file, or empty → BadInput (one stat call)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise BadInput(f"missing file {path}") from None
    except (OSError, ValueError, UnicodeError) as e:  # ValueError: NUL byte; UnicodeError: lone surrogate
        raise BadInput(f"unreadable file {ascii(str(path))} ({type(e).__name__}: {e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise BadInput(f"not a file: {path}")
    if st.st_size == 0:
        raise BadInput(f"empty file (0 bytes): {path}")
