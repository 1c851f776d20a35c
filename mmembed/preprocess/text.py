"""Text preprocessing: a caption → token ids (T,) with BOS/EOS, truncated to `max_length`.

Accepted items: `str`, or UTF-8 `bytes` (invalid bytes → BadInput naming the offset).
Captions are stripped of surrounding whitespace (CSV cells and JSON strings often carry a
trailing newline); an empty or whitespace-only caption is rejected. A pathological caption
(1 MB) is cut to a character budget before tokenizing, so its cost is bounded by `max_length`
rather than by the caption's size.

Truncation keeps EOS as the last id (CLIP's convention): text towers that pool at EOS still
find it in a truncated caption.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from mmembed.errors import BadInput, ConfigError
from mmembed.modality import Modality

# characters tokenized per id of budget; byte-level BPE tokens average 3-5 characters, so 16
# leaves ample room, and the loop in `_encode` widens the window in the rare case it is not
CHARS_PER_TOKEN_BUDGET = 16


class TokenizerLike(Protocol):
    """The part of `mmembed.tokenizer.Tokenizer` (and ClipTokenizer) this module uses."""

    bos_id: int
    eos_id: int
    pad_id: int

    def encode(
        self, text: str, *, add_bos: bool = False, add_eos: bool = False, max_length: int | None = None
    ) -> list[int]: ...


class TextPreprocessor:
    """Caption → LongTensor (T,) of token ids, T ≤ `max_length` (BOS/EOS included).

    Args:
        tokenizer: the model's tokenizer (passed by the builder, not the config).
        max_length: most ids per caption, special tokens included (CLIP: 77).
        add_bos, add_eos: wrap the ids in the tokenizer's BOS / EOS.
        train: accepted for a uniform builder interface; text has no augmentation.

    Shapes: `__call__` returns (T,) long; `collate` returns ids (B, T_max) padded with
    `tokenizer.pad_id` and a (B, T_max) bool mask, True = real token.
    """

    modality = Modality.TEXT
    stochastic = False
    random_options = ()

    def __init__(
        self,
        tokenizer: TokenizerLike,
        *,
        max_length: int = 77,
        add_bos: bool = True,
        add_eos: bool = True,
        train: bool = False,
    ) -> None:
        n_special = int(add_bos) + int(add_eos)
        if max_length <= n_special:
            raise ConfigError(
                f"text preprocess: max_length must exceed the {n_special} special tokens, got {max_length}"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.add_bos, self.add_eos = add_bos, add_eos
        self.train = train

    def __call__(self, item: Any) -> Tensor:
        """One caption → (T,) int64 ids. Raises BadInput for empty, non-text or invalid UTF-8."""
        text = _as_text(item).strip()
        if not text:
            raise BadInput("empty caption")
        budget = self.max_length - int(self.add_bos) - int(self.add_eos)
        ids = _encode(self.tokenizer, text, budget)
        if self.add_bos:
            ids = [self.tokenizer.bos_id, *ids]
        if self.add_eos:
            ids = [*ids, self.tokenizer.eos_id]
        return torch.tensor(ids, dtype=torch.long)

    def collate(self, samples: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Right-pad (T_i,) samples → ids (B, T_max) and mask (B, T_max)."""
        length = max(s.numel() for s in samples)
        ids = torch.full((len(samples), length), self.tokenizer.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(samples), length, dtype=torch.bool)  # (B, T)
        for i, s in enumerate(samples):
            ids[i, : s.numel()] = s
            mask[i, : s.numel()] = True
        return ids, mask

    def __repr__(self) -> str:
        return f"TextPreprocessor(max_length={self.max_length}, add_bos={self.add_bos}, add_eos={self.add_eos})"


def _as_text(item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, (bytes, bytearray, memoryview)):
        try:
            return bytes(item).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadInput(f"caption is not valid UTF-8 (byte {e.start}: {e.reason})") from None
    raise BadInput(f"caption must be a string, got {type(item).__name__}")


def _encode(tokenizer: TokenizerLike, text: str, budget: int) -> list[int]:
    """The first `budget` ids of `text`, tokenizing only O(budget) characters of it.

    The window is cut just before a space or newline that ends a word: BPE pre-tokenizers (GPT-2's
    regex, CLIP's word split) never merge across that point, so the prefix's ids equal the
    full caption's first ids exactly. Text without such a boundary (CJK, a 1 MB run of one
    character) is cut mid-word and asked for twice the budget, keeping the edge effects of
    the cut far beyond the ids we keep. The window widens until it holds enough ids.
    """
    window = budget * CHARS_PER_TOKEN_BUDGET
    while len(text) > window:
        cut = _word_boundary(text, window)
        ids = tokenizer.encode(text[: cut or window])
        if len(ids) > (budget if cut else 2 * budget):
            return ids[:budget]
        window *= 4
    return tokenizer.encode(text)[:budget]


def _word_boundary(text: str, end: int) -> int | None:
    """The largest k in (end/2, end] with text[k] a space or newline and text[k-1] no whitespace, or
    None. Only those two: `str.isspace` also holds for \x1c-\x1f, which GPT-2's regex reads as
    punctuation and joins to its neighbours (as `text_encoding.prefix_cut` does)."""
    for k in range(end, end // 2, -1):
        if text[k] in " \n" and not text[k - 1].isspace():
            return k
    return None
