"""Multi-head scaled dot-product attention, shared by every encoder and the causal decoder.

softmax(Q K^T / sqrt(d_head)) V per head, computed by `torch.nn.functional.
scaled_dot_product_attention` (fused kernels where the device has them). One implementation
serves bidirectional encoders (key padding mask), causal decoders (`is_causal`), sliding-window
causal decoders (`window`: each query sees itself and the window - 1 keys before it) and KV-cache
decoding (`positions` of the new tokens + a `kv_cache` object that returns the keys/values so far:
all of them, or, for a rolling cache, the most recent ones that a window still reaches).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoders.linear import Linear


class KVCacheLike(Protocol):
    """What attention needs from a KV cache (the decoder owns the implementation)."""

    length: int  # slots appended so far (a rolling cache counts those it no longer holds): default positions

    def update(self, positions: Tensor | None, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v (B, H, T_new, head_dim) after what the cache holds; return the keys and
        values of the last T_all slots, in order, the new ones last (B, H, T_all, head_dim): every
        slot, or (a rolling cache) the most recent ones. `positions` (the tokens' positions, for
        rotary) may differ from the cache slots: rows of a left-padded batch share slots, not positions."""
        ...

    def inputs_before(self, x: Tensor, keep: int) -> Tensor:
        """What a block's short convolution needs (`encoders.short_conv`): the `keep` block inputs
        before x (B, T_new, C), zeros before the first, as (B, keep, C); x's are then held instead."""
        ...


def build_attention_mask(mask: Tensor | None, is_causal: bool, tq: int, tk: int, device: torch.device,
                         window: int | None = None) -> Tensor | None:
    """Combine a padding mask, causality and a sliding window into one boolean mask, True = may attend.

    Args:
        mask: None; (B, Tk) key padding mask; (B, Tq, Tk) or (B, 1|H, Tq, Tk) full mask.
        is_causal: query i sees key j when j <= i + (Tk - Tq): queries are the last Tq of the
            Tk positions, which is also the KV-cache case (the cache returns past + new keys).
        tq, tk: query and key lengths.
        window: with `is_causal`, query i also needs j > i + (Tk - Tq) - window: it sees `window`
            keys, itself included. None = no limit.

    Returns:
        None (attend everywhere) or a bool mask broadcastable to (B, H, Tq, Tk).
    """
    if window is not None and not is_causal:
        raise ValueError("a sliding window needs causal attention")
    combined = None
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"attention mask must be bool (True = valid), got {mask.dtype}")
        if mask.dim() == 2:
            combined = mask[:, None, None, :]  # (B, 1, 1, Tk)
        elif mask.dim() == 3:
            combined = mask[:, None]  # (B, 1, Tq, Tk)
        elif mask.dim() == 4:
            combined = mask
        else:
            raise ValueError(f"attention mask must have 2, 3 or 4 dimensions, got shape {tuple(mask.shape)}")
        # a (B, 1) mask (a decoding step's new token only) broadcast over every key: no error, wrong logits
        if mask.shape[-1] != tk or (mask.dim() > 2 and mask.shape[-2] not in (1, tq)):
            raise ValueError(f"attention mask of shape {tuple(mask.shape)} does not fit {tq} queries over {tk} keys "
                             f"(with a KV cache: past + new); a key padding mask is (B, {tk})")
    if is_causal:
        causal = torch.ones(tq, tk, dtype=torch.bool, device=device).tril(diagonal=tk - tq)  # (Tq, Tk)
        if window is not None:
            causal = causal.triu(diagonal=tk - tq - window + 1)
        combined = causal if combined is None else combined & causal
    return combined


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention.

    Args:
        dim: model width C; split into `heads` heads of C / heads channels.
        heads: number of heads.
        dropout: dropout on the attention weights and on the output projection (training only).
        bias: biases in the q/k/v and output projections.
        positional: a positional module applied to q and k inside attention (rotary), shared
            across layers; None when positions are added to the input instead.
        window: sliding-window causal attention: a query sees itself and the window - 1 keys
            before it (training, prefill and decoding alike). None = every earlier key.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        positional: nn.Module | None = None,
        window: int | None = None,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads={heads}")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be an integer >= 1 or None, got {window!r}")
        self.dim, self.heads, self.head_dim, self.window = dim, heads, dim // heads, window
        self.dropout = dropout
        self.qkv = Linear(dim, 3 * dim, bias=bias)
        self.proj = Linear(dim, dim, bias=bias)
        self.proj_drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.positional = positional

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        *,
        is_causal: bool = False,
        positions: Tensor | None = None,
        kv_cache: KVCacheLike | None = None,
    ) -> Tensor:
        """Attend.

        Args:
            x: (B, T, C) input.
            mask: (B, Tk) key padding mask, or a (B, T, Tk) / (B, 1|H, T, Tk) full mask; bool,
                True = valid. Tk = T without a cache, past + T with one. With a cache, a key
                padding mask wider than the keys it returns covers earlier slots too: its last Tk
                columns are used (a rolling cache returns only the most recent keys).
            is_causal: causal attention (bottom-right aligned when a cache adds past keys); the
                layer's window, if any, applies with it.
            positions: (T,) or (B, T) absolute positions of x for rotary; None = 0..T-1.
            kv_cache: stores this call's keys/values and returns all of them.

        Returns:
            (B, T, C). Query rows that may attend to no key read zeros (their output is the
            projection's bias), never NaN.
        """
        if self.window is not None and not is_causal:
            raise ValueError("a sliding-window attention layer must be called with is_causal=True")
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 × (B, H, T, hd)
        if self.positional is not None:
            q, k = self.positional(q, positions), self.positional(k, positions)
        if kv_cache is not None:
            k, v = kv_cache.update(positions, k, v)  # (B, H, Tk, hd)
        drop = self.dropout if self.training else 0.0
        tk = k.shape[2]
        if kv_cache is not None and mask is not None and mask.dim() == 2 and mask.shape[1] > tk:
            mask = mask[:, -tk:]  # the cache returned only the most recent keys
        # The window bites only when there are more keys than it spans.
        window = self.window if self.window is not None and tk > self.window else None
        # One query (a decoding step) is the last position: bottom-right causality lets it see every key.
        causal = is_causal and (T > 1 or window is not None)
        if mask is None and window is None and (not causal or tk == T):
            # Fast path: no mask tensor, the fused kernels handle causality themselves.
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=causal)
        else:
            allowed = build_attention_mask(mask, causal, T, tk, x.device, window)
            # A row with no allowed key would be softmax over nothing (NaN on some backends):
            # let it attend everywhere, then zero its output.
            has_key = allowed.any(dim=-1, keepdim=True)  # (B|1, 1|H, Tq|1, 1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~has_key, dropout_p=drop)
            out = out.masked_fill(~has_key, 0.0)
        out = out.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj_drop(self.proj(out))
