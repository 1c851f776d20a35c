"""Waveforms as the audio preprocessor takes them: a file opened with `soundfile` (any name, or
bytes), a `(waveform, rate)` pair or a bare array split, cropped to the samples the features need,
scaled to float32 in [-1, 1] and its channel axis found and averaged away.

The shape and scaling rules are those of `audio.py`'s docstring (the preprocessor's contract).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from torch import Tensor

from mmembed.checkpoint import utf8_name
from mmembed.errors import BadInput

MAX_CHANNELS = 32
MAX_FLOAT_PEAK = 8.0  # a float waveform louder than this is integer samples left unscaled


@contextlib.contextmanager
def opened(source: Path | bytes) -> Iterator[sf.SoundFile]:
    if isinstance(source, bytes):
        with sf.SoundFile(io.BytesIO(source)) as f:
            yield f
    elif utf8_name(source):
        with sf.SoundFile(source) as f:
            yield f
    else:  # libsndfile takes UTF-8 names only: open the others here
        with open(source, "rb") as stream, sf.SoundFile(stream) as f:
            yield f


def read_frames(f: sf.SoundFile, n: int) -> np.ndarray:
    """Up to n frames from the current position: (m, channels) float32, m <= n.

    libsndfile's own read, as `SoundFile.read` calls it (soundfile's private names: only files
    `SoundFile.read` fails on come here): that method then seeks to the new position, a seek that
    fails at the end of a FLAC whose header misstates its length, losing the frames read.
    """
    out = np.empty((n, f.channels), dtype=np.float32)
    got = sf._snd.sf_readf_float(f._file, sf._ffi.cast("float *", sf._ffi.from_buffer(out)), n)
    sf._error_check(f._errorcode)
    return out[:got]


def split_pair(item: Any, default_rate: int) -> tuple[Tensor, int]:
    """`(waveform, rate)` or a bare waveform → (float32 CPU tensor, int rate); integer samples are
    scaled to [-1, 1]. BadInput for a bad rate, dtype or type, or float samples left unscaled."""
    data, rate = raw_pair(item, default_rate)
    return to_float(data), rate


def raw_pair(item: Any, default_rate: int) -> tuple[Tensor, int]:
    """`(waveform, rate)` or a bare waveform → (CPU tensor of the samples as given, int rate)."""
    if isinstance(item, (tuple, list)) and len(item) == 2 and is_rate(item[1]):
        data, rate = item[0], checked_rate(item[1])
    else:
        data, rate = item, default_rate
    if isinstance(data, np.ndarray):
        if data.dtype.byteorder not in "=|":  # big-endian samples (a WAV reader's raw view): native first
            data = data.astype(data.dtype.newbyteorder("="))
        data = np.ascontiguousarray(data)
        if not data.flags.writeable:  # np.frombuffer(pcm_bytes, np.int16): torch warns on read-only memory
            data = data.copy()
        try:
            data = torch.from_numpy(data)
        except TypeError:  # object, string or other dtypes torch has no tensor for
            raise BadInput(f"unsupported audio dtype {data.dtype} (float, int16, int32, int8 or uint8)") from None
    if not isinstance(data, Tensor):
        raise BadInput(
            f"unsupported audio input of type {type(data).__name__} (path, bytes, array, tensor or (waveform, rate))"
        )
    return data.detach().cpu(), rate


def is_rate(x: Any) -> bool:
    """Whether a pair's second element is a rate: a number, or a 0-d array or tensor (np.load(...)["sr"],
    torch.tensor(16000)); a longer array or a list is a second waveform."""
    if isinstance(x, (np.ndarray, Tensor)):
        return x.ndim == 0
    return not isinstance(x, list)


def checked_rate(rate: Any) -> int:
    if isinstance(rate, (np.ndarray, Tensor)):
        rate = rate.item()
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.number)):
        raise BadInput(f"sample rate must be a number, got {type(rate).__name__}")
    if not float(rate).is_integer() or rate <= 0:
        raise BadInput(f"sample rate must be a positive integer, got {rate}")
    return int(rate)


def mono_clip(data: Tensor, n: int, random: bool) -> Tensor:
    """A waveform as `raw_pair` gives it → mono float32 (T,), T <= n: cropped first, so that float samples
    are checked over the samples kept, as a float file's are (a loud sample past the crop is not read)."""
    if data.numel() == 0:  # (0, 2) would average to two NaN samples
        raise BadInput(f"zero-length audio (shape {tuple(data.shape)})")
    axis = channel_axis(data)  # of the whole waveform: a crop shorter than the channel count would flip it
    time = 0 if axis is None else 1 - axis
    if data.shape[time] > n:
        start = int(torch.randint(0, data.shape[time] - n + 1, ()).item()) if random else 0
        data = data.narrow(time, start, n)
    wave = to_float(data)
    return wave if axis is None else wave.mean(dim=axis)


def to_float(t: Tensor) -> Tensor:
    if t.dtype.is_floating_point:
        t = t.to(torch.float32)
        peak = float(t.abs().max()) if t.numel() else 0.0
        # integer samples made float unscaled (scipy's wavfile.read(...).astype(float)) peak in the
        # thousands and embed as something else; a mix or a resample overshoots 1 by far less
        if is_unscaled(peak):
            raise BadInput(f"float audio of peak {peak:.4g} lies far outside [-1, 1], the range float samples "
                           "are read in: divide int16 samples by 32768 (int32 by 2**31), or pass the integer array")
        return t
    scale = {torch.int16: 32768.0, torch.int32: 2.0**31, torch.int8: 128.0}
    if t.dtype in scale:
        return t.to(torch.float32) / scale[t.dtype]
    if t.dtype == torch.uint8:
        return (t.to(torch.float32) - 128.0) / 128.0
    raise BadInput(f"unsupported audio dtype {t.dtype} (float, int16, int32, int8 or uint8)")


def is_unscaled(peak: float) -> bool:
    """Whether float samples of this peak are integer samples left unscaled (NaN/Inf are refused as such later)."""
    return MAX_FLOAT_PEAK < peak < math.inf


def channel_axis(t: Tensor) -> int | None:
    """The channel axis of a waveform (None for mono (T,)): of (C, T) or (T, C), the shorter one."""
    if t.ndim == 1:
        return None
    if t.ndim != 2:
        raise BadInput(f"audio must be (T,), (C, T) or (T, C); got shape {tuple(t.shape)}")
    axis = 0 if t.shape[0] <= t.shape[1] else 1
    if t.shape[axis] > MAX_CHANNELS:
        raise BadInput(f"ambiguous audio shape {tuple(t.shape)}: no axis is a plausible channel count")
    return axis
