"""The causal language model: token embeddings → pre-norm causal transformer → tied LM head.

    ids (B, T) ─► token embedding ─┐
                 inputs_embeds ────┴► (B, T, C) ─► Transformer(is_causal) ─► (B, T, C) ─► lm_head ─► (B, T, V)

Built from the same attention and blocks as the encoders (`encoders/`), so rotary, sinusoidal
and learned positions, SDPA, dropout and the KV-cache hook are the tested ones. GPT-2 is this
architecture with learned positions and tanh-GELU (`gpt2.py` loads its weights).

With a `window` W every block attends sliding-window causally (a position sees itself and the
W - 1 before it) in training, prefill and decoding alike; generation then keeps only W keys per
layer (`kv_cache.RollingKVCache`) and, with rotary or sinusoidal positions, runs past `max_len`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from encoders.attention import KVCacheLike
from encoders.blocks import Transformer
from encoders.linear import Linear
from mmembed.decoder.kv_cache import KVCache, RollingKVCache, allocate_caches


class Decoder(nn.Module):
    """A GPT-style decoder-only language model.

    Args:
        vocab_size: rows of the token embedding (and logits per position).
        width: model width C.
        layers: transformer blocks.
        heads: attention heads.
        mlp_ratio: MLP hidden width / width.
        max_len: the context: longest sequence of positions.
        positional: `rotary` (default), `sinusoidal` or `learned`.
        dropout: embedding, attention and residual dropout (training only).
        bias: biases in linear layers and LayerNorms.
        tie_embeddings: the output projection shares the token-embedding matrix.
        activation: `gelu` or `gelu_tanh` (GPT-2).
        norm_eps: LayerNorm epsilon.
        window: sliding-window attention span W (a position sees itself and the W - 1 before it);
            None = full causal attention over the context.
        conv_kernel: a short causal convolution of this many taps before each block's attention
            (`encoders.short_conv`: every token carries the few before it); 0 = none (GPT-2).

    Shapes:
        forward(input_ids (B, T) | inputs_embeds (B, T, C)) → logits (B, T, V).
    """

    def __init__(
        self,
        vocab_size: int,
        width: int = 256,
        layers: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        max_len: int = 256,
        positional: Literal["rotary", "sinusoidal", "learned"] = "rotary",
        dropout: float = 0.0,
        bias: bool = True,
        tie_embeddings: bool = True,
        activation: Literal["gelu", "gelu_tanh"] = "gelu",
        norm_eps: float = 1e-5,
        window: int | None = None,
        conv_kernel: int = 0,
    ) -> None:
        super().__init__()
        if positional == "none":
            raise ValueError("a causal decoder needs positions: use rotary, sinusoidal or learned")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be an integer >= 1 or None, got {window!r}")
        if isinstance(conv_kernel, bool) or not isinstance(conv_kernel, int) or conv_kernel == 1 or conv_kernel < 0:
            raise ValueError(f"conv_kernel must be 0 (none) or an integer >= 2, got {conv_kernel!r}")
        self.vocab_size, self.width, self.heads, self.max_len = vocab_size, width, heads, max_len
        self.window, self.conv_kernel = window, conv_kernel
        self.token_embedding = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, dropout, bias, positional, max_len,
                                       activation=activation, norm_eps=norm_eps, window=window,
                                       conv_kernel=conv_kernel)
        self.lm_head = Linear(width, vocab_size, bias=False)
        if tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=0.02)

    @property
    def layers(self) -> int:
        return len(self.transformer.blocks)

    @property
    def slides(self) -> bool:
        """Whether generation may run past `max_len`: a window, and positions computed past their
        table (rotary, sinusoidal; not a learned table)."""
        return self.window is not None and self.transformer.positional.unbounded

    def hidden(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        mask: Tensor | None = None,
        positions: Tensor | None = None,
        kv_caches: list[KVCacheLike] | None = None,
    ) -> Tensor:
        """Final hidden states (after the last LayerNorm).

        Args:
            input_ids: (B, T) long, or None when `inputs_embeds` is given.
            inputs_embeds: (B, T, C) embeddings (text tokens and soft tokens interleaved).
            mask: (B, T_all) bool key padding mask, True = real token (T_all counts cached slots);
                None when no row is padded.
            positions: (T,) or (B, T) positions; None = 0..T-1 after the tokens the caches hold (a
                left-padded batch passes its own: see `generate.decode_steps`).
            kv_caches: one per block, for incremental decoding. With rolling caches `mask` may
                cover only the most recent slots (at least as many as the caches return).

        Returns:
            (B, T, C).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.token_embedding(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        return self.transformer(x, mask, is_causal=True, positions=positions, kv_caches=kv_caches)

    def forward(self, input_ids: Tensor | None = None, *, inputs_embeds: Tensor | None = None,
                mask: Tensor | None = None, positions: Tensor | None = None,
                kv_caches: list[KVCacheLike] | None = None) -> Tensor:
        """Logits (B, T, V) for every position; arguments as in `hidden`."""
        return self.lm_head(self.hidden(input_ids, inputs_embeds=inputs_embeds, mask=mask, positions=positions,
                                        kv_caches=kv_caches))

    def new_caches(self, batch: int, max_len: int) -> list[KVCache] | list[RollingKVCache]:
        """Empty KV caches for `batch` rows and `max_len` slots, on this model's device and dtype:
        rolling caches of the window when it is shorter than `max_len`."""
        weight = self.token_embedding.weight
        return allocate_caches(self.layers, batch, self.heads, max_len, self.width // self.heads,
                               weight.dtype, weight.device, self.window)

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameter count; `non_embedding` leaves out the token (and learned position) tables,
        as scaling-law papers count N."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.token_embedding.weight.numel()
            if self.lm_head.weight is not self.token_embedding.weight:
                total -= self.lm_head.weight.numel()
            learned = getattr(self.transformer.positional, "embedding", None)
            if learned is not None:
                total -= learned.weight.numel()
        return total


@torch.no_grad()
def start_rows_at_mean(decoder: Decoder, start: int, stop: int) -> None:
    """Rows `start`..`stop` of the embedding table (and of an untied head) become the mean of the
    rows before `start`: new tokens in a table padded past its tokenizer begin as an average
    token, as `resize_token_embeddings`'s grown rows do, not as padding rows never trained."""
    for weight in {id(w): w for w in (decoder.token_embedding.weight, decoder.lm_head.weight)}.values():
        weight[start:stop] = weight[:start].mean(dim=0)


@torch.no_grad()
def resize_token_embeddings(decoder: Decoder, vocab_size: int) -> None:
    """Grow the vocabulary to `vocab_size` rows (new special tokens after pre-training).

    New rows start at the mean of the existing ones, so they begin as an average token rather
    than a random direction the pre-trained model has never seen (what transformers does too).
    """
    old = decoder.token_embedding.weight
    if vocab_size < old.shape[0]:
        raise ValueError(f"cannot shrink the vocabulary from {old.shape[0]} to {vocab_size}")
    if vocab_size == old.shape[0]:
        return
    tied = decoder.lm_head.weight is old
    grown = nn.Embedding(vocab_size, old.shape[1], device=old.device, dtype=old.dtype)
    grown.weight[: old.shape[0]] = old
    grown.weight[old.shape[0]:] = old.mean(dim=0)
    decoder.token_embedding = grown
    decoder.vocab_size = vocab_size
    if tied:
        decoder.lm_head = Linear(old.shape[1], vocab_size, bias=False, device=old.device, dtype=old.dtype)
        decoder.lm_head.weight = grown.weight
    else:
        head = Linear(old.shape[1], vocab_size, bias=False, device=old.device, dtype=old.dtype)
        head.weight[: old.shape[0]] = decoder.lm_head.weight
        head.weight[old.shape[0]:] = decoder.lm_head.weight.mean(dim=0)
        decoder.lm_head = head
