"""Byte-level BPE: train / encode / decode / save / load, with special tokens (minbpe's interface).

The model is Hugging Face `tokenizers` (Rust) configured like GPT-2: text is split by the GPT-2
regex, each piece is turned into its UTF-8 bytes, and BPE merges bytes into tokens. Every one of
the 256 bytes is a token, so any string (and any byte string, via `encode_bytes`) round-trips
exactly. The file format is the ecosystem's `tokenizer.json`.

Special tokens (`<bos> <eos> <pad> <image> </image> <audio> </audio>`, then user extras) take
the first ids. Like tiktoken, user text never turns into special ids unless the caller allows it
(`allowed_special`): a caption that says "<image>" is seven characters of text, not an image slot.

`ClipTokenizer` (clip_tokenizer.py) offers the same interface over open_clip's CLIP vocabulary;
`load_tokenizer` (tokenizer_io.py) restores either from what `save` wrote, and `train_tokenizer`
trains one on text files into a folder.
"""

from __future__ import annotations

import json
import logging
import numbers
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers

from mmembed.checkpoint import atomic_write_text
from mmembed.errors import CheckpointError, UserError
from mmembed.text_encoding import (AllowedSpecial, Padding, check_ids, check_text, check_texts,
                                   content_budget, encode_bounded, pad_rows, prefix_chars, prefix_cut, prefix_holds,
                                   resolve_allowed, split_on_specials, with_bos_eos)
from mmembed.tokenizer_corpus import iter_corpus
from mmembed.tokenizer_file import byte_to_unicode, check_special, check_tokenizer_json, id_to_bytes
from mmembed.tokenizer_io import (TOKENIZER_FILE, _one_line, _read_text, _resolve_file, load_tokenizer,
                                  train_tokenizer)

log = logging.getLogger(__name__)

DEFAULT_SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>", "<image>", "</image>", "<audio>", "</audio>")
_ESCAPED_BYTES = re.compile("([\udc80-\udcff]+)")  # what surrogateescape makes of invalid UTF-8


def vocab_floor(specials: Sequence[str] = DEFAULT_SPECIAL_TOKENS) -> int:
    """The smallest vocabulary a byte-level BPE can have: every byte and every special token."""
    return 256 + len(specials)


