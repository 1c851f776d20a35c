"""Memory dialogues: earlier turns show pictures and sounds, or tell a scene in words; a later question
asks about one of them.

The prompt is laid out exactly as a `Session` lays out what the decoder sees, so the decoder
learns to answer from memories the way the session will hand them over:

    recalled items (bare media, or the words a scene was told in)     {image} "Note: a red star, small, on the left."
    earlier turns of the conversation: words, media, the answer       "Remember this picture." {image} "a small red star on the left"
    the question, naming one shown object by another attribute        "What colour was the star?"   → "red"

A turn's answer is the canonical description of what it showed or told: what the decoder says
when it is shown something (the instruction set trains that too: `instructions.SHOWN_DESCRIBED`).
The asked object is named by a description that no other object in the dialogue matches, and
never by the asked attribute itself. Text segments stay apart (each is tokenised on its own), as
the session hands over each turn's words and answers.
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
# Half the scenes of a dialogue are told in words instead ("Remember this: a large red circle on the left."),
# so the decoder learns to read the words in its context, as it must read a Session's earlier answers. A
# decoder that never had to answered 0.09 of questions about a scene described in the prompt's words;
# with P_TOLD 0.5 and two dialogues per scene, 0.80 (every one-object scene, 0.6 of two-object ones).
TELL = ("Remember this: {caption}.", "Note: {caption}.", "Keep in mind: {caption}.", "I saw this: {caption}.",
        "Here is what I saw: {caption}.", "Please remember: {caption}.")
P_TOLD = 0.5
# Media items per dialogue, 1 to 6: a Session shows up to recall_k = 3 recalled items and history_turns = 3
# turns by default; a decoder that only ever read two picked the asked one out of those for 0.40 of
# long-horizon questions, four trained on up to six for 0.36-0.58 (mean 0.47; docs/memory.md). Dialogues longer
# than the decoder's context (about one in four at 128 tokens) are skipped, and counted, in training.
MAX_SHOWN = 6


def recall_item(scenes: Sequence[Scene], media: Sequence[dict[str, str]], anchor: int,
                rng: np.random.Generator) -> tuple[list, str, list[Scene]] | None:
    """One memory dialogue about an object of scene `anchor`, with up to MAX_SHOWN − 1 other scenes shown.

    Args:
        scenes: the split's scenes; `media[i]` maps "image"/"audio" to scene i's paths (and
            "captions" to its captions, which a told scene is told in; else its canonical one).
        anchor: the scene the question is about.

    Returns:
        (prompt segments, answer, the scene of each media item in prompt order: a told scene has
        none, so a dialogue may list no scene at all), or None when no object of the anchor can be
        named uniquely among everything shown.
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
    bare_scenes: list[Scene] = []
    turn_scenes: list[Scene] = []
    for j, is_recalled in zip(shown, recalled):
        modality = pick(rng, ("image", "audio"))
        if rng.random() < P_TOLD:  # the user's words are the memory: recalled, they are all there is
            captions = media[j].get("captions") or [canonical_caption(scenes[j].objects)]
            user = [pick(rng, TELL).format(caption=pick(rng, captions))]
        else:
            user = [pick(rng, SHOW[modality]), {modality: media[j][modality]}]
            (bare_scenes if is_recalled else turn_scenes).append(scenes[j])
        if is_recalled:
            bare.append(user[-1])
        else:
            turns += [*user, canonical_caption(scenes[j].objects)]
    return bare + turns + [question], getattr(target, attr), bare_scenes + turn_scenes


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
