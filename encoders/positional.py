"""Positional encodings, selectable by name.

Two families, one interface:

- added to the input once (`in_attention = False`): `sinusoidal` (fixed, Vaswani et al. 2017)
  and `learned` (an embedding table). `forward(x, positions)` returns `x + P[positions]`.
- applied to queries and keys inside every attention layer (`in_attention = True`): `rotary`
  (RoPE, Su et al. 2021). `forward(x, positions)` rotates (B, H, T, head_dim) tensors, so that
  q_i · k_j depends on i - j only. The same instance is shared by every layer (as torchtune
  does); its cos/sin cache is a non-persistent buffer, so it never enters a checkpoint.

`none` adds nothing. Every class takes `(dim, heads, max_len, unbounded)`; `positions` is (T,) or
(B, T) long, or None for 0..T-1. A KV-cache decoder passes the absolute positions of the new tokens.

Given `positions` are checked (ValueError for a negative one, or one past a bounded table) unless
`checks_positions` is False: a `Transformer` clears it and checks once per forward instead, since
each check reads the positions on the host and a rotary module is called twice in every layer.

Tables hold `max_len` positions. `unbounded=True` (a sliding-window decoder generating past its
context) computes the rows of positions past the table from the same float64 formula, so they
equal the rows a longer table would hold; a learned table has nothing to compute and stays bounded.
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
    return sinusoidal_rows(torch.arange(length), dim, base)


def sinusoidal_rows(positions: Tensor, dim: int, base: float = 10000.0, dtype: torch.dtype = torch.float32) -> Tensor:
    """The rows of the sinusoidal encoding for any `positions` (..., ) long, computed in float64 on
    the CPU.

    Returns:
        (..., dim) of `dtype` on the CPU.
    """
    if dim % 2:
        raise ValueError(f"sinusoidal positional encoding needs an even dimension, got {dim}")
    position = positions.detach().to("cpu", torch.float64).unsqueeze(-1)  # (..., 1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(base) / dim))  # (dim/2,)
    table = torch.zeros(*positions.shape, dim, dtype=torch.float64)
    table[..., 0::2] = torch.sin(position * inv_freq)
    table[..., 1::2] = torch.cos(position * inv_freq)
    return table.to(dtype)


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


def check_positions(positions: Tensor, size: int | None) -> None:
    """ValueError for a negative position or (`size` rows, None = unbounded) one past the table:
    indexing raised a bare IndexError there, and a negative position read rows from the table's
    end. Reads the positions on the host (a device sync): a model checks once per forward, not
    every layer's rotary call."""
    if not positions.numel():
        return
    low, high = int(positions.min()), int(positions.max())
    if low < 0 or (size is not None and high >= size):
        valid = "0 or more" if size is None else f"0..{size - 1}"
        raise ValueError(f"positions {low}..{high} lie outside the table of "
                         f"max_len={size if size is not None else 'unbounded'} (valid: {valid})")


def _check(module: nn.Module, positions: Tensor | None, size: int) -> None:
    """`check_positions` for a module's own call (`size` rows, unbounded modules: no limit), unless
    its owner checks them (`checks_positions` False)."""
    if positions is not None and module.checks_positions:
        check_positions(positions, None if module.unbounded else size)


def _gather(table: Tensor, positions: Tensor | None, length: int) -> Tensor:
    """Rows of `table` for `positions`: (T, C) for None / (T,), (B, T, C) for (B, T)."""
    if positions is None:
        if length > table.shape[0]:
            raise ValueError(f"sequence of {length} positions exceeds max_len={table.shape[0]}")
        return table[:length]
    return table[positions]


def _past_table(positions: Tensor | None, length: int, size: int) -> Tensor | None:
    """The positions (0..length-1 for None) when one lies past a table of `size` rows, else None.
    Reads the largest position on the host (a device sync): only unbounded modules ask."""
    if positions is None:
        return torch.arange(length) if length > size else None
    return positions if positions.numel() and int(positions.max()) >= size else None


