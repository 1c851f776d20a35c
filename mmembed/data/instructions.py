"""Instruction manifests: (prompt, answer) pairs for training and testing the decoder.

JSONL, one example per line. A prompt is a list of segments: a string is typed text; an object
with one modality key is a media item — a file path for image/audio (relative to `root`: data.root
in training, the manifest's folder in `mmembed eval`, as for manifests; with the same
`..`/absolute-path rule), the caption itself for text (it reaches the decoder as a shared-space
vector, not as tokens).

    {"prompt": ["What colour is the star in", {"image": "images/s1.png"}, "?"], "answer": "red",
     "task": "colour"}

`task` (optional) groups rows for filtering and accuracy tables; every other key is metadata.
Bad rows (invalid JSON, a prompt that is not a list, an unknown segment, an empty answer, a
refused path) are skipped and counted, or raised with their line in strict mode.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmembed.data.manifest import (INLINE_MODALITIES, BadRow, check_file, check_unicode, check_utf8ish,
                                   read_jsonl_records, resolve_path)
from mmembed.errors import UserError
from mmembed.gc_pause import collector_paused
from mmembed.modality import Modality

MediaRef = tuple[Modality, "str | Path"]  # (modality, absolute path — or the caption for inline modalities)


def manifest_kinds(path: Path, *, root: str | Path | None = None, allow_outside_root: bool = False,
                   strict: bool = False) -> dict[str | None, set[frozenset[str]]]:
    """Each task the usable rows of an instruction manifest name (None: rows without one), with
    the sets of modalities their prompts show. The rows are those `read_instructions` keeps (same
    arguments, same UserError when none is usable): a bad row counted in training stopped the run here."""
    kinds: dict[str | None, set[frozenset[str]]] = {}
    for row in read_instructions(path, root=root, allow_outside_root=allow_outside_root, strict=strict).rows:
        kinds.setdefault(row.task, set()).add(frozenset(m.value for m, _ in row.media))
    return kinds


@dataclass(frozen=True)
class InstructionRow:
    """One example: prompt segments (text, or a `MediaRef`), the answer and its task."""

    line: int
    prompt: tuple[str | MediaRef, ...]
    answer: str
    task: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def media(self) -> list[MediaRef]:
        return [s for s in self.prompt if not isinstance(s, str)]


@dataclass
class InstructionSet:
    path: Path
    rows: list[InstructionRow]
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, tasks: Sequence[str] | None = None, modalities: Sequence[str] | None = None) -> InstructionSet:
        """Rows of the given tasks whose media are all of the given modalities (None: any)."""
        allowed = None if modalities is None else {Modality.parse(m) for m in modalities}
        rows = [r for r in self.rows if (tasks is None or r.task in tasks)
                and (allowed is None or all(m in allowed for m, _ in r.media))]
        return InstructionSet(self.path, rows, self.skipped)

    def weighted(self, weights: Mapping[str, float], seed: int = 0) -> InstructionSet:
        """Each row repeated by its task's weight, so an epoch holds the tasks in those proportions
        (an instruction-tuning mixture): 3 keeps every row of the task three times, 2.5 twice and
        a seeded half of them (exactly: round(0.5 n)) a third time, 0 drops the task, a weight
        between 0 and 1 keeps at least one row; tasks not named keep 1."""
        present = {r.task for r in self.rows if r.task is not None}
        unknown = sorted(set(weights) - present)
        if unknown:
            raise UserError(f"task weights name task(s) none of the rows has: {', '.join(unknown)} (rows of "
                            f"{self.path}, after any selection by task or modality; their tasks: "
                            f"{', '.join(sorted(present))})")
        bad = sorted(t for t, w in weights.items() if not (math.isfinite(w) and w >= 0))
        if bad:
            raise UserError(f"task weights must be finite and >= 0: {', '.join(f'{t}={weights[t]}' for t in bad)}")
        # A fraction f of a task's n rows gets its extra copy: exactly round(f·n) of them, at least one
        # for a weight above 0 (a coin flip per row left a 0.3-weighted task of 7 rows out for 2 seeds of 10).
        rng = random.Random(seed)
        by_task: dict[str | None, list[int]] = {}
        for i, row in enumerate(self.rows):
            by_task.setdefault(row.task, []).append(i)
        extra: set[int] = set()
        for task in sorted(by_task, key=str):
            w = weights.get(task, 1.0) if task is not None else 1.0
            part = w - math.floor(w)
            if part:
                rows_of = by_task[task]
                k = max(round(part * len(rows_of)), 1 if math.floor(w) == 0 else 0)
                extra.update(rng.sample(rows_of, k))
        rows = [row for i, row in enumerate(self.rows)
                for _ in range(math.floor(weights.get(row.task, 1.0) if row.task is not None else 1.0) + (i in extra))]
        return InstructionSet(self.path, rows, self.skipped)


@collector_paused()  # rows of dicts and lists, many of them: gc_pause.py
def read_instructions(path: str | Path, *, root: str | Path | None = None, allow_outside_root: bool = False,
                      strict: bool = False) -> InstructionSet:
    """Read an instruction manifest (JSONL).

    Args:
        path: the file.
        root: folder relative media paths resolve against (default: the file's folder).
        allow_outside_root: accept absolute paths and `..` escapes.
        strict: raise on the first bad row (naming its line) instead of skipping it.

    Returns:
        The readable rows and the (line, reason) of each skipped one. Raises UserError when the
        file is missing or has no usable row.
    """
    path = Path(path)
    check_file(path, "instruction manifest")
    check_utf8ish(path)  # read as UTF-8, a UTF-16 file's every line was a bad row, and no row was usable
    base = Path(os.path.abspath(root if root is not None else path.parent))  # normalised, as media paths are
    rows, skipped = [], []
    for line, record in read_jsonl_records(path):
        try:
            if isinstance(record, BadRow):
                raise record
            rows.append(_row(line, record, base, allow_outside_root))
        except BadRow as e:
            if strict:
                raise UserError(f"{path}:{line}: {e}") from None
            skipped.append((line, str(e)))
    if not rows:
        first = f"; first, line {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise UserError(f"{path}: no usable instruction row ({len(skipped)} skipped{first})")
    return InstructionSet(path, rows, skipped)


def _row(line: int, record: dict[str, Any], base: Path, allow_outside_root: bool) -> InstructionRow:
    prompt, answer = record.get("prompt"), record.get("answer")
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise BadRow("prompt must be a non-empty list of segments")
    if not isinstance(answer, str) or not answer.strip():
        raise BadRow("answer must be a non-empty string")
    check_unicode(answer, "answer")
    task = record.get("task")
    segments = tuple(_segment(s, base, allow_outside_root) for s in prompt)
    if all(isinstance(s, str) and not s.strip() for s in segments):  # generation refuses such a prompt
        raise BadRow("the prompt holds no text and no media")
    meta = {k: v for k, v in record.items() if k not in ("prompt", "answer", "task")}
    return InstructionRow(line, segments, answer, None if task is None else str(task), meta)


def _segment(seg: Any, base: Path, allow_outside_root: bool) -> str | MediaRef:
    if isinstance(seg, str):
        check_unicode(seg, "a prompt segment")
        return seg
    if not isinstance(seg, dict) or len(seg) != 1:
        raise BadRow(f"a prompt segment must be a string or an object with one modality key, got {seg!r:.60}")
    (key, value), = seg.items()
    try:
        modality = Modality(key)
    except ValueError:
        raise BadRow(f"unknown media key {key!r} (valid: {', '.join(m.value for m in Modality)})") from None
    if not isinstance(value, str) or not value.strip():
        raise BadRow(f"{key} must be a non-empty string")
    check_unicode(value, key)
    return (modality, value if modality in INLINE_MODALITIES else resolve_path(value, base, allow_outside_root))

