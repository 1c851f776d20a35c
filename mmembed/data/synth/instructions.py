"""Instruction manifests for a multimodal decoder: prompts that mix pictures, sounds and text,
each with the text answer the decoder must produce, and how to score a generated answer.

One JSON object per line of `instruct-{split}.jsonl`:

    {"id": "s000123/4", "task": "colour",
     "prompt": ["What colour is the star in ", {"image": "images/s000123.png"}, "?"],
     "answer": "red", "scenes": ["s000123"], "objects": [[{"shape": "star", ...}]]}

`prompt` is a list of segments in order: a string is text the user typed; a one-key object is
a media item, `{"image": path}`, `{"audio": path}` (paths as the split manifest writes them) or
`{"text": caption}` (a caption given as an embedding). `scenes` names the scene of each media
item in prompt order and `objects` holds that scene's objects, left to right (a memory dialogue's
scenes told in words are no media items: its `scenes` may be shorter than what it tells, or empty).

Spacing convention: a media item reads as one word and the text around it carries the spaces.
Text just before a media item ends with a space; text just after one starts with a space, or
with punctuation that attaches to it ("Describe ", {image}, "."). Text never starts or ends
the prompt with a space, so joining the segments, each media item as a word, reads correctly.

Randomness comes from one generator per scene (`STREAM_INSTRUCT`), drawn first for the
scene's own rows (descriptions and attribute questions), so they do not depend on `n`. The rows
drawn after them do: comparison partners and the other scenes a memory dialogue shows are drawn
from the split, so both change with its size (and so with `n`).
"""

from __future__ import annotations

import unicodedata
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from mmembed.data.synth.captions import SHAPE_WORDS, article, canonical_caption, parse_caption, pick
from mmembed.data.synth.dialogues import SHOW, recall_item
from mmembed.data.synth.phrasings import MODALITY_WORDS, TEMPLATES, TEXT_TEMPLATES
from mmembed.data.synth.questions import ATTRS, COUNT_WORDS, asked_pair, reference
from mmembed.data.synth.rules import COLOURS, SHAPES, SIZES
from mmembed.data.synth.world import Combo, Scene, SceneObject, rng_for

# world.py's streams are 0-3 (sample, image, audio, text); these are the next free ones.
STREAM_INSTRUCT = 4
STREAM_LOOKUPS = 5  # `lookup_rows`: drawn apart, so the world's own rows stay the same
LOOKUP_TASKS = ("colour", "shape", "size", "position")  # questions that find an object by another attribute

TASK_GROUPS: dict[str, tuple[str, ...]] = {
    "describe": ("describe", "describe_both"),
    "attribute": ("count", "exists", "colour", "shape", "size", "position"),
    "compare": ("same_colour", "same_shape", "larger"),
    "memory": ("recall",),  # dialogues.py: a question about something shown turns earlier
}
TASKS = tuple(task for tasks in TASK_GROUPS.values() for task in tasks)
# The media each task's prompts show, as `manifest_kinds` reads them from a written world: what
# preflight checks a selection by prompt modality against before the world exists (a test keeps
# it equal to a generated world's).
_ONE_ITEM = {frozenset({"image"}), frozenset({"audio"})}
_BOTH = {frozenset({"image", "audio"})}
TASK_MEDIA: dict[str, set[frozenset[str]]] = {
    "describe": _ONE_ITEM | {frozenset({"text"})}, "describe_both": _BOTH,
    **{task: _ONE_ITEM for task in TASK_GROUPS["attribute"]},
    **{task: _BOTH for task in TASK_GROUPS["compare"]},
    "recall": _ONE_ITEM | _BOTH | {frozenset()},
}
LARGER_ANSWERS = ("the picture", "the sound", "equal")  # larger object in the image, the audio, neither
# Share of single-item descriptions asked as a conversation's show turn ("Remember this picture." {image}):
# without them a decoder answered a Session's show turn with "one", "yes" or "left", and those answers
# are what a later turn reads back from memory.
SHOWN_DESCRIBED = 0.25
# Memory dialogues per scene (each may fail to name an object uniquely). With one, and a quarter of their
# scenes told in words, the decoder answered 0.30 of questions about a scene given in words; with two, and
# half told (dialogues.P_TOLD), 0.80: it reads words only once it has read enough of them.
MEMORY_ROWS = 2

Prompt = list[str | dict[str, str]]
Item = tuple[str, Prompt, str, list[Scene]]  # task, prompt, answer, scene of each media item
_MARK = re.compile("\x00(\\d)\x00")


