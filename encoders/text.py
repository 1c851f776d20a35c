"""Text transformer encoder: token ids → token embedding + positions → pre-norm blocks → pooled.

Input ids (B, T) long with a padding mask (B, T) bool (True = real token), padded on either
side. Positions count valid tokens only, so a left- or right-padded item gets the same
positions — and the same output — as the item alone.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from encoders.blocks import Transformer, check_sizes
from encoders.output import EncoderOutput, last_valid, masked_mean


class TextTransformer(nn.Module):
    """Bidirectional (or causal) transformer over token ids.

    Args:
        vocab_size: number of token ids (must match the tokenizer).
        width: model width W (= output width).
        layers: number of transformer blocks.
        heads: attention heads.
        mlp_ratio: MLP hidden width / width.
        max_len: longest token sequence (positional table size; cls adds one position).
        positional: `sinusoidal`, `learned`, `rotary` or `none`.
        pool: `mean` over valid tokens, `last` valid token (the EOS of right-padded text), or a
            learned `cls` token prepended to the sequence.
        causal: causal attention (each token sees only earlier ones, as in CLIP's text tower).
        dropout: dropout inside the transformer.

    Shapes:
        forward(ids (B, T) long, mask (B, T) bool | None) → EncoderOutput(tokens (B, T, W),
        mask (B, T), pooled (B, W)); with `cls` pooling, tokens exclude the cls position.
    """

    def __init__(
        self,
        vocab_size: int,
        width: int = 256,
        layers: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        max_len: int = 256,
        positional: Literal["sinusoidal", "learned", "rotary", "none"] = "learned",
        pool: Literal["mean", "last", "cls"] = "mean",
        causal: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        # nn.Embedding is built before the Transformer checks its sizes: a negative width was a
        # RuntimeError ("negative dimension") there, not this one line
        check_sizes(vocab_size=vocab_size, width=width, layers=layers, heads=heads, max_len=max_len)
        if pool not in ("mean", "last", "cls"):
            raise ValueError(f"unknown pool {pool!r} (valid: mean, last, cls)")
        if pool == "cls" and causal:
            raise ValueError("pool='cls' with causal attention: a leading cls token sees only itself; use pool='last'")
        self.width, self.pool, self.causal, self.max_len = width, pool, causal, max_len
        self.token_embedding = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.cls = nn.Parameter(torch.randn(width) * 0.02) if pool == "cls" else None
        extra = 1 if pool == "cls" else 0
        self.transformer = Transformer(
            width, layers, heads, mlp_ratio, dropout, positional=positional, max_len=max_len + extra
        )

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> EncoderOutput:
        """Encode token ids; see the class docstring for shapes."""
        B, T = ids.shape
        if T > self.max_len:
            raise ValueError(f"text of {T} tokens exceeds max_len={self.max_len}")
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=ids.device)
        x = self.token_embedding(ids)  # (B, T, W)
        if self.cls is not None:
            x = torch.cat([self.cls.to(x.dtype).expand(B, 1, -1), x], dim=1)  # (B, 1 + T, W)
            full_mask = torch.cat([mask.new_ones(B, 1), mask], dim=1)
        else:
            full_mask = mask
        # Position = number of valid tokens before this one: independent of padding side/amount.
        positions = (full_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T')
        x = self.transformer(x, full_mask, is_causal=self.causal, positions=positions)  # (B, T', W)
        if self.cls is not None:
            pooled, tokens = x[:, 0], x[:, 1:]
        else:
            tokens = x
            pooled = masked_mean(x, mask) if self.pool == "mean" else last_valid(x, mask)
        return EncoderOutput(tokens=tokens, mask=mask, pooled=pooled)
