"""Image encoders: a small ViT of our own, and torchvision ResNets.

Input: (B, 3, H, W) float, normalised by the image preprocessor; no mask (every patch is real).
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import Tensor, nn

from encoders.blocks import Transformer, check_sizes, norm_groups
from encoders.linear import Linear
from encoders.output import EncoderOutput
from encoders.positional import sinusoidal_table_2d
from encoders.weights import load_into, load_state_dict_file

log = logging.getLogger(__name__)


class ViT(nn.Module):
    """Vision Transformer (Dosovitskiy et al. 2020): patchify → cls + positions → pre-norm blocks.

    Args:
        image_size: input height = width, in pixels.
        patch_size: square patch side; image_size must be a multiple.
        width: model width W.
        layers: transformer blocks.
        heads: attention heads.
        mlp_ratio: MLP hidden width / width.
        positional: `learned` (1 + N vectors), `sinusoidal` (1-D over the 1 + N positions),
            `sinusoidal_2d` (fixed row/column encoding of the patch grid, none on cls),
            `rotary` (1-D, on q/k) or `none`.
        pool: the `cls` token, the `mean` of the patch tokens, or `flatten`: one linear map of all
            patch tokens concatenated in grid order ((N·W) → W), so every grid cell has weights of
            its own. A mean forgets where each token was, and what sits where (the left object's
            shape, the right one's colour) must then survive inside the features; in a 2-block
            tower on the built-in world it does not: supervised per-slot shape accuracy after 400
            steps is 0.42 with `mean`, 0.33 with `cls` and 0.99 with `flatten` (docs/decoder.md).
            The grid is fixed: inputs are always image_size square.
        dropout: dropout inside the transformer.
        in_channels: image channels.
        stem: `patch` (one linear map per patch, as in the ViT paper) or `conv`: stride-2 3×3
            convolutions down to the patch grid, then a 1×1 projection (Xiao et al. 2021,
            "Early convolutions help transformers see better": same tokens, far faster and
            more stable training from scratch on small data). patch_size must be a power of 2.
        stem_depth: 3×3 convolutions per stage of the conv stem (the first one strided): one
            number for every stage, or a list with one per stage (e.g. [1, 2, 2, 2] saves the
            full-resolution stage's second conv, the stem's most expensive layer).
        stem_channels: channels of the first (full-resolution, most expensive) stem stage; they
            double per stage up to `width`.

    Shapes:
        forward(images (B, C, H, W)) → EncoderOutput(tokens (B, N, W) patch tokens,
        mask (B, N) all True, pooled (B, W)), N = (image_size / patch_size)^2.
    """

    def __init__(
        self,
        image_size: int = 64,
        patch_size: int = 8,
        width: int = 128,
        layers: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        positional: Literal["learned", "sinusoidal", "sinusoidal_2d", "rotary", "none"] = "learned",
        pool: Literal["cls", "mean", "flatten"] = "cls",
        dropout: float = 0.0,
        in_channels: int = 3,
        stem: Literal["patch", "conv"] = "patch",
        stem_depth: int | tuple[int, ...] = 1,
        stem_channels: int = 32,
    ) -> None:
        super().__init__()
        check_sizes(image_size=image_size, patch_size=patch_size, width=width, in_channels=in_channels,
                    stem_channels=stem_channels)
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
        if pool not in ("cls", "mean", "flatten"):
            raise ValueError(f"unknown pool {pool!r} (valid: cls, mean, flatten)")
        self.width, self.pool, self.image_size, self.stem = width, pool, image_size, stem
        grid = image_size // patch_size
        self.num_patches = grid * grid
        if stem == "patch":
            # kernel = stride = patch: each output pixel is a linear map of one patch.
            self.patchify = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        elif stem == "conv":
            # channels-last (NHWC): oneDNN's convolutions, forward and backward, run ~10% faster on it
            self.patchify = conv_stem(in_channels, width, patch_size, stem_depth, stem_channels).to(
                memory_format=torch.channels_last
            )
        else:
            raise ValueError(f"unknown stem {stem!r} (valid: patch, conv)")
        self.cls = nn.Parameter(torch.randn(width) * 0.02)
        if positional == "sinusoidal_2d":
            table = torch.cat([torch.zeros(1, width), sinusoidal_table_2d(grid, grid, width)])  # (1 + N, W)
            self.register_buffer("pos_2d", table, persistent=False)
            positional = "none"
        else:
            self.pos_2d = None
        self.transformer = Transformer(
            width, layers, heads, mlp_ratio, dropout, positional=positional, max_len=1 + self.num_patches
        )
        self.flatten = Linear(self.num_patches * width, width) if pool == "flatten" else None

    def forward(self, images: Tensor, mask: Tensor | None = None) -> EncoderOutput:
        """Encode images; `mask` is accepted for interface symmetry and must be None."""
        if mask is not None:
            raise ValueError("image encoders take no mask: every patch is real")
        B, _, H, W = images.shape
        if (H, W) != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got {H}x{W}")
        if self.stem == "conv":
            images = images.contiguous(memory_format=torch.channels_last)
        x = self.patchify(images).flatten(2).transpose(1, 2)  # (B, N, W), row-major patches
        x = torch.cat([self.cls.to(x.dtype).expand(B, 1, -1), x], dim=1)  # (B, 1 + N, W)
        if self.pos_2d is not None:
            x = x + self.pos_2d.to(x.dtype)
        x = self.transformer(x)  # (B, 1 + N, W)
        tokens = x[:, 1:]
        if self.flatten is not None:
            pooled = self.flatten(tokens.flatten(1))
        else:
            pooled = x[:, 0] if self.pool == "cls" else tokens.mean(dim=1)
        mask = torch.ones(B, self.num_patches, dtype=torch.bool, device=images.device)
        return EncoderOutput(tokens=tokens, mask=mask, pooled=pooled)


def conv_stem(
    in_channels: int, width: int, patch_size: int, depth: int | tuple[int, ...] = 1, min_channels: int = 32
) -> nn.Sequential:
    """log2(patch_size) stages of stride-2 3×3 conv → GroupNorm → GELU (`depth` convs per stage,
    or one depth per stage), channels doubling up to `width` (at least `min_channels`), then a
    1×1 conv to `width`: (B, C, H, W) → (B, W, H/p, W/p)."""
    steps = patch_size.bit_length() - 1
    if patch_size < 2 or 1 << steps != patch_size:
        raise ValueError(f"stem='conv' needs a power-of-2 patch_size, got {patch_size}")
    depths = [depth] * steps if isinstance(depth, int) else list(depth)
    if len(depths) != steps or min(depths) < 1:
        raise ValueError(f"stem_depth={depth!r}: need one depth >= 1 per stage ({steps} stages for patch_size={patch_size})")
    layers: list[nn.Module] = []
    c_in = in_channels
    for i in range(steps):
        c_out = max(min_channels, width >> (steps - 1 - i))
        for j in range(depths[i]):  # the first conv of a stage halves the resolution, the rest keep it
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2 if j == 0 else 1, padding=1, bias=False),
                       nn.GroupNorm(norm_groups(c_out), c_out), nn.GELU()]
            c_in = c_out
    layers.append(nn.Conv2d(c_in, width, 1))
    return nn.Sequential(*layers)


RESNETS = ("resnet18", "resnet34", "resnet50")  # torchvision.models builders


class ResNet(nn.Module):
    """torchvision ResNet trunk without its classifier.

    Args:
        arch: `resnet18`, `resnet34` or `resnet50`.
        weights: None (random init) or a local file (`.safetensors`, or `.pt`/`.pth`/`.bin` loaded
            with `weights_only=True`) holding a torchvision ResNet state dict; `fc.*` is ignored.

    Shapes:
        forward(images (B, 3, H, W)) → EncoderOutput(tokens (B, h*w, C) the final feature map
        (h, w = H/32, W/32), mask (B, h*w) all True, pooled (B, C) its average); C = 512 for
        resnet18/34, 2048 for resnet50.
    """

    def __init__(
        self, arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet18", weights: str | None = None
    ) -> None:
        super().__init__()
        if arch not in RESNETS:
            raise ValueError(f"unknown ResNet {arch!r} (valid: {', '.join(RESNETS)})")
        import torchvision  # deferred: importing it costs seconds

        net = getattr(torchvision.models, arch)(weights=None)
        self.width = net.fc.in_features
        net.fc = nn.Identity()  # the classifier is replaced by the projection head downstream
        if weights is not None:
            load_into(net, load_state_dict_file(weights), weights, ignore_prefixes=("fc.",))
            log.info("loaded %s weights from %s", arch, weights)
        self.net = net

    def forward(self, images: Tensor, mask: Tensor | None = None) -> EncoderOutput:
        """Encode images; `mask` must be None."""
        if mask is not None:
            raise ValueError("image encoders take no mask: every pixel is real")
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(images))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))  # (B, C, h, w)
        tokens = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        pooled = tokens.mean(dim=1)  # = torchvision's adaptive average pool
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=images.device)
        return EncoderOutput(tokens=tokens, mask=mask, pooled=pooled)
