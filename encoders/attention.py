"""Multi-head scaled dot-product attention, shared by every encoder and the causal decoder.

softmax(Q K^T / sqrt(d_head)) V per head, computed by `torch.nn.functional.
scaled_dot_product_attention` (fused kernels where the device has them). One implementation
serves bidirectional encoders (key padding mask), causal decoders (`is_causal`) and KV-cache
decoding (`positions` of the new tokens + a `kv_cache` object that returns every key/value so far).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KVCacheLike(Protocol):
    """What attention needs from a KV cache (the decoder owns the implementation)."""

    def update(self, positions: Tensor | None, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v (B, H, T_new, head_dim) after what the cache holds; return every key and
        value held (B, H, T_all, head_dim). `positions` (the tokens' positions, for rotary) may
        differ from the cache slots: rows of a left-padded batch share slots, not positions."""
        ...


def build_attention_mask(mask: Tensor | None, is_causal: bool, tq: int, tk: int, device: torch.device) -> Tensor | None:
    """Combine a padding mask and causality into one boolean mask, True = may attend.

    Args:
        mask: None; (B, Tk) key padding mask; (B, Tq, Tk) or (B, 1|H, Tq, Tk) full mask.
        is_causal: query i sees key j when j <= i + (Tk - Tq): queries are the last Tq of the
            Tk positions, which is also the KV-cache case (the cache returns past + new keys).
        tq, tk: query and key lengths.

    Returns:
        None (attend everywhere) or a bool mask broadcastable to (B, H, Tq, Tk).
    """
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
    if is_causal:
        causal = torch.ones(tq, tk, dtype=torch.bool, device=device).tril(diagonal=tk - tq)  # (Tq, Tk)
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
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        positional: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads={heads}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
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
                True = valid. Tk = T without a cache, past + T with one.
            is_causal: causal attention (bottom-right aligned when a cache adds past keys).
            positions: (T,) or (B, T) absolute positions of x for rotary; None = 0..T-1.
            kv_cache: stores this call's keys/values and returns all of them.

        Returns:
            (B, T, C). Query rows that may attend to no key return zeros, never NaN.
        """
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 × (B, H, T, hd)
        if self.positional is not None:
            q, k = self.positional(q, positions), self.positional(k, positions)
        if kv_cache is not None:
            k, v = kv_cache.update(positions, k, v)  # (B, H, Tk, hd)
        drop = self.dropout if self.training else 0.0
        tk = k.shape[2]
        # One query (a decoding step) is the last position: bottom-right causality lets it see every key.
        causal = is_causal and T > 1
        if mask is None and (not causal or tk == T):
            # Fast path: no mask tensor, the fused kernels handle causality themselves.
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=causal)
        else:
            allowed = build_attention_mask(mask, causal, T, tk, x.device)
            # A row with no allowed key would be softmax over nothing (NaN on some backends):
            # let it attend everywhere, then zero its output.
            has_key = allowed.any(dim=-1, keepdim=True)  # (B|1, 1|H, Tq|1, 1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~has_key, dropout_p=drop)
            out = out.masked_fill(~has_key, 0.0)
        out = out.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj_drop(self.proj(out))
