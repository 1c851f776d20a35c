"""Config → decoder modules, and the decoder's files in a run directory.

A run with a decoder stage holds, beside the shared space's files:

    decoder.safetensors       projector + language model (a tied LM head is stored once)
    decoder_tokenizer.json    only when the decoder has its own tokenizer (GPT-2's); otherwise it
                              shares the run's tokenizer.json with the text tower
    decoder/                  the stage's checkpoints, metrics.jsonl and curves
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encoders.weights import state_fault
from mmembed.checkpoint import load_tensors, save_tensors
from mmembed.config_decoder import DecoderConfig
from mmembed.decoder.fusion import MultimodalLM, Projector
from mmembed.decoder.gpt2 import PretrainedTokenizer, gpt2_architecture, gpt2_tokenizer, load_gpt2
from mmembed.decoder.model import Decoder, resize_token_embeddings, start_rows_at_mean
from mmembed.decoder.prompt import PromptFormat
from mmembed.decoder.whitening import Whitening
from mmembed.errors import CheckpointError

log = logging.getLogger(__name__)

DECODER_WEIGHTS, DECODER_TOKENIZER, DECODER_DIR = "decoder.safetensors", "decoder_tokenizer.json", "decoder"
SPACE_FINGERPRINT = "space_fingerprint"  # decoder.safetensors' metadata: the space it was trained on


@dataclass
class PromptModel:
    """What `Model.generate` needs besides the shared space: the fused LM and its prompt format."""

    lm: MultimodalLM
    fmt: PromptFormat
    config: DecoderConfig

    @property
    def own_tokenizer(self) -> bool:
        return isinstance(self.fmt.tokenizer, PretrainedTokenizer)


def with_gpt2_architecture(cfg: DecoderConfig) -> DecoderConfig:
    """`cfg` with the architecture fields of its `init_from_gpt2` folder (the run's config records
    the real shape, so the run loads without that folder)."""
    if cfg.init_from_gpt2 is None:
        return cfg
    arch = gpt2_architecture(cfg.init_from_gpt2)
    return dataclasses.replace(cfg, width=arch["width"], layers=arch["layers"], heads=arch["heads"],
                               mlp_ratio=arch["mlp_ratio"], context=arch["max_len"], positional="learned",
                               activation=arch["activation"], tie_embeddings=arch["tie_embeddings"],
                               norm_eps=arch["norm_eps"])


def build_prompt_model(cfg: DecoderConfig, tokenizer: Any, embed_dim: int) -> PromptModel:
    """A fresh projector + decoder for `cfg` (GPT-2 weights when `init_from_gpt2` is set).

    Args:
        cfg: the decoder section.
        tokenizer: the decoder's tokenizer (see `decoder_tokenizer`).
        embed_dim: D of the shared space the projector reads.
    """
    fmt = PromptFormat(tokenizer, cfg.soft_tokens)
    if cfg.init_from_gpt2 is not None:
        decoder = load_gpt2(cfg.init_from_gpt2, dropout=cfg.dropout, window=cfg.window,
                            conv_kernel=cfg.conv_kernel).train()
        if tokenizer.vocab_size > decoder.vocab_size:  # the table would grow rows at the mean for real tokens
            raise CheckpointError(f"{cfg.init_from_gpt2}: the tokenizer has {tokenizer.vocab_size} tokens but the "
                                  f"weights only {decoder.vocab_size} token rows (vocab_size): the tokenizer and "
                                  "the weights come from different models; put the model's own tokenizer beside it")
        # markers get ids after the tokenizer's; a model whose table is larger (padded) already has rows
        # for them, which start as the grown ones do
        resize_token_embeddings(decoder, max(fmt.vocab_size, decoder.vocab_size))
        start_rows_at_mean(decoder, tokenizer.vocab_size, fmt.vocab_size)
    else:
        decoder = Decoder(fmt.vocab_size, cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.context,
                          cfg.positional, cfg.dropout, tie_embeddings=cfg.tie_embeddings, activation=cfg.activation,
                          norm_eps=cfg.norm_eps, window=cfg.window, conv_kernel=cfg.conv_kernel)
    projector = Projector(embed_dim, decoder.width, cfg.soft_tokens, cfg.projector, cfg.projector_hidden)
    return PromptModel(_fused(cfg, projector, decoder, fmt, embed_dim), fmt, cfg)


def _fused(cfg: DecoderConfig, projector: Projector, decoder: Decoder, fmt: PromptFormat, embed_dim: int
           ) -> MultimodalLM:
    """Projector + decoder, with the vectors whitened first if the config asks."""
    return MultimodalLM(projector, decoder, fmt.placeholder_id, Whitening(embed_dim) if cfg.whiten else None)


def decoder_tokenizer(cfg: DecoderConfig, space_tokenizer: Any, run_dir: Path | None = None) -> Any:
    """GPT-2's tokenizer (from the run once saved, else from the GPT-2 folder), or the run's own."""
    if cfg.init_from_gpt2 is None:
        if space_tokenizer is None:
            raise CheckpointError("the decoder shares the text tower's tokenizer, but this run has none")
        return space_tokenizer
    if run_dir is not None and (run_dir / DECODER_TOKENIZER).is_file():
        return PretrainedTokenizer.load(run_dir / DECODER_TOKENIZER)
    return gpt2_tokenizer(cfg.init_from_gpt2)


def save_prompt_model(pm: PromptModel, run_dir: Path, space_fingerprint: str | None = None) -> None:
    """Write decoder.safetensors (and decoder_tokenizer.json for a tokenizer of its own), recording
    the fingerprint of the shared space it reads (`Model.fingerprint`), which loading checks."""
    meta = None if space_fingerprint is None else {SPACE_FINGERPRINT: space_fingerprint}
    save_tensors(run_dir / DECODER_WEIGHTS, _own_state(pm.lm), meta)
    if pm.own_tokenizer:
        pm.fmt.tokenizer.save(run_dir / DECODER_TOKENIZER)


def load_prompt_model(run_dir: Path, cfg: DecoderConfig, space_tokenizer: Any, embed_dim: int) -> PromptModel:
    """Rebuild the decoder of a finished run from its files."""
    tokenizer = decoder_tokenizer(cfg, space_tokenizer, run_dir)
    fmt = PromptFormat(tokenizer, cfg.soft_tokens)
    state = load_tensors(run_dir / DECODER_WEIGHTS)
    table = state.get("decoder.token_embedding.weight")
    vocab = table.shape[0] if table is not None else fmt.vocab_size
    if vocab < fmt.vocab_size:
        raise CheckpointError(f"{run_dir / DECODER_WEIGHTS}: {vocab} token rows for a {fmt.vocab_size}-id vocabulary")
    decoder = Decoder(vocab, cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.context, cfg.positional,
                      0.0, tie_embeddings=cfg.tie_embeddings, activation=cfg.activation, norm_eps=cfg.norm_eps,
                      window=cfg.window, conv_kernel=cfg.conv_kernel)
    projector = Projector(embed_dim, cfg.width, cfg.soft_tokens, cfg.projector, cfg.projector_hidden)
    lm = _fused(cfg, projector, decoder, fmt, embed_dim)
    expected = _own_state(lm)
    if set(state) != set(expected) or any(state[k].shape != v.shape for k, v in expected.items()):
        wrong = sorted(set(state) ^ set(expected)) or [k for k in expected if state[k].shape != expected[k].shape]
        raise CheckpointError(f"{run_dir / DECODER_WEIGHTS} does not match the decoder in config.yaml "
                              f"(first difference: {wrong[0]})")
    if fault := state_fault(lm, state):  # load_state_dict would cast an integer tensor, and load NaN
        raise CheckpointError(f"{run_dir / DECODER_WEIGHTS}: {fault}")
    lm.load_state_dict(state, strict=False)
    return PromptModel(lm.eval(), fmt, cfg)


def _own_state(lm: MultimodalLM) -> dict:
    """The state dict without the tied LM head (it is the token embedding)."""
    state = lm.state_dict()
    if lm.decoder.lm_head.weight is lm.decoder.token_embedding.weight:
        state.pop("decoder.lm_head.weight")
    return state
