"""What `Memory.add` accepts, turned into what the store keeps: the file bytes and the text.

An item is `mm.Image`, `mm.Audio` or `mm.Text`, a plain `str` (text), or None with `text=`.
Media are kept as the bytes of a file, so what is stored is what gets embedded and exported:

    path or bytes             the file's own bytes, unchanged
    PIL image                 PNG (lossless; the image's own mode where PNG has it)
    array / tensor image      PNG of its RGB uint8 form (as `load_image` decodes it)
    (waveform, sample_rate)   WAV, 32-bit float samples (lossless for float32 and int16 input)

With `store_media="path"` a media item must be a file path: only its absolute path is kept.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mmembed.decoder.prompt import Media, Text
from mmembed.errors import BadInput, UserError
from mmembed.modality import Modality
from mmembed.text_encoding import SURROGATE

StoreMedia = Literal["bytes", "path"]
ItemLike = Media | str | None
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}


@dataclass(frozen=True)
class Entry:
    """One item ready to embed and store. `source` is what `model.embed` reads (text, bytes, path)."""

    modality: Modality
    source: Any
    text: str | None
    media: bytes | None = None
    media_path: str | None = None
    origin: str = ""  # what the user passed, for error messages: a path, or the object's type


@dataclass(frozen=True)
class Pending:
    """Items checked and embedded but not stored yet (`Memory.prepare`): a conversation's turn is
    stored with its answer, in one transaction (`Memory.add_turn`)."""

    entries: list[Entry]
    vectors: torch.Tensor  # (N, D) float32 unit rows, stored as they are
    role: str
    fingerprint: str  # the model that embedded them: a file holding another model's vectors refuses them


class ItemError(BadInput):
    """One item of a list cannot be used: `position` is its index in the list, `reason` says why."""

    def __init__(self, message: str, position: int, modality: str, reason: str):
        super().__init__(message)
        self.position, self.modality, self.reason = position, modality, reason


def to_entries(items: Sequence[ItemLike], texts: Sequence[str | None], store_media: StoreMedia = "bytes"
               ) -> list[Entry]:
    """`to_entry` of each (item, text); an item that cannot be used is an `ItemError` naming its index."""
    _check_store_media(store_media)  # not any item's fault
    entries = []
    for i, (item, text) in enumerate(zip(items, texts)):
        try:
            entries.append(to_entry(item, text, store_media))
        except BadInput as e:
            kind = str(getattr(item, "modality", "text"))
            raise ItemError(f"items[{i}] ({kind}): {e}", i, kind, str(e)) from None
        except UserError as e:  # not an item at all (a number): named by its place too
            raise UserError(f"items[{i}]: {e}") from None
    return entries


def to_entry(item: ItemLike, text: str | None, store_media: StoreMedia = "bytes") -> Entry:
    """Normalise one `add` argument pair; raises UserError / BadInput with one line."""
    _check_store_media(store_media)
    if text is not None and not isinstance(text, str):
        raise BadInput(f"text must be a str, got {type(text).__name__}")
    if text is not None:
        check_utf8(text, "text")
    if item is None:
        if text is None:
            raise UserError("add needs an item (mm.Image, mm.Audio, mm.Text or a str) or text=")
        item, text = Text(text), None
    if isinstance(item, str):
        item = Text(item)
    if not isinstance(item, Media):
        raise UserError(f"cannot store a {type(item).__name__}: pass mm.Image, mm.Audio, mm.Text or a str")
    if item.modality == Text.modality:  # the item is the text itself: nothing to encode
        return _inline_entry(item, text)
    origin = str(item.item) if isinstance(item.item, (str, Path)) else type(item.item).__name__
    if store_media == "path":
        path = _file_path(item.item)
        return Entry(item.modality, path, text, media_path=path, origin=origin)
    media = ENCODERS[item.modality](item.item)
    return Entry(item.modality, media, text, media=media, origin=origin)


def _check_store_media(store_media: object) -> None:
    if store_media not in ("bytes", "path"):
        raise UserError(f"store_media must be 'bytes' or 'path', got {store_media!r}")


def _inline_entry(item: Media, text: str | None) -> Entry:
    if text is not None:
        raise UserError(f"a {item.modality} item is its own text: pass text= only with a media item")
    if not isinstance(item.item, str) or not item.item.strip():
        raise BadInput(f"a {item.modality} item must be a non-empty str, got {item.item!r:.60}")
    check_utf8(item.item, f"a {item.modality} item")
    return Entry(item.modality, item.item, item.item)


def check_utf8(value: str, name: str) -> None:
    """BadInput for a str SQLite cannot store: lone surrogates (undecodable bytes of a command-line
    argument or a file name, as Python's surrogateescape keeps them)."""
    if m := SURROGATE.search(value):
        raise BadInput(f"{name} is not valid UTF-8 text (undecodable character at position {m.start()}): "
                       f"{value!r:.60}")


def _checked_path(item: str | Path) -> Path:
    """An existing, non-empty file's path; an empty or blank item is named as such (not as ".")."""
    from mmembed.preprocess.files import as_path, check_file  # on use: mmembed.preprocess loads torchvision

    path = as_path(item)
    check_file(path)
    return path


def _file_path(item: Any) -> str:
    if not isinstance(item, (str, Path)):
        raise UserError(f"store_media='path' needs a file path, got a {type(item).__name__}")
    return str(_checked_path(item).absolute())


def _file_bytes(item: Any) -> bytes | None:
    """A path's or a bytes-like's bytes; None for any other kind of item."""
    if isinstance(item, (str, Path)):
        path = _checked_path(item)
        try:
            return path.read_bytes()
        except OSError as e:
            raise BadInput(f"unreadable file {path} ({type(e).__name__}: {e})") from None
    if isinstance(item, (bytes, bytearray, memoryview)):
        if not len(item):
            raise BadInput("empty media bytes")
        return bytes(item)
    return None


def encode_image(item: Any) -> bytes:
    """Image item → the bytes of an image file (its own file, or PNG)."""
    raw = _file_bytes(item)
    if raw is not None:
        return raw
    from PIL import Image

    if isinstance(item, Image.Image):  # stored upright, as embedding reads it (a JPEG's EXIF orientation)
        from PIL import ImageOps

        try:
            item = ImageOps.exif_transpose(item)
        except Exception as e:  # noqa: BLE001 - a closed or truncated image fails here first
            raise BadInput(f"corrupt, truncated or closed image ({type(e).__name__}: {e})") from None
    if not isinstance(item, Image.Image) or item.mode not in _PNG_MODES:
        from mmembed.preprocess.image_decode import load_image

        chw = load_image(item)  # (3, H, W) uint8, or float in [0, 1]; BadInput when unusable
        if chw.dtype != torch.uint8:
            chw = (chw.float() * 255).round().clamp(0, 255).to(torch.uint8)
        item = Image.fromarray(chw.permute(1, 2, 0).contiguous().numpy())  # (H, W, 3)
    out = io.BytesIO()
    try:
        item.save(out, format="PNG")
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot encode the image as PNG ({type(e).__name__}: {e})") from None
    return out.getvalue()


_MAX_WAV_RATE = 2**31 - 1


def encode_audio(item: Any) -> bytes:
    """Audio item → the bytes of an audio file (its own file, or 32-bit float WAV)."""
    raw = _file_bytes(item)
    if raw is not None:
        return raw
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise BadInput("a waveform needs its sample rate: pass mm.Audio((waveform, sample_rate)) or a file")
    from mmembed.preprocess.waveform import channel_axis, split_pair

    wave, rate = split_pair(item, 0)  # the audio preprocessing's rules: rate, dtype, scaling, channels
    axis = channel_axis(wave)
    samples = (wave[:, None] if axis is None else wave.movedim(axis, 1)).contiguous().numpy()  # (T, C)
    if samples.shape[0] == 0:
        raise BadInput("zero-length audio")
    if not np.isfinite(samples).all():
        raise BadInput("audio contains NaN/Inf samples")
    if not 1 <= rate <= _MAX_WAV_RATE:  # a WAV header holds the rate in 32 bits (10**12 overflowed)
        raise BadInput(f"sample rate {rate} Hz cannot be stored in a WAV file (at most {_MAX_WAV_RATE} Hz)")
    import soundfile as sf

    out = io.BytesIO()
    sf.write(out, samples, int(rate), format="WAV", subtype="FLOAT")
    return out.getvalue()


# one line per stored (non-inline) modality
ENCODERS: dict[Modality, Callable[[Any], bytes]] = {
    Modality.IMAGE: encode_image,
    Modality.AUDIO: encode_audio,
}

_MAGIC = [(b"\x89PNG\r\n\x1a\n", 0, "png"), (b"\xff\xd8\xff", 0, "jpg"), (b"GIF8", 0, "gif"), (b"BM", 0, "bmp"),
          (b"II*\x00", 0, "tiff"), (b"MM\x00*", 0, "tiff"), (b"WEBP", 8, "webp"), (b"WAVE", 8, "wav"),
          (b"fLaC", 0, "flac"), (b"OggS", 0, "ogg")]


def file_suffix(data: bytes) -> str:
    """The usual suffix of a media file, from its leading bytes (".bin" when unknown)."""
    for magic, offset, suffix in _MAGIC:
        if data[offset:offset + len(magic)] == magic:
            return f".{suffix}"
    return ".bin"
