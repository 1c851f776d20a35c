"""The rows of a memory file as Python values: what goes in (`NewItem`), what comes out
(`MemoryHit`), and what the vector cache reads (`VectorRows`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmembed.modality import Modality


@dataclass(frozen=True)
class MemoryHit:
    """One stored item: what `Memory.search` returns (best first), and `get` / `recent`.

    `score` is the cosine similarity to the query in [-1, 1]; None for items from `get` and
    `recent`, which had no query. `media` holds the stored file bytes (PNG, WAV, …) when asked
    for (`get`, `recent(media=True)`); `media_path` is set for items added with
    `store_media="path"` instead.
    """

    id: int
    score: float | None
    user: str
    session: str | None
    turn: int | None
    role: str
    time: float
    modality: Modality
    text: str | None
    meta: dict[str, Any]
    media: bytes | None = field(default=None, repr=False)
    media_path: str | None = None


@dataclass(frozen=True)
class NewItem:
    """One row to insert; `embedding` is (D,) float32 little-endian bytes, `meta` JSON text."""

    user: str
    session: str | None
    turn: int | None
    role: str
    time: float
    modality: str
    embedding: bytes
    text: str | None = None
    meta: str = "{}"
    media_path: str | None = None
    media: bytes | None = None


@dataclass(frozen=True)
class VectorRows:
    """Rows of one user read for the vector cache: ids (N,), vectors (N, D), and filter columns."""

    ids: np.ndarray
    vectors: np.ndarray
    modalities: list[str]
    times: np.ndarray  # (N,) float64 unix seconds
    sessions: list[str | None]
    total: int  # the user's item count in the same snapshot
