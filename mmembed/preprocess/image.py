"""Image preprocessing: any raw image → a normalised float tensor (3, size, size).

Accepted items (the same code serves training, `model.embed` and prompts):
  - a path (str / Path) or the encoded bytes of a file: decoded with Pillow;
  - a PIL image, in any mode;
  - a numpy array, (H, W) or (H, W, C) with C in {1, 3, 4} — numpy follows PIL's HWC layout;
  - a torch tensor, (H, W) or (C, H, W) with C in {1, 3, 4} — torch follows torchvision's CHW layout.
  uint8 values are 0..255, uint16 0..65535, floats 0..1. A fourth channel is alpha.

Limits on hostile files, checked before anything is decoded:
  - formats: only an allow-list of raster formats is opened (default PNG, JPEG, GIF, BMP, TIFF,
    WebP), whatever the file name says; Pillow is never offered the others, so a PostScript file
    named .png is refused and can never start Ghostscript;
  - size: at most `max_pixels` pixels (files), each side at most `max_side` and the aspect ratio
    at most `max_aspect` (every input: the resize of a 16,000,000 x 1 strip would allocate
    ~10^10 pixels).

Every failure that belongs to the item (missing, empty, corrupt or truncated file, HTML saved
as .png, a format or shape outside the limits, NaN pixels, any error while decoding, converting
or resizing) raises `BadInput` with the reason, so loaders can skip the row and count it.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from mmembed.errors import BadInput, ConfigError
from mmembed.preprocess.files import check_file
from mmembed.modality import Modality

# open_clip / OpenAI CLIP statistics: the usual choice, and what pretrained CLIP towers expect.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa"}  # "La" has no Pillow conversion: BadInput
_HIGH_DEPTH_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}
_INTERPOLATION = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR}

DEFAULT_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
# raster formats Pillow decodes in-process (EPS needs Ghostscript; TGA has no magic bytes to
# check, so Pillow would try it on any file): the only names `formats` accepts
SAFE_FORMATS = (*DEFAULT_FORMATS, "AVIF", "DDS", "ICO", "JPEG2000", "PCX", "PPM", "QOI", "SGI")


@dataclass(frozen=True)
class ImageLimits:
    """What `load_image` accepts: `formats` and `max_pixels` are read from a file's header before
    decoding; `max_side` and `max_aspect` (longer side / shorter side) bound every input."""

    formats: tuple[str, ...] = DEFAULT_FORMATS
    max_pixels: int = 64_000_000
    max_side: int = 16384
    max_aspect: float = 50.0

    def __post_init__(self) -> None:
        Image.init()  # register every plugin, so `Image.open(formats=...)` finds the allowed ones
        formats = tuple(f.upper() for f in self.formats)
        valid = [f for f in SAFE_FORMATS if f in Image.OPEN]
        unknown = [f for f in formats if f not in valid]
        if not formats or unknown:
            raise ConfigError(
                f"image preprocess: formats {unknown or '(empty)'} not accepted (valid: {', '.join(valid)})"
            )
        if min(self.max_pixels, self.max_side) <= 0:
            raise ConfigError(f"image preprocess: max_pixels and max_side must be positive, got {self.max_pixels}, "
                              f"{self.max_side}")
        if not self.max_aspect >= 1:
            raise ConfigError(f"image preprocess: max_aspect must be >= 1, got {self.max_aspect}")
        object.__setattr__(self, "formats", formats)


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
        if len(mean) != 3 or len(std) != 3 or len(background) != 3:
            raise ConfigError("image preprocess: mean, std and background need 3 values (R, G, B)")
        if any(s <= 0 for s in std):
            raise ConfigError(f"image preprocess: std must be positive, got {std}")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ConfigError(f"image preprocess: crop_scale must satisfy 0 < lo <= hi <= 1, got {crop_scale}")
        if color_jitter < 0 or affine_degrees < 0 or not 0 <= affine_translate < 0.5:
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

    def __call__(self, item: Any) -> Tensor:
        """One raw image → (3, size, size) float32. Raises BadInput with the reason."""
        chw = load_image(item, limits=self.limits, background=self.background)  # (3, H, W)
        with _failures_as_bad_input("image resize"):
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


# --------------------------------------------------------------------------------------------
# Decoding: anything → (3, H, W) uint8 or float in [0, 1]
# --------------------------------------------------------------------------------------------


_DEFAULT_LIMITS = ImageLimits()


def load_image(item: Any, *, limits: ImageLimits = _DEFAULT_LIMITS, background=(255, 255, 255)) -> Tensor:
    """Decode one raw image into an RGB tensor (3, H, W), uint8 (0..255) or float32 (0..1).

    Raises BadInput, and nothing else but MemoryError, for any image that cannot be used.
    """
    name = str(item) if isinstance(item, (str, Path)) else type(item).__name__
    with _failures_as_bad_input(f"image decoding of {name}"):
        return _load(item, limits, background)


def _load(item: Any, limits: ImageLimits, background) -> Tensor:
    if isinstance(item, (str, Path)):
        return _decode(Path(item), limits, background)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(item)), limits, background)
    if isinstance(item, Image.Image):
        _check_shape(item.width, item.height, limits, "PIL image")
        return pil_to_rgb_tensor(item, background)
    if isinstance(item, np.ndarray):
        if item.ndim == 2:
            item = item[..., None]
        if item.ndim != 3:
            raise BadInput(f"image array must be (H, W) or (H, W, C); got shape {item.shape}")
        _check_shape(item.shape[1], item.shape[0], limits, "image array")
        if not item.flags.writeable:  # e.g. np.asarray(pil_image); torch warns on read-only memory
            item = item.copy()
        return _chw_to_rgb(torch.from_numpy(np.ascontiguousarray(item)).permute(2, 0, 1), background)
    if isinstance(item, Tensor):
        if item.ndim in (2, 3):
            _check_shape(item.shape[-1], item.shape[-2], limits, "image tensor")
        return _chw_to_rgb(item.detach().cpu().unsqueeze(0) if item.ndim == 2 else item.detach().cpu(), background)
    raise BadInput(f"unsupported image input of type {type(item).__name__} (path, bytes, PIL image, array or tensor)")


@contextmanager
def _failures_as_bad_input(what: str) -> Iterator[None]:
    """Any exception inside → BadInput naming `what` and the exception, so the row is skipped.

    MemoryError passes through: it says the process is short of memory, not that the item is
    bad (the limits keep any one item's allocations bounded).
    """
    try:
        yield
    except (BadInput, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - the point: one hostile item must never stop the epoch
        raise BadInput(f"{what} failed ({type(e).__name__}: {e})") from e


def _check_shape(width: int, height: int, limits: ImageLimits, what: str) -> None:
    """A side over max_side or an aspect ratio over max_aspect → BadInput (before any resize)."""
    longer, shorter = max(width, height), min(width, height)
    if longer > limits.max_side:
        raise BadInput(f"image too large: {what} {width}x{height} has a side > max_side {limits.max_side}")
    # resizing the shorter side to `size` makes the longer one size * aspect: bound it
    if shorter > 0 and longer / shorter > limits.max_aspect:
        raise BadInput(f"image too elongated: {what} {width}x{height} has aspect ratio {longer / shorter:,.0f}:1 "
                       f"> max_aspect {limits.max_aspect:g}")


def _decode(source: Path | io.BytesIO, limits: ImageLimits, background) -> Tensor:
    name = str(source) if isinstance(source, Path) else "<bytes>"
    if isinstance(source, Path):
        check_file(source)
    with _open_header(source, name, limits) as im:
        width, height = im.size
        if width * height > limits.max_pixels:
            raise BadInput(
                f"image too large: {name} header claims {width}x{height} = {width * height:,} pixels "
                f"> max_pixels {limits.max_pixels:,} (decompression-bomb guard; not decoded)"
            )
        _check_shape(width, height, limits, f"{name} header claims")
        try:
            im.load()
        except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, zlib/struct errors...
            raise BadInput(f"corrupt or truncated image: {name} ({type(e).__name__}: {e})") from None
        return pil_to_rgb_tensor(im, background)


def _open_header(source: Path | io.BytesIO, name: str, limits: ImageLimits) -> Image.Image:
    """Image.open restricted to the allowed formats (lazy: reads the header only)."""
    try:
        with warnings.catch_warnings():
            # our own max_pixels check is the authoritative guard; Pillow's hard limit
            # (DecompressionBombError at 2 × MAX_IMAGE_PIXELS) still fires and is caught
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # `formats=` means Pillow never hands the bytes to any other plugin
            return Image.open(source, formats=limits.formats)
    except Image.DecompressionBombError as e:
        raise BadInput(f"decompression bomb refused: {name} ({e})") from None
    except UnidentifiedImageError:
        detected = _sniff_format(source, exclude=limits.formats)
        if detected is None:
            raise BadInput(f"not a readable image: {name} (no {', '.join(limits.formats)} header)") from None
        raise BadInput(f"image format {detected} is not allowed: {name} "
                       f"(allowed: {', '.join(limits.formats)}; see the `formats` option)") from None
    except Exception as e:  # noqa: BLE001 - any failure to parse an untrusted header = bad file
        raise BadInput(f"not a readable image: {name} ({type(e).__name__}: {e})") from None


def _sniff_format(source: Path | io.BytesIO, exclude: tuple[str, ...]) -> str | None:
    """The Pillow format whose magic bytes start the file, for the message (nothing is parsed)."""
    if isinstance(source, Path):
        with source.open("rb") as f:
            prefix = f.read(16)
    else:
        prefix = source.getvalue()[:16]
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        if fmt in exclude or accept is None:  # no magic bytes (TGA, IM...): cannot tell
            continue
        with suppress(Exception):  # some checks index past a short prefix
            if accept(prefix):
                return fmt
    return None


def pil_to_rgb_tensor(im: Image.Image, background=(255, 255, 255)) -> Tensor:
    """Any PIL mode → RGB uint8 (3, H, W): alpha composited on `background`, 16-bit/float scaled."""
    if im.width == 0 or im.height == 0:
        raise BadInput(f"empty image ({im.width}x{im.height})")
    try:
        im = ImageOps.exif_transpose(im)  # camera orientation, as every photo viewer shows it
        if im.mode in _HIGH_DEPTH_MODES:
            gray = _high_depth_to_uint8(np.asarray(im), im.mode)  # (H, W)
            return torch.from_numpy(gray).unsqueeze(0).expand(3, -1, -1).contiguous()
        if im.mode in _ALPHA_MODES or im.info.get("transparency") is not None:
            rgba = im.convert("RGBA")
            base = Image.new("RGBA", rgba.size, (*background, 255))
            im = Image.alpha_composite(base, rgba)
        rgb = im.convert("RGB") if im.mode != "RGB" else im
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 - unsupported mode conversions raise ValueError/OSError
        raise BadInput(f"cannot convert image mode {im.mode!r} to RGB ({type(e).__name__}: {e})") from None
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)  # (3, H, W) uint8


def _high_depth_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """16/32-bit integer or float grayscale → uint8 with the full range preserved (not clipped)."""
    if mode == "F":
        if not np.isfinite(a).all():
            raise BadInput("float image contains NaN/Inf pixels")
        # floats in [0, 1] are normalised intensities; anything else is taken as 0..255
        scaled = a * 255.0 if a.size and a.min() >= 0 and a.max() <= 1 else a
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    a = a.astype(np.int64)
    # "I" holds 16-bit data in practice (PNG/TIFF); values above 255 mean a 16-bit range
    if mode.startswith("I;16") or (a.size and a.max() > 255):
        return ((np.clip(a, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
    return np.clip(a, 0, 255).astype(np.uint8)


def _chw_to_rgb(t: Tensor, background) -> Tensor:
    """(C, H, W) tensor with C in {1, 3, 4} → (3, H, W) uint8 or float32 in [0, 1]."""
    if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
        raise BadInput(f"image tensor must be (H, W) or (C, H, W) with C in 1, 3, 4; got shape {tuple(t.shape)}")
    if t.shape[1] == 0 or t.shape[2] == 0:
        raise BadInput(f"empty image (shape {tuple(t.shape)})")
    if t.dtype == torch.uint16:
        t = t.to(torch.float32) / 65535.0
    elif t.dtype.is_floating_point:
        t = t.to(torch.float32)
        if not torch.isfinite(t).all():
            raise BadInput("image contains NaN/Inf pixels")
        t = t.clamp(0.0, 1.0)
    elif t.dtype != torch.uint8:
        raise BadInput(f"unsupported image dtype {t.dtype} (uint8, uint16 or float)")
    if t.shape[0] == 1:
        return t.expand(3, -1, -1).contiguous()
    if t.shape[0] == 4:
        scale = 255.0 if t.dtype == torch.uint8 else 1.0
        rgb, alpha = t[:3].float() / scale, t[3:].float() / scale
        bg = torch.tensor(background, dtype=torch.float32).view(3, 1, 1) / 255.0
        out = rgb * alpha + bg * (1 - alpha)
        return (out * 255).round().to(torch.uint8) if t.dtype == torch.uint8 else out
    return t.contiguous()
