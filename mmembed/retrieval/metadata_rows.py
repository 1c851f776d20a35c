"""An index's metadata, a row each, held as the JSON text a save writes (one line of metadata.jsonl).

A manifest row's metadata (its captions, objects and questions: the built-in world's) took 7.2 KB
of Python dicts and lists a row and takes 1.3 KB as text: an index of 1M such rows held 7 GB of
metadata beside 2 GB of vectors (D = 512). A row is decoded when it is read, so what a caller gets is its
own copy and an edit never reaches the index.

Filters that must look at every row's values — a predicate, a dict filter on a key holding an
id-like value or a list — would decode every row at every search; the first one decodes the rows
once and keeps the dicts (`decoded`) until rows move, which gives back the memory the text saved.
A dict filter on plain values codes its key in one decoding pass and keeps only the codes
(`masks.py`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from mmembed.gc_pause import collector_paused


class MetadataRows:
    """Row-ordered metadata as JSON texts (each a JSON object), with an on-demand cache of the dicts."""

    def __init__(self, lines: Iterable[str] = ()) -> None:
        self._lines: list[str] = list(lines)
        self._decoded: list[dict[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self._lines)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Every row, freshly decoded."""
        return (json.loads(line) for line in self._lines)

    def __getitem__(self, row: int) -> dict[str, Any]:
        """Row `row`'s metadata, freshly decoded: the caller's to edit."""
        return json.loads(self._lines[row])

    def extend(self, lines: Sequence[str]) -> None:
        """Append rows given as JSON object texts (a cached decoding is extended when next asked for)."""
        self._lines.extend(lines)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only these rows, in this order (a compaction)."""
        self._lines = [self._lines[r] for r in rows]
        self._decoded = None

    def text(self) -> str:
        """Every row as a line, "\\n"-terminated: metadata.jsonl."""
        return "".join(line + "\n" for line in self._lines)

    def decoded(self) -> list[dict[str, Any]]:
        """Every row's dict, decoded once and kept until rows move; read-only (never hand one out)."""
        if self._decoded is None:
            self._decoded = []
        cache = self._decoded
        if len(cache) < len(self._lines):
            with collector_paused():  # 97,200 world rows: 4.2 s with the collector running, 1.6 s without
                cache.extend(json.loads(line) for line in self._lines[len(cache):])
        return cache

    def dicts(self, start: int = 0) -> Iterator[dict[str, Any]]:
        """The rows from `start` on, decoded one at a time (from the cache when there is one); read-only."""
        if self._decoded is not None:
            yield from self.decoded()[start:]
        else:
            for line in self._lines[start:]:
                yield json.loads(line)

    def __getstate__(self) -> dict[str, Any]:  # a copy or pickle carries the text, not the cache
        return {"_lines": self._lines, "_decoded": None}
