"""Positional encodings, selectable by name.

Two families, one interface:

- added to the input once (`in_attention = False`): `sinusoidal` (fixed, Vaswani et al. 2017)
  and `learned` (an embedding table). `forward(x, positions)` returns `x + P[positions]`.
- applied to queries and keys inside every attention layer (`in_attention = True`): `rotary`
  (RoPE, Su et al. 2021). `forward(x, positions)` rotates (B, H, T, head_dim) tensors, so that
  q_i · k_j depends on i - j only. The same instance is shared by every layer (as torchtune
  does); its cos/sin cache is a non-persistent buffer, so it never enters a checkpoint.

`none` adds nothing. Every class takes `(dim, heads, max_len)`; `positions` is (T,) or (B, T)
long, or None for 0..T-1. A KV-cache decoder passes the absolute positions of the new tokens.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_table(length: int, dim: int, base: float = 10000.0) -> Tensor:
    """The fixed encoding PE[p, 2i] = sin(p / base^(2i/dim)), PE[p, 2i+1] = cos(p / base^(2i/dim)).

    Returns:
        (length, dim) float32.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal positional encoding needs an even dimension, got {dim}")
    position = torch.arange(length, dtype=torch.float64).unsqueeze(1)  # (L, 1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(base) / dim))  # (dim/2,)
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq)
    return table.float()


def sinusoidal_table_2d(height: int, width: int, dim: int) -> Tensor:
    """2-D fixed encoding (MAE style): half the channels encode the row, half the column.

    Returns:
        (height * width, dim) float32, row-major over the grid.
    """
    if dim % 4:
        raise ValueError(f"2-D sinusoidal positional encoding needs a dimension divisible by 4, got {dim}")
    rows = sinusoidal_table(height, dim // 2)  # (H, dim/2)
    cols = sinusoidal_table(width, dim // 2)  # (W, dim/2)
    grid_rows = rows[:, None, :].expand(height, width, dim // 2)
    grid_cols = cols[None, :, :].expand(height, width, dim // 2)
    return torch.cat([grid_rows, grid_cols], dim=-1).reshape(height * width, dim)


def _gather(table: Tensor, positions: Tensor | None, length: int) -> Tensor:
    """Rows of `table` for `positions`: (T, C) for None / (T,), (B, T, C) for (B, T)."""
    if positions is None:
        if length > table.shape[0]:
            raise ValueError(f"sequence of {length} positions exceeds max_len={table.shape[0]}")
        return table[:length]
    return table[positions]


class SinusoidalPositional(nn.Module):
    """Fixed sinusoidal encoding added to the input; a buffer, not a parameter."""

    in_attention = False

    def __init__(self, dim: int, heads: int = 1, max_len: int = 2048) -> None:
        super().__init__()
        # Deterministic from (max_len, dim): recomputed at construction, kept out of checkpoints.
        self.register_buffer("table", sinusoidal_table(max_len, dim), persistent=False)

    def forward(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """x: (B, T, C) → x + PE[positions]."""
        return x + _gather(self.table, positions, x.shape[1]).to(x.dtype)


class LearnedPositional(nn.Module):
    """A learned table of `max_len` position vectors added to the input."""

    in_attention = False

    def __init__(self, dim: int, heads: int = 1, max_len: int = 2048) -> None:
        super().__init__()
        self.embedding = nn.Embedding(max_len, dim)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """x: (B, T, C) → x + E[positions]."""
        return x + _gather(self.embedding.weight, positions, x.shape[1]).to(x.dtype)


class RotaryPositional(nn.Module):
    """Rotary position embedding applied to queries and keys (rotate-half convention).

    Channel pairs (c, c + head_dim/2) are rotated by the angle position * base^(-2c/head_dim),
    a rotation, so norms are preserved and q_i · k_j depends only on i - j.
    """

    in_attention = True

    def __init__(self, dim: int, heads: int = 1, max_len: int = 2048, base: float = 10000.0) -> None:
        super().__init__()
        if dim % heads or (dim // heads) % 2:
            raise ValueError(f"rotary needs an even head dimension; got dim={dim}, heads={heads}")
        head_dim = dim // heads
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hd/2,)
        angles = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq  # (L, hd/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """Rotate x: (B, H, T, head_dim) at `positions` ((T,) or (B, T))."""
        cos = _gather(self.cos, positions, x.shape[2])  # (T, hd/2) or (B, T, hd/2)
        sin = _gather(self.sin, positions, x.shape[2])
        if cos.dim() == 3:  # per-row positions: broadcast over heads
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd/2)
        # Rotate in float32 even under bf16 autocast: large angles lose precision in bf16.
        x1, x2 = x.float().chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
        return rotated.type_as(x)


class NoPositional(nn.Module):
    """No positional information (a bag of tokens, or positions given by the content)."""

    in_attention = False

    def __init__(self, dim: int, heads: int = 1, max_len: int = 2048) -> None:
        super().__init__()

    def forward(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        return x


POSITIONAL: dict[str, type[nn.Module]] = {
    "sinusoidal": SinusoidalPositional,
    "learned": LearnedPositional,
    "rotary": RotaryPositional,
    "none": NoPositional,
}


def build_positional(name: str, dim: int, heads: int, max_len: int) -> nn.Module:
    """Positional encoding `name` for width `dim` split into `heads` heads, up to `max_len` positions.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    if name not in POSITIONAL:
        raise ValueError(f"unknown positional encoding {name!r} (valid: {', '.join(POSITIONAL)})")
    return POSITIONAL[name](dim, heads=heads, max_len=max_len)
