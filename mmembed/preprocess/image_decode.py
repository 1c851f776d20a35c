"""Decoding any raw image → an RGB tensor (3, H, W), uint8 (0..255) or float32 (0..1), within limits.

Accepted items (the same code serves training, `model.embed`, prompts and the web app):
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
as .png, a format or shape outside the limits, NaN pixels, any error while decoding or
converting) raises `BadInput` with the reason, so loaders can skip the row and count it.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from mmembed.errors import BadInput, ConfigError
from mmembed.preprocess.files import as_path, check_file, shown

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa"}  # "La" has no Pillow conversion: BadInput
_HIGH_DEPTH_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}

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


_DEFAULT_LIMITS = ImageLimits()


def load_image(item: Any, *, limits: ImageLimits = _DEFAULT_LIMITS, background=(255, 255, 255)) -> Tensor:
    """Decode one raw image into an RGB tensor (3, H, W), uint8 (0..255) or float32 (0..1).

    Raises BadInput, and nothing else but MemoryError, for any image that cannot be used.
    """
    name = shown(item) if isinstance(item, (str, Path)) else type(item).__name__
    try:
        with failures_as_bad_input(f"image decoding of {name}"):
            return _load(item, limits, background)
    except BadInput as e:  # a file's content errors ("NaN pixels") name the file, as its others do
        # (a name with a NUL or a lone surrogate is already there in its ascii() form)
        if isinstance(item, (str, Path)) and name not in str(e) and ascii(name) not in str(e):
            raise BadInput(f"{e}: {name}") from None
        raise


def _load(item: Any, limits: ImageLimits, background) -> Tensor:
    if isinstance(item, (str, Path)):
        return _decode(as_path(item), limits, background)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(item)), limits, background)
    if isinstance(item, Image.Image):
        _check_shape(item.width, item.height, limits, "PIL image")
        return pil_to_rgb_tensor(item, background)
    if isinstance(item, np.ndarray):
        if item.ndim == 2:
            item = item[..., None]
        if item.ndim != 3 or item.shape[-1] not in (1, 3, 4):  # the layout first: a CHW array is no tall image
            raise BadInput(f"image array must be (H, W) or (H, W, C) with C in 1, 3, 4; got shape {item.shape}")
        _check_shape(item.shape[1], item.shape[0], limits, "image array")
        if item.dtype.byteorder not in "=|":  # big-endian pixels (FITS, np.frombuffer('>u2')): native first
            item = item.astype(item.dtype.newbyteorder("="))
        if not item.flags.writeable:  # e.g. np.asarray(pil_image); torch warns on read-only memory
            item = item.copy()
        return _chw_to_rgb(torch.from_numpy(np.ascontiguousarray(item)).permute(2, 0, 1), background)
    if isinstance(item, Tensor):
        if item.ndim == 3 and item.shape[0] not in (1, 3, 4):
            raise BadInput(f"image tensor must be (H, W) or (C, H, W) with C in 1, 3, 4; got shape {tuple(item.shape)}")
        if item.ndim in (2, 3):
            _check_shape(item.shape[-1], item.shape[-2], limits, "image tensor")
        return _chw_to_rgb(item.detach().cpu().unsqueeze(0) if item.ndim == 2 else item.detach().cpu(), background)
    raise BadInput(f"unsupported image input of type {type(item).__name__} (path, bytes, PIL image, array or tensor)")


@contextmanager
def failures_as_bad_input(what: str) -> Iterator[None]:
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
    name = shown(source) if isinstance(source, Path) else "<bytes>"
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
        if (key := colour_key(im)) is not None:  # our own image: the 8-bit key, read after loading too
            im.info["transparency"] = key
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
            allowed = _sniff_format(source, exclude=tuple(f for f in Image.ID if f not in limits.formats))
            if allowed is not None:  # its signature, but Pillow could not read the header after it
                raise BadInput(f"truncated or corrupt {allowed} file: {name}") from None
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
    key = colour_key(im)  # before loading: the tile still says whether the samples were 16-bit
    try:
        im.load()  # a lazily opened image decodes here: a truncated or closed one fails as itself
    except Exception as e:  # noqa: BLE001 - OSError (truncated), AttributeError/ValueError (closed)
        raise BadInput(f"corrupt, truncated or closed image ({type(e).__name__}: {e})") from None
    try:
        im = ImageOps.exif_transpose(im)  # camera orientation, as every photo viewer shows it
        if key is not None:  # an RGB tRNS colour: its pixels are the background
            rgb = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)  # (3, H, W)
            clear = (rgb == torch.tensor(key, dtype=torch.uint8)[:, None, None]).all(dim=0)  # (H, W)
            rgb[:, clear] = torch.tensor(background, dtype=torch.uint8)[:, None]
            return rgb
        if im.mode in _HIGH_DEPTH_MODES:
            pixels = np.asarray(im)
            rgb = torch.from_numpy(_high_depth_to_uint8(pixels, im.mode)).unsqueeze(0).repeat(3, 1, 1)  # (3, H, W)
            clear = im.info.get("transparency")  # a 16-bit grey PNG's tRNS: one fully transparent value
            if isinstance(clear, int):
                rgb[:, torch.from_numpy(pixels == clear)] = torch.tensor(background, dtype=torch.uint8)[:, None]
            return rgb
        # has_transparency_data: a palette of RGBA colours too (rgba.convert("P") keeps no info["transparency"],
        # and its own PNG, which gets a tRNS chunk, read composited where the image read black)
        if im.mode in _ALPHA_MODES or im.info.get("transparency") is not None or _palette_alpha(im):
            rgba = im.convert("RGBA")
            base = Image.new("RGBA", rgba.size, (*background, 255))
            im = Image.alpha_composite(base, rgba)
        rgb = im.convert("RGB") if im.mode != "RGB" else im
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 - unsupported mode conversions raise ValueError/OSError
        raise BadInput(f"cannot convert image mode {im.mode!r} to RGB ({type(e).__name__}: {e})") from None
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)  # (3, H, W) uint8


def colour_key(im: Image.Image) -> tuple[int, int, int] | None:
    """An RGB image's transparent colour (a PNG's tRNS) at 8 bits, or None. Pillow decodes a 16-bit
    PNG to its high bytes but keeps the colour at 16 bits, which then matched no pixel."""
    key = im.info.get("transparency")
    if im.mode != "RGB" or not isinstance(key, tuple) or len(key) != 3:
        return None
    sixteen = any(len(t) > 3 and t[3] == "RGB;16B" for t in im.tile) or max(key) > 255  # the tile: not yet loaded
    return tuple(v >> 8 for v in key) if sixteen else key


def _palette_alpha(im: Image.Image) -> bool:
    """A palette of RGBA colours (Pillow's has_transparency_data, which Pillow 10.0 lacks)."""
    return im.mode == "P" and im.palette is not None and im.palette.mode == "RGBA"


def _high_depth_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """16/32-bit integer or float grayscale → uint8 with the full range preserved (not clipped).

    Values inside a usual range keep its meaning: floats 0..1 or 0..255 (each with a little slack,
    clipped), integers 0..255 or 0..65535 (always, for the "I;16" modes). Any other values (a float TIFF
    of 0..1000, 32-bit counts, signed 16-bit) are scaled by their own range: min → 0, max → 255.
    """
    if mode == "F":
        if not np.isfinite(a).all():
            raise BadInput("float image contains NaN/Inf pixels")
        # floats in [0, 1] are normalised intensities (with the slack a float tensor gets: a resize
        # overshoots 1.0 a little, and a 1.02 made the image 0..255, near black)
        if a.min() >= -_FLOAT_SLACK and a.max() <= 1 + _FLOAT_SLACK:
            return np.clip(np.rint(np.clip(a, 0, 1) * 255.0), 0, 255).astype(np.uint8)
        if a.min() >= -_FLOAT_SLACK_255 and a.max() <= 255 + _FLOAT_SLACK_255:  # 0..255, as resized
            return np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return _own_range_to_uint8(a)
    a = a.astype(np.int64)
    low, high = a.min(), a.max()
    if 0 <= low and high <= 255 and not mode.startswith("I;16"):
        return a.astype(np.uint8)
    # "I" holds 16-bit data in practice (PNG/TIFF); values above 255 mean a 16-bit range
    if 0 <= low and high <= 65535:
        return ((a * 255 + 32767) // 65535).astype(np.uint8)
    return _own_range_to_uint8(a)


def _own_range_to_uint8(a: np.ndarray) -> np.ndarray:
    """min → 0, max → 255 (a constant image → 0): clipping such values to 0..255 made most pixels white."""
    low, high = float(a.min()), float(a.max())
    scaled = (a.astype(np.float64) - low) * (255.0 / (high - low)) if high > low else np.zeros(a.shape)
    return np.rint(scaled).astype(np.uint8)


# how far past [0, 1] a float image may go and be clamped: a bicubic resize overshoots sharp edges
# by up to ~10% (a 1e-3 slack refused such images); 0..255 values or mean/std-normalised ones
# (about -2.1 to 2.6) lie well beyond it
_FLOAT_SLACK = 0.5
# the same for a grey float image of 0..255 (a resize overshot it to -8..263, and scaling that by its
# own range moved every pixel): a quarter of the range, well inside a 0..1000 TIFF's or counts'
_FLOAT_SLACK_255 = 0.25 * 255


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
        low, high = float(t.min()), float(t.max())
        if low < -_FLOAT_SLACK or high > 1 + _FLOAT_SLACK:  # 0..255 or normalised values, clamped to white/black
            raise BadInput(f"a float image's values must lie in [0, 1], these span [{low:.3g}, {high:.3g}]: "
                           "divide 0..255 values by 255, or give uint8 (an image already normalised cannot be read)")
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
