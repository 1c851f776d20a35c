"""Preallocated key/value caches: one per decoder block (gpt-fast style).

Decoding token t needs the keys and values of every earlier token. Recomputing them costs a
full forward pass over the prefix per step; caching them makes each step one token's work.

`KVCache` holds every slot: its buffers are allocated once for the whole generation (prompt +
new tokens), so a step writes one slot in place and reads a view: no concatenation, no
reallocation.

`RollingKVCache` serves a sliding-window decoder (each token sees itself and the window - 1
before it): it keeps only the keys a window still reaches, so its memory is bounded by the
window however long generation runs. Its buffers hold 2 × window slots; keys are written in
order and returned as a view of the most recent ones: chronological, so attention's bottom-right
causal/window mask is right as it is, and a one-token step (which gets at most `window` keys)
needs no causal or window mask at all. When the buffer is full, the window - 1 newest keys move
to its front: one copy of window - 1 slots per window + 1 steps, under one slot per step.

Slots are columns shared by the batch. In a left-padded batch, row b's token at slot s has
position s - pad_b; positions go to the rotary/learned encodings, slots only index the cache.
The key padding mask given to attention covers slots; a rolling cache returns the last few, and
attention reads the mask's last columns to match.

Both also hold the last few inputs of their block for its short convolution, if it has one
(`InputHistory`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class InputHistory:
    """The last block inputs a short convolution reaches back to (`encoders.short_conv`)."""

    _history: Tensor | None = None

    def inputs_before(self, x: Tensor, keep: int) -> Tensor:
        """The `keep` inputs before x (B, T_new, C) — zeros before the first call — as (B, keep, C);
        afterwards the last `keep` of them and x are held."""
        past = self._history if self._history is not None else x.new_zeros(x.shape[0], keep, x.shape[2])
        self._history = torch.cat([past, x], dim=1)[:, -keep:]
        return past

    def reset_history(self) -> None:
        self._history = None


class KVCache(InputHistory, nn.Module):
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
        self.reset_history()

    def nbytes(self) -> int:
        """Memory held by the buffers, in bytes."""
        return 2 * self.k.numel() * self.k.element_size()


class RollingKVCache(InputHistory, nn.Module):
    """Keys and values of one sliding-window attention layer: the most recent slots only.

    Args:
        batch, heads, head_dim: buffer shape (B, H, 2 × window, head_dim).
        window: the attention span W: a query sees itself and the W - 1 slots before it.
        dtype, device: of the buffers (the model's).

    `update(positions, k, v)` appends k, v (B, H, T_new, head_dim) and returns, in order, the
    W - 1 (or fewer) slots before them and the T_new new ones: (B, H, ≤ W - 1 + T_new, head_dim),
    a view of the buffers unless T_new alone nearly fills them (a long prompt in one call).
    """

    def __init__(self, batch: int, heads: int, window: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        shape = (batch, heads, 2 * window, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.window = window
        self.length = 0  # slots appended so far
        self.end = 0  # buffer index after the newest slot held
        self.held = 0  # slots held, ending at `end`

    @property
    def max_len(self) -> int:
        """Buffer slots: the most keys one call can return as a view."""
        return self.k.shape[2]

    def update(self, positions: Tensor | None, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        n = k.shape[2]
        keep = min(self.held, self.window - 1)  # earlier slots the first new query still sees
        self.length += n
        if keep + n > self.max_len:  # too many for a view: concatenate, then hold the newest
            k_all = torch.cat([self.k[:, :, self.end - keep: self.end], k], dim=2)
            v_all = torch.cat([self.v[:, :, self.end - keep: self.end], v], dim=2)
            self._hold(k_all[:, :, -self.window:], v_all[:, :, -self.window:])
            return k_all, v_all
        if self.end + n > self.max_len:  # full: move the `keep` newest slots to the front
            start = self.end - keep
            k_kept, v_kept = self.k[:, :, start: self.end], self.v[:, :, start: self.end]
            if start < keep:  # overlapping ranges: copy through a temporary
                k_kept, v_kept = k_kept.clone(), v_kept.clone()
            self._hold(k_kept, v_kept)
        self.k[:, :, self.end: self.end + n] = k
        self.v[:, :, self.end: self.end + n] = v
        self.end, self.held = self.end + n, keep + n
        return self.k[:, :, self.end - self.held: self.end], self.v[:, :, self.end - self.held: self.end]

    def _hold(self, k: Tensor, v: Tensor) -> None:
        """Hold exactly k, v (B, H, m, head_dim), m <= max_len, at the front of the buffers."""
        m = k.shape[2]
        self.k[:, :, :m] = k
        self.v[:, :, :m] = v
        self.end = self.held = m

    def reset(self) -> None:
        self.length = self.end = self.held = 0
        self.reset_history()

    def nbytes(self) -> int:
        """Memory held by the buffers, in bytes."""
        return 2 * self.k.numel() * self.k.element_size()


def allocate_caches(layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                    dtype: torch.dtype, device: torch.device, window: int | None = None
                    ) -> list[KVCache] | list[RollingKVCache]:
    """One cache per block: a full one for `max_len` slots, or a rolling one when a `window`
    shorter than `max_len` is given (within the window a full cache is the same attention and no
    larger)."""
    if window is not None and window < max_len:
        return [RollingKVCache(batch, heads, window, head_dim, dtype, device) for _ in range(layers)]
    return [KVCache(batch, heads, max_len, head_dim, dtype, device) for _ in range(layers)]
