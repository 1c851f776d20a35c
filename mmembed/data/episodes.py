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
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmembed.data.manifest import BadRow, check_unicode, read_jsonl_records, resolve_path
from mmembed.errors import UserError
from mmembed.modality import Modality

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Episode:
    """Items shown (modality, path or caption) and questions (text, index of the item asked about)."""

    items: tuple[tuple[Modality, str], ...]
    questions: tuple[tuple[str, int], ...]


def parse_episodes(records: Sequence[dict[str, Any]], root: Path | None = None, what: str = "episodes", *,
                   lines: Sequence[int] | None = None, allow_outside_root: bool = False) -> list[Episode]:
    """Episodes from decoded JSON records; relative media paths are taken under `root`, as a
    manifest's are (an absolute or `../` path is refused unless `allow_outside_root`). A malformed
    record is a UserError naming it: `what:line` with `lines` (the file's line of each record),
    else its number."""
    out, dropped = [], 0
    for n, rec in enumerate(records, 1):
        where = f"{what}:{lines[n - 1]}" if lines is not None else f"{what}: record {n}"
        try:
            items = []
            for item in rec["items"]:
                (name, value), = item.items()
                modality = Modality.parse(name)
                if not isinstance(value, str) or not value.strip():
                    raise BadRow(f"an item's {name} must be a non-empty string, got {value!r:.40}")
                check_unicode(value, f"an item's {name}")
                if modality != Modality.TEXT and root is not None:
                    value = resolve_path(value, root, allow_outside_root)
                items.append((modality, str(value)))
            questions = tuple(_question(q) for q in rec["questions"])
        except BadRow as e:
            raise UserError(f"{where}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{where} is not an episode ({type(e).__name__}: {e}); expected "
                            '{"items": [{"image": path}, ...], "questions": [{"text": ..., "item": index}, ...]}') from None
        if any(not 0 <= i < len(items) for _, i in questions):
            raise UserError(f"{where} asks about an item it does not have")
        if len(items) >= 2 and questions:
            out.append(Episode(tuple(items), questions))
        else:
            dropped += 1
    if not out:
        raise UserError(f"{what}: no episode with two or more items and a question")
    if dropped:
        log.warning("%s: %d of %d episodes skipped (fewer than two items, or no question)", what, dropped,
                    len(records))
    return out


def _question(q: Any) -> tuple[str, int]:
    """(text, item) of a question: a non-empty text, an integer item (1.7, true or "3" were read as
    items 1, 1 and 3; Infinity stopped the run with an OverflowError)."""
    text, item = q["text"], q["item"]
    if not isinstance(text, str) or not text.strip():
        raise BadRow(f"a question's text must be a non-empty string, got {text!r:.40}")
    check_unicode(text, "a question's text")
    if isinstance(item, bool) or not isinstance(item, int):
        raise BadRow(f"a question's item must be an integer index, got {item!r:.40}")
    return text, item


def read_episodes(path: str | Path, root: str | Path | None = None, allow_outside_root: bool = False) -> list[Episode]:
    """Episodes from a JSONL file (relative media paths under `root`, default the file's folder),
    read as manifests are: a byte-order mark allowed, lines split at "\\n" only, errors naming the line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"episodes file not found: {path}")
    records, lines = [], []
    for line, record in read_jsonl_records(path):
        if isinstance(record, BadRow):
            raise UserError(f"{path}:{line}: {record}")
        records.append(record)
        lines.append(line)
    base = Path(os.path.abspath(root if root is not None else path.parent))
    return parse_episodes(records, base, what=str(path), lines=lines, allow_outside_root=allow_outside_root)
