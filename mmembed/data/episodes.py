"""Recall episodes: items shown to someone, and questions that each name one of them.

One JSON object a line:

    {"items": [{"image": path} | {"audio": path} | {"text": caption}, ...],
     "questions": [{"text": "What colour was the large star?", "item": 3}, ...]}

`item` indexes `items`. Relative media paths are read under a root (by default the file's folder).
A query tower learns from them (`mmembed.train.queries`); the built-in world writes them from its
manifests (`mmembed.data.synth.episodes`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmembed.errors import UserError
from mmembed.modality import Modality


@dataclasses.dataclass(frozen=True)
class Episode:
    """Items shown (modality, path or caption) and questions (text, index of the item asked about)."""

    items: tuple[tuple[Modality, str], ...]
    questions: tuple[tuple[str, int], ...]


def parse_episodes(records: Sequence[dict[str, Any]], root: Path | None = None, what: str = "episodes") -> list[Episode]:
    """Episodes from decoded JSON records; relative media paths are taken under `root`. A malformed
    record is a UserError naming it."""
    out = []
    for n, rec in enumerate(records, 1):
        try:
            items = []
            for item in rec["items"]:
                (name, value), = item.items()
                modality = Modality.parse(name)
                if modality != Modality.TEXT and root is not None and not Path(value).is_absolute():
                    value = str(root / value)
                items.append((modality, str(value)))
            questions = tuple((str(q["text"]), int(q["item"])) for q in rec["questions"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{what}: record {n} is not an episode ({type(e).__name__}: {e}); expected "
                            '{"items": [{"image": path}, ...], "questions": [{"text": ..., "item": index}, ...]}') from None
        if any(not 0 <= i < len(items) for _, i in questions):
            raise UserError(f"{what}: record {n} asks about an item it does not have")
        if len(items) >= 2 and questions:
            out.append(Episode(tuple(items), questions))
    if not out:
        raise UserError(f"{what}: no episode with two or more items and a question")
    return out


def read_episodes(path: str | Path, root: str | Path | None = None) -> list[Episode]:
    """Episodes from a JSONL file (relative media paths under `root`, default the file's folder)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"episodes file not found: {path}")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not JSON ({e.msg})") from None
    return parse_episodes(records, Path(root) if root is not None else path.parent, what=str(path))
