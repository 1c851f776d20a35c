"""Text-encoding helpers shared by `Tokenizer` and `ClipTokenizer`: special tokens inside user
text, the length budget, encoding in bounded time, and padding into batches."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from functools import lru_cache
from typing import Literal, Union

import numpy as np
import torch

from mmembed.errors import BadInput, UserError

SURROGATE = re.compile("[\ud800-\udfff]")
CHARS_PER_ID = 8  # with max_length, encode a prefix of ~this many characters per id (then grow it)

AllowedSpecial = Union[AbstractSet[str], Literal["all"]]
Padding = Union[bool, Literal["max_length"]]


def require_str(text: object) -> None:
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")


def check_text(text: object) -> None:
    """TypeError for non-strings; BadInput naming the first lone surrogate (not valid Unicode)."""
    require_str(text)
    m = SURROGATE.search(text)
    if m:
        raise BadInput(f"text is not valid Unicode: lone surrogate U+{ord(m.group()):04X} at index "
                       f"{m.start()} (raw bytes go through encode_bytes)")


def check_texts(texts: Sequence[str]) -> list[str]:
    """The strings of a batch as a list, each checked as `check_text` does; one string is a
    TypeError (iterating it would encode each character as a row)."""
    if isinstance(texts, (str, bytes, bytearray)):
        raise TypeError(f"encode_batch takes a sequence of strings, got one {type(texts).__name__}")
    texts = list(texts)
    for t in texts:
        check_text(t)
    return texts


def resolve_allowed(allowed: AllowedSpecial, specials: dict[str, int]) -> frozenset[str]:
    if not allowed:
        return frozenset()
    if allowed == "all":
        return frozenset(specials)
    if isinstance(allowed, str):
        raise UserError(f'allowed_special must be a set of special tokens or "all", got {allowed!r}')
    unknown = sorted(set(allowed) - specials.keys())
    if unknown:
        raise UserError(f"allowed_special names unknown tokens {unknown}; known: {', '.join(specials)}")
    return frozenset(allowed)


def split_on_specials(text: str, allowed: frozenset[str]) -> list[tuple[str, bool]]:
    """Cut text into (piece, is_special) around occurrences of the allowed special tokens."""
    if not allowed:
        return [(text, False)] if text else []
    parts = _special_pattern(allowed).split(text)
    return [(p, i % 2 == 1) for i, p in enumerate(parts) if p]


@lru_cache(maxsize=64)
def _special_pattern(allowed: frozenset[str]) -> re.Pattern:
    # Longest first, so "<image>" never wins over a longer token that starts the same way.
    alts = sorted(allowed, key=lambda s: (-len(s), s))
    return re.compile("(" + "|".join(map(re.escape, alts)) + ")")


def content_budget(max_length: int | None, add_bos: bool, add_eos: bool) -> int | None:
    """How many ids the text itself may use once bos/eos are reserved (None: unlimited)."""
    if max_length is None:
        return None
    extra = int(add_bos) + int(add_eos)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < max(1, extra):
        raise ValueError(f"max_length must be an int >= {max(1, extra)}, got {max_length!r}")
    return max_length - extra


def encode_bounded(text: str, budget: int | None, encode: Callable[[str], list[int]]) -> list[int]:
    """`encode(text)[:budget]` without encoding all of a huge text.

    Encodes a prefix cut at a word boundary (so its ids are a prefix of the full text's ids), and
    grows it until it yields `budget` ids. Only a run without whitespace longer than the prefix is
    cut inside it: BPE inside one word is not prefix-stable (a merge at the cut can change the
    word's ids from its start), so such a prefix is taken only when it holds more than twice
    `budget` ids and one twice as long gives the same first `budget` (else it grows, up to the
    whole text).
    """
    if budget is None:
        return encode(text)
    n, earlier = prefix_chars(budget), None
    while True:
        cut = prefix_cut(text, n)
        ids = encode(text[:cut])
        if prefix_holds(text, cut, len(ids), budget):
            return ids[:budget]
        if not at_word_boundary(text, cut) and len(ids) > 2 * budget:  # inside a run: stable from here on?
            if earlier is not None and earlier == ids[:budget]:
                return earlier
            earlier = ids[:budget]
            n *= 2
            continue
        earlier = None
        n *= 4


def prefix_holds(text: str, cut: int, n_ids: int, budget: int) -> bool:
    """Whether `text[:cut]`, encoded to `n_ids` ids, surely gives the full text's first `budget`: when it
    is the whole text, or cut at a word boundary with `budget` ids (a cut inside a run of non-blank
    characters never surely does: `encode_bounded` checks it against a longer prefix)."""
    if cut >= len(text):
        return True
    return at_word_boundary(text, cut) and n_ids >= budget


def at_word_boundary(text: str, cut: int) -> bool:
    """Whether a pre-tokenizer (GPT-2's regex, CLIP's) surely ends a token at `cut`: a blank there
    after a non-blank. Blank as the regex's `\\s` means it: Python's `isspace` also counts
    U+001C..U+001F, which the regex takes for punctuation (a cut before one joined a token in two)."""
    return 0 < cut < len(text) and _blank(text[cut]) and not _blank(text[cut - 1])


def _blank(c: str) -> bool:
    return c.isspace() and not "\x1c" <= c <= "\x1f"


def prefix_chars(budget: int) -> int:
    """Characters to encode first when `budget` ids are wanted (English needs ~4 per id)."""
    return CHARS_PER_ID * budget + 64


def prefix_cut(text: str, n: int) -> int:
    """A cut position <= n where a whitespace char follows a non-whitespace one, else n.

    Pre-tokenizers (GPT-2's regex, CLIP's) never join across that boundary, so the prefix's
    tokens are exactly the full text's tokens up to there.
    """
    if len(text) <= n:
        return len(text)
    lo, end = n // 2, n + 1
    for _ in range(64):
        i = max(text.rfind(" ", lo, end), text.rfind("\n", lo, end))
        if i <= lo:
            break
        if not _blank(text[i - 1]):
            return i
        end = i
    return n


def check_ids(ids: Sequence[int] | torch.Tensor, vocab_size: int) -> list[int]:
    """Ids as a list of ints; an id outside [0, vocab_size) is a ValueError naming it, and anything
    but a sequence (or 1-D integer tensor) of integers is a TypeError saying what was given."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"token ids must be a 1-D integer tensor, got {ids.dim()}-D {ids.dtype}")
        ids = ids.tolist()
    else:
        try:
            ids = [_as_id(i) for i in ids]
        except TypeError as e:
            raise TypeError(f"token ids must be a sequence of integers ({e})") from None
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        bad = next(i for i in ids if not 0 <= i < vocab_size)
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    return ids


def _as_id(value: object) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{value!r} is a bool, not a token id")
    return operator.index(value)


def with_bos_eos(ids: list[int], bos: int | None, eos: int | None) -> list[int]:
    if bos is None and eos is None:
        return ids
    return ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])


def pad_rows(rows: list[list[int]], pad_id: int, padding: Padding,
             max_length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists. Returns ids (B, T) long and mask (B, T) bool (True = real token)."""
    lengths = [len(r) for r in rows]
    if padding == "max_length":
        if max_length is None:
            raise ValueError('padding="max_length" needs max_length')
        width = max_length
    elif padding is True:
        width = max(lengths, default=0)
    elif padding is False:
        if len(set(lengths)) > 1:
            raise ValueError(f"rows have different lengths {sorted(set(lengths))}; use padding=True")
        width = lengths[0] if lengths else 0
    else:
        raise ValueError(f'padding must be True, False or "max_length", got {padding!r}')
    # numpy converts nested int lists ~5x faster than torch.tensor; from_numpy shares its memory.
    padded = np.array([r + [pad_id] * (width - len(r)) for r in rows], dtype=np.int64)
    ids = torch.from_numpy(padded.reshape(len(rows), width))  # (B, T), also when B == 0
    mask = torch.arange(width)[None, :] < torch.tensor(lengths, dtype=torch.long).reshape(-1, 1)  # (B, T)
    return ids, mask