def _render(template: str, media: Sequence[dict[str, str]], rng: np.random.Generator, **slots: str) -> Prompt:
    """Fill a template; each media item becomes its own segment, the text keeps its spaces."""
    values = dict(slots)
    for i, item in enumerate(media):
        words = MODALITY_WORDS[next(iter(item))]
        mark, noun, see = f"\x00{i}\x00", pick(rng, words["noun"]), pick(rng, words["see"])
        values.update({f"m{i + 1}": mark, f"noun{i + 1}": noun, f"see{i + 1}": see})
        if i == 0:
            values.update(m=mark, noun=noun, see=see)
    parts = _MARK.split(template.format_map(values))
    # split() alternates text and captured media indices: text at even positions.
    return [media[int(p)] if k % 2 else p for k, p in enumerate(parts) if k % 2 or p]


_SAME_KEYS: dict[str, Callable[[Sequence[SceneObject]], frozenset[str]]] = {
    "same_colour": lambda objects: frozenset(o.colour for o in objects),
    "same_shape": lambda objects: frozenset(o.shape for o in objects),
}


class _Split:
    """One split's scenes with their media, and the groups comparison partners are drawn from."""

    def __init__(self, scenes: Sequence[Scene], manifest: Sequence[Mapping[str, Any]],
                 heldout: Collection[Combo] = ()) -> None:
        if [s.id for s in scenes] != [r["id"] for r in manifest]:
            raise ValueError("instruction_rows needs the manifest rows of `scenes`, in the same order")
        self.scenes, self.rows, self.heldout = list(scenes), list(manifest), heldout
        self.groups: dict[str, dict[Any, list[int]]] = {task: defaultdict(list) for task in _SAME_KEYS}
        for i, s in enumerate(self.scenes):
            for task, key in _SAME_KEYS.items():
                self.groups[task][key(s.objects)].append(i)
        self.singles = [i for i, s in enumerate(self.scenes) if len(s.objects) == 1]

    def withheld(self, i: int) -> Collection[Combo]:
        """The pairs no question about scene i may name: the held-out ones, outside their split."""
        return () if self.scenes[i].split == "heldout" else self.heldout

    def media(self, i: int, modality: str) -> dict[str, str]:
        return {modality: self.rows[i][modality]}


# ---------------------------------------------------------------- one scene
def _describe_prompt(item: dict[str, str], modality: str, rng: np.random.Generator) -> Prompt:
    """A request to describe `item`; one in SHOWN_DESCRIBED is a conversation's show turn ("Look at
    this." {image}), whose answer is the description, as memory dialogues assume of the decoder."""
    if rng.random() < SHOWN_DESCRIBED:
        return [pick(rng, SHOW[modality]) + " ", item]
    return _render(pick(rng, TEMPLATES["describe"]), [item], rng)


def _describe_items(split: _Split, i: int, rng: np.random.Generator) -> list[Item]:
    scene = split.scenes[i]
    answer = canonical_caption(scene.objects)
    items = [("describe", _describe_prompt(split.media(i, m), m, rng), answer, [scene]) for m in ("image", "audio")]
    alternatives = split.rows[i]["captions"][1:]
    if rng.random() < 0.5 and alternatives:
        caption = {"text": pick(rng, alternatives)}
        items.append(("describe", _render(pick(rng, TEXT_TEMPLATES), [caption], rng), answer, [scene]))
    if rng.random() < 0.25:
        media = [split.media(i, m) for m in rng.permutation(["image", "audio"]).tolist()]
        prompt = _render(pick(rng, TEMPLATES["describe_both"]), media, rng)
        items.append(("describe_both", prompt, answer, [scene] * 2))
    return items


def _referable(obj: SceneObject, objects: Sequence[SceneObject], hide: str) -> bool:
    """Whether some description of `obj` without attribute `hide` matches no other object."""
    free = [a for a in ATTRS if a != hide]
    return all(any(getattr(o, a) != getattr(obj, a) for a in free) for o in objects if o is not obj)


def _possible(task: str, objects: Sequence[SceneObject]) -> bool:
    return task not in ATTRS or any(_referable(o, objects, task) for o in objects)


