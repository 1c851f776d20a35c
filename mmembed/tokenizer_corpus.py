"""What BPE training reads: a corpus of text files or strings, fed to the trainer line by line,
with any pre-token longer than the trainer can handle cut into pieces (`Tokenizer.train`), and
whether a corpus file holds text at all (`train_tokenizer`'s check before it trains)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import pre_tokenizers

from mmembed.errors import UserError
from mmembed.text_encoding import SURROGATE

log = logging.getLogger(__name__)

# At most this many characters of one pre-token per training string: the trainer's time grows with
# the square of a pre-token's length ('a' * 200,000 took 26 s, a million 11 min). A text whose
# pre-tokens are all shorter reaches the trainer whole, and trains exactly as it did uncut.
RUN_CHUNK = 1000
PRE_TOKENS = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # as the trainer splits


def iter_corpus(corpus: Iterable[str] | Sequence[str | Path]) -> Iterator[str]:
    """The training strings of `corpus`: each line of each path (`os.PathLike`; bad UTF-8 read
    as U+FFFD), each `str` item as it is (one holding lone surrogates is skipped and counted),
    long pre-tokens cut by `cut_long_runs`."""
    if isinstance(corpus, (str, bytes)):
        raise UserError("corpus must be a list of file paths or an iterable of strings, not one string")
    skipped = 0
    for item in corpus:
        if isinstance(item, os.PathLike):
            check_corpus_file(Path(item))
            with open(item, encoding="utf-8", errors="replace", newline="") as f:  # bad UTF-8 -> U+FFFD
                for line in f:
                    yield from cut_long_runs(line)
        elif isinstance(item, str):
            if SURROGATE.search(item):  # not valid Unicode: cannot be encoded, so not learnt
                skipped += 1
            else:
                yield from cut_long_runs(item)
        else:
            raise UserError(f"corpus items must be str or paths, got {type(item).__name__}")
    if skipped:
        log.warning("skipped %d corpus strings with lone surrogates (not valid Unicode)", skipped)


def cut_long_runs(text: str) -> Iterator[str]:
    """`text` in pieces (joined, the same text), cut only inside a pre-token longer than RUN_CHUNK
    characters (a CJK paragraph or a URL without spaces is many short pre-tokens: not cut)."""
    if len(text) <= RUN_CHUNK:
        yield text
        return
    start = 0
    for _, (first, end) in PRE_TOKENS.pre_tokenize_str(text):  # character offsets into `text`
        for cut in range(first + RUN_CHUNK, end, RUN_CHUNK):
            yield text[start:cut]
            start = cut
    yield text[start:]


def check_corpus_file(file: Path) -> None:
    """UserError unless `file` is a UTF-8 (or ASCII) file: a folder is said to be one, not "not found"."""
    if file.is_dir():
        raise UserError(f"corpus file {file} is a folder, not a file")
    if not file.is_file():
        raise UserError(f"corpus file not found: {file}")
    from mmembed.data.manifest import check_utf8ish

    check_utf8ish(file, "corpus")  # read as UTF-8, a UTF-16 file trained a vocabulary of NULs and U+FFFD


def holds_text(file: Path) -> bool:
    """Whether a corpus file holds anything but whitespace (read up to its first such character)."""
    with open(file, encoding="utf-8", errors="replace") as f:
        while chunk := f.read(1 << 20):
            if not chunk.isspace():
                return True
    return False
