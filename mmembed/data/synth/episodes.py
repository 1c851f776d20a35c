"""Recall episodes: a handful of shown pictures and sounds, and questions that each name one of them.

    manifest rows (objects + media) ─► episodes of `size` scenes, one picture or sound each
                                    ─► per scene, a question about one of its objects, named by
                                       attributes no other object of the episode shares
                                       ("What colour was the large star on the left?")

This is what a `Session` meets when a user asks about something shown many turns ago, and what a
query tower learns from (`mmembed.train.queries`): each question must find its own item among
the episode's. The questions are the memory dialogues' (`dialogues.question_about`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmembed.data.episodes import Episode, parse_episodes
from mmembed.data.manifest import read_jsonl_records
from mmembed.data.synth.captions import pick
from mmembed.data.synth.dialogues import question_about
from mmembed.data.synth.rules import ATTRIBUTES
from mmembed.data.synth.world import SceneObject
from mmembed.errors import UserError

MEDIA = ("image", "audio")
log = logging.getLogger(__name__)


def recall_episodes(rows: Sequence[Mapping[str, Any]], size: int, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """`n` episodes of `size` distinct scenes drawn from `rows` (a world manifest's rows).

    Returns:
        [{"items": [{"image": path} | {"audio": path}, ...], "questions": [{"text", "item", "answer"}, ...]}]
        with paths as the manifest gives them; scenes whose objects cannot be named uniquely ask nothing.
    """
    if not 2 <= size <= len(rows):
        raise ValueError(f"an episode needs 2 to {len(rows)} scenes, got {size}")
    rng = np.random.default_rng(seed)
    episodes = []
    for _ in range(n):
        picked = rng.choice(len(rows), size=size, replace=False)
        objects = [tuple(SceneObject.from_dict(o) for o in rows[int(i)]["objects"]) for i in picked]
        everything = tuple(o for scene in objects for o in scene)
        items, questions = [], []
        for k, (i, scene) in enumerate(zip(picked, objects)):
            modality = pick(rng, MEDIA)
            items.append({modality: rows[int(i)][modality]})
            asked = question_about(scene, everything, rng)
            if asked is not None:
                questions.append({"text": asked[0], "item": k, "answer": asked[1]})
        episodes.append({"items": items, "questions": questions})
    return episodes


def world_episodes(root: str | Path, split: str, size: int, n: int, seed: int = 0) -> list[Episode]:
    """`recall_episodes` over the `split` manifest of the world in `root`, media paths under `root`."""
    path = Path(root) / f"{split}.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found: recall episodes are built from a synthetic world's manifests")
    records = [r for _, r in read_jsonl_records(path)]  # a byte-order mark and CRLF read as manifests are
    rows = [r for r in records if isinstance(r, dict) and _scene_objects(r.get("objects"))]
    if len(rows) < len(records):
        log.warning("%s: %d of %d rows skipped (not a scene with its objects)", path, len(records) - len(rows),
                    len(records))
    if len(rows) < 2:
        raise UserError(f"{path} holds {len(rows)} scene(s) with their objects; a recall episode needs 2 or more "
                        "(a larger world, or give episodes)")
    return parse_episodes(recall_episodes(rows, min(size, len(rows)), n, seed), Path(root), what=str(path))


def _scene_objects(objects: Any) -> bool:
    """Whether a row's `objects` name every attribute of each object with one of the world's values
    (an object without a colour was a KeyError)."""
    return isinstance(objects, list) and bool(objects) and all(
        isinstance(o, Mapping) and all(o.get(attr) in values for attr, values in ATTRIBUTES.items()) for o in objects)
