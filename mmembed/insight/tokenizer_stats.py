"""Tokenizer trade-off: what a bigger BPE vocabulary buys (compression) and costs (parameters).

    rows = tokenizer_stats(["captions.txt"], parse_vocab_sizes("1k,4k,16k,64k"))
    plot_tokenizer_stats(rows, "tokenizer_stats.png")

For each vocabulary size a byte-level BPE (`mmembed.tokenizer.Tokenizer`) is trained on the
corpus minus a held-out split (every `holdout_every`-th non-blank line), and compression is
measured on the held-out lines only: a large vocabulary trained on a small corpus memorises
whole lines, which would flatter its compression on text it has already seen. The training-set
figure is kept beside it so that gap is visible.

A small corpus runs out of pairs to merge before a large size is reached; BPE then stops early
and the row reports the size actually reached (`vocab`), which is also what the embedding
table is sized by.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mmembed.errors import UserError
from mmembed.insight.plotting import pyplot, save_png
from mmembed.tokenizer import DEFAULT_SPECIAL_TOKENS, MAX_VOCAB, Tokenizer
from mmembed.tokenizer_corpus import check_corpus_file

log = logging.getLogger(__name__)

# The demo's text tower and decoder width (configs/demo.yaml: encoder_args.width, decoder.width).
DEFAULT_EMBED_WIDTH = 128
DEFAULT_HOLDOUT_EVERY = 10
_SUFFIX = {"": 1, "k": 1024, "m": 1024 ** 2}  # binary, like the demo's vocab_size: 1024 ("1k")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)([kKmM]?)")
_ENCODE_CHUNK = 1024  # lines per encode_batch call: bounds the padded (B, T) batch


@dataclass(frozen=True)
class TokenizerStatsRow:
    """The numbers for one vocabulary size.

    Fields:
        requested: the vocabulary size asked for.
        vocab: the size reached (below `requested` when the corpus ran out of merges).
        chars_per_token: characters / tokens over the held-out lines (higher = better compression).
        chars_per_token_train: the same over the training lines (what the tokenizer has seen).
        tokens_per_line: mean tokens per held-out line (a caption, in a caption corpus).
        embedding_params: vocab × width, one token-embedding table.
        train_seconds: wall time of BPE training.
        held_out_lines: how many lines the held-out figures are measured on.
    """

    requested: int
    vocab: int
    chars_per_token: float
    chars_per_token_train: float
    tokens_per_line: float
    embedding_params: int
    train_seconds: float
    held_out_lines: int


def parse_vocab_sizes(text: str) -> list[int]:
    """"1k,4k,16k,64k" → [1024, 4096, 16384, 65536]: sorted, duplicates dropped.

    A suffix k means 1024 and M means 1024² (binary, as vocabulary sizes are counted: the
    demo's "1k" tokenizer has 1024 tokens); a bare number is taken as is; "1.5k" is 1536.

    Raises:
        UserError: naming the first item that is not such a size, or a size that is not whole.
    """
    sizes = set()
    for item in text.split(","):
        match = _SIZE.fullmatch(item.strip())
        if match is None:
            raise UserError(f"bad vocabulary size {item.strip()!r} in {text!r} (use numbers like 4096, 4k or 1M; "
                            "k = 1024)")
        value = float(match.group(1)) * _SUFFIX[match.group(2).lower()]
        if value != int(value) or value < 1:
            raise UserError(f"vocabulary size {item.strip()!r} is not a positive whole number of tokens")
        sizes.add(int(value))
    return sorted(sizes)


def check_stats_arguments(vocab_sizes: Sequence[int], embed_width: int, holdout_every: int) -> None:
    """UserError for arguments `tokenizer_stats` cannot use, before any tokenizer is trained."""
    if embed_width < 1:
        raise UserError(f"embed width must be positive, got {embed_width}")
    if not vocab_sizes:
        raise UserError("no vocabulary sizes given")
    floor = 256 + len(DEFAULT_SPECIAL_TOKENS)
    if min(vocab_sizes) < floor:
        raise UserError(f"vocabulary size {min(vocab_sizes)} is below the {floor} byte and special tokens")
    if max(vocab_sizes) > MAX_VOCAB:  # was found after training every smaller size
        raise UserError(f"vocabulary size {max(vocab_sizes):,} is above {MAX_VOCAB:,}")
    if holdout_every < 2:
        raise UserError(f"holdout_every must be at least 2, got {holdout_every}")


def split_corpus(lines: Sequence[str], holdout_every: int) -> tuple[list[str], list[str]]:
    """Non-blank lines → (train, held-out): every `holdout_every`-th line (the 10th, 20th...) is held out.

    Lines keep no trailing newline. Raises UserError when no line would be held out.
    """
    if holdout_every < 2:
        raise UserError(f"holdout_every must be at least 2, got {holdout_every}")
    text = [line.rstrip("\r\n") for line in lines]
    text = [line for line in text if line.strip()]
    held = [line for i, line in enumerate(text) if (i + 1) % holdout_every == 0]
    train = [line for i, line in enumerate(text) if (i + 1) % holdout_every != 0]
    if not held:
        raise UserError(f"the corpus has {len(text)} non-blank lines; at least {holdout_every} are needed to hold "
                        f"out every {holdout_every}th line for measuring")
    return train, held


def read_corpus(files: Sequence[str | Path]) -> list[str]:
    """All lines of the corpus files (UTF-8; undecodable bytes → U+FFFD). A missing file is a UserError."""
    if not files:
        raise UserError("no corpus files given")
    lines: list[str] = []
    for f in map(Path, files):
        check_corpus_file(f)
        # Lines end at \n, \r or \r\n only, as when the tokenizer trains on the file:
        # str.splitlines would also cut at U+2028, form feeds and other separators inside a caption.
        with f.open(encoding="utf-8", errors="replace", newline=None) as fh:
            lines += [line.removesuffix("\n") for line in fh]
    return lines


def count_tokens(tok: Tokenizer, lines: Sequence[str]) -> list[int]:
    """Tokens of each line (no bos/eos), in the order given."""
    # Batches of similar length: one long line padded beside a thousand short ones would fill memory.
    order = sorted(range(len(lines)), key=lambda i: len(lines[i]))
    counts = [0] * len(lines)
    for start in range(0, len(order), _ENCODE_CHUNK):
        chunk = order[start:start + _ENCODE_CHUNK]
        _, mask = tok.encode_batch([lines[i] for i in chunk], padding=True)  # (B, T) bool
        for i, n in zip(chunk, mask.sum(dim=1).tolist()):
            counts[i] = n
    return counts


def tokenizer_stats(corpus_files: Sequence[str | Path], vocab_sizes: Sequence[int], *,
                    embed_width: int = DEFAULT_EMBED_WIDTH, holdout_every: int = DEFAULT_HOLDOUT_EVERY,
                    progress: Callable[[int], None] | None = None) -> list[TokenizerStatsRow]:
    """Train a BPE at each vocabulary size and measure it on held-out lines.

    Args:
        corpus_files: UTF-8 text files, one caption (or sentence) per line.
        vocab_sizes: sizes to train, e.g. from `parse_vocab_sizes`.
        embed_width: the token-embedding width for the parameter count (vocab × width).
        holdout_every: every this-many-th non-blank line is held out for measuring.
        progress: called with each size once it is done (e.g. to advance a progress bar).

    Returns:
        One row per size, in the order of `vocab_sizes`.
    """
    check_stats_arguments(vocab_sizes, embed_width, holdout_every)
    train, held = split_corpus(read_corpus(corpus_files), holdout_every)
    return split_stats(train, held, vocab_sizes, embed_width=embed_width, progress=progress)


def split_stats(train: Sequence[str], held: Sequence[str], vocab_sizes: Sequence[int], *,
                embed_width: int = DEFAULT_EMBED_WIDTH,
                progress: Callable[[int], None] | None = None) -> list[TokenizerStatsRow]:
    """`tokenizer_stats` of a corpus already split by `split_corpus` (training, held-out lines):
    the CLI reads and splits it before making its output folder."""
    held_chars = sum(len(line) for line in held)
    train_chars = sum(len(line) for line in train)
    rows = []
    for size in vocab_sizes:
        t0 = time.perf_counter()
        tok = Tokenizer.train([line + "\n" for line in train], size)  # lines as a file iterator gives them
        seconds = time.perf_counter() - t0
        held_tokens = count_tokens(tok, held)
        train_tokens = sum(count_tokens(tok, train))
        rows.append(TokenizerStatsRow(
            requested=size, vocab=tok.vocab_size, chars_per_token=held_chars / max(1, sum(held_tokens)),
            chars_per_token_train=train_chars / max(1, train_tokens),
            tokens_per_line=sum(held_tokens) / len(held), embedding_params=tok.vocab_size * embed_width,
            train_seconds=seconds, held_out_lines=len(held)))
        if tok.vocab_size < size:
            log.info("vocab %d: the corpus ran out of merges at %d tokens", size, tok.vocab_size)
        if progress is not None:
            progress(size)
    return rows


def format_stats_table(rows: Sequence[TokenizerStatsRow], holdout_every: int = DEFAULT_HOLDOUT_EVERY) -> str:
    """A Markdown table of the rows, and a note on how compression was measured."""
    lines = ["| vocab asked | vocab reached | chars/token (held-out) | chars/token (train) | tokens/line "
             "| embedding params | train s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        short = "" if r.vocab == r.requested else " (corpus ran out of merges)"
        lines.append(f"| {r.requested} | {r.vocab}{short} | {r.chars_per_token:.3f} | {r.chars_per_token_train:.3f} "
                     f"| {r.tokens_per_line:.2f} | {r.embedding_params:,} | {r.train_seconds:.2f} |")
    if rows:
        lines += ["", f"Held-out: {rows[0].held_out_lines} lines (every {holdout_every}th non-blank line; a line "
                      "repeated in the corpus may also be among the trained ones); chars/token and tokens/line are "
                      "measured on them."]
    return "\n".join(lines)


def write_stats(rows: Sequence[TokenizerStatsRow], out_dir: str | Path) -> tuple[Path, Path]:
    """Write `tokenizer_stats.json` and `tokenizer_stats.csv` into `out_dir`; returns both paths."""
    from mmembed.checkpoint import atomic_write_json, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = [asdict(r) for r in rows]
    atomic_write_json(out / "tokenizer_stats.json", records)
    fields = list(records[0]) if records else []
    csv = [",".join(fields)] + [",".join(str(rec[f]) for f in fields) for rec in records]
    atomic_write_text(out / "tokenizer_stats.csv", "\n".join(csv) + "\n")
    return out / "tokenizer_stats.json", out / "tokenizer_stats.csv"


def plot_tokenizer_stats(rows: Sequence[TokenizerStatsRow], out_png: str | Path) -> Path:
    """Three panels against the vocabulary size reached (log₂ axis): characters per token
    (held-out and train), tokens per line, embedding-table parameters. Returns `out_png`."""
    if not rows:
        raise UserError("no rows to plot")
    x = [r.vocab for r in rows]
    fig, axes = pyplot().subplots(1, 3, figsize=(13, 3.8))
    panels = [("characters per token", [("held-out", [r.chars_per_token for r in rows]),
                                        ("train", [r.chars_per_token_train for r in rows])]),
              ("tokens per line (held-out)", [("", [r.tokens_per_line for r in rows])]),
              ("embedding-table parameters", [("", [r.embedding_params for r in rows])])]
    for ax, (title, series) in zip(axes, panels):
        for label, y in series:
            ax.plot(x, y, marker="o", linestyle="--" if label == "train" else "-", label=label or None)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(x)), labels=[_short(v) for v in sorted(set(x))])
        ax.minorticks_off()
        ax.set_xlabel("vocabulary size reached")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
    short: dict[tuple[int, float], list[int]] = {}  # say where BPE stopped short of the size asked: one note a
    for r in rows:                                   # point, naming every size asked that stopped there
        if r.vocab < r.requested:
            short.setdefault((r.vocab, r.chars_per_token), []).append(r.requested)
    for (vocab, cpt), asked in short.items():
        axes[0].annotate(f"asked {', '.join(map(str, asked))}", (vocab, cpt), fontsize=7, ha="right",
                         textcoords="offset points", xytext=(-6, -4))
    return save_png(fig, out_png)


def _short(n: int) -> str:
    """4096 → "4k", 1536 → "1.5k", 300 → "300" (k = 1024, as in `parse_vocab_sizes`)."""
    for suffix, unit in (("M", 1024 ** 2), ("k", 1024)):
        if n >= unit and (n * 10) % unit == 0:
            return f"{n / unit:g}{suffix}"
    return str(n)


__all__ = ["DEFAULT_EMBED_WIDTH", "TokenizerStatsRow", "count_tokens", "format_stats_table", "parse_vocab_sizes",
           "plot_tokenizer_stats", "read_corpus", "split_corpus", "split_stats", "tokenizer_stats", "write_stats"]
