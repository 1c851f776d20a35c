"""Text preprocessing: a caption → token ids (T,) with BOS/EOS, truncated to `max_length`.

Accepted items: `str`, or UTF-8 `bytes` (invalid bytes → BadInput naming the offset).
Captions are stripped of surrounding whitespace (CSV cells and JSON strings often carry a
trailing newline); an empty or whitespace-only caption is rejected. A pathological caption
(1 MB) costs what `max_length` asks, not its size: the tokenizer encodes only a prefix
(`text_encoding.encode_bounded`), whose ids are the whole caption's first ones.

Truncation keeps EOS as the last id (CLIP's convention): text towers that pool at EOS still
find it in a truncated caption.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from mmembed.errors import BadInput, ConfigError
from mmembed.modality import Modality



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

    def example(self) -> Any:
        """A caption cut at `max_length` ids (see `Preprocessor.example`): a word is at least one token."""
        return "a " * self.max_length

    def __call__(self, item: Any) -> Tensor:
        """One caption → (T,) int64 ids. Raises BadInput for empty, non-text or invalid UTF-8."""
        text = _as_text(item).strip()
        if not text:
            raise BadInput("empty caption")
        # the tokenizer bounds the work itself (a prefix cut where its pre-tokenizer never merges
        # across, after CLIP's cleaning for the CLIP tokenizer): the first ids of the whole caption
        ids = self.tokenizer.encode(text, add_bos=self.add_bos, add_eos=self.add_eos, max_length=self.max_length)
        if len(ids) <= self.add_bos + self.add_eos:  # e.g. "&nbsp;", which CLIP's cleaning turns into nothing
            raise BadInput(f"empty caption (nothing is left of {text[:40]!r} to tokenise)")
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