class SinusoidalPositional(nn.Module):
    """Fixed sinusoidal encoding added to the input; a buffer, not a parameter."""

    in_attention = False
    checks_positions = True

    def __init__(self, dim: int, heads: int = 1, max_len: int = 2048, unbounded: bool = False) -> None:
        super().__init__()
        self.dim, self.unbounded = dim, unbounded
        # Deterministic from (max_len, dim): recomputed at construction, kept out of checkpoints.
        self.register_buffer("table", sinusoidal_table(max_len, dim), persistent=False)

    def forward(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """x: (B, T, C) → x + PE[positions]."""
        _check(self, positions, self.table.shape[0])
        past = _past_table(positions, x.shape[1], self.table.shape[0]) if self.unbounded else None
        if past is None and x.dtype != torch.float64:
            pe = _gather(self.table, positions, x.shape[1])
        else:  # past the table, or a float64 x (the float32 table rounded a float64 model's rows, as rotary's did)
            rows = past if past is not None else _gather(torch.arange(self.table.shape[0]), positions, x.shape[1])
            pe = sinusoidal_rows(rows, self.dim, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        return x + pe.to(device=x.device, dtype=x.dtype)


class LearnedPositional(nn.Module):
    """A learned table of `max_len` position vectors added to the input."""

    in_attention = False
    checks_positions = True
    unbounded = False  # `unbounded` is accepted and ignored: no formula gives rows never learned

    def __init__(self, dim: int, heads: int = 1, max_len: int = 2048, unbounded: bool = False) -> None:
        super().__init__()
        self.embedding = nn.Embedding(max_len, dim)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """x: (B, T, C) → x + E[positions]."""
        _check(self, positions, self.embedding.num_embeddings)
        return x + _gather(self.embedding.weight, positions, x.shape[1]).to(x.dtype)


class RotaryPositional(nn.Module):
    """Rotary position embedding applied to queries and keys (rotate-half convention).

    Channel pairs (c, c + head_dim/2) are rotated by the angle position * base^(-2c/head_dim),
    a rotation, so norms are preserved and q_i · k_j depends only on i - j.
    """

    in_attention = True
    checks_positions = True

    def __init__(self, dim: int, heads: int = 1, max_len: int = 2048, base: float = 10000.0,
                 unbounded: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads={heads}")
        if (dim // heads) % 2:
            raise ValueError(f"rotary needs an even head dimension; got dim={dim}, heads={heads}")
        head_dim = dim // heads
        # A plain float64 CPU tensor, not a buffer: `.to(dtype)` must not round the frequencies.
        self.inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hd/2,)
        self.unbounded = unbounded
        angles = self._angles(torch.arange(max_len))  # (L, hd/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def _angles(self, positions: Tensor) -> Tensor:
        """position × frequency in float64 on the CPU: (...,) → (..., hd/2)."""
        return positions.detach().to("cpu", torch.float64)[..., None] * self.inv_freq

    def forward(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """Rotate x: (B, H, T, head_dim) at `positions` ((T,) or (B, T))."""
        _check(self, positions, self.cos.shape[0])
        # At least float32 even under bf16 autocast (large angles lose precision in bf16); float64 stays.
        dtype = torch.promote_types(x.dtype, torch.float32)
        cos, sin = self._cos_sin(positions, x.shape[2], dtype)  # (T, hd/2) or (B, T, hd/2)
        if cos.dim() == 3:  # per-row positions: broadcast over heads
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd/2)
        x1, x2 = x.to(dtype).chunk(2, dim=-1)
        rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
        return rotated.type_as(x)

    def _cos_sin(self, positions: Tensor | None, length: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin at `positions`: rows of the tables, or computed from the float64 angles past
        them (unbounded) and for a float64 x (the float32 tables rounded a float64 model's rotary)."""
        rows = _past_table(positions, length, self.cos.shape[0]) if self.unbounded else None
        if rows is None and dtype != torch.float64:
            return _gather(self.cos, positions, length), _gather(self.sin, positions, length)
        if rows is None:  # float64 within the table (None: 0..length-1, bounded by it as the tables are)
            rows = _gather(torch.arange(self.cos.shape[0]), None, length) if positions is None else positions
        angles = self._angles(rows)
        cos, sin = angles.cos(), angles.sin()
        if dtype != torch.float64:  # the rows a longer table would hold, rounded as it is
            return cos.float().to(self.cos), sin.float().to(self.sin)
        return cos.to(self.cos.device), sin.to(self.sin.device)


class NoPositional(nn.Module):
    """No positional information (a bag of tokens, or positions given by the content)."""

    in_attention = False

    def __init__(self, dim: int, heads: int = 1, max_len: int = 2048, unbounded: bool = False) -> None:
        super().__init__()
        self.unbounded = unbounded  # no table: any position is fine

    def forward(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        return x


POSITIONAL: dict[str, type[nn.Module]] = {
    "sinusoidal": SinusoidalPositional,
    "learned": LearnedPositional,
    "rotary": RotaryPositional,
    "none": NoPositional,
}


def build_positional(name: str, dim: int, heads: int, max_len: int, unbounded: bool = False) -> nn.Module:
    """Positional encoding `name` for width `dim` split into `heads` heads, up to `max_len` positions
    (past them too when `unbounded` and the encoding can compute them: not `learned`).

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    if name not in POSITIONAL:
        raise ValueError(f"unknown positional encoding {name!r} (valid: {', '.join(POSITIONAL)})")
    return POSITIONAL[name](dim, heads=heads, max_len=max_len, unbounded=unbounded)
