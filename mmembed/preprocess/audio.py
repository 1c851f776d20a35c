"""Audio preprocessing: any raw clip → normalised log-filterbank features (n_mels, frames).

Accepted items:
  - a path (str / Path) or the encoded bytes of a file: WAV, FLAC or OGG, decoded with
    `soundfile` (torchaudio's own loaders need torchcodec + FFmpeg);
  - a `(waveform, sample_rate)` pair, waveform a numpy array or tensor;
  - a bare array/tensor, taken to be at the configured `sample_rate`.
  Waveform shape rule: 1-D is mono (T,). 2-D is (C, T) or (T, C): the SHORTER axis is channels
  (a clip has more samples than channels), so (2, 48000) and (48000, 2) are both stereo; an
  array whose shorter axis exceeds 32 is ambiguous and rejected. Integer samples are scaled to
  [-1, 1] (int16 / 32768, int32 / 2**31, uint8 centred on 128); float samples are taken to lie
  in [-1, 1], and a float waveform (or float file) of peak over 8 in the samples cropped
  (integer samples left unscaled) is refused.

Pipeline: mix to mono (mean of channels) → crop to `max_seconds` (random offset when training,
from the start otherwise; cropping happens before resampling and reads only the needed frames
of a file, so an hour-long file costs no more than a clip; a file whose header gives no
length, a FLAC streamed to a pipe, is read from the start, four crops' worth when training)
→ resample to `sample_rate` → filterbank (torchaudio's MelSpectrogram, or log-spaced filters on
which a pitch change is a shift) → log(x + 1e-6) → (x - mean) / std. SpecAugment, when
training, is the separate `augment` step: it works on the features, so a dataset can cache them
and still draw fresh masks.

Sample rates: a file header or a `(waveform, rate)` pair may claim any rate; rates outside
[`min_sample_rate`, `max_sample_rate`] (default 4,000–192,000 Hz) are refused with BadInput
before anything is read or built. Inside the range every rate is resampled with a bounded
windowed-sinc kernel (see `filterbanks.resample_ratio`), and only the 8 most recently used kernels are kept.

Longer recordings are cropped, not chunked: an encoder that wants to cover a whole long file
embeds several crops and averages them itself, using the frame masks.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile as sf
import torch
import torchaudio
from torch import Tensor

from mmembed.errors import BadInput, ConfigError
from mmembed.preprocess.files import as_path, check_file, shown
from mmembed.preprocess.filterbanks import LogFrequencySpectrogram, resample_ratio
from mmembed.modality import Modality
from mmembed.preprocess.waveform import (MAX_CHANNELS, channel_axis, is_unscaled, mono_clip, opened, raw_pair,
                                         read_frames, to_float)

MAX_SECONDS = 600.0  # the longest max_seconds a preprocessor takes (a clip is cropped to it)
_IN_MEMORY = re.compile(r"<_io\.\w+ object at 0x[0-9a-f]+>")
_LOG_FLOOR = 1e-6
RESAMPLER_CACHE_SIZE = 8  # source rates whose kernels are kept, least recently used evicted first
_UNKNOWN_FRAMES = 2**62  # libsndfile's frame count for a file of unknown length is 2**63 - 1
_UNKNOWN_SPAN = 4  # crops' worth read from a file of unknown length, for a random crop to fall in


class AudioPreprocessor:
    """Waveform → normalised log-mel or log-frequency features (n_mels, frames), frames ≤ `max_frames`.

    Args:
        sample_rate: every clip is resampled to this rate (Hz).
        n_mels, n_fft, hop_length, f_min, f_max: filterbank settings (Whisper/AST-like
            25 ms windows, 10 ms hop at 16 kHz); `n_mels` is the number of frequency bins.
        frequency_scale: `mel` (torchaudio's MelSpectrogram) or `log`: triangular filters at
            log-spaced centres from f_min (> 0) to f_max, a constant-Q axis on which a change of
            pitch is a shift (see `filterbanks.log_frequency_fbanks`). Low bins are narrow: `log` needs an
            n_fft whose bin spacing (sample_rate / n_fft) fits the lowest filter, e.g. 2048.
        max_seconds: longer clips are cropped to this duration.
        min_sample_rate, max_sample_rate: the accepted source rates (Hz); a clip claiming a rate
            outside them is refused (BadInput). The range must contain `sample_rate`.
        random_crop: when training, crop at a random offset (otherwise from the start).
        mean, std: fixed normalisation of the log-mel values; the defaults suit speech and
            synthetic tones at moderate loudness. Estimate your own with `feature_stats`.
        spec_augment: when training, `augment` masks up to `freq_mask` mel bins and up to
            `time_mask` frames (one band of each).
        freq_shift: when training, `augment` shifts the features by a uniform whole number of
            bins in [-freq_shift, freq_shift] (vacated bins get 0, the mean). On the `log` axis a
            shift of k bins scales every frequency by the same factor, which is what a longer or
            shorter vocal tract, or a higher or lower voice, does to speech: vocal tract length
            perturbation (Jaitly & Hinton 2013) in the feature domain. 0 = off.
        time_stretch: when training, `augment` resamples the time axis by a factor drawn in
            1 ± time_stretch (linear interpolation; at most `max_frames`): a slower or faster
            speaker, as speed perturbation (Ko et al. 2015) does to the waveform. 0 = off.
        train: set by the trainer, never by the config.

    Shapes: `__call__` returns (n_mels, frames) float32; `collate` returns
    (B, n_mels, F) and a (B, F) bool mask, True = real frame, padding = 0 (the mean).
    """

    modality = Modality.AUDIO
    random_options = ("random_crop",)  # what makes training calls of `__call__` random

    def __init__(
        self,
        sample_rate: int = 16000,
        *,
        n_mels: int = 64,
        n_fft: int = 400,
        hop_length: int = 160,
        f_min: float = 0.0,
        f_max: float | None = None,
        frequency_scale: Literal["mel", "log"] = "mel",
        max_seconds: float = 10.0,
        min_sample_rate: int = 4000,
        max_sample_rate: int = 192_000,
        random_crop: bool = True,
        mean: float = -6.0,
        std: float = 5.0,
        spec_augment: bool = False,
        freq_mask: int = 8,
        time_mask: int = 20,
        freq_shift: int = 0,
        time_stretch: float = 0.0,
        train: bool = False,
    ) -> None:
        if not all(math.isfinite(v) for v in (max_seconds, mean, std, f_min, f_max or 0.0, time_stretch)):
            raise ConfigError("audio preprocess: max_seconds, mean, std, f_min, f_max and time_stretch must be finite")
        if max_seconds > MAX_SECONDS:  # a clip's features are computed whole: 10 hours asked 29 GB
            raise ConfigError(f"audio preprocess: max_seconds={max_seconds} is over {MAX_SECONDS} (longer clips are "
                              "cropped to max_seconds)")
        if min(sample_rate, n_mels, n_fft, hop_length) <= 0 or max_seconds <= 0 or std <= 0:
            raise ConfigError(
                "audio preprocess: sample_rate, n_mels, n_fft, hop_length, max_seconds and std must be positive"
            )
        top = sample_rate / 2 if f_max is None else f_max
        if not 0 <= f_min < top <= sample_rate / 2:
            raise ConfigError(f"audio preprocess: need 0 <= f_min < f_max <= sample_rate / 2 = {sample_rate / 2:g} Hz, "
                              f"got f_min={f_min}, f_max={f_max}")
        if min(freq_mask, time_mask) < 0:
            raise ConfigError(f"audio preprocess: freq_mask={freq_mask} and time_mask={time_mask} must be >= 0")
        if not 0 <= freq_shift < n_mels or not 0 <= time_stretch < 1:
            raise ConfigError(f"audio preprocess: freq_shift={freq_shift} must be in [0, n_mels) and "
                              f"time_stretch={time_stretch} in [0, 1)")
        if not 0 < min_sample_rate <= sample_rate:
            raise ConfigError(
                f"audio preprocess: min_sample_rate={min_sample_rate} must be in 1..sample_rate={sample_rate}"
            )
        if max_sample_rate < sample_rate:
            raise ConfigError(
                f"audio preprocess: max_sample_rate={max_sample_rate} must be >= sample_rate={sample_rate}"
            )
        self.min_sample_rate, self.max_sample_rate = min_sample_rate, max_sample_rate
        self.sample_rate = sample_rate
        self.n_mels, self.n_fft, self.hop_length = n_mels, n_fft, hop_length
        self.max_seconds = max_seconds
        self.max_samples = max(1, int(round(max_seconds * sample_rate)))
        self.max_frames = self.max_samples // hop_length + 1  # center=True framing
        self.mean, self.std = mean, std
        self.train, self.random_crop, self.spec_augment = train, random_crop, spec_augment
        if frequency_scale == "mel":
            self.filterbank: torch.nn.Module = torchaudio.transforms.MelSpectrogram(
                sample_rate, n_fft=n_fft, hop_length=hop_length, f_min=f_min, f_max=f_max, n_mels=n_mels
            )
        elif frequency_scale == "log":
            self.filterbank = LogFrequencySpectrogram(sample_rate, n_fft, hop_length, f_min, f_max, n_mels)
        else:
            raise ConfigError(f"audio preprocess: unknown frequency_scale {frequency_scale!r} (valid: mel, log)")
        self.freq_mask, self.time_mask = freq_mask, time_mask
        self.freq_shift, self.time_stretch = int(freq_shift), float(time_stretch)
        self._resamplers: OrderedDict[int, torchaudio.transforms.Resample] = OrderedDict()  # LRU, by source rate

    @property
    def stochastic(self) -> bool:
        """True when two calls on the same item can differ (so samples must not be cached)."""
        return self.train and self.random_crop

    @property
    def augments(self) -> bool:
        """True when `augment` is random (training with SpecAugment, a frequency shift or a time
        stretch); it runs after any cache."""
        return self.train and (self.spec_augment or self.freq_shift > 0 or self.time_stretch > 0)

    def augment(self, feats: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Stretch, shift, then SpecAugment one (n_mels, frames) output of `__call__`: a new
        tensor, the input intact.

        The stretch and the shift are described in the class docstring. SpecAugment: one band of
        width U[0, freq_mask) mel bins and one of U[0, time_mask) frames, each at a uniform start,
        are set to 0 (the normalised mean), as torchaudio's Frequency/TimeMasking do. The draws
        come from `generator` (the dataset seeds one per sample) or the global RNG; the masks'
        come first, so turning the stretch or the shift on leaves their draws as they were.
        """
        if not self.augments:
            return feats
        u = torch.rand(4, generator=generator).tolist()
        out = feats.clone()
        if self.time_stretch > 0 or self.freq_shift > 0:
            v = torch.rand(2, generator=generator).tolist()
            out = self._shift(self._stretch(out, 1 + self.time_stretch * (2 * v[0] - 1)),
                              round(self.freq_shift * (2 * v[1] - 1)))
        if not self.spec_augment:
            return out
        n_mels, frames = out.shape
        width = int(u[0] * min(self.freq_mask, n_mels))
        start = int(u[1] * (n_mels - width))
        out[start : start + width] = 0.0
        width = int(u[2] * min(self.time_mask, frames))
        start = int(u[3] * (frames - width))
        out[:, start : start + width] = 0.0
        return out

    def _stretch(self, feats: Tensor, factor: float) -> Tensor:
        """(n_mels, F) → (n_mels, round(F * factor)) by linear interpolation in time, ≤ max_frames."""
        frames = min(self.max_frames, max(1, round(feats.shape[1] * factor)))
        if frames == feats.shape[1]:
            return feats
        return torch.nn.functional.interpolate(feats[None], size=frames, mode="linear", align_corners=True)[0]

    @staticmethod
    def _shift(feats: Tensor, k: int) -> Tensor:
        """Bin i moves to bin i + k; the k vacated bins are 0 (the normalised mean)."""
        if k == 0:
            return feats
        out = torch.zeros_like(feats)
        if k > 0:
            out[k:] = feats[:-k]
        else:
            out[:k] = feats[-k:]
        return out

    def example(self) -> Any:
        """Silence of the longest clip (see `Preprocessor.example`)."""
        return torch.zeros(self.max_samples), self.sample_rate

    def __call__(self, item: Any, generator: torch.Generator | None = None) -> Tensor:
        """One raw clip → (n_mels, frames) float32. Raises BadInput with the reason. A training
        crop's offset is drawn from `generator` (a dataset seeds one per sample), else the global RNG."""
        wave = self.waveform(item, generator)  # (T,) at self.sample_rate, T <= max_samples
        if wave.numel() < self.n_fft:
            # reflect padding in the STFT needs a window's worth of samples; silence is neutral
            wave = torch.nn.functional.pad(wave, (0, self.n_fft - wave.numel()))
        with torch.no_grad():
            feats = self.filterbank(wave).add_(_LOG_FLOOR).log_()  # (n_mels, frames)
            feats = feats.sub_(self.mean).div_(self.std)
        if not torch.isfinite(feats).all():  # finite samples so large (~1e18) that their power overflows
            raise BadInput(f"audio of peak {float(wave.abs().max()):.3g} gives non-finite features "
                           "(samples should lie in [-1, 1])")
        return feats[:, : self.max_frames].contiguous()

    def waveform(self, item: Any, generator: torch.Generator | None = None) -> Tensor:
        """One raw clip → mono float32 waveform (T,) at `sample_rate`, cropped to `max_seconds`
        (a training crop at an offset drawn from `generator`, else the global RNG)."""
        of = ""
        if isinstance(item, (str, Path, bytes, bytearray, memoryview)):
            wave, rate = self._read_file(item, generator)
            of = f": {shown(item)}" if isinstance(item, (str, Path)) else ""  # a file's content errors name it
        else:
            data, rate = raw_pair(item, self.sample_rate)
            self._check_rate(rate, "the waveform")
            wave = self._mono_clip(data, self._crop_len(rate), generator)  # (T,)
        if wave.numel() == 0:
            raise BadInput(f"zero-length audio{of}")
        # the sum is finite iff every sample is (for audio-range values); check fully only then
        if not torch.isfinite(wave.sum()) and not torch.isfinite(wave).all():
            raise BadInput(f"audio contains NaN/Inf samples{of}")
        if rate != self.sample_rate:
            wave = self._resampler(rate)(wave)  # (T',)
        return wave[: self.max_samples]

    def collate(self, samples: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Pad (n_mels, f_i) samples → (B, n_mels, F) with F = max f_i, and a (B, F) frame mask."""
        frames = max(s.shape[1] for s in samples)
        batch = samples[0].new_zeros(len(samples), samples[0].shape[0], frames)  # (B, n_mels, F)
        mask = torch.zeros(len(samples), frames, dtype=torch.bool)  # (B, F)
        for i, s in enumerate(samples):
            batch[i, :, : s.shape[1]] = s
            mask[i, : s.shape[1]] = True
        return batch, mask

    def __repr__(self) -> str:
        return (
            f"AudioPreprocessor(sample_rate={self.sample_rate}, n_mels={self.n_mels}, "
            f"max_seconds={self.max_seconds}, train={self.train})"
        )

    # ----------------------------------------------------------------------------------------

    def _random(self) -> bool:
        return self.train and self.random_crop

    def _start(self, length: int, n: int, generator: torch.Generator | None) -> int:
        """The first of n samples cropped from `length`: uniform when cropping at random, else 0."""
        if not self._random() or length <= n:
            return 0
        return int(torch.randint(0, length - n + 1, (), generator=generator).item())

    def _mono_clip(self, data: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
        """`mono_clip`, its offset from `_start` (mono_clip draws a random one from the global RNG)."""
        if not self._random() or data.numel() == 0:
            return mono_clip(data, n, False)  # from the start; a zero-length waveform is refused there
        axis = channel_axis(data)  # of the whole waveform, as mono_clip takes it
        time = 0 if axis is None else 1 - axis
        wave = to_float(data.narrow(time, self._start(data.shape[time], n, generator), min(n, data.shape[time])))
        return wave if axis is None else wave.mean(dim=axis)

    def _check_rate(self, rate: int, name: str) -> None:
        if not self.min_sample_rate <= rate <= self.max_sample_rate:
            raise BadInput(
                f"sample rate {rate} Hz of {name} is outside the accepted range "
                f"{self.min_sample_rate}-{self.max_sample_rate} Hz (min_sample_rate, max_sample_rate)"
            )

    def _crop_len(self, rate: int) -> int:
        """Samples at `rate` covering max_seconds (one extra so resampling never falls short)."""
        return int(math.ceil(self.max_seconds * rate)) + 1

    def _read_file(self, item: str | Path | bytes, generator: torch.Generator | None) -> tuple[Tensor, int]:
        if isinstance(item, (str, Path)):
            source: Path | bytes = as_path(item)
            name = shown(source)
            check_file(source)
        else:
            name, source = "<bytes>", bytes(item)
        try:
            data, rate = self._decode(source, name, generator)  # (m, C)
        except BadInput:
            raise
        except Exception as e:  # noqa: BLE001 - libsndfile reports any malformed file this way
            # libsndfile names an in-memory file by its repr ("<_io.BytesIO object at 0x7f…>"): say which one
            reason = _IN_MEMORY.sub(str(name), str(e))
            raise BadInput(f"not a readable audio file: {name} ({type(e).__name__}: {reason})") from None
        if data.shape[0] == 0:
            raise BadInput(f"zero-length audio: {name}")
        wave = torch.from_numpy(data)  # (m, C)
        # averaged as `mono_clip` averages a given waveform: samples too large to sum (finite, ~1e38)
        # give Inf, refused as such by `waveform`
        wave = wave[:, 0] if wave.shape[1] == 1 else wave.mean(dim=1)  # (m,)
        # a file of unknown length was read past one crop: crop here (a no-op for every other file)
        start = self._start(wave.numel(), self._crop_len(rate), generator)
        return wave[start : start + self._crop_len(rate)], int(rate)

    def _decode(self, source: Path | bytes, name: str, generator: torch.Generator | None) -> tuple[np.ndarray, int]:
        """The frames to crop from, (m, C) float32, and the file's rate."""
        data = None
        with opened(source) as f:
            rate, float_samples = f.samplerate, f.subtype in ("FLOAT", "DOUBLE")
            self._check_rate(rate, name)
            if f.channels > MAX_CHANNELS:  # read as (n, channels) float32: a tiny file could ask for GBs
                raise BadInput(f"{name} has {f.channels} channels; at most {MAX_CHANNELS} are read")
            n = self._crop_len(rate)
            if f.frames < _UNKNOWN_FRAMES:  # else a FLAC streamed to a pipe: no length to draw a crop from
                n = min(f.frames, n)
                start = self._start(f.frames, n, generator)
                try:
                    f.seek(start)
                    data = f.read(n, dtype="float32", always_2d=True)
                except sf.LibsndfileError:
                    pass
        if data is None:
            # a header that gives no length or overstates it: a seek past the real end failed (and
            # libsndfile keeps the error on that handle), so read from the start of a fresh one, more
            # than one crop when training for a random crop (by the caller) to fall in
            with opened(source) as f:
                data = read_frames(f, n * _UNKNOWN_SPAN if self._random() else n)
        # libsndfile scales integer PCM into [-1, 1]; float samples are read as stored, and may be
        # integer samples written unscaled, as a float array may be
        peak = float(np.abs(data).max()) if float_samples and data.size else 0.0
        if is_unscaled(peak):
            raise BadInput(f"{name} holds float samples of peak {peak:.4g}, far outside [-1, 1], the range float "
                           "samples are read in: write it as 16-bit PCM or scale it to [-1, 1]")
        return data, rate

    def _resampler(self, rate: int) -> torchaudio.transforms.Resample:
        # the windowed-sinc kernel depends only on the rate pair: reuse it for recent source rates
        resampler = self._resamplers.pop(rate, None)
        if resampler is None:
            resampler = torchaudio.transforms.Resample(*resample_ratio(rate, self.sample_rate))
        self._resamplers[rate] = resampler  # now the most recently used
        if len(self._resamplers) > RESAMPLER_CACHE_SIZE:
            self._resamplers.popitem(last=False)
        return resampler


def feature_stats(preprocessor: AudioPreprocessor, items: list[Any]) -> tuple[float, float]:
    """Mean and std of the raw log-mel values of `items`: the `mean`/`std` to configure.

    Uses the preprocessor's settings with its own normalisation undone; bad items are skipped.
    """
    values = []
    for item in items:
        try:
            feats = preprocessor(item) * preprocessor.std + preprocessor.mean
        except BadInput:
            continue
        values.append(feats.flatten())
    if not values:
        raise BadInput("feature_stats: no readable audio among the items")
    flat = torch.cat(values)
    return float(flat.mean()), float(flat.std())
