"""A tiny tokenizer and untrained decoders for the decoder tests (seeded, CPU, milliseconds)."""

from __future__ import annotations

import functools
import zlib

import torch
import torch.nn.functional as F

from mmembed.config import DecoderConfig
from mmembed.decoder import PromptModel, build_prompt_model
from mmembed.modality import Modality
from mmembed.tokenizer import Tokenizer

DIM = 16
CORPUS = ["a small red circle on the left", "what colour is the star? blue", "describe the picture and the sound",
          "yes no one two large green square in the centre"] * 20


@functools.lru_cache(maxsize=1)
def tokenizer() -> Tokenizer:
    return Tokenizer.train(CORPUS, vocab_size=320)


def prompt_model(positional: str = "rotary", seed: int = 0, **overrides) -> PromptModel:
    torch.manual_seed(seed)
    cfg = DecoderConfig(width=32, layers=2, heads=4, context=64, positional=positional, dropout=0.0,
                        soft_tokens=3, **overrides)
    pm = build_prompt_model(cfg, tokenizer(), DIM)
    pm.lm.eval()
    return pm


def fake_embed(modality: Modality, items: list) -> torch.Tensor:
    """Deterministic unit vectors: a function of the item's text and modality."""
    rows = []
    for item in items:
        g = torch.Generator().manual_seed(zlib.crc32(f"{modality}:{item}".encode()))
        rows.append(F.normalize(torch.randn(DIM, generator=g), dim=0))
    return torch.stack(rows)
