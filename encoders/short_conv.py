"""Short causal convolution over the residual stream: each token mixed with the few before it.

    out_t = x_t + Σ_{j=0}^{K-1} w_j ⊙ x_{t-j}          (depthwise: one weight per channel and offset)

Why a decoder wants it. Associative recall — key/value pairs, then a key: its value — needs
attention to find the key in the context and read the token *after* it. Without mixing, a
transformer does that only with two heads composed across layers: one that copies each token's
predecessor into it, and one that matches the query against those tokens (the induction
circuit), which small decoders trained from scratch learn slowly. A short convolution hands
every token its neighbours before attention, so each value already carries its key and one head
that matches the query suffices. This is the short convolution of H3, Hyena and Based, and the
"Canon layers" of Allen-Zhu (Physics of Language Models 4.1, 2025), placed before each block's
attention. On recall of 6 pairs with the key as the last token, 2 blocks of 128 went from 0.23
accuracy after 3,000 steps to 1.0 within 500 with K = 3. When words stand between the key and
the answer (a question: "what colour was the star?"), the key must first be carried to the
answer's position, a second hop the convolution does not provide (docs/decoder.md).

Token boundaries. `positions` (a token's index within its own prompt) says how far back a token
may look: offset j is used only where position ≥ j. So the prompts packed into one training row,
and the left padding of a generation batch, never leak into a prompt's first tokens; without
`positions` the sequence starts at its first token (zeros before it).

Decoding. With a cache, each call passes the K - 1 inputs before it (`past`); the caller keeps
them (`kv_cache.InputHistory`).

The weights start at zero: a decoder with the convolution computes exactly what one without it
does until training moves them (so pre-trained weights keep their function).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ShortConv(nn.Module):
    """Causal depthwise convolution of `kernel` taps, added to its input.

    Args:
        dim: channels C.
        kernel: taps K (the token itself and the K - 1 before it); >= 2.

    Shapes:
        forward(x (B, T, C), positions (T,) | (B, T) | None, past (B, K-1, C) | None) → (B, T, C).
    """

    def __init__(self, dim: int, kernel: int) -> None:
        super().__init__()
        if kernel < 2:
            raise ValueError(f"a short convolution needs kernel >= 2, got {kernel}")
        self.kernel = kernel
        self.weight = nn.Parameter(torch.zeros(kernel, dim))  # row j: the weights of the token j back

    def forward(self, x: Tensor, positions: Tensor | None = None, past: Tensor | None = None) -> Tensor:
        B, T, C = x.shape
        back = self.kernel - 1
        if past is None:
            past = x.new_zeros(B, back, C)
        seq = torch.cat([past.to(x.dtype), x], dim=1)  # (B, K-1+T, C): seq[:, back + t] is x_t
        if positions is not None:
            positions = positions if positions.dim() == 2 else positions[None]  # (B|1, T)
        weight = self.weight.to(x.dtype)
        out = x + x * weight[0]
        for j in range(1, self.kernel):
            earlier = seq[:, back - j: back - j + T]  # x_{t-j}
            if positions is not None:
                earlier = earlier * (positions >= j)[..., None].to(x.dtype)
            out = out + earlier * weight[j]
        return out
