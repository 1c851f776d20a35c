"""Memory dialogues: earlier turns show pictures and sounds, a later question asks about one of them.

The prompt is laid out exactly as a `Session` lays out what the decoder sees, so the decoder
learns to answer from memories the way the session will hand them over:

    recalled items (bare media, oldest first)                         {image} {audio}
    earlier turns of the conversation: words, media, the answer       "Remember this picture. " {image} " a small red star on the left"
    the question, naming one shown object by another attribute        "What colour was the star?"   → "red"

A turn's answer is the canonical description of what it showed (what the decoder says when it
is shown something). The asked object is named by a description that no other object shown
in the dialogue matches, and never by the asked attribute itself. Text segments stay apart
(each is tokenised on its own), as the session hands over each turn's words and answers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmembed.data.synth.captions import canonical_caption, pick
from mmembed.data.synth.questions import reference
from mmembed.data.synth.world import Scene, SceneObject

SHOW = {
    "image": ("Remember this picture.", "Look at this.", "Here is a picture.", "Keep this image in mind.",
              "I am showing you a photo.", "Take a look at this picture.", "See this?", "This is my picture.",
              "Please remember this image.", "Here is something to look at.", "Note this picture."),
    "audio": ("Remember this sound.", "Listen to this.", "Here is a sound.", "Keep this recording in mind.",
              "I am playing you a sound.", "Take a listen.", "Hear this?", "This is my recording.",
              "Please remember this sound.", "Here is something to listen to.", "Note this audio clip."),
}
ASK = {
    "colour": ("What colour was the {ref}?", "Which colour did the {ref} have?", "What colour was the {ref} I showed you?",
               "Do you remember the colour of the {ref}?", "The {ref} from before: what colour was it?",
               "Earlier I showed you the {ref}. What colour was it?", "Tell me the colour of the {ref} you saw earlier.",
               "What was the colour of the {ref}?", "Remind me: what colour was the {ref}?",
               "Which colour was the {ref} in what I showed you?", "Recall the {ref}. What colour was it?"),
    "shape": ("What shape was the {ref}?", "Which shape did the {ref} have?", "What shape was the {ref} I showed you?",
              "Do you remember the shape of the {ref}?", "The {ref} from before: what shape was it?",
              "Earlier I showed you the {ref}. What shape was it?", "Tell me the shape of the {ref} you saw earlier.",
              "What was the shape of the {ref}?", "Remind me: what shape was the {ref}?",
              "Which shape was the {ref} in what I showed you?", "Recall the {ref}. What shape was it?"),
}
# Media items per dialogue, 1 to 6: a Session shows up to recall_k = 3 recalled items and history_turns = 3
# turns by default; a decoder that only ever read two picked the asked one out of those for 0.40 of
# long-horizon questions, four trained on up to six for 0.36-0.58 (mean 0.47; README, "Memory"). Dialogues longer
# than the decoder's context (about one in five at 128 tokens) are skipped, and counted, in training.
MAX_SHOWN = 6


def recall_item(scenes: Sequence[Scene], media: Sequence[dict[str, str]], anchor: int,
                rng: np.random.Generator) -> tuple[list, str, list[Scene]] | None:
    """One memory dialogue about an object of scene `anchor`, with up to MAX_SHOWN − 1 other scenes shown.

    Args:
        scenes: the split's scenes; `media[i]` maps "image"/"audio" to scene i's paths.
        anchor: the scene the question is about.

    Returns:
        (prompt segments, answer, the scene of each media item in prompt order), or None when no
        object of the anchor can be named uniquely among everything shown.
    """
    shown = [anchor] + [int(j) for j in rng.choice(len(scenes), size=int(rng.integers(0, MAX_SHOWN)))]
    shown = list(dict.fromkeys(shown))  # no scene twice
    rng.shuffle(shown)
    objects = tuple(o for j in shown for o in scenes[j].objects)
    attr = pick(rng, ("colour", "shape"))
    candidates = [o for o in scenes[anchor].objects if reference(o, objects, attr, rng) is not None]
    if not candidates:
        return None
    target: SceneObject = pick(rng, candidates)
    question = pick(rng, ASK[attr]).format(ref=reference(target, objects, attr, rng))
    recalled = [rng.random() < 0.5 for _ in shown]  # bare, first: as a session recalls them
    bare: list = []
    turns: list = []
    for j, is_recalled in zip(shown, recalled):
        modality = pick(rng, ("image", "audio"))
        item = {modality: media[j][modality]}
        if is_recalled:
            bare.append(item)
        else:
            turns += [pick(rng, SHOW[modality]), item, canonical_caption(scenes[j].objects)]
    prompt = bare + turns + [question]
    order = [scenes[j] for j, r in zip(shown, recalled) if r] + [scenes[j] for j, r in zip(shown, recalled) if not r]
    return prompt, getattr(target, attr), order


def question_about(objects: Sequence[SceneObject], everything: tuple[SceneObject, ...],
                   rng: np.random.Generator) -> tuple[str, str] | None:
    """A question about the first of `objects` (one shown item's) that can be named uniquely among
    `everything` shown, by a description without the asked attribute: (question, answer), or
    None when none of them can be."""
    attr = pick(rng, ("colour", "shape"))
    for obj in objects:
        ref = reference(obj, everything, attr, rng)
        if ref is not None:
            return pick(rng, ASK[attr]).format(ref=ref), getattr(obj, attr)
    return None


def memory_probe(objects: tuple[SceneObject, ...], media: dict[str, str],
                 rng: np.random.Generator) -> dict[str, str] | None:
    """One show-then-ask pair about a scene's `objects`: {"show", "modality", "path", "question", "answer"}.

    The show turn is one picture or sound with words; the later question names one of its
    objects by a description that excludes the asked attribute. None when no object can be named.
    """
    modality = pick(rng, ("image", "audio"))
    attr = pick(rng, ("colour", "shape"))
    candidates = [o for o in objects if reference(o, objects, attr, rng) is not None]
    if not candidates:
        return None
    target: SceneObject = pick(rng, candidates)
    return {"show": pick(rng, SHOW[modality]), "modality": modality, "path": media[modality],
            "question": pick(rng, ASK[attr]).format(ref=reference(target, objects, attr, rng)),
            "answer": getattr(target, attr)}
