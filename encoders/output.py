"""What every encoder returns, and the pooling rules shared by the encoders.

Every backbone in this package maps one batch of one modality to an `EncoderOutput`:
per-position features, which positions are real, and one vector per item. Padding masks are
`True = valid` everywhere in the package.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class EncoderOutput:
    """Output of every encoder.

    Attributes:
        tokens: (B, T, W) per-token / per-patch / per-frame features.
        mask: (B, T) bool, True where `tokens` holds a real position (False = padding).
        pooled: (B, W) one vector per item; finite even for items with no valid position.
    """

    tokens: Tensor
    mask: Tensor
    pooled: Tensor


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of `x` over the valid positions of `mask`.

    Args:
        x: (B, T, W) features.
        mask: (B, T) bool, True = valid.

    Returns:
        (B, W); zeros for rows without any valid position (never NaN).
    """
    weights = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    total = (x * weights).sum(dim=1)  # (B, W)
    count = weights.sum(dim=1).clamp(min=1.0)  # (B, 1)
    return total / count


def last_valid(x: Tensor, mask: Tensor) -> Tensor:
    """Feature at the last valid position of each row (the EOS token for right-padded text).

    Args:
        x: (B, T, W) features.
        mask: (B, T) bool, True = valid.

    Returns:
        (B, W); rows without any valid position return position 0 (finite, to be masked out).
    """
    # cumsum reaches its maximum first at the last valid position; argmax returns the first max.
    index = mask.long().cumsum(dim=1).argmax(dim=1)  # (B,)
    return x[torch.arange(x.shape[0], device=x.device), index]


def downsample_mask(mask: Tensor, stride: int) -> Tensor:
    """Mask for a sequence shortened by a stride-`stride` convolution or pooling.

    A kernel covering `stride` consecutive frames yields a valid position when any of them is
    valid; for right-padded input this is position t' < ceil(valid / stride), the same length
    the unpadded sequence would produce.

    Args:
        mask: (B, T) bool.
        stride: downsampling factor.

    Returns:
        (B, ceil(T / stride)) bool.
    """
    if stride == 1:
        return mask
    pad = (-mask.shape[1]) % stride
    padded = torch.nn.functional.pad(mask, (0, pad), value=False)  # (B, T + pad)
    return padded.view(mask.shape[0], -1, stride).any(dim=-1)
