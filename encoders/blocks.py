"""Pre-norm transformer: MLP → block → stack. Shared by every transformer encoder and the decoder.

Block (pre-norm, GPT-2 / ViT style):
    x = ShortConv(x)                              optional (a decoder's `conv_kernel`): x + a causal conv
    x = x + Dropout(Attention(LayerNorm(x)))
    x = x + Dropout(MLP(LayerNorm(x)))           MLP = Linear → GELU → Linear
Stack: input positional encoding → embedding dropout → blocks → final LayerNorm.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from encoders.attention import KVCacheLike, MultiHeadAttention
from encoders.linear import Linear
from encoders.positional import NoPositional, build_positional, check_positions
from encoders.short_conv import ShortConv


# GELU exact (erf), or its tanh approximation (GPT-2's "gelu_new"; needed for weight parity).
ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}


class MLP(nn.Module):
    """Linear(dim → hidden) → GELU → Linear(hidden → dim) → dropout."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, bias: bool = True,
                 activation: str = "gelu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r} (valid: {', '.join(ACTIVATIONS)})")
        self.fc = Linear(dim, hidden, bias=bias)
        self.act = nn.GELU(approximate=ACTIVATIONS[activation])
        self.proj = Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class TransformerBlock(nn.Module):
    """One pre-norm block: LayerNorm → attention → residual, LayerNorm → MLP → residual.

    Args:
        dim: width C.
        heads: attention heads.
        mlp_ratio: MLP hidden width = mlp_ratio * dim, rounded (a GPT-2's n_inner / n_embd can come
            back as 959.999… of 960).
        dropout: attention-weight, attention-output and MLP-output dropout.
        bias: biases in linear layers and LayerNorms.
        positional: rotary module shared across layers, or None.
        activation: MLP non-linearity, a key of `ACTIVATIONS`.
        norm_eps: LayerNorm epsilon.
        window: sliding-window causal attention span (see `MultiHeadAttention`), or None.
        conv_kernel: taps of a short causal convolution before attention (`encoders.short_conv`);
            0 = none.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        bias: bool = True,
        positional: nn.Module | None = None,
        activation: str = "gelu",
        norm_eps: float = 1e-5,
        window: int | None = None,
        conv_kernel: int = 0,
    ) -> None:
        super().__init__()
        self.conv = ShortConv(dim, conv_kernel) if conv_kernel else None
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, bias=bias)
        self.attn = MultiHeadAttention(dim, heads, dropout=dropout, bias=bias, positional=positional, window=window)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, bias=bias)
        self.mlp = MLP(dim, round(mlp_ratio * dim), dropout=dropout, bias=bias, activation=activation)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        *,
        is_causal: bool = False,
        positions: Tensor | None = None,
        kv_cache: KVCacheLike | None = None,
    ) -> Tensor:
        """x: (B, T, C) → (B, T, C). Arguments as in `MultiHeadAttention.forward`."""
        if self.conv is not None:
            past = kv_cache.inputs_before(x, self.conv.kernel - 1) if kv_cache is not None else None
            x = self.conv(x, positions, past)
        x = x + self.attn(self.norm1(x), mask, is_causal=is_causal, positions=positions, kv_cache=kv_cache)
        return x + self.mlp(self.norm2(x))


def check_sizes(**sizes: int) -> None:
    """ValueError naming the first size that is not an integer >= 1 (a width, a layer count, a
    patch size): caught at construction, not as a shape error in the first forward pass."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def norm_groups(channels: int, most: int = 8) -> int:
    """GroupNorm's group count for a stem stage of `channels`: the largest divisor of `channels`
    that is at most `most` and at most channels / 4 (so a group holds 4 channels or more), and 1
    when none is (a stage of 2 or 6 channels still builds)."""
    bound = max(1, min(most, channels // 4))
    return next(g for g in range(bound, 0, -1) if channels % g == 0)


class Transformer(nn.Module):
    """A stack of pre-norm blocks with a positional encoding and a final LayerNorm.

    Args:
        dim: width C.
        depth: number of blocks.
        heads: attention heads per block.
        mlp_ratio: MLP hidden width / dim.
        dropout: dropout after the positional encoding and inside every block.
        bias: biases in linear layers and LayerNorms.
        positional: a key of `encoders.positional.POSITIONAL` (sinusoidal, learned, rotary, none).
        max_len: longest sequence the positional encoding covers.
        activation: MLP non-linearity (`gelu`, or `gelu_tanh` as GPT-2).
        norm_eps: LayerNorm epsilon.
        window: sliding-window causal attention: each position sees itself and the window - 1
            before it, in every block (so the receptive field is depth × (window - 1) + 1). Rotary
            and sinusoidal positions then also run past max_len (computed on demand); None = full
            causal attention within max_len.
        conv_kernel: a short causal convolution of this many taps before each block's attention
            (`encoders.short_conv`; a decoder's token mixing); 0 = none.

    Shapes:
        forward(x (B, T, C), mask (B, T) bool) → (B, T, C).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        bias: bool = True,
        positional: str = "none",
        max_len: int = 2048,
        activation: str = "gelu",
        norm_eps: float = 1e-5,
        window: int | None = None,
        conv_kernel: int = 0,
    ) -> None:
        super().__init__()
        check_sizes(width=dim, layers=depth, heads=heads, max_len=max_len)
        if not 0 < mlp_ratio < math.inf:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.dim, self.max_len, self.window = dim, max_len, window
        # Recompute each block's activations in backward instead of keeping them (training
        # memory ~ one block instead of depth blocks, for ~1/3 more compute); see `set_grad_checkpointing`.
        self.grad_checkpointing = False
        self.positional = build_positional(positional, dim, heads, max_len, unbounded=window is not None)
        self.positional.checks_positions = False  # `forward` checks them once, not in every layer's rotary call
        rotary = self.positional if self.positional.in_attention else None
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, mlp_ratio, dropout, bias, positional=rotary, activation=activation,
                             norm_eps=norm_eps, window=window, conv_kernel=conv_kernel)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps, bias=bias)
        self.apply(_init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * depth),
        # so the stream's variance does not grow with depth at initialisation.
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * max(depth, 1)))

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        *,
        is_causal: bool = False,
        positions: Tensor | None = None,
        kv_caches: list[KVCacheLike] | None = None,
    ) -> Tensor:
        """Encode a sequence.

        Args:
            x: (B, T, C) embedded inputs.
            mask: (B, T) bool key padding mask (True = valid) or a full mask, see `MultiHeadAttention`.
            is_causal: causal self-attention.
            positions: (T,) or (B, T) positions of x; None = 0..T-1, after the tokens the caches hold.
            kv_caches: one cache per block (decoding), or None.

        Returns:
            (B, T, C) after the final LayerNorm.
        """
        if positions is None and kv_caches is not None:
            positions = cached_positions(kv_caches, x.shape[1], x.device)
        if positions is None and x.shape[1] > self.max_len and not self.positional.unbounded:
            raise ValueError(f"sequence of {x.shape[1]} positions exceeds max_len={self.max_len}")
        if positions is not None and not isinstance(self.positional, NoPositional):  # no table: any position
            # once here, not in every block's rotary call: each check reads the positions (a sync)
            check_positions(positions, None if self.positional.unbounded else self.max_len)
        if not self.positional.in_attention:
            x = self.positional(x, positions)
        x = self.drop(x)
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled() and kv_caches is None
        for i, block in enumerate(self.blocks):
            if recompute:  # non-reentrant: works with DDP and keyword arguments; the RNG (dropout) is replayed
                x = checkpoint(block, x, mask, is_causal=is_causal, positions=positions, use_reentrant=False)
                continue
            cache = kv_caches[i] if kv_caches is not None else None
            x = block(x, mask, is_causal=is_causal, positions=positions, kv_cache=cache)
        return self.norm(x)


def cached_positions(kv_caches: list[KVCacheLike], length: int, device: torch.device) -> Tensor | None:
    """Positions of `length` tokens appended to the caches, continuing from the first cache's
    `length` (every slot appended so far, also by a rolling cache that holds only the last few);
    None (0..length-1) when it is empty. A decoding step given no positions restarted them at 0.

    Raises:
        ValueError: a cache that records no length (pass the positions).
    """
    start = getattr(kv_caches[0], "length", None)
    if not isinstance(start, int):
        raise ValueError(f"{type(kv_caches[0]).__name__} records no length, so the positions of the new "
                         "tokens are unknown: pass positions")
    return torch.arange(start, start + length, device=device) if start else None


def set_grad_checkpointing(module: nn.Module, enabled: bool = True) -> int:
    """Switch activation checkpointing on (or off) in every transformer stack inside `module`: ours,
    and any other with a boolean `grad_checkpointing` switch (open_clip's `Transformer`, which
    its towers run through); returns how many stacks were switched."""
    stacks = [m for m in module.modules()
              if isinstance(m, Transformer) or isinstance(getattr(m, "grad_checkpointing", None), bool)]
    for stack in stacks:
        stack.grad_checkpointing = enabled
    return len(stacks)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
