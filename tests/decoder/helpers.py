"""A tiny tokenizer and untrained decoders for the decoder tests (seeded, CPU, milliseconds)."""

from __future__ import annotations

import functools
import zlib

import torch
import torch.nn.functional as F

from mmembed.config_decoder import DecoderConfig
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
    fields = {"width": 32, "layers": 2, "heads": 4, "context": 64, "dropout": 0.0, "soft_tokens": 3}
    cfg = DecoderConfig(positional=positional, **{**fields, **overrides})
    pm = build_prompt_model(cfg, tokenizer(), DIM)
    pm.lm.eval()
    return pm


@torch.no_grad()
def lively(pm: PromptModel, std: float = 1.0, seed: int = 0) -> PromptModel:
    """Re-draw every weight with a larger spread: an untrained model at the usual 0.02 writes one
    id over and over, which would let a token-equality check pass whatever the code does."""
    g = torch.Generator().manual_seed(seed)
    for p in pm.lm.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * std)
    return pm


@torch.no_grad()
def with_conv(pm: PromptModel, std: float = 0.3, seed: int = 3) -> PromptModel:
    """Random short-convolution weights (`decoder.conv_kernel`): they start at zero, where they
    change nothing, so a test of their plumbing needs them drawn."""
    g = torch.Generator().manual_seed(seed)
    for block in pm.lm.decoder.transformer.blocks:
        block.conv.weight.copy_(torch.randn(block.conv.weight.shape, generator=g) * std)
    return pm


def fake_embed(modality: Modality, items: list) -> torch.Tensor:
    """Deterministic unit vectors: a function of the item's text and modality."""
    rows = []
    for item in items:
        g = torch.Generator().manual_seed(zlib.crc32(f"{modality}:{item}".encode()))
        rows.append(F.normalize(torch.randn(DIM, generator=g), dim=0))
    return torch.stack(rows)


def save_tiny_gpt2(folder, **config):
    """A randomly initialised GPT2LMHeadModel and a byte-level BPE tokenizer, saved by transformers
    (what a user's local GPT-2 folder holds); `config` overrides GPT2Config's fields. Returns the folder."""
    import transformers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=299, special_tokens=[], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(CORPUS, trainer)
    hf.add_special_tokens(["<|endoftext|>"])
    transformers.PreTrainedTokenizerFast(tokenizer_object=hf, eos_token="<|endoftext|>").save_pretrained(folder)
    end = hf.token_to_id("<|endoftext|>")
    torch.manual_seed(0)
    config = transformers.GPT2Config(**{"vocab_size": hf.get_vocab_size(), "n_embd": 64, "n_layer": 2, "n_head": 4,
                                        "n_positions": 128, "bos_token_id": end, "eos_token_id": end, **config})
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(folder)
    return folder
