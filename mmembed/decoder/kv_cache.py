"""A preallocated key/value cache: one per decoder block (gpt-fast style).

Decoding token t needs the keys and values of every earlier token. Recomputing them costs a
full forward pass over the prefix per step; caching them makes each step one token's work.
The buffers are allocated once for the whole generation (prompt + new tokens), so a step writes
one slot in place and reads a view: no concatenation, no reallocation.

Slots are columns shared by the batch. In a left-padded batch, row b's token at slot s has
position s - pad_b; positions go to the rotary/learned encodings, slots only index the cache.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    """Keys and values of one attention layer for `batch` rows and up to `max_len` slots.

    Args:
        batch, heads, max_len, head_dim: buffer shape (B, H, max_len, head_dim).
        dtype, device: of the buffers (the model's).

    `update(positions, k, v)` appends k, v (B, H, T_new, head_dim) after the `length` slots
    already filled and returns views of all filled slots (B, H, length, head_dim).
    """

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (batch, heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, positions: Tensor | None, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} slots needed, {self.max_len} allocated")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reset(self) -> None:
        self.length = 0

    def nbytes(self) -> int:
        """Memory held by the buffers, in bytes."""
        return 2 * self.k.numel() * self.k.element_size()


def allocate_caches(layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                    dtype: torch.dtype, device: torch.device) -> list[KVCache]:
    """One cache per block."""
    return [KVCache(batch, heads, max_len, head_dim, dtype, device) for _ in range(layers)]
