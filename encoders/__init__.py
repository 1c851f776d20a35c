"""Backbones: token / patch / frame sequences in, `EncoderOutput` out.

Reading order: linear.py → positional.py → attention.py → short_conv.py → blocks.py (the shared transformer) →
output.py → text.py, image.py, audio.py (our encoders) → open_clip_towers.py → weights.py (safe loading).

Every encoder is an `nn.Module` with `width: int` and
`forward(x, mask=None) -> EncoderOutput(tokens (B, T, W), mask (B, T) bool True=valid, pooled (B, W))`,
and optionally `pooled(x, mask=None) -> (B, W)`: `forward(...).pooled` without the work only the
tokens need (what the shared space's towers call; the open_clip towers have one).
This package never imports mmembed; builders take typed keyword arguments only, so a YAML block
can be validated against their signatures.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from encoders.attention import MultiHeadAttention, build_attention_mask
from encoders.audio import AudioCNN, AudioTransformer
from encoders.blocks import MLP, Transformer, TransformerBlock
from encoders.image import ResNet, ViT
from encoders.open_clip_towers import OpenClipImage, OpenClipText, open_clip_image, open_clip_text
from encoders.output import EncoderOutput, last_valid, masked_mean
from encoders.positional import POSITIONAL, build_positional
from encoders.short_conv import ShortConv
from encoders.text import TextTransformer
from encoders.weights import WeightsFileError, load_state_dict_file

ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "text_transformer": TextTransformer,
    "vit": ViT,
    "resnet": ResNet,
    "audio_transformer": AudioTransformer,
    "audio_cnn": AudioCNN,
    "open_clip_image": open_clip_image,
    "open_clip_text": open_clip_text,
}


def build_encoder(name: str, /, **kwargs) -> nn.Module:
    """Build encoder `name` from `ENCODERS` with keyword arguments `kwargs`.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r} (valid: {', '.join(ENCODERS)})")
    return ENCODERS[name](**kwargs)


__all__ = [
    "ENCODERS",
    "POSITIONAL",
    "MLP",
    "AudioCNN",
    "AudioTransformer",
    "EncoderOutput",
    "MultiHeadAttention",
    "OpenClipImage",
    "OpenClipText",
    "ResNet",
    "ShortConv",
    "TextTransformer",
    "Transformer",
    "TransformerBlock",
    "ViT",
    "WeightsFileError",
    "build_attention_mask",
    "build_encoder",
    "build_positional",
    "last_valid",
    "load_state_dict_file",
    "masked_mean",
    "open_clip_image",
    "open_clip_text",
]
