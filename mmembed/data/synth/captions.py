"""Captions of a scene: varied templates and synonyms that still pin down every attribute.

Synonyms never cross attributes or values (colours have none, so colours stay unambiguous),
and every object phrase mentions its size, colour, shape and position exactly once, in a
contiguous stretch of the caption. `parse_caption` inverts any caption made here, which is how
the tests prove captions are complete, and how generated captions can be scored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmembed.data.synth.rules import (
    ATTRIBUTES,
    COLOURS,
    GAIN_DB,
    ONSET_S,
    PITCH_HZ,
    TIMBRE,
    TIMBRE_DESCRIPTION,
)
from mmembed.data.synth.world import SceneObject

SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
COLOUR_WORDS = {c: (c,) for c in COLOURS}
SHAPE_WORDS = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross", "plus sign"),
    "diamond": ("diamond", "rhombus"),
}
# Phrases after the noun ("a red star on the left") and bare words before it ("left: red star").
POSITION_PHRASES = {
    "left": ("on the left", "at the left", "on the left side"),
    "centre": ("in the centre", "in the middle", "at the center"),
    "right": ("on the right", "at the right", "on the right side"),
}
POSITION_WORDS = {"left": ("left",), "centre": ("centre", "center", "middle"), "right": ("right",)}
SYNONYMS: dict[str, dict[str, tuple[str, ...]]] = {
    "size": SIZE_WORDS,
    "colour": COLOUR_WORDS,
    "shape": SHAPE_WORDS,
    "position": POSITION_WORDS,
}

N_ALTERNATIVES = 4
# Object phrase styles: 0 'a big red star on the left', 1 'on the left, a big red star',
# 2 'left: big red star', 3 'a red star, big, on the left'. Each frame lists the styles that
# read naturally inside it ('there is left: ...' does not).
_NOUN_STYLES = (0, 3)
_SINGLE_FRAMES = (
    ("{0}", (0, 1, 2, 3)),
    ("there is {0}", _NOUN_STYLES),
    ("a picture of {0}", _NOUN_STYLES),
    ("{0}, nothing else", (0, 1, 3)),
)
_DOUBLE_FRAMES = (
    ("{0} and {1}", _NOUN_STYLES),  # style 1 second would read "...at the left and on the right, a ..."
    ("{0}; {1}", (0, 1, 2, 3)),
    ("there is {0} and {1}", _NOUN_STYLES),
    ("two objects: {0} and {1}", _NOUN_STYLES),
    ("{0}, and {1}", _NOUN_STYLES),
)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def canonical_caption(objects: tuple[SceneObject, ...]) -> str:
    """The main caption: fixed wording, objects left to right.

    e.g. 'a large red circle on the left and a small blue star on the right'."""
    phrases = [
        f"{article(o.size)} {o.size} {o.colour} {o.shape} {POSITION_PHRASES[o.position][0]}" for o in objects
    ]
    return " and ".join(phrases)


def pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    """One of `options`, drawn uniformly from `rng` (every synthetic choice of a word or a template)."""
    return options[int(rng.integers(len(options)))]


def _object_phrase(obj: SceneObject, style: int, rng: np.random.Generator) -> str:
    size, colour = pick(rng, SIZE_WORDS[obj.size]), obj.colour
    shape, where = pick(rng, SHAPE_WORDS[obj.shape]), pick(rng, POSITION_PHRASES[obj.position])
    if style == 0:
        return f"{article(size)} {size} {colour} {shape} {where}"
    if style == 1:
        return f"{where}, {article(size)} {size} {colour} {shape}"
    if style == 2:
        return f"{pick(rng, POSITION_WORDS[obj.position])}: {size} {colour} {shape}"
    return f"{article(colour)} {colour} {shape}, {size}, {where}"


def random_caption(objects: tuple[SceneObject, ...], rng: np.random.Generator) -> str:
    """One caption with a random frame, object order, phrase styles and synonyms."""
    frame, styles = pick(rng, _SINGLE_FRAMES if len(objects) == 1 else _DOUBLE_FRAMES)
    order = rng.permutation(len(objects))
    return frame.format(*(_object_phrase(objects[int(i)], pick(rng, styles), rng) for i in order))


def captions_for(
    objects: tuple[SceneObject, ...], rng: np.random.Generator, n_alternatives: int = N_ALTERNATIVES
) -> list[str]:
    """The canonical caption followed by up to `n_alternatives` distinct random ones."""
    captions = [canonical_caption(objects)]
    for _ in range(8 * n_alternatives):
        if len(captions) > n_alternatives:
            break
        caption = random_caption(objects, rng)
        if caption not in captions:
            captions.append(caption)
    return captions


def _mention_pattern() -> re.Pattern[str]:
    words = {w: (attr, value) for attr, table in SYNONYMS.items() for value, ws in table.items() for w in ws}
    alternation = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"\b({alternation})\b")


_MENTION = _mention_pattern()
_WORD_MEANING = {w: (attr, value) for attr, table in SYNONYMS.items() for value, ws in table.items() for w in ws}


def mentions(text: str) -> list[tuple[str, str]]:
    """Attribute words of `text` in order, as (attribute, canonical value) pairs.

    e.g. 'where is the little red box?' -> [('size', 'small'), ('colour', 'red'), ('shape', 'square')].
    """
    return [_WORD_MEANING[m.group(1)] for m in _MENTION.finditer(text.lower())]


def parse_caption(text: str) -> list[SceneObject]:
    """Read the objects back out of a caption written by this module (or one like it).

    Every object phrase mentions four attributes, contiguously, so consecutive groups of four
    mentions are the objects.

    Raises:
        ValueError: if the mentions do not form whole objects (missing or repeated attributes).
    """
    found = mentions(text)
    if not found or len(found) % 4:
        raise ValueError(f"caption {text!r} has {len(found)} attribute words, not 4 per object")
    objects = []
    for i in range(0, len(found), 4):
        group = dict(found[i : i + 4])
        if len(group) != 4:
            raise ValueError(f"caption {text!r}: object {i // 4 + 1} repeats an attribute and misses another")
        objects.append(SceneObject(**group))
    return objects


def _objects_of(row: Mapping[str, Any] | Any) -> tuple[SceneObject, ...]:
    meta = row if isinstance(row, Mapping) else getattr(row, "meta", None)
    if not isinstance(meta, Mapping) or "objects" not in meta:
        raise ValueError("describe_scene needs a synthetic-world row: a mapping with an 'objects' list")
    objects = meta["objects"]
    if not isinstance(objects, (list, tuple)) or not objects:  # an empty list failed as an IndexError
        raise ValueError(f"describe_scene needs a non-empty 'objects' list, got {objects!r}")
    return tuple(_object_of(o) for o in objects)


def _object_of(o: Any) -> SceneObject:
    """A row's object, checked: a missing key or an unknown value failed as a KeyError."""
    if not isinstance(o, Mapping):
        raise ValueError(f"describe_scene: an object must be a mapping of {', '.join(ATTRIBUTES)}, got {o!r}")
    for attr, values in ATTRIBUTES.items():
        if attr not in o or o[attr] not in values:
            raise ValueError(f"describe_scene: object {dict(o)!r} has {attr}={o.get(attr)!r}; "
                             f"expected one of {', '.join(values)}")
    return SceneObject.from_dict(o)