class Tokenizer:
    """Byte-level BPE tokenizer. Build one with `Tokenizer.train` or `Tokenizer.load`.

    Args:
        hf: a trained byte-level BPE `tokenizers.Tokenizer` whose special tokens include
            `<bos>`, `<eos>` and `<pad>`. A copy is kept, with truncation and padding off
            (`encode` takes `max_length` itself and pads nothing).
    """

    kind = "bpe"

    def __init__(self, hf: tokenizers.Tokenizer):
        text = hf.to_str()  # serialised once: a 50k-token vocabulary takes a tenth of a second a pass
        spec = json.loads(text)
        check_tokenizer_json(spec)
        if spec.get("truncation") is not None or spec.get("padding") is not None:
            # transformers' `save_pretrained` writes what its last call set; `encode` cuts and pads
            # itself. Turned off in a copy: the caller's keeps its settings.
            hf = tokenizers.Tokenizer.from_str(text)
            hf.no_truncation()
            hf.no_padding()
        self._hf = hf
        # A twin that treats special-token text as plain text: user strings go through it, so
        # "<image>" typed by a user can never become the image slot (tiktoken's default).
        self._plain = tokenizers.Tokenizer.from_str(text)
        self._plain.no_truncation()
        self._plain.no_padding()
        self._plain.encode_special_tokens = True
        added = hf.get_added_tokens_decoder()
        self._special = {t.content: i for i, t in sorted(added.items()) if t.special}
        missing = [t for t in DEFAULT_SPECIAL_TOKENS[:3] if t not in self._special]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}")
        self._id_bytes = id_to_bytes(hf, self._special)
        chars = byte_to_unicode()
        self._byte_ids = [hf.token_to_id(chars[b]) for b in range(256)]  # byte value -> its id
        if None in self._byte_ids:
            raise ValueError("vocabulary lacks some of the 256 single-byte tokens")
        self.vocab_size: int = len(self._id_bytes)
        self.bos_id: int = self._special["<bos>"]
        self.eos_id: int = self._special["<eos>"]
        self.pad_id: int = self._special["<pad>"]

    # ---------------------------------------------------------------- construction, persistence

    @classmethod
    def train(cls, corpus: Iterable[str] | Sequence[str | Path], vocab_size: int,
              special_tokens: Sequence[str] | None = None, *, min_frequency: int = 0,
              show_progress: bool = False) -> Tokenizer:
        """Learn BPE merges on a corpus.

        Args:
            corpus: file paths (`pathlib.Path` / `os.PathLike`, read as UTF-8 lines) or any
                iterable of text strings. A plain `str` item is text, never a path.
            vocab_size: total vocabulary size including the 256 byte tokens and the specials;
                a small corpus may stop short of it (`vocab_size` then reports the real size).
            special_tokens: extra special tokens, after the seven defaults. One that the merges
                also make from the corpus's text (a byte-level form such as "Ã©", the bytes of
                "é") is a UserError once trained: user text would encode to it.
            min_frequency: a pair must occur this often to be merged (0: as often as it takes
                to reach vocab_size, like Hugging Face's trainer).

        Returns:
            The trained tokenizer.
        """
        min_frequency = _check_train_options(special_tokens, min_frequency)
        specials = list(dict.fromkeys([*DEFAULT_SPECIAL_TOKENS, *(special_tokens or ())]))
        for s in specials:
            check_special(s)
        check_vocab_size(vocab_size, specials)
        hf = tokenizers.Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
        hf.train_from_iterator(iter_corpus(corpus), trainer)
        try:
            tok = cls(hf)
        except ValueError as e:  # a special that merges made from the corpus's text
            raise UserError(f"the trained tokenizer is refused: {e}") from None
        log.info("trained byte-level BPE: %d tokens (asked %d)", tok.vocab_size, vocab_size)
        return tok

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a `tokenizer.json`, or the one inside a directory. Bad files raise CheckpointError."""
        file = _resolve_file(path)
        return cls._from_json(_read_text(file), file)

    @classmethod
    def _from_json(cls, text: str, file: Path) -> Tokenizer:
        from mmembed.clip_tokenizer import ClipTokenizer

        if ClipTokenizer.is_marker(text):
            raise CheckpointError(f"{file}: is a CLIP tokenizer marker; use load_tokenizer()")
        try:
            spec = json.loads(text)
        except (ValueError, RecursionError) as e:  # RecursionError: arrays nested thousands deep
            raise CheckpointError(f"{file}: not a valid tokenizer.json ({_one_line(e)})") from None
        try:
            check_tokenizer_json(spec)  # before the Rust library reads it: some options make it panic
        except ValueError as e:
            raise CheckpointError(f"{file}: not an mmembed byte-level BPE tokenizer ({e})") from None
        try:
            hf = tokenizers.Tokenizer.from_str(text)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # plain Exception on a bad file, a PanicException on some
            raise CheckpointError(f"{file}: not a valid tokenizer.json ({_one_line(e)})") from None
        try:
            return cls(hf)
        except ValueError as e:
            raise CheckpointError(f"{file}: not an mmembed byte-level BPE tokenizer ({e})") from None

    def save(self, path: str | Path) -> Path:
        """Write `tokenizer.json` atomically (Hugging Face format). A path not ending in `.json`
        is a directory to write `tokenizer.json` into. Returns the file written."""
        file = Path(path)
        if file.suffix != ".json":
            file = file / TOKENIZER_FILE
        atomic_write_text(file, self._hf.to_str(pretty=True))
        return file

    def to_hf(self) -> tokenizers.Tokenizer:
        """A fresh copy of the underlying Hugging Face tokenizer (special tokens match in text)."""
        return tokenizers.Tokenizer.from_str(self._hf.to_str())

    def __getstate__(self) -> dict:  # DataLoader workers: `encode_special_tokens` is not pickled
        return {"json": self._hf.to_str()}

    def __setstate__(self, state: dict) -> None:
        self.__init__(tokenizers.Tokenizer.from_str(state["json"]))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, special_tokens={list(self._special)})"

    # ---------------------------------------------------------------- special tokens

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token text → id, in id order."""
        return dict(self._special)

    def token_id(self, name: str) -> int:
        """Id of a special token such as `"<image>"`; an unknown name lists the known ones."""
        if name not in self._special:
            raise UserError(f"unknown special token {name!r}; known: {', '.join(self._special)}")
        return self._special[name]

    # ---------------------------------------------------------------- encode / decode

    def encode(self, text: str, *, allowed_special: AllowedSpecial = frozenset(),
               add_bos: bool = False, add_eos: bool = False, max_length: int | None = None) -> list[int]:
        """Text → token ids.

        Args:
            text: any valid Unicode string (lone surrogates raise BadInput).
            allowed_special: special tokens that may be recognised in `text` (a set, or "all");
                any other special-token text is encoded as ordinary characters.
            add_bos, add_eos: wrap the ids in `<bos>` / `<eos>`.
            max_length: keep at most this many ids, bos/eos included (eos is kept). Bounded
                time on huge inputs: only a prefix of about 8 characters per id is encoded.

        Returns:
            The ids.
        """
        check_text(text)  # the whole text: with max_length only a prefix reaches the encoder
        allowed = resolve_allowed(allowed_special, self._special)
        budget = content_budget(max_length, add_bos, add_eos)
        if not allowed and budget is None:
            ids = self._encode_plain(text)
        else:
            ids = encode_bounded(text, budget, lambda t: self._encode_with_specials(t, allowed))
        return with_bos_eos(ids, self.bos_id if add_bos else None, self.eos_id if add_eos else None)

    def encode_batch(self, texts: Sequence[str], *, max_length: int | None = None,
                     padding: Padding = True, add_bos: bool = False, add_eos: bool = False,
                     allowed_special: AllowedSpecial = frozenset()) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode many texts into one right-padded batch (HF's parallel batch encoder).

        Args:
            texts: the strings.
            max_length, add_bos, add_eos, allowed_special: as in `encode`, per text.
            padding: True pads to the longest row; "max_length" pads every row to `max_length`;
                False requires equal lengths.

        Returns:
            ids: (B, T) long, padded with `pad_id`; mask: (B, T) bool, True = real token.
        """
        texts = check_texts(texts)
        allowed = resolve_allowed(allowed_special, self._special)
        if allowed:
            rows = [self.encode(t, allowed_special=allowed, add_bos=add_bos, add_eos=add_eos,
                                max_length=max_length) for t in texts]
            return pad_rows(rows, self.pad_id, padding, max_length)
        budget = content_budget(max_length, add_bos, add_eos)
        cut = texts if budget is None else [t[:prefix_cut(t, prefix_chars(budget))] for t in texts]
        rows = [e.ids for e in self._batch_plain(cut)]
        bos, eos = self.bos_id if add_bos else None, self.eos_id if add_eos else None
        for i, row in enumerate(rows):
            if budget is not None and not prefix_holds(texts[i], len(cut[i]), len(row), budget):
                row = self.encode(texts[i], max_length=budget)  # the prefix was too short
            rows[i] = with_bos_eos(row if budget is None else row[:budget], bos, eos)
        return pad_rows(rows, self.pad_id, padding, max_length)

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special: bool = False) -> str:
        """Ids → text. Ids from `encode` give back the exact input; a cut inside a multi-byte
        character decodes to U+FFFD. `skip_special` drops every special token."""
        return self.decode_bytes(ids, skip_special=skip_special).decode("utf-8", errors="replace")

    def encode_bytes(self, data: bytes) -> list[int]:
        """Arbitrary bytes (invalid UTF-8 included) → ids; `decode_bytes` gives them back exactly."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"encode_bytes takes bytes, got {type(data).__name__}")
        # Valid UTF-8 runs go through BPE; each undecodable byte becomes its single-byte token.
        parts = _ESCAPED_BYTES.split(bytes(data).decode("utf-8", errors="surrogateescape"))
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i % 2 == 0:
                ids += self._encode_plain(part) if part else []
            else:
                ids += [self._byte_ids[ord(c) - 0xDC00] for c in part]
        return ids

    def decode_bytes(self, ids: Sequence[int] | torch.Tensor, *, skip_special: bool = False) -> bytes:
        """Ids → the exact bytes they stand for (special tokens as their UTF-8 text)."""
        ids = check_ids(ids, self.vocab_size)
        if skip_special:
            specials = set(self._special.values())
            ids = [i for i in ids if i not in specials]
        table = self._id_bytes
        return b"".join([table[i] for i in ids])

    # ---------------------------------------------------------------- internals

    def _encode_plain(self, text: str) -> list[int]:
        try:
            return self._plain.encode(text, add_special_tokens=False).ids
        except TypeError:
            check_text(text)  # names the lone surrogate if that is the cause
            raise

    def _batch_plain(self, texts: list[str]) -> list[tokenizers.Encoding]:
        try:
            return self._plain.encode_batch_fast(texts, add_special_tokens=False)
        except TypeError:
            for t in texts:
                check_text(t)
            raise

    def _encode_with_specials(self, text: str, allowed: frozenset[str]) -> list[int]:
        ids: list[int] = []
        for piece, is_special in split_on_specials(text, allowed):
            ids += [self._special[piece]] if is_special else self._encode_plain(piece)
        return ids


# Four times the largest vocabulary in use (Gemma's 262,144). The trainer reserves ~70 bytes per
# vocabulary entry up front: 2,000,000,000 asked it for 141 GB and aborted the process.
MAX_VOCAB = 2**20


def check_vocab_size(vocab_size: object, specials: Sequence[str] = DEFAULT_SPECIAL_TOKENS) -> None:
    """UserError unless `vocab_size` is an int between `vocab_floor(specials)` and MAX_VOCAB."""
    floor = vocab_floor(specials)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise UserError(f"vocab_size must be an integer, got {vocab_size!r}")
    if vocab_size < floor:
        raise UserError(f"vocab_size={vocab_size} is below the {floor} byte and special tokens")
    if vocab_size > MAX_VOCAB:
        raise UserError(f"vocab_size={vocab_size:,} is above {MAX_VOCAB:,}")


def _check_train_options(special_tokens: object, min_frequency: object) -> int:
    """min_frequency as an int. UserError for a str of special tokens (it was split into characters:
    "special token '<' could arise from plain text"), a set of them (its order, which numbers the
    tokens, changes from run to run) or a min_frequency the Rust trainer cannot hold (a raw
    OverflowError); numpy's integers are integers."""
    if isinstance(special_tokens, (str, bytes)):
        raise UserError(f"special_tokens must be a list of strings, got {special_tokens!r}; "
                        f"pass [{special_tokens!r}] for one token")
    if special_tokens is not None and not isinstance(special_tokens, Sequence):
        raise UserError(f"special_tokens must be a list of strings (in order: it numbers the tokens), got a "
                        f"{type(special_tokens).__name__}")
    if (isinstance(min_frequency, (bool, np.bool_)) or not isinstance(min_frequency, numbers.Integral)
            or not 0 <= min_frequency < 2**64):
        raise UserError(f"min_frequency must be an integer >= 0 (how often a pair occurs to be merged), "
                        f"got {min_frequency!r}")
    return int(min_frequency)


__all__ = ["DEFAULT_SPECIAL_TOKENS", "Tokenizer", "byte_to_unicode", "load_tokenizer",
           "train_tokenizer"]
