"""Question/answer pairs about a scene, and yes/no questions that compare two scenes across
modalities, for training and testing the decoder.

Answers are single canonical words (an attribute value, 'one'/'two', 'yes'/'no'), so scoring
a generated answer is an exact string match. Every question refers to an object by a
description that is unique in its scene and never contains the answer.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np

from mmembed.data.synth.captions import POSITION_PHRASES, SHAPE_WORDS, SIZE_WORDS, article, pick
from mmembed.data.synth.rules import COLOURS, SHAPES
from mmembed.data.synth.world import Scene, SceneObject

ATTRS = ("size", "colour", "shape", "position")
COUNT_WORDS = {1: "one", 2: "two"}
MODALITY_NOUNS = {"image": "picture", "audio": "sound", "text": "description"}


def _phrase(obj: SceneObject, attrs: tuple[str, ...], rng: np.random.Generator) -> str:
    """'small red star on the left', 'object on the right', ... using only `attrs`."""
    words = []
    if "size" in attrs:
        words.append(pick(rng, SIZE_WORDS[obj.size]))
    if "colour" in attrs:
        words.append(obj.colour)
    words.append(pick(rng, SHAPE_WORDS[obj.shape]) if "shape" in attrs else "object")
    if "position" in attrs:
        words.append(pick(rng, POSITION_PHRASES[obj.position]))
    return " ".join(words)


def reference(obj: SceneObject, scene: tuple[SceneObject, ...], hide: str, rng: np.random.Generator) -> str | None:
    """Shortest description of `obj` that no other object of `scene` matches and that does
    not mention attribute `hide`; names the shape whenever allowed. None if impossible."""
    free = [a for a in ATTRS if a != hide]
    others = [o for o in scene if o is not obj]
    for r in range(len(free) + 1):
        subsets = [s for s in itertools.combinations(free, r) if "shape" in s or hide == "shape"]
        unique = [s for s in subsets if all(any(getattr(o, a) != getattr(obj, a) for a in s) for o in others)]
        if unique:
            return _phrase(obj, pick(rng, unique), rng)
    return None


def _object_questions(
    obj: SceneObject, scene: tuple[SceneObject, ...], rng: np.random.Generator
) -> list[dict[str, str]]:
    templates: dict[str, Callable[[str], str]] = {
        "colour": lambda ref: f"what colour is the {ref}?",
        "shape": lambda ref: f"what shape is the {ref}?",
        "size": lambda ref: pick(rng, (f"what size is the {ref}?", f"is the {ref} small or large?")),
        "position": lambda ref: f"where is the {ref}?",
    }
    qa = []
    for attr in ("colour", "shape", "size", "position"):
        ref = reference(obj, scene, attr, rng)
        if ref is not None:
            qa.append({"question": templates[attr](ref), "answer": getattr(obj, attr)})
    return qa


def asked_pair(objects: Sequence[SceneObject], rng: np.random.Generator,
               withheld: Collection[tuple[str, str]] = ()) -> tuple[str, str]:
    """The (shape, colour) an "is there …?" question names: half the time one of the scene's
    objects', else any pair but the `withheld` ones (the world's held-out pairs, outside the
    held-out split: no text of train, val or test may name them, not even as an absent thing)."""
    if rng.random() < 0.5:
        return pick(rng, objects).combo
    return pick(rng, [c for c in itertools.product(SHAPES, COLOURS) if c not in withheld])


def questions_for(objects: tuple[SceneObject, ...], rng: np.random.Generator,
                  withheld: Collection[tuple[str, str]] = ()) -> list[dict[str, str]]:
    """Counting, existence and per-object attribute questions with one-word answers (`withheld`:
    as `asked_pair`)."""
    qa = [{"question": "how many objects are there?", "answer": COUNT_WORDS[len(objects)]}]
    shape, colour = asked_pair(objects, rng, withheld)
    present = any(o.combo == (shape, colour) for o in objects)
    noun = pick(rng, SHAPE_WORDS[shape])
    qa.append({"question": f"is there {article(colour)} {colour} {noun}?", "answer": "yes" if present else "no"})
    for obj in objects:
        qa.extend(_object_questions(obj, objects, rng))
    return qa


# ---------------------------------------------------------------- two-scene comparisons
def _colours(s: Scene) -> frozenset[str]:
    return frozenset(o.colour for o in s.objects)


def _shapes(s: Scene) -> frozenset[str]:
    return frozenset(o.shape for o in s.objects)


_COMPARISONS: dict[str, Callable[[Scene], Any]] = {
    "colour": _colours,
    "shape": _shapes,
    "scene": lambda s: s.label,
    "count": lambda s: len(s.objects),
}


def _comparison_question(kind: str, a: str, b: str, both_single: bool) -> str:
    if kind == "colour":
        if both_single:
            return f"is the {a} the same colour as the {b}?"
        return f"do the {a} and the {b} have the same colours?"
    if kind == "shape":
        if both_single:
            return f"is the {a} the same shape as the {b}?"
        return f"do the {a} and the {b} show the same shapes?"
    if kind == "scene":
        return f"do the {a} and the {b} show the same scene?"
    return f"do the {a} and the {b} have the same number of objects?"


def pairs_for_split(
    scenes: list[Scene], rng: np.random.Generator, per_scene: int = 2
) -> dict[str, list[dict[str, Any]]]:
    """For each scene, `per_scene` yes/no questions comparing it with another scene of the
    same split, each shown in a different modality.

    About half the partners are drawn among scenes that share the compared property (so 'yes'
    is common enough to learn), the rest at random; answers are always computed, never assumed.

    Returns:
        scene id -> [{"other": id, "modalities": [this scene's, other's], "question", "answer"}].
    """
    if len(scenes) < 2:
        return {s.id: [] for s in scenes}
    groups = {kind: defaultdict(list) for kind in _COMPARISONS}
    for i, s in enumerate(scenes):
        for kind, key in _COMPARISONS.items():
            groups[kind][key(s)].append(i)
    nouns = list(MODALITY_NOUNS.items())
    result: dict[str, list[dict[str, Any]]] = {}
    for i, scene in enumerate(scenes):
        pairs = []
        for kind in rng.choice(list(_COMPARISONS), size=per_scene, replace=False).tolist():
            same = groups[kind][_COMPARISONS[kind](scene)]
            pool = same if rng.random() < 0.5 and len(same) > 1 else range(len(scenes))
            j = i
            while j == i:
                j = pick(rng, pool)
            other = scenes[j]
            (ma, na), (mb, nb) = (nouns[int(k)] for k in rng.choice(len(nouns), size=2, replace=False))
            both_single = len(scene.objects) == 1 and len(other.objects) == 1
            answer = _COMPARISONS[kind](scene) == _COMPARISONS[kind](other)
            pairs.append(
                {
                    "other": other.id,
                    "modalities": [ma, mb],
                    "question": _comparison_question(kind, na, nb, both_single),
                    "answer": "yes" if answer else "no",
                }
            )
        result[scene.id] = pairs
    return result
