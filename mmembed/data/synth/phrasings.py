"""The world's instruction phrasings: at least ten templates per task, so a decoder trained on them
answers paraphrases, and the words a template may use for each kind of media item.

Slots: {m} the media item ({m1}, {m2} for two), {noun} and {see} its words ({noun1}, {see2}, ...),
{ref} a unique reference to one object, {attr} / {attrs} the asked attribute, {thing} 'a red star'.
`instructions.py` fills them."""

from __future__ import annotations

# Words a template may use for a media item: {noun} and {see} (or {noun1}, {see2}, ...).
MODALITY_WORDS: dict[str, dict[str, tuple[str, ...]]] = {
    "image": {"noun": ("picture", "image", "photo"), "see": ("see",)},
    "audio": {"noun": ("sound", "recording", "audio clip"), "see": ("hear",)},
    "text": {"noun": ("description", "caption"), "see": ("read",)},
}

# Slots: {m} the media item ({m1}, {m2} for two), {ref} a unique reference to one object,
# {thing} 'a red star'. Attribute questions never name the asked value, nor offer choices.
_WHAT = (
    "What {attr} is the {ref} in {m}?",
    "{m} What {attr} is the {ref}?",
    "In {m}, what {attr} is the {ref}?",
    "Tell me the {attr} of the {ref} you {see} in {m}.",
    "What is the {attr} of the {ref}? {m}",
    "{m} Which {attr} does the {ref} have?",
    "Name the {attr} of the {ref} in this {noun}. {m}",
    "What {attr} is the {ref} you {see}? {m}",
    "Consider {m}. What {attr} is the {ref}?",
    "The {ref} in {m}: what {attr} is it?",
    "Which {attr} is the {ref} in this {noun}? {m}",
)
_SAME = (
    "Do {m1} and {m2} have the same {attrs}?",
    "{m1} {m2} Are the {attrs} the same in both?",
    "Is the set of {attrs} in {m1} the same as in {m2}?",
    "Compare the {attrs} in {m1} and {m2}. Are they the same?",
    "Does the {noun1} {m1} have the same {attrs} as the {noun2} {m2}?",
    "Are the objects in {m1} the same {attrs} as those in {m2}?",
    "{m1} {m2} Do these two share exactly the same {attrs}?",
    "Do you {see1} the same {attrs} in {m1} as you {see2} in {m2}?",
    "Here are {m1} and {m2}. Do they have the same {attrs}?",
    "Are the {attrs} of {m1} and {m2} identical?",
    "Same {attrs} in {m1} and {m2}?",
)
TEMPLATES: dict[str, tuple[str, ...]] = {
    "describe": (
        "Describe {m}.",
        "{m} Describe what you {see}.",
        "What do you {see} in {m}?",
        "{m} What is in this {noun}?",
        "Write a caption for {m}.",
        "Caption this {noun}: {m}",
        "Tell me what this {noun} contains. {m}",
        "{m} List every object you {see}, with its size, colour and position.",
        "Which objects are in {m}?",
        "In {m}, what do you {see}?",
        "{m} Describe this {noun} in one sentence.",
        "Give a short description of {m}.",
    ),
    "describe_both": (
        "{m1} {m2} Describe the scene.",
        "The {noun1} {m1} and the {noun2} {m2} come from the same scene. Describe it.",
        "Describe the scene that {m1} and {m2} both capture.",
        "What scene do {m1} and {m2} have in common?",
        "{m1} and {m2} come from one scene. What is in it?",
        "Write one caption for {m1} and {m2}.",
        "You {see1} {m1} and {see2} {m2}. Describe the scene.",
        "{m1} {m2} What scene do these two share?",
        "Caption the scene behind {m1} and {m2}.",
        "Given {m1} and {m2}, describe the objects in the scene.",
        "Here are the {noun1} {m1} and the {noun2} {m2} of one scene. What does it hold?",
    ),
    "count": (
        "How many objects are in {m}?",
        "{m} How many objects do you {see}?",
        "Count the objects in this {noun}. {m}",
        "How many shapes does {m} contain?",
        "{m} How many things are in this {noun}?",
        "Count the shapes you {see} in {m}.",
        "What is the number of objects in {m}?",
        "In {m}, how many objects are there?",
        "Tell me how many objects this {noun} holds: {m}",
        "{m} Count the objects.",
        "How many objects can you {see} in this {noun}? {m}",
    ),
    "exists": (
        "Is there {thing} in {m}?",
        "{m} Do you {see} {thing}?",
        "Does this {noun} contain {thing}? {m}",
        "Can you {see} {thing} in {m}?",
        "{m} Is there {thing} in this {noun}?",
        "Does {m} have {thing} in it?",
        "In {m}, is there {thing}?",
        "Check {m} for {thing}. Is it there?",
        "Is {thing} present in this {noun}? {m}",
        "{m} Does {thing} appear here?",
        "Would you say {m} contains {thing}?",
    ),
    **{attr: tuple(t.replace("{attr}", attr) for t in _WHAT) for attr in ("colour", "shape", "size")},
    "position": (
        "Where is the {ref} in {m}?",
        "{m} Where is the {ref}?",
        "In {m}, where is the {ref}?",
        "Where do you {see} the {ref}? {m}",
        "Tell me where the {ref} is in this {noun}. {m}",
        "{m} In which part of the scene is the {ref}?",
        "Which position does the {ref} have in {m}?",
        "What is the position of the {ref}? {m}",
        "Consider {m}. Where is the {ref}?",
        "The {ref} in {m}: where is it?",
        "{m} Where in this {noun} is the {ref}?",
    ),
    "same_colour": tuple(t.replace("{attrs}", "colours") for t in _SAME),
    "same_shape": tuple(t.replace("{attrs}", "shapes") for t in _SAME),
    # Single-object scenes: size is radius in the picture and loudness in the sound.
    "larger": (
        "Which object is larger, the one in {m1} or the one in {m2}?",
        "{m1} {m2} Which holds the larger object, the picture or the sound?",
        "Compare the sizes in {m1} and {m2}: which is larger?",
        "Which is bigger: the object you {see1} in {m1} or the one you {see2} in {m2}?",
        "{m1} {m2} Which object is larger? If they match, say equal.",
        "A louder sound means a larger object. Which is larger, {m1} or {m2}?",
        "Which of {m1} and {m2} has the larger object?",
        "Is the larger object in the {noun1} or in the {noun2}? {m1} {m2}",
        "Here are {m1} and {m2}. Which shows the larger object?",
        "Which has the bigger object: {m1} or {m2}?",
        "Between {m1} and {m2}, which object is larger, or are they equal?",
    ),
}
# `describe` with a caption given as an embedding: the answer is the canonical caption.
TEXT_TEMPLATES: tuple[str, ...] = (
    "Rewrite {m} in the standard form.",
    "{m} Restate this description in the usual words.",
    "Describe the scene that {m} talks about.",
    "{m} What scene is this?",
    "Put this description in the usual words: {m}",
    "Here is a description: {m} Say it the standard way.",
    "Read {m} and describe the scene.",
    "What objects does {m} describe?",
    "Paraphrase {m}.",
    "{m} Give the canonical caption.",
    "Summarise the scene in {m}.",
)
