"""Text from a model or a store made safe to print on a terminal.

A generated answer or a stored text printed raw could retitle the terminal, write its clipboard or
forge lines (escape codes), or reorder what follows it (bidi controls). `printable` escapes those.
"""

from __future__ import annotations

import sys
import unicodedata
from typing import TextIO

# escaped: controls (escape codes, newlines), line and paragraph separators, lone surrogates and the
# bidi controls (which reorder what follows); a no-break space, a zero-width joiner (emoji,
# Persian), a soft hyphen or an emoji newer than Python's tables is text
_UNSAFE = {"Cc", "Zl", "Zp", "Cs"}
_BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str, quoted: bool = False, keep: str = "") -> str:
    """`text` safe to print on a terminal: control characters (escape codes, newlines), separators,
    lone surrogates and bidi controls escaped as Python writes them (`\\x1b`); quotes and backslashes
    too when `quoted`; the characters of `keep` (e.g. "\\n\\t") as they are."""
    special = '"\\' if quoted else ""
    return "".join(c if c in keep else _escaped(c) if unicodedata.category(c) in _UNSAFE or c in _BIDI
                   or c in special else c for c in text)


def for_terminal(text: str, stream: TextIO | None = None) -> str:
    """`text` as `stream` (stdout) should get it: escaped but for its newlines and tabs when it is a
    terminal, as it is when it is a pipe or a file (whose reader wants the exact text)."""
    stream = sys.stdout if stream is None else stream
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # a closed or a stand-in stream
        tty = False
    return printable(text, keep="\n\t") if tty else text


def _escaped(c: str) -> str:
    return {'"': '\\"', "\\": "\\\\"}.get(c) or repr(c)[1:-1]
