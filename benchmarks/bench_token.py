"""B-token: byte-level BPE encode throughput, ours vs Hugging Face `tokenizers` (vs tiktoken).

    python -m benchmarks.bench_token            # ~10 MB of English, vocab 8000
    python -m benchmarks.bench_token --quick    # ~1 MB

The corpus is English that ships with Python (the pydoc topics and stdlib docstrings), its
paragraphs repeated in a seeded shuffle up to the target size. One vocabulary is trained once
(`Tokenizer.train`, 8000 tokens); the anchors read the very same merges: HF `tokenizers` loads
the saved `tokenizer.json`, and tiktoken (when importable) gets an `Encoding` built from the
same ranks. Everything runs single-threaded (RAYON_NUM_THREADS=1, set before `tokenizers` is
imported). Reported: MB/s (UTF-8 bytes per CPU second, timed interleaved in chunks: see
`interleaved_medians`) for document-at-a-time encode and for batch encode, `ratio` = ours / HF
(goal >= 0.9), and whether the ids are identical (`identical_ids`, and tiktoken's when it runs): the
row is `correct` only if they are.

Our encoder runs on `tokenizers` itself (a twin that reads special-token text as text), so the
HF ratio measures our wrapper's overhead, and the HF identity check holds by construction
(the corpus holds no special-token text); tiktoken, an independent implementation of the same
ranks, is the real check of the ids. The "~10 MB" corpus is about 0.7 MB of distinct text
repeated.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before tokenizers starts its thread pool
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import tokenizers  # noqa: E402
from pydoc_data.topics import topics  # noqa: E402

from benchmarks.common import ratio_report, setup  # noqa: E402
from mmembed.tokenizer import Tokenizer, byte_to_unicode  # noqa: E402

VOCAB = 8000
BATCH = 64  # documents (~4 KB each) per batch, and per interleaved timing chunk
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_DOC_MODULES = """argparse asyncio collections configparser csv dataclasses datetime decimal difflib
    email.message enum fractions functools http.client inspect itertools json logging mailbox
    multiprocessing optparse os pathlib pickle pydoc re shutil smtplib socket sqlite3 statistics
    string subprocess tarfile textwrap threading typing unittest urllib.request zipfile""".split()


def english_paragraphs() -> list[str]:
    """Distinct paragraphs of English shipped with Python: pydoc topics + stdlib docstrings."""
    texts = list(topics.values())
    for name in _DOC_MODULES:
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module, lambda o: inspect.isclass(o) or inspect.isroutine(o)):
            doc = inspect.getdoc(obj)
            if doc:
                texts.append(doc)
    paragraphs = [p for t in texts for p in t.split("\n\n") if p.strip()]
    return list(dict.fromkeys(paragraphs))


def corpus(n_bytes: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(documents of ~4 KB totalling about n_bytes, the distinct paragraphs they are made of)."""
    paragraphs = english_paragraphs()
    rng = random.Random(seed)
    docs, doc, size = [], [], 0
    while size < n_bytes:
        p = rng.choice(paragraphs)
        doc.append(p)
        size += len(p.encode()) + 2
        if sum(map(len, doc)) > 4000:
            docs.append("\n\n".join(doc))
            doc = []
    if doc:
        docs.append("\n\n".join(doc))
    return docs, paragraphs


def tiktoken_encoding(tok: Tokenizer):
    """A tiktoken Encoding over the same merges (ranks = our ids, which follow merge order)."""
    import tiktoken

    byte_of = {c: b for b, c in byte_to_unicode().items()}
    hf_vocab = tok.to_hf().get_vocab(with_added_tokens=False)
    ranks = {bytes(byte_of[c] for c in t): i for t, i in hf_vocab.items() if t not in tok.special_tokens}
    return tiktoken.Encoding(name="mmembed-bench", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens=tok.special_tokens)


def interleaved_medians(fns: list[Callable[[list[str]], object]], chunks: list[list[str]],
                        repeats: int) -> list[float]:
    """Median over rounds of each fn's CPU seconds on all chunks.

    Within a round every chunk is run by each fn back to back (order alternating), and the clock
    is process CPU time: on a shared, noisy machine, load from other processes then neither
    lands on one side only nor counts as our time (the work is single-threaded).
    """
    for fn in fns:
        fn(chunks[0])  # warm-up: BPE caches, allocator
    totals: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        spent = [0.0] * len(fns)
        for j, chunk in enumerate(chunks):
            order = range(len(fns)) if j % 2 == 0 else reversed(range(len(fns)))
            for i in order:
                t0 = time.process_time()
                fns[i](chunk)
                spent[i] += time.process_time() - t0
        for i, t in enumerate(spent):
            totals[i].append(t)
    return [statistics.median(t) for t in totals]


def run(quick: bool = False) -> dict:
    setup(threads=1)
    docs, paragraphs = corpus(1_000_000 if quick else 10_000_000)
    n_mb = sum(len(d.encode()) for d in docs) / 1e6
    tok = Tokenizer.train(paragraphs, VOCAB)
    with tempfile.TemporaryDirectory() as tmp:
        hf = tokenizers.Tokenizer.from_file(str(tok.save(Path(tmp))))
    chunks = [docs[i:i + BATCH] for i in range(0, len(docs), BATCH)]  # also the batches
    ours_ids = [tok.encode(d) for d in docs]
    identical = ours_ids == [hf.encode(d, add_special_tokens=False).ids for d in docs]
    t_ours, t_hf, t_ours_b, t_hf_b = interleaved_medians([
        lambda c: [tok.encode(d) for d in c],
        lambda c: [hf.encode(d, add_special_tokens=False).ids for d in c],
        lambda c: tok.encode_batch(c),
        lambda c: [e.ids for e in hf.encode_batch_fast(c, add_special_tokens=False)],
    ], chunks, repeats=5)

    extra = {
        "corpus_mb": round(n_mb, 2), "documents": len(docs), "vocab": tok.vocab_size, "threads": 1,
        "chars_per_token": sum(map(len, docs)) / sum(map(len, ours_ids)),
        "identical_ids": identical,
        "batch": {"ours_mb_s": n_mb / t_ours_b, "hf_mb_s": n_mb / t_hf_b, "ratio": t_hf_b / t_ours_b,
                  "note": "ours includes building the padded (B, T) id and mask tensors"},
        "goal": "ratio >= 0.9, identical ids",
    }
    try:
        enc = tiktoken_encoding(tok)
    except ImportError:
        extra["tiktoken"] = "skipped: tiktoken is not installed"
    else:
        t_tt, t_ours2 = interleaved_medians([lambda c: [enc.encode_ordinary(d) for d in c],
                                             lambda c: [tok.encode(d) for d in c]], chunks, repeats=5)
        extra["tiktoken"] = {"mb_s": n_mb / t_tt, "ratio_ours_over_tiktoken": t_tt / t_ours2,
                             "identical_ids": [enc.encode_ordinary(d) for d in docs] == ours_ids}
    tt = extra["tiktoken"]
    correct = identical and (not isinstance(tt, dict) or tt["identical_ids"])
    return ratio_report("B-token", n_mb / t_ours, n_mb / t_hf, "MB/s", higher_is_better=True, correct=correct,
                        correct_if="identical_ids, and tiktoken's identical_ids where tiktoken runs", **extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~1 MB corpus instead of ~10 MB")
    print(json.dumps(run(quick=parser.parse_args().quick), indent=2))


if __name__ == "__main__":
    main()