def describe_scene(row: Mapping[str, Any] | Any) -> str:
    """Explain in plain words what a scene's picture shows and what its sound is.

    Args:
        row: a manifest row of the synthetic world (the JSON dict, or any object whose `meta`
            dict holds the row's `objects`).

    Returns:
        A few sentences, e.g. 'The picture shows a large red circle on the left. The sound
        is a pure sine tone at 220 Hz (red), loud (0 dB, large), starting early at about
        0.10 s (left).'

    Raises:
        ValueError: `row` is not a synthetic-world row (no objects, or one that is not a known
            shape, colour, size and position), naming what is wrong.
    """
    objects = _objects_of(row)
    picture = f"The picture shows {canonical_caption(objects)}, on a noisy grey background"
    parts = []
    for o in objects:
        loudness = "loud" if GAIN_DB[o.size] == max(GAIN_DB.values()) else "quiet"
        when = {"left": "early", "centre": "midway", "right": "late"}[o.position]
        parts.append(
            f"{TIMBRE_DESCRIPTION[TIMBRE[o.shape]]} at {PITCH_HZ[o.colour]:.0f} Hz ({o.colour}), "
            f"{loudness} ({GAIN_DB[o.size]:+.0f} dB, {o.size}), starting {when} at about "
            f"{ONSET_S[o.position]:.2f} s ({o.position})"
        )
    sound = "The sound is " + ("; then ".join(parts) if len(parts) > 1 else parts[0])
    return f"{picture}. {sound}."
