"""Image preprocessing: any raw image → a normalised float tensor (3, size, size).

`image_decode.load_image` turns the raw item (path, bytes, PIL image, array or tensor) into RGB
within the limits on hostile files; this file resizes the shorter side, centre-crops and
normalises, and draws the training augmentations. Every failure that belongs to the item
(decoding, converting, resizing) raises `BadInput` with the reason, so loaders can skip the row
and count it.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from mmembed.errors import ConfigError
from mmembed.preprocess.image_decode import DEFAULT_FORMATS, ImageLimits, failures_as_bad_input, load_image
from mmembed.modality import Modality

# open_clip / OpenAI CLIP statistics: the usual choice, and what pretrained CLIP towers expect.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_INTERPOLATION = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR}


class ImagePreprocessor:
    """Decode, convert to RGB, resize the shorter side, centre-crop, normalise.

    Args:
        size: output height and width.
        mean, std: per-channel normalisation (defaults: CLIP's).
        interpolation: resize filter ("bicubic" as CLIP, or "bilinear").
        max_pixels: images whose header claims more pixels are rejected before decoding
            (decompression-bomb guard). Pillow's own guard (2 × `Image.MAX_IMAGE_PIXELS`,
            ≈ 179 M px) still applies above that.
        max_side, max_aspect: images (files, PIL images, arrays, tensors) with a side longer
            than `max_side` or a longer/shorter side ratio above `max_aspect` are rejected
            (files before decoding).
        formats: the file formats that are opened (Pillow's names, any case); the rest are
            rejected naming the detected format. Valid: `SAFE_FORMATS`.
        background: RGB colour that transparent pixels are composited onto.
        augment: with `train=True`, the `augment` step (below) runs on every training sample.
        crop_scale: area range of its random resized crop (aspect ratio log-uniform in 3/4..4/3).
        affine_degrees, affine_translate: a random rotation in ±degrees and a shift of up to
            this fraction of the side, each way; uncovered pixels get `background`. 0 = off.
        color_jitter: brightness, contrast and saturation factors drawn in 1 ± this (no hue: a
            hue shift turns a red circle into a green one). 0 = off.
        hflip: mirror half of the samples. Colour and left/right are meaningful in many
            datasets (the synthetic world among them), so jitter and flips are off by default.
        train: set by the trainer, never by the config: enables the augmentation.

    Augmentation runs after preprocessing (`augment`, like the audio side's SpecAugment), on the
    (3, size, size) tensor `__call__` returns: calls stay deterministic, so a data cache holds
    clean images and each epoch draws fresh augmentations from the per-sample seed (the same
    with any number of workers and after a resume). The price: the crop is taken from the
    resized image, not the full-resolution file, so a 0.5-area crop is upsampled by √2.

    Shapes: `__call__` returns (3, size, size) float32; `collate` returns (B, 3, size, size), None.
    """

    modality = Modality.IMAGE
    random_options = ()  # no setting makes `__call__` random: augmentation is the separate `augment`

    def __init__(
        self,
        size: int = 224,
        *,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
        interpolation: Literal["bicubic", "bilinear"] = "bicubic",
        max_pixels: int = 64_000_000,
        max_side: int = 16384,
        max_aspect: float = 50.0,
        formats: tuple[str, ...] = DEFAULT_FORMATS,
        background: tuple[int, int, int] = (255, 255, 255),
        augment: bool = False,
        crop_scale: tuple[float, float] = (0.8, 1.0),
        affine_degrees: float = 0.0,
        affine_translate: float = 0.0,
        color_jitter: float = 0.0,
        hflip: bool = False,
        train: bool = False,
    ) -> None:
        if size <= 0:
            raise ConfigError(f"image preprocess: size must be positive, got {size}")
        self.limits = ImageLimits(tuple(formats), max_pixels, max_side, max_aspect)
        if size > max_side:  # every image is resized to size x size (the error blamed an image)
            raise ConfigError(f"image preprocess: size={size} exceeds max_side={max_side}")
        if len(mean) != 3 or len(std) != 3 or len(background) != 3:
            raise ConfigError("image preprocess: mean, std and background need 3 values (R, G, B)")
        if not all(math.isfinite(v) for v in (*mean, *std)) or any(s <= 0 for s in std):
            raise ConfigError(f"image preprocess: mean must be finite and std finite and positive, got {mean}, {std}")
        if not all(0 <= b <= 255 for b in background):
            raise ConfigError(f"image preprocess: background values must lie in 0..255, got {background}")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ConfigError(f"image preprocess: crop_scale must satisfy 0 < lo <= hi <= 1, got {crop_scale}")
        if not (0 <= color_jitter < math.inf and 0 <= affine_degrees < math.inf and 0 <= affine_translate < 0.5):
            raise ConfigError(f"image preprocess: color_jitter={color_jitter} and affine_degrees={affine_degrees} "
                              f"must be >= 0 and affine_translate={affine_translate} in [0, 0.5)")
        if interpolation not in _INTERPOLATION:
            raise ConfigError(f"image preprocess: interpolation must be one of {list(_INTERPOLATION)}")
        self.size = size
        self.mean, self.std = tuple(mean), tuple(std)
        self.background = tuple(background)
        self.train = train
        self.augment_on = augment
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.affine_degrees, self.affine_translate = float(affine_degrees), float(affine_translate)
        self.color_jitter, self.hflip = float(color_jitter), bool(hflip)
        self.interpolation = _INTERPOLATION[interpolation]
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        self._fill = [(b / 255 - m) / s for b, m, s in zip(self.background, self.mean, self.std)]

    stochastic = False  # `__call__` is deterministic: cacheable even when training

    @property
    def augments(self) -> bool:
        """True when `augment` is random (training with augmentation); it runs after any cache."""
        return self.train and self.augment_on

    def augment(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Random resized crop, affine, colour jitter and flip of one (3, size, size) output of
        `__call__`: a new tensor, the input intact. Every draw comes from `generator` (the dataset
        seeds one per sample) or the global RNG, in a fixed order."""
        if not self.augments:
            return x
        u = torch.rand(11, generator=generator).tolist()
        out = self._random_resized_crop(x, u[0], u[1], u[2], u[3])
        if self.affine_degrees > 0 or self.affine_translate > 0:
            shift = [round((2 * v - 1) * self.affine_translate * self.size) for v in (u[5], u[6])]
            out = F.affine(out, angle=(2 * u[4] - 1) * self.affine_degrees, translate=shift, scale=1.0,
                           shear=[0.0], interpolation=v2.InterpolationMode.BILINEAR, fill=self._fill)
        if self.color_jitter > 0:
            out = self._jitter(out, *(1 + self.color_jitter * (2 * v - 1) for v in u[7:10]))
        if self.hflip and u[10] < 0.5:
            out = F.horizontal_flip(out)
        return out

    def _random_resized_crop(self, x: Tensor, u_area: float, u_ratio: float, u_top: float, u_left: float) -> Tensor:
        lo, hi = self.crop_scale
        if lo == hi == 1.0:
            return x.clone()
        area = self.size * self.size * (lo + (hi - lo) * u_area)
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u_ratio)
        w = min(self.size, max(1, round(math.sqrt(area * ratio))))
        h = min(self.size, max(1, round(math.sqrt(area / ratio))))
        top, left = int(u_top * (self.size - h + 1)), int(u_left * (self.size - w + 1))
        return F.resized_crop(x, top, left, h, w, [self.size, self.size], interpolation=self.interpolation,
                              antialias=True)

    def _jitter(self, x: Tensor, brightness: float, contrast: float, saturation: float) -> Tensor:
        """Brightness, contrast and saturation factors (clamped at 0), applied in pixel space."""
        rgb = (x * self._std + self._mean).clamp_(0, 1)
        rgb = F.adjust_brightness(rgb, max(brightness, 0.0))
        rgb = F.adjust_saturation(F.adjust_contrast(rgb, max(contrast, 0.0)), max(saturation, 0.0))
        return rgb.sub_(self._mean).div_(self._std)

    def example(self) -> Any:
        """A blank image (see `Preprocessor.example`): every image becomes size × size."""
        from PIL import Image

        return Image.new("RGB", (self.size, self.size))

    def __call__(self, item: Any) -> Tensor:
        """One raw image → (3, size, size) float32. Raises BadInput with the reason."""
        chw = load_image(item, limits=self.limits, background=self.background)  # (3, H, W)
        with failures_as_bad_input("image resize"):
            return self._resize_and_normalise(chw)

    def _resize_and_normalise(self, chw: Tensor) -> Tensor:
        # functional calls, not a Compose: this path runs per sample and the wrappers cost
        # as much as the arithmetic on small images
        chw = F.resize(chw, [self.size], interpolation=self.interpolation, antialias=True)
        chw = F.center_crop(chw, [self.size, self.size])  # (3, size, size)
        if chw.dtype == torch.uint8:
            x = chw.to(torch.float32).div_(255.0)
        else:
            x = chw.clamp(0.0, 1.0)  # bicubic resizing of floats overshoots; uint8 is clamped by the kernel
        return x.sub_(self._mean).div_(self._std)

    def collate(self, samples: list[Tensor]) -> tuple[Tensor, None]:
        """Stack (3, H, W) samples → (B, 3, H, W); images need no padding mask."""
        return torch.stack(samples), None

    def __repr__(self) -> str:
        return f"ImagePreprocessor(size={self.size}, train={self.train}, augment={self.augment_on})"