def _attribute_question(task: str, objects: Sequence[SceneObject], rng: np.random.Generator,
                        withheld: Collection[Combo]) -> tuple[dict, str]:
    """Template slots and answer of one attribute question; `task` must be possible for the scene."""
    if task == "count":
        return {}, COUNT_WORDS[len(objects)]
    if task == "exists":  # as questions.py: half about an object that is there, half any allowed pair
        shape, colour = asked_pair(objects, rng, withheld)
        noun = pick(rng, SHAPE_WORDS[shape])
        present = any(o.combo == (shape, colour) for o in objects)
        return {"thing": f"{article(colour)} {colour} {noun}"}, "yes" if present else "no"
    obj = pick(rng, [o for o in objects if _referable(o, objects, task)])
    return {"ref": reference(obj, tuple(objects), task, rng)}, getattr(obj, task)


def _attribute_items(split: _Split, i: int, modality: str, rng: np.random.Generator) -> list[Item]:
    scene = split.scenes[i]
    possible = [t for t in TASK_GROUPS["attribute"] if _possible(t, scene.objects)]
    items = []
    for task in rng.choice(possible, size=2, replace=False).tolist():
        slots, answer = _attribute_question(task, scene.objects, rng, split.withheld(i))
        prompt = _render(pick(rng, TEMPLATES[task]), [split.media(i, modality)], rng, **slots)
        items.append((task, prompt, answer, [scene]))
    return items


# ---------------------------------------------------------------- two scenes
def _larger(image: SceneObject, audio: SceneObject) -> str:
    gap = SIZES.index(image.size) - SIZES.index(audio.size)
    return LARGER_ANSWERS[0] if gap > 0 else LARGER_ANSWERS[1] if gap < 0 else LARGER_ANSWERS[2]


def _comparison_item(split: _Split, i: int, rng: np.random.Generator) -> Item:
    """This scene's image and a partner's audio, in random order; the split has >= 2 scenes."""
    anchor = split.scenes[i]
    larger_ok = len(anchor.objects) == 1 and len(split.singles) >= 2
    task = pick(rng, TASK_GROUPS["compare"] if larger_ok else TASK_GROUPS["compare"][:2])
    if task == "larger":
        pool: Sequence[int] = split.singles
    else:  # about half among scenes that share the property, so that 'yes' is common
        same = split.groups[task][_SAME_KEYS[task](anchor.objects)]
        pool = same if rng.random() < 0.5 and len(same) > 1 else range(len(split.scenes))
    j = i
    while j == i:
        j = pick(rng, pool)
    partner = split.scenes[j]
    if task == "larger":
        answer = _larger(anchor.objects[0], partner.objects[0])
    else:
        answer = "yes" if _SAME_KEYS[task](anchor.objects) == _SAME_KEYS[task](partner.objects) else "no"
    media, scenes = [split.media(i, "image"), split.media(j, "audio")], [anchor, partner]
    if rng.random() < 0.5:
        media, scenes = media[::-1], scenes[::-1]
    return task, _render(pick(rng, TEMPLATES[task]), media, rng), answer, scenes


# ---------------------------------------------------------------- rows, scoring
def instruction_rows(
    scenes: Sequence[Scene], manifest: Sequence[Mapping[str, Any]], seed: int, heldout: Collection[Combo] = ()
) -> Iterator[dict[str, Any]]:
    """The instruction rows of one split, about 11 per scene, in scene order.

    Args:
        scenes: the split's scenes.
        manifest: their manifest rows, in the same order: media paths and captions come from there.
        seed: the world seed.
        heldout: the world's held-out (shape, colour) pairs, which only the held-out split's rows name.

    Yields:
        JSON-ready rows (see the module docstring), a scene's at a time (a world's are written as
        they come); ids are '<scene id>/<k>', unique in the split.
    """
    split = _Split(scenes, manifest, heldout)
    for i, scene in enumerate(split.scenes):
        rng = rng_for(seed, scene.kind, scene.index, STREAM_INSTRUCT)
        items = _describe_items(split, i, rng)
        for modality in ("image", "audio"):
            items += _attribute_items(split, i, modality, rng)
        if len(split.scenes) > 1:
            items += [_comparison_item(split, i, rng) for _ in range(2)]
        for _ in range(MEMORY_ROWS):
            recall = recall_item(split.scenes, split.rows, i, rng)
            if recall is not None:
                items.append(("recall", *recall))
        yield from (_row(f"{scene.id}/{k}", item) for k, item in enumerate(items))


