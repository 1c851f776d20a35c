"""Search results and their table form (what `mmembed search` prints)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mmembed.modality import Modality


@dataclass(frozen=True)
class Hit:
    """One search result: the item's stable id, its cosine similarity to the query, and what it is."""

    id: int
    score: float
    modality: Modality
    metadata: dict[str, Any] = field(default_factory=dict)


def format_hits(hits: Sequence[Hit], columns: Sequence[str] = ("label", "item"), max_width: int = 60) -> str:
    """A markdown table of hits, best first: rank, score, id, modality and metadata `columns`.

    Missing metadata values print empty; long values are shortened from the left (the end of
    a path is the informative part) to `max_width` characters.
    """
    header = ["rank", "score", "id", "modality", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---:"] * 3 + ["---"] * (1 + len(columns))) + "|"]
    for rank, hit in enumerate(hits, start=1):
        cells = [str(rank), f"{hit.score:.4f}", str(hit.id), str(hit.modality)]
        cells += [_cell(hit.metadata.get(c), max_width) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    if not hits:
        lines.append("| (no hits) |" + " |" * (len(header) - 1))
    return "\n".join(lines)


def _cell(value: Any, max_width: int) -> str:
    if value is None:
        return ""
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= max_width else "…" + text[-(max_width - 1):]
