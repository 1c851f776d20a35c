"""Text of the synthetic world as a language-modelling corpus, packed into fixed-length rows.

    scenes (seeded) ─► "a large red star on the left. how many objects are there? one. …"
                    ─► BPE ids, documents joined by <eos> ─► rows of context + 1 ids (inputs + targets)

A document is one scene: a random caption followed by its questions and answers. Answering
needs the caption (what colour is the star? → look back), so a larger model has more to gain
than n-gram statistics, and the randomness of the world (which objects, which phrasing) sets an
irreducible loss: the E of a scaling law. Scenes are drawn fresh from a seed, so any number of
tokens is available; the world is small, though, and a simple scene (one object, few questions)
comes up again: about 3% of another seed's documents are also among a sweep's training ones.
A validation set packed with `exclude` = the training documents (`token_rows(..., seen=...)`)
skips those and draws on until it has its tokens, so it holds no document the models trained
on, and as many tokens as asked. (Training itself may repeat a simple scene.)
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Container, Iterator

import numpy as np
import torch
from torch import Tensor

from mmembed.data.synth.captions import random_caption
from mmembed.data.synth.questions import questions_for
from mmembed.data.synth.rules import COLOURS, SHAPES
from mmembed.data.synth.world import sample_objects
from mmembed.tokenizer import Tokenizer

TOKENS_PER_DOCUMENT = 80  # measured mean at the default vocabulary; sizes each draw of documents


def world_documents(n: int, seed: int) -> list[str]:
    """`n` documents (caption, then its questions with answers) from scenes drawn with `seed`."""
    combos = list(itertools.product(SHAPES, COLOURS))
    rng = np.random.default_rng([seed, 0x7E47])
    docs = []
    for _ in range(n):
        objects = sample_objects(rng, combos)
        qa = " ".join(f"{q['question']} {q['answer']}." for q in questions_for(objects, rng))
        docs.append(f"{random_caption(objects, rng)}. {qa}")
    return docs


def train_world_tokenizer(vocab_size: int, seed: int, documents: int = 5000) -> Tokenizer:
    """A BPE tokenizer learned on `documents` world documents (a seed of its own: the same tokenizer
    for every model of a sweep)."""
    return Tokenizer.train(world_documents(documents, seed), vocab_size)


def token_rows(tokenizer: Tokenizer, tokens: int, context: int, seed: int, exclude: Container[int] = frozenset(),
               seen: set[int] | None = None) -> Tensor:
    """At least `tokens` training tokens as (R, context + 1) rows: documents joined by <eos> and cut
    into consecutive rows that overlap by one id (row r's last id is row r+1's first input), so
    every id is predicted exactly once.

    Args:
        exclude: `document_key`s of documents to skip (a validation set leaves out the training ones).
        seen: when given, the `document_key` of every document packed is added to it.

    Returns:
        (R, context + 1) long, R = ceil(tokens / context).
    """
    rows = -(-tokens // context)
    need = rows * context + 1
    ids: list[int] = []
    for doc in _document_stream(seed, batch=64 + need // TOKENS_PER_DOCUMENT):
        if len(ids) >= need:
            break
        key = document_key(doc)
        if key in exclude:
            continue
        if seen is not None:
            seen.add(key)
        ids.extend(tokenizer.encode(doc, add_eos=True))
    flat = torch.tensor(ids[:need], dtype=torch.long)
    starts = torch.arange(rows) * context
    return flat[starts[:, None] + torch.arange(context + 1)]  # (R, context + 1)


def document_key(doc: str) -> int:
    """A document's key in `token_rows`' `exclude` and `seen`: 8 bytes, not the text (a 1e9-token
    training set holds ~12M documents). A collision can only drop a document, never let one in."""
    return int.from_bytes(hashlib.blake2b(doc.encode(), digest_size=8).digest(), "little")


def _document_stream(seed: int, batch: int) -> Iterator[str]:
    """World documents without end, drawn `batch` at a time (each draw a seed of its own)."""
    for chunk in itertools.count():
        yield from world_documents(batch, seed=seed * 1_000_003 + chunk)