def lookup_rows(scenes: Sequence[Scene], manifest: Sequence[Mapping[str, Any]], seed: int,
                per_item: int, heldout: Collection[Combo] = ()) -> list[dict[str, Any]]:
    """More questions that find one of two objects by one attribute and ask another ("What colour
    is the star in {image}?"), `per_item` about each two-object scene's picture and as many about
    its sound, written as `instruction_rows` writes its attribute questions (same templates).

    A decoder learns such lookups from hundreds of thousands of examples (docs/decoder.md, "The vectors
    bind; a lookup costs examples"); the world's own rows ask about 1.3 per two-object scene and
    modality.
    Ids are '<scene id>/l<k>'; the generator is the scene's own (`STREAM_LOOKUPS`)."""
    split = _Split(scenes, manifest, heldout)
    rows = []
    for i, scene in enumerate(split.scenes):
        if len(scene.objects) != 2:
            continue
        rng = rng_for(seed, scene.kind, scene.index, STREAM_LOOKUPS)
        possible = [t for t in LOOKUP_TASKS if _possible(t, scene.objects)]
        for k in range(2 * per_item):
            task = pick(rng, possible)
            slots, answer = _attribute_question(task, scene.objects, rng, split.withheld(i))
            media = split.media(i, "image" if k < per_item else "audio")
            prompt = _render(pick(rng, TEMPLATES[task]), [media], rng, **slots)
            rows.append(_row(f"{scene.id}/l{k}", (task, prompt, answer, [scene])))
    return rows


def _row(row_id: str, item: Item) -> dict[str, Any]:
    task, prompt, answer, members = item
    return {"id": row_id, "task": task, "prompt": prompt, "answer": answer, "scenes": [s.id for s in members],
            "objects": [[o.as_dict() for o in s.objects] for s in members]}


def task_group(task: str) -> str:
    """The group ('describe', 'attribute', 'compare' or 'memory') a task belongs to.

    Raises:
        ValueError: for an unknown task; the message lists the valid ones.
    """
    for group, tasks in TASK_GROUPS.items():
        if task in tasks:
            return group
    raise ValueError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")


def normalise(answer: str) -> str:
    """Compatibility forms folded (NFKC: full-width 'Ｒｅｄ' is 'Red', '…' is '...'), lower-case, one space
    between words, no punctuation or blanks at the end however many ('red. .', 'red…' are 'red'):
    ' Red  star. ' -> 'red star'."""
    text = " ".join(unicodedata.normalize("NFKC", answer).casefold().split())
    end = len(text)
    while end and (text[end - 1].isspace() or unicodedata.category(text[end - 1]) == "Po"):  # not a closing ")"
        end -= 1
    return text[:end]


def same_answer(generated: str, reference: str) -> bool:
    """Exact match after `normalise` on both sides ("Red." = "red"); a reference that normalises to
    nothing ("...") is matched as written, or an empty answer would match it."""
    if not (wanted := normalise(reference)):
        return generated.strip() == reference.strip()
    return normalise(generated) == wanted


def objects_problem(objects: Any) -> str | None:
    """What is wrong with a row's `objects` for `score` (None: nothing): a list of scenes, each a
    non-empty list of objects with one of the world's shapes and colours, as it writes them (a
    "Star" or a "box" passed, and the row's own reference description then scored wrong)."""
    if not (isinstance(objects, list) and objects and all(isinstance(s, list) and s for s in objects)
            and all(isinstance(o, Mapping) for s in objects for o in s)):
        return ("objects must be a list of scenes, each a list of objects with a shape and a colour "
                '([[{"shape": "star", "colour": "red", ...}]], as `mmembed data synth` writes them)')
    for o in (o for s in objects for o in s):
        for key, valid in (("shape", SHAPES), ("colour", COLOURS)):
            if o.get(key) not in valid:
                return f"an object's {key} {o.get(key)!r} is not one of the world's ({', '.join(valid)})"
    return None


def score(row: Mapping[str, Any], generated: str) -> bool:
    """Whether `generated` answers an instruction row correctly.

    Description tasks are right when the answer parses as the world's captions do (each object's
    size, colour, shape and position: "a red star" alone does not parse) to exactly the (shape,
    colour) pairs of the scene's objects, as a multiset; the sizes and positions it states are not
    checked. Every other task needs the normalised answer to equal the row's answer exactly.
    """
    task_group(row["task"])
    if row["task"] not in TASK_GROUPS["describe"]:  # both sides: a hand-written "Red" is "red" too,
        return same_answer(generated, row["answer"])
    try:
        said = parse_caption(" ".join(generated.split()))  # "plus  sign" as the exact-match path reads it
    except ValueError:
        return False
    truth = Counter((o["shape"], o["colour"]) for o in row["objects"][0])
    return Counter(o.combo for o in said) == truth
