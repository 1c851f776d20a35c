"""A manifest's column names: the two that are not modalities (`label`, `captions`), and which
column a user meant when its name is a synonym or a slip of a modality's ("caption", "imgae"),
for the hints the manifest reader and the training data checks give."""

from __future__ import annotations

from mmembed.modality import Modality

LABEL_COLUMN = "label"
# alternative captions of the row's media (manifest.CAPTION_MODALITY's)
CAPTIONS_COLUMN = "captions"
# column names people give a modality (a close misspelling of these or of a modality is caught too)
_MODALITY_SYNONYMS = {
    "caption": Modality.TEXT, "txt": Modality.TEXT, "sentence": Modality.TEXT, "description": Modality.TEXT,
    "img": Modality.IMAGE, "picture": Modality.IMAGE, "photo": Modality.IMAGE, "image_path": Modality.IMAGE,
    "img_path": Modality.IMAGE, "image_file": Modality.IMAGE,
    "wav": Modality.AUDIO, "sound": Modality.AUDIO, "audio_path": Modality.AUDIO, "audio_file": Modality.AUDIO,
}


def likely_modality(column: str) -> Modality | None:
    """The modality a metadata column's name looks like a synonym or misspelling of, else None."""
    if column in (CAPTIONS_COLUMN, LABEL_COLUMN):  # real columns (`captions` is close to `caption`)
        return None
    name = column.strip().lower()
    names = {m.value: m for m in Modality} | _MODALITY_SYNONYMS
    # one slip away at most ("imgae", "images"), in names of 4 characters or more ("id" is not "img"):
    # a looser match took ids and sizes ("caption_id", "image_w", "audio_len") for the modality itself
    near = _one_edit_apart if len(name) >= 4 else str.__eq__
    return next((m for known, m in names.items() if near(name, known)), None)


def _one_edit_apart(a: str, b: str) -> bool:
    """Whether `a` is `b`, or `b` with one character inserted or deleted, or two adjacent ones
    swapped. Not one replaced: "test" and "audit" are words of their own, not "text" and "audio"."""
    if a == b:
        return True
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 2 and diff[1] == diff[0] + 1 and (a[diff[0]], a[diff[1]]) == (b[diff[1]], b[diff[0]])
    short, long = sorted((a, b), key=len)
    return len(long) - len(short) == 1 and any(long[:i] + long[i + 1:] == short for i in range(len(long)))


def misnamed_columns(columns: set[str], wanted: set[Modality]) -> dict[str, Modality]:
    """The columns among `columns` that look like a modality of `wanted`: column → that modality."""
    guesses = {c: likely_modality(c) for c in sorted(columns) if c not in {m.value for m in Modality}}
    return {c: m for c, m in guesses.items() if m in wanted}


def column_hints(columns: set[str], wanted: set[Modality]) -> list[str]:
    """"column 'caption' is metadata (did you mean 'text'?)" for each column that looks like one of `wanted`."""
    return [f"column {c!r} is metadata (did you mean {m.value!r}?)" for c, m in misnamed_columns(columns, wanted).items()]
