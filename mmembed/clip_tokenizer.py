"""open_clip's CLIP BPE tokenizer behind mmembed's tokenizer interface.

Use it with CLIP-style text towers (and pretrained open_clip weights): the vocabulary
(49,408 tokens, shipped inside open_clip) and the ids are exactly open_clip's. What CLIP does
differs from our byte-level BPE in ways that matter:

- Text is cleaned before it is tokenized (ftfy, HTML unescape, whitespace collapsed and, by
  default, lowercased), and BPE marks word *ends* rather than spaces. So decode is NOT an exact
  round trip: `decode(encode("A  Cat!"))` is `"a cat ! "` (open_clip's own decode).
- bos/eos are `<start_of_text>` / `<end_of_text>`; pad is id 0 (as in open_clip, the id of "!":
  only the mask tells padding apart). open_clip's text towers pool at the highest id, i.e. at
  `<end_of_text>`, so encode with `add_bos=True, add_eos=True` for them.
- `encode_batch` truncates to `context_length` (77) by default, keeping `<end_of_text>`, like
  `open_clip.tokenize`; `padding="max_length"` reproduces its (B, 77) tensor.
- There is no bytes API (`encode_bytes`): CLIP tokenizes cleaned text, not bytes.

What it promises, and its tests check: ids equal open_clip's tokenizer on the same text.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Literal

import torch

from mmembed.checkpoint import atomic_write_json
from mmembed.errors import CheckpointError, UserError
from mmembed.tokenizer_io import TOKENIZER_FILE
from mmembed.text_encoding import (
    AllowedSpecial,
    Padding,
    check_ids,
    check_text,
    check_texts,
    content_budget,
    encode_bounded,
    pad_rows,
    resolve_allowed,
    with_bos_eos,
)

log = logging.getLogger(__name__)

CLIP_CONTEXT_LENGTH = 77
# CLIP towers use 77 (Long-CLIP 248); far above any text tower's positional table, and a padded
# batch of it stays small: a tokenizer file's 10**12 was a MemoryError at the first padded batch
MAX_CONTEXT_LENGTH = 1 << 14
_MARKER_FORMAT = "mmembed.clip_tokenizer/1"
_CLEAN_MODES = ("lower", "whitespace", "canonicalize")
_CLEAN_WINDOW = 1 << 16  # characters of a huge caption cleaned before it is cut (open_clip cleans all of it)
# ASCII whitespace, and the Unicode blanks that no single-byte encoding holds (U+3000, U+2028…), so
# that ftfy never reads them as mojibake (U+00A0 is byte A0 of "à" in UTF-8 read as Latin-1). Their
# runs are shrunk before the window is cut: a long run hid the words after it
_BLANK = r"[\t\n\x0c\r \u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
_BLANK_RUN = re.compile(_BLANK + "{6,}")
_BLANKS = re.compile(_BLANK + "+")
# open_clip's word pattern without its special-token alternatives, so that user text spelling
# "<end_of_text>" stays text unless allowed (we split on allowed specials ourselves).
_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class ClipTokenizer:
    """CLIP's BPE tokenizer (open_clip's `SimpleTokenizer`) with mmembed's interface.

    Args:
        context_length: the text tower's sequence length; `encode_batch`'s default max_length.
        clean: open_clip's text cleaning: "lower" (CLIP's), "whitespace" or "canonicalize".
    """

    kind = "clip"

    def __init__(self, context_length: int = CLIP_CONTEXT_LENGTH,
                 clean: Literal["lower", "whitespace", "canonicalize"] = "lower"):
        if (isinstance(context_length, bool) or not isinstance(context_length, int)
                or not 2 <= context_length <= MAX_CONTEXT_LENGTH):
            raise UserError(f"context_length must be an int in [2, {MAX_CONTEXT_LENGTH}], got {context_length!r}")
        if clean not in _CLEAN_MODES:
            raise UserError(f"unknown clean mode {clean!r}; valid: {', '.join(_CLEAN_MODES)}")
        try:  # imported here: only CLIP users pay for open_clip (and its `regex` dependency)
            import regex
            from open_clip.tokenizer import SimpleTokenizer
        except ImportError as e:
            raise UserError(f"the CLIP tokenizer needs open_clip_torch installed ({e})") from None

        self._words = regex.compile(_WORDS, regex.IGNORECASE)
        self._patterns: dict[frozenset[str], Any] = {}  # the word pattern with allowed specials, by set
        self._tok = SimpleTokenizer(context_length=context_length, clean=clean)
        self.context_length = context_length
        self.clean = clean
        self.vocab_size: int = self._tok.vocab_size
        self.bos_id: int = self._tok.sot_token_id
        self.eos_id: int = self._tok.eot_token_id
        self.pad_id: int = 0
        self._special = {"<start_of_text>": self.bos_id, "<end_of_text>": self.eos_id}

    # ---------------------------------------------------------------- special tokens

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token text → id."""
        return dict(self._special)

    def token_id(self, name: str) -> int:
        """Id of a special token; "<bos>", "<eos>" and "<pad>" are accepted as aliases."""
        aliases = {"<bos>": self.bos_id, "<eos>": self.eos_id, "<pad>": self.pad_id}
        if name in self._special:
            return self._special[name]
        if name in aliases:
            return aliases[name]
        raise UserError(f"unknown special token {name!r}; known: {', '.join([*self._special, *aliases])}")

    # ---------------------------------------------------------------- encode / decode

    def encode(self, text: str, *, allowed_special: AllowedSpecial = frozenset(),
               add_bos: bool = False, add_eos: bool = False, max_length: int | None = None) -> list[int]:
        """Text → CLIP token ids (after CLIP's cleaning).

        Args:
            text: any valid Unicode string (lone surrogates raise BadInput).
            allowed_special: "<start_of_text>"/"<end_of_text>" that may be recognised in the
                (cleaned) text; by default they are encoded as ordinary characters.
            add_bos, add_eos: wrap the ids in `<start_of_text>` / `<end_of_text>`.
            max_length: keep at most this many ids, bos/eos included (eos is kept); only a
                prefix of the text is encoded, so huge captions take bounded time. The text is
                cleaned before it is cut (ftfy's rules are not local: HTML unescaping depends on
                the whole text, mojibake repair spans spaces), from `_CLEAN_WINDOW` characters
                once long runs of whitespace are shrunk (`_shrink_run`), grown while the
                prefix's words give fewer ids than asked (`_encode_prefix`).

        Returns:
            The ids.
        """
        check_text(text)
        allowed = resolve_allowed(allowed_special, self._special)
        budget = content_budget(max_length, add_bos, add_eos)
        encode = partial(self._encode_cleaned, allowed=allowed)
        if budget is None:
            ids = encode(self._tok.clean_fn(text))
        else:
            ids = self._encode_prefix(text, budget, encode)
        return with_bos_eos(ids, self.bos_id if add_bos else None, self.eos_id if add_eos else None)

    def _encode_prefix(self, text: str, budget: int, encode: Callable[[str], list[int]]) -> list[int]:
        """The whole text's first `budget` ids, from a cleaned prefix of it (blank runs shrunk)."""
        window = max(_CLEAN_WINDOW, 64 * budget)
        while True:
            prefix, end = _shrunk_prefix(text, window) if len(text) > window else (text, len(text))
            if end == len(text):
                return encode_bounded(self._tok.clean_fn(prefix), budget, encode)
            # ftfy leaves HTML entities to open_clip in a line holding "<": so must the prefix's line
            tag = " <" if text.find("<", end, _line_end(text, end)) >= 0 else ""
            # the cut can fall inside a word, an entity ("&nb") or mojibake, which then clean to
            # other text; the words before those last ones clean as in the whole caption
            cleaned = self._tok.clean_fn(prefix + tag)
            ids = encode_bounded(_without_last_words(cleaned, 2), budget, encode)
            if len(ids) == budget:
                return ids
            window *= 4  # blanks or entities that clean to nothing filled the window

    def encode_batch(self, texts: Sequence[str], *, max_length: int | None = None,
                     padding: Padding = True, add_bos: bool = False, add_eos: bool = False,
                     allowed_special: AllowedSpecial = frozenset()) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode many texts into one right-padded batch.

        Args:
            texts: the strings.
            max_length: per-row limit, bos/eos included; None means `context_length`.
            padding: True pads to the longest row; "max_length" pads every row to `max_length`
                (open_clip's fixed (B, 77)); False requires equal lengths.
            add_bos, add_eos, allowed_special: as in `encode`.

        Returns:
            ids: (B, T) long, padded with `pad_id` (0); mask: (B, T) bool, True = real token.
        """
        max_length = self.context_length if max_length is None else max_length
        rows = [self.encode(t, allowed_special=allowed_special, add_bos=add_bos, add_eos=add_eos,
                            max_length=max_length) for t in check_texts(texts)]
        return pad_rows(rows, self.pad_id, padding, max_length)

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special: bool = False) -> str:
        """Ids → open_clip's decoding: cleaned text, a space after every word end (not exact)."""
        ids = check_ids(ids, self.vocab_size)
        if skip_special:
            ids = [i for i in ids if i not in (self.bos_id, self.eos_id)]
        return self._tok.decode(ids)

    def _encode_cleaned(self, cleaned: str, allowed: frozenset[str]) -> list[int]:
        if not allowed:
            return [i for word in self._words.findall(cleaned) for i in self._encode_word(word)]
        # open_clip's own split: the specials are alternatives of its word pattern (case-insensitive),
        # so ".<end_of_text>" is one run of punctuation there, and "<END_OF_TEXT>" one word; only a
        # match spelled exactly as an allowed special is that special
        ids: list[int] = []
        for word in self._words_with(allowed).findall(cleaned):
            ids += [self._special[word]] if word in allowed else self._encode_word(word)
        return ids

    def _words_with(self, allowed: frozenset[str]) -> Any:
        import regex

        if allowed not in self._patterns:
            specials = "|".join(regex.escape(s) for s in sorted(allowed))
            self._patterns[allowed] = regex.compile(f"{specials}|{_WORDS}", regex.IGNORECASE)
        return self._patterns[allowed]

    def _encode_word(self, word: str) -> list[int]:
        tok = self._tok
        mapped = "".join(tok.byte_encoder[b] for b in word.encode("utf-8"))
        return [tok.encoder[piece] for piece in tok.bpe(mapped).split(" ")]

    # ---------------------------------------------------------------- persistence

    @staticmethod
    def is_marker(text: str) -> bool:
        """Whether a tokenizer file's text is the marker `ClipTokenizer.save` writes."""
        if len(text) > 65536:  # markers are tiny; a real tokenizer.json is megabytes
            return False
        try:
            obj = json.loads(text)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: arrays nested thousands deep
            return False
        return isinstance(obj, dict) and obj.get("kind") == "clip"

    def save(self, path: str | Path) -> Path:
        """Write a small JSON marker (the vocabulary ships with open_clip). A path not ending in
        `.json` is a directory to write `tokenizer.json` into. Returns the file written."""
        file = Path(path)
        if file.suffix != ".json":
            file = file / TOKENIZER_FILE
        marker = {"kind": "clip", "format": _MARKER_FORMAT, "context_length": self.context_length,
                  "clean": self.clean, "vocab_sha256": _vocab_sha256()}
        atomic_write_json(file, marker)
        return file

    @classmethod
    def load(cls, path: str | Path) -> ClipTokenizer:
        """Restore from a marker file (or a directory holding `tokenizer.json`)."""
        p = Path(path)
        file = p / TOKENIZER_FILE if p.is_dir() else p
        try:
            obj = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"tokenizer file not found: {file}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise CheckpointError(f"{file}: unreadable CLIP tokenizer marker ({e})") from None
        if not isinstance(obj, dict) or obj.get("kind") != "clip":
            raise CheckpointError(f"{file}: not a CLIP tokenizer marker (no \"kind\": \"clip\")")
        ctx, clean = obj.get("context_length"), obj.get("clean", "lower")
        if isinstance(ctx, bool) or not isinstance(ctx, int) or not 2 <= ctx <= MAX_CONTEXT_LENGTH:
            raise CheckpointError(f"{file}: bad CLIP marker: context_length must be an int in "
                                  f"[2, {MAX_CONTEXT_LENGTH}], got {ctx!r}")
        if clean not in _CLEAN_MODES:
            raise CheckpointError(f"{file}: bad CLIP marker: clean must be one of {', '.join(_CLEAN_MODES)}, "
                                  f"got {clean!r}")
        if obj.get("vocab_sha256") not in (None, _vocab_sha256()):
            log.warning("%s: open_clip's installed CLIP vocabulary differs from the one saved with "
                        "this tokenizer; ids may not match the trained model", file)
        return cls(context_length=ctx, clean=clean)

    def __getstate__(self) -> dict:  # rebuild in DataLoader workers instead of pickling 49k merges
        return {"context_length": self.context_length, "clean": self.clean}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __repr__(self) -> str:
        return f"ClipTokenizer(context_length={self.context_length}, clean={self.clean!r})"


def _shrunk_prefix(text: str, window: int) -> tuple[str, int]:
    """The first `window` characters (a few more when a blank run ends them) of `text` with every
    run of 6+ blanks shrunk (`_shrink_run`), and where in `text` they end; reading no further into
    `text` than they need: a huge caption keeps its bounded time."""
    pieces, size, pos = [], 0, 0
    while size < window:
        found = _BLANK_RUN.search(text, pos, pos + window - size + 6)  # a run starting within the budget
        if found is None:
            end = min(len(text), pos + window - size)
            return "".join([*pieces, text[pos:end]]), end
        end = _BLANKS.match(text, found.start()).end()  # the whole run (the search stopped at the budget)
        run = _shrink_run(text[found.start():end])
        pieces += [text[pos:found.start()], run]
        size, pos = size + found.start() - pos + len(run), end
    return "".join(pieces), pos


def _shrink_run(run: str) -> str:
    """A run of blanks as its first three and last two characters, with one of each other blank
    it held between, before and after one newline when it held one. CLIP's cleaning ends by
    collapsing whitespace; before that, ftfy cleans line by line (newlines kept), reads at most
    three blanks beside a word (a-grave's "Ã " with no second space) and repairs mojibake in a
    whole line only when every character of it has a byte (so a U+3000 is kept in its line); the
    ids stay open_clip's, lines over ftfy's 1,000,000 characters aside. A run of 70,000 spaces
    then fits the window with the words after it."""
    first, newline, last = run[3:-2].partition("\n")
    last = last.rpartition("\n")[2]
    return run[:3] + "".join(dict.fromkeys(first)) + newline + "".join(dict.fromkeys(last)) + run[-2:]


def _line_end(text: str, pos: int) -> int:
    """Where the line holding `text[pos]` ends (ftfy cleans line by line)."""
    end = text.find("\n", pos)
    return len(text) if end < 0 else end


def _without_last_words(cleaned: str, n: int, tail: int = 32) -> str:
    """`cleaned` (words joined by single spaces) less its last `n` words, a word longer than `tail`
    characters (CJK prose, a URL, mojibake without spaces) cut back by `tail` only: that is all a
    cut can garble (an entity, a mojibake sequence), and dropping such a word whole left too few ids,
    so the window grew until the whole megabyte was cleaned."""
    end = len(cleaned)
    for _ in range(n):
        space = cleaned.rfind(" ", 0, end)
        end = space if end - space <= tail else end - tail  # (space is -1 where there is none)
    return cleaned[:max(end, 0)]


@lru_cache(maxsize=1)
def _vocab_sha256() -> str:
    from open_clip.tokenizer import default_bpe

    return hashlib.sha256(Path(default_bpe()).read_bytes()).hexdigest()
