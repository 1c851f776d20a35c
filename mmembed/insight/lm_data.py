"""Text of the synthetic world as a language-modelling corpus, packed into fixed-length rows.

    scenes (seeded) ─► "a large red star on the left. how many objects are there? one. …"
                    ─► BPE ids, documents joined by <eos> ─► rows of context + 1 ids (inputs + targets)

A document is one scene: a random caption followed by its questions and answers. Answering
needs the caption (what colour is the star? → look back), so a larger model has more to gain
than n-gram statistics, and the randomness of the world (which objects, which phrasing) sets an
irreducible loss: the E of a scaling law. Scenes are drawn fresh from a seed, so any number of
tokens is available without repeating a document: a sweep on a fixed token budget never sees
a document twice, and a validation set from another seed shares no document with training.
"""

from __future__ import annotations

import itertools

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


def token_rows(tokenizer: Tokenizer, tokens: int, context: int, seed: int) -> Tensor:
    """At least `tokens` training tokens as (R, context + 1) rows: documents joined by <eos> and cut
    into consecutive rows that overlap by one id (row r's last id is row r+1's first input), so
    every id is predicted exactly once.

    Returns:
        (R, context + 1) long, R = ceil(tokens / context).
    """
    rows = -(-tokens // context)
    need = rows * context + 1
    ids: list[int] = []
    batch = 64 + need // TOKENS_PER_DOCUMENT
    chunk = 0
    while len(ids) < need:
        docs = world_documents(batch, seed=seed * 1_000_003 + chunk)
        for doc in docs:
            ids.extend(tokenizer.encode(doc, add_eos=True))
        chunk += 1
    flat = torch.tensor(ids[:need], dtype=torch.long)
    starts = torch.arange(rows) * context
    return flat[starts[:, None] + torch.arange(context + 1)]  # (R, context + 1)
