"""Image preprocessing: any raw image → a normalised float tensor (3, size, size).

Accepted items (the same code serves training, `model.embed` and prompts):
  - a path (str / Path) or the encoded bytes of a file: decoded with Pillow;
  - a PIL image, in any mode;
  - a numpy array, (H, W) or (H, W, C) with C in {1, 3, 4} — numpy follows PIL's HWC layout;
  - a torch tensor, (H, W) or (C, H, W) with C in {1, 3, 4} — torch follows torchvision's CHW layout.
  uint8 values are 0..255, uint16 0..65535, floats 0..1. A fourth channel is alpha.

Every failure that belongs to the item (missing, empty, corrupt or truncated file, HTML saved
as .png, decompression bomb, NaN pixels) raises `BadInput` with the reason, so loaders can skip
the row and count it.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps
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


class ImagePreprocessor:
    """Decode, convert to RGB, resize the shorter side, centre-crop, normalise.

    Args:
        size: output height and width.
        mean, std: per-channel normalisation (defaults: CLIP's).
        interpolation: resize filter ("bicubic" as CLIP, or "bilinear").
        max_pixels: images whose header claims more pixels are rejected before decoding
            (decompression-bomb guard). Pillow's own guard (2 × `Image.MAX_IMAGE_PIXELS`,
            ≈ 179 M px) still applies above that.
        background: RGB colour that transparent pixels are composited onto.
        augment: with `train=True`, a random resized crop (scale `crop_scale`) replaces the
            centre crop; `color_jitter` and `hflip` add to it. Colour and left/right are
            meaningful in many datasets (the synthetic world among them), so both are off by
            default.
        train: set by the trainer, never by the config: enables the augmentation.

    Shapes: `__call__` returns (3, size, size) float32; `collate` returns (B, 3, size, size), None.
    """

    modality = Modality.IMAGE
    random_options = ("augment",)  # the settings that make training calls random (see `stochastic`)

    def __init__(
        self,
        size: int = 224,
        *,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
        interpolation: Literal["bicubic", "bilinear"] = "bicubic",
        max_pixels: int = 64_000_000,
        background: tuple[int, int, int] = (255, 255, 255),
        augment: bool = False,
        crop_scale: tuple[float, float] = (0.8, 1.0),
        color_jitter: float = 0.0,
        hflip: bool = False,
        train: bool = False,
    ) -> None:
        if size <= 0 or max_pixels <= 0:
            raise ConfigError(f"image preprocess: size and max_pixels must be positive, got {size}, {max_pixels}")
        if len(mean) != 3 or len(std) != 3 or len(background) != 3:
            raise ConfigError("image preprocess: mean, std and background need 3 values (R, G, B)")
        if any(s <= 0 for s in std):
            raise ConfigError(f"image preprocess: std must be positive, got {std}")
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ConfigError(f"image preprocess: crop_scale must satisfy 0 < lo <= hi <= 1, got {crop_scale}")
        if color_jitter < 0:
            raise ConfigError(f"image preprocess: color_jitter must be >= 0, got {color_jitter}")
        if interpolation not in _INTERPOLATION:
            raise ConfigError(f"image preprocess: interpolation must be one of {list(_INTERPOLATION)}")
        self.size = size
        self.mean, self.std = tuple(mean), tuple(std)
        self.max_pixels = max_pixels
        self.background = tuple(background)
        self.train = train
        self.augment = augment
        self.interpolation = _INTERPOLATION[interpolation]
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        self.augmentation = self._build_augmentation(crop_scale, color_jitter, hflip)

    @property
    def stochastic(self) -> bool:
        """True when two calls on the same item can differ (so samples must not be cached)."""
        return self.train and self.augment

    def _build_augmentation(self, crop_scale, color_jitter: float, hflip: bool) -> v2.Compose | None:
        """The random ops (training only); None means the deterministic resize + centre crop."""
        if not self.stochastic:
            return None
        crop = v2.RandomResizedCrop(self.size, scale=crop_scale, interpolation=self.interpolation, antialias=True)
        ops: list = [crop]
        if hflip:
            ops.append(v2.RandomHorizontalFlip())
        if color_jitter > 0:
            # no hue: a hue shift turns a red circle into a green one
            ops.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
        return v2.Compose(ops)

    def __call__(self, item: Any) -> Tensor:
        """One raw image → (3, size, size) float32. Raises BadInput with the reason."""
        chw = load_image(item, max_pixels=self.max_pixels, background=self.background)  # (3, H, W)
        if self.augmentation is not None:
            chw = self.augmentation(chw)
        else:
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
        return f"ImagePreprocessor(size={self.size}, train={self.train}, augment={self.augment})"


# --------------------------------------------------------------------------------------------
# Decoding: anything → (3, H, W) uint8 or float in [0, 1]
# --------------------------------------------------------------------------------------------


def load_image(item: Any, *, max_pixels: int = 64_000_000, background=(255, 255, 255)) -> Tensor:
    """Decode one raw image into an RGB tensor (3, H, W), uint8 (0..255) or float32 (0..1)."""
    if isinstance(item, (str, Path)):
        return _decode(Path(item), max_pixels, background)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(item)), max_pixels, background)
    if isinstance(item, Image.Image):
        return pil_to_rgb_tensor(item, background)
    if isinstance(item, np.ndarray):
        if item.ndim == 2:
            item = item[..., None]
        if item.ndim != 3:
            raise BadInput(f"image array must be (H, W) or (H, W, C); got shape {item.shape}")
        if not item.flags.writeable:  # e.g. np.asarray(pil_image); torch warns on read-only memory
            item = item.copy()
        return _chw_to_rgb(torch.from_numpy(np.ascontiguousarray(item)).permute(2, 0, 1), background)
    if isinstance(item, Tensor):
        return _chw_to_rgb(item.detach().cpu().unsqueeze(0) if item.ndim == 2 else item.detach().cpu(), background)
    raise BadInput(f"unsupported image input of type {type(item).__name__} (path, bytes, PIL image, array or tensor)")


def _decode(source: Path | io.BytesIO, max_pixels: int, background) -> Tensor:
    name = str(source) if isinstance(source, Path) else "<bytes>"
    if isinstance(source, Path):
        check_file(source)
    try:
        with warnings.catch_warnings():
            # our own max_pixels check below is the authoritative guard; Pillow's hard limit
            # (DecompressionBombError at 2 × MAX_IMAGE_PIXELS) still fires and is caught
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(source)  # lazy: reads the header only
    except Image.DecompressionBombError as e:
        raise BadInput(f"decompression bomb refused: {name} ({e})") from None
    except Exception as e:  # noqa: BLE001 - any failure to parse an untrusted header = bad file
        raise BadInput(f"not a readable image: {name} ({type(e).__name__}: {e})") from None
    with im:
        width, height = im.size
        if width * height > max_pixels:
            raise BadInput(
                f"image too large: {name} header claims {width}x{height} = {width * height:,} pixels "
                f"> max_pixels {max_pixels:,} (decompression-bomb guard; not decoded)"
            )
        try:
            im.load()
        except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, zlib/struct errors...
            raise BadInput(f"corrupt or truncated image: {name} ({type(e).__name__}: {e})") from None
        return pil_to_rgb_tensor(im, background)



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
