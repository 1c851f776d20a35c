"""Tokenizers on disk: the file name, finding and reading a saved `tokenizer.json`, restoring either
kind from what `save` wrote (`load_tokenizer`), and the CLI's `mmembed tokenizer train`
(`train_tokenizer`: byte-level BPE trained on text files into a folder). The tokenizers themselves
are tokenizer.py (`Tokenizer`) and clip_tokenizer.py (`ClipTokenizer`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mmembed.checkpoint import make_output_folder
from mmembed.errors import CheckpointError, UserError
from mmembed.tokenizer_corpus import check_corpus_file, holds_text

if TYPE_CHECKING:
    from mmembed.clip_tokenizer import ClipTokenizer
    from mmembed.tokenizer import Tokenizer

TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(path_or_kind: str | Path) -> Tokenizer | ClipTokenizer:
    """Restore what `Tokenizer.save` or `ClipTokenizer.save` wrote (a file or its directory).

    The string "clip" (when no such file exists) gives a fresh `ClipTokenizer`.
    """
    from mmembed.clip_tokenizer import ClipTokenizer
    from mmembed.tokenizer import Tokenizer

    if str(path_or_kind) == "clip" and not Path(path_or_kind).exists():
        return ClipTokenizer()
    file = _resolve_file(path_or_kind)
    text = _read_text(file)
    if ClipTokenizer.is_marker(text):
        return ClipTokenizer.load(file)
    return Tokenizer._from_json(text, file)


def train_tokenizer(corpus_files: Sequence[str | Path], vocab_size: int, out_dir: str | Path,
                    *, show_progress: bool = False, overwrite: bool = False) -> Path:
    """Train byte-level BPE on text files and write `out_dir/tokenizer.json`; returns that path.

    A bad vocab_size, a missing corpus file, or only empty (or whitespace-only) ones, is a
    UserError naming them, and so is a tokenizer.json already in `out_dir` unless `overwrite`, and
    a training run's folder in any case, finished, under way or interrupted (its weights belong to
    its tokenizer); all checked before any training starts and before `out_dir` is made, and again
    just before the file is written (without `overwrite`, a file another process wrote meanwhile is
    never replaced: the file is hard-linked into place).
    """
    from mmembed.tokenizer import Tokenizer, check_vocab_size

    check_vocab_size(vocab_size)
    files = [Path(f) for f in corpus_files]
    if not files:
        raise UserError("no corpus files given")
    for f in files:
        check_corpus_file(f)
    if not any(holds_text(f) for f in files):
        raise UserError(f"the corpus is empty ({', '.join(str(f) for f in files)}; whitespace only counts as empty): "
                        "a tokenizer learns its merges from text")
    _refuse_run(Path(out_dir))
    target = make_output_folder(out_dir) / TOKENIZER_FILE  # before the training, which a bad --out would lose
    _refuse_existing(target, overwrite)
    tok = Tokenizer.train(files, vocab_size, show_progress=show_progress)
    return _save_into(tok, target, overwrite)


def _refuse_run(folder: Path) -> None:
    from mmembed.train.run_dir import run_evidence

    run = run_evidence(folder)
    if run:  # a same-size tokenizer loaded (or resumed with), every id another word
        raise UserError(f"{folder} is a training run's folder ({run}): its weights belong to its tokenizer.json; "
                        "write the new tokenizer to another folder")


def _refuse_existing(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_file():
        raise UserError(f"{target} exists and is not a file: the tokenizer is written there")
    if (target.exists() or target.is_symlink()) and not overwrite:  # a dangling link: the exclusive link fails on it
        raise UserError(f"{target} already exists (a run's own tokenizer, if the folder is a run): choose another "
                        "--out, or pass --overwrite")


def _save_into(tok: Tokenizer, target: Path, overwrite: bool) -> Path:
    """Write `tok` to `target`, the checks made again first: while it trained, a run could start (and
    finish) in the folder, or another `tokenizer train` write there, and the file was replaced without
    a word. No lock is taken: a `.lock` left by a killed save would mark the folder as a run's."""
    folder = target.parent
    _refuse_run(folder)
    _refuse_existing(target, overwrite)
    if overwrite:
        return tok.save(target)
    tmp = tok.save(folder / f".{TOKENIZER_FILE}.{os.getpid()}.json")
    try:
        _place_new(tmp, target)
    except FileExistsError:  # written since the check above
        _refuse_existing(target, overwrite)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _place_new(tmp: Path, target: Path) -> None:
    """Move `tmp` to `target` unless a file is there: a rename would replace one another process wrote
    since the check (FileExistsError instead)."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: claim the name, then fill it in one rename
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        os.replace(tmp, target)


def _resolve_file(path: str | Path) -> Path:
    p = Path(path)
    file = p / TOKENIZER_FILE if p.is_dir() else p
    if not file.is_file():
        raise CheckpointError(f"tokenizer file not found: {file}")
    return file


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable tokenizer file ({_one_line(e)})") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]
