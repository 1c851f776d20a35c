"""The frequency analysis under `AudioPreprocessor`: a resampling ratio whose windowed-sinc kernel
stays bounded for any sample rate, and triangular filters at log-spaced centres (on which a change
of pitch is a shift along the bins), as a spectrogram module beside torchaudio's MelSpectrogram."""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor

from mmembed.errors import ConfigError

MAX_RESAMPLE_KERNEL = 2**20  # elements (4 MB of float32) in one resampling kernel
_SINC_WIDTH, _ROLLOFF = 6, 0.99  # torchaudio Resample's defaults: its kernel size depends on them


def resample_ratio(rate: int, target: int, max_kernel: int = MAX_RESAMPLE_KERNEL) -> tuple[int, int]:
    """(orig, new) to give torchaudio's Resample for `rate` → `target` Hz, its kernel bounded.

    Resample reduces the ratio by the gcd and builds a (new, orig + 2 * width) kernel, so a rate
    sharing no factor with the target is a disaster: 44,101 → 16,000 Hz is 16000 x 44135 elements
    (2.8 GB, and 5.6 GB float64 temporaries while building). A lowpass width or rolloff does not
    help (the kernel has `new` rows whatever they are). So the exact ratio is used when its kernel
    has at most `max_kernel` elements (every common rate: 44,100 → 16,000 Hz is 441/160, 76 k),
    and otherwise the closest fraction whose denominator is small enough for the kernel to fit
    (`Fraction.limit_denominator`). Duration and pitch then change by the fraction's error: at
    most 0.05 % (under a cent) for every integer rate from 4 to 192 kHz → 16 kHz with the
    default `max_kernel` (measured).

    Returns:
        (orig, new), coprime, with orig / new ≈ rate / target.
    """
    exact = Fraction(rate, target)
    ratio, limit = exact, exact.denominator
    while _kernel_elements(ratio.numerator, ratio.denominator) > max_kernel and limit > 1:
        # the kernel grows as new**2 * (orig / new): aim straight at a denominator that fits
        limit = max(1, min(limit - 1, math.isqrt(max_kernel * ratio.denominator // ratio.numerator)))
        ratio = exact.limit_denominator(limit)
    return ratio.numerator, ratio.denominator


def _kernel_elements(orig: int, new: int) -> int:
    """Size of torchaudio's sinc kernel for a reduced orig/new ratio (its formula, default width and rolloff)."""
    width = math.ceil(_SINC_WIDTH * orig / (min(orig, new) * _ROLLOFF))
    return new * (orig + 2 * width)


class LogFrequencySpectrogram(torch.nn.Module):
    """Power spectrogram (Hann window) → triangular filters at log-spaced centres: (n_bins, frames)."""

    def __init__(self, sample_rate: int, n_fft: int, hop_length: int, f_min: float, f_max: float | None,
                 n_bins: int) -> None:
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        self.register_buffer("window", torch.hann_window(n_fft))
        fb = log_frequency_fbanks(n_fft // 2 + 1, f_min, f_max or sample_rate / 2, n_bins, sample_rate)
        self.register_buffer("fb", fb)  # (n_freqs, n_bins)

    def forward(self, wave: Tensor) -> Tensor:
        spec = torch.stft(wave, self.n_fft, self.hop_length, window=self.window, center=True, pad_mode="reflect",
                          return_complex=True)  # (..., n_freqs, frames), framed as torchaudio's Spectrogram
        power = spec.real.square() + spec.imag.square()  # 4x faster than abs().pow(2) (no sqrt, no strided sum)
        return (power.transpose(-1, -2) @ self.fb).transpose(-1, -2)  # (..., n_bins, frames)


def log_frequency_fbanks(n_freqs: int, f_min: float, f_max: float, n_bins: int, sample_rate: int) -> Tensor:
    """Triangular filters whose centres are evenly spaced in log-frequency: (n_freqs, n_bins).

    torchaudio's `melscale_fbanks` with log2(Hz) in place of mel: n_bins + 2 edges spaced evenly
    in log2 from f_min to f_max, filter i rising from edge i to a peak of 1 at edge i + 1 and
    falling to 0 at edge i + 2 (linear in log-frequency). Every octave gets the same number of
    bins, so multiplying every frequency by a factor (a change of pitch) shifts a harmonic
    spectrum along the bins without changing its shape. Raises ConfigError when a filter is
    narrower than the STFT's bin spacing and catches no bin.
    """
    if not 0 < f_min < f_max <= sample_rate / 2:
        raise ConfigError(f"audio preprocess: frequency_scale=log needs 0 < f_min < f_max <= sample_rate / 2, "
                          f"got f_min={f_min}, f_max={f_max}")
    log_f = torch.log2(torch.linspace(0, sample_rate / 2, n_freqs, dtype=torch.float64).clamp(min=1e-3))  # (n_freqs,)
    edges = torch.linspace(math.log2(f_min), math.log2(f_max), n_bins + 2, dtype=torch.float64)  # (n_bins + 2,)
    rising = (log_f[:, None] - edges[None, :-2]) / (edges[1:-1] - edges[:-2])  # (n_freqs, n_bins)
    falling = (edges[None, 2:] - log_f[:, None]) / (edges[2:] - edges[1:-1])
    fb = torch.minimum(rising, falling).clamp(min=0.0).to(torch.float32)
    if (fb.amax(dim=0) == 0).any():
        raise ConfigError(f"audio preprocess: the lowest log-frequency filters ({f_min:g} Hz, {n_bins} bins) catch no "
                          f"STFT bin at n_fft={2 * (n_freqs - 1)}: raise n_fft or f_min")
    return fb
