"""Synthesise a scene as a short mono clip: one tone per object, in time order of position.

Each object becomes one event of `EVENT_S` seconds: pitch from colour, timbre from shape,
level from size, onset from position (`rules.py`). Harmonic timbres are band-limited
(additive synthesis below 0.9x Nyquist, looked up from a cached single-cycle wavetable), so no
aliased partials blur the pitch. Every event is normalised to unit RMS before its gain, which
makes loudness depend on size alone, not on the waveform's crest factor.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
import soundfile as sf

from mmembed.data.synth.rules import (
    ATTACK_S,
    DURATION_S,
    EVENT_S,
    FM_INDEX,
    FM_RATIO,
    GAIN_DB,
    GAIN_JITTER_DB,
    NOISE_RMS,
    ONSET_JITTER_S,
    ONSET_S,
    PITCH_HZ,
    PITCH_JITTER_CENTS,
    PULSE_DUTY,
    REFERENCE_RMS,
    RELEASE_S,
    TIMBRE,
    VIBRATO_HZ,
    VIBRATO_SEMITONES,
)
from mmembed.data.synth.world import SceneObject

TABLE_SIZE = 4096
HARMONIC_TIMBRES = ("sine", "square", "sawtooth", "pulse_train", "triangle", "vibrato")


def harmonic_amplitudes(timbre: str, n_harmonics: int) -> np.ndarray:
    """Amplitude of partials 1..n_harmonics of a harmonic timbre: (n_harmonics,)."""
    n = np.arange(1, n_harmonics + 1, dtype=np.float64)
    if timbre == "sine":
        return (n == 1).astype(np.float64)
    if timbre == "square":
        return np.where(n % 2 == 1, 1.0 / n, 0.0)
    if timbre == "sawtooth":
        return 1.0 / n
    if timbre == "pulse_train":  # Fourier series of a pulse of width `PULSE_DUTY` periods
        return np.sinc(n * PULSE_DUTY)
    if timbre in ("triangle", "vibrato"):  # odd harmonics at 1/n^2, alternating sign
        return np.where(n % 2 == 1, (-1.0) ** ((n - 1) // 2) / n**2, 0.0)
    raise KeyError(f"{timbre!r} is not a harmonic timbre; valid: {HARMONIC_TIMBRES}")


@lru_cache(maxsize=256)
def _wavetable(timbre: str, n_harmonics: int) -> np.ndarray:
    """One period of the band-limited waveform, closed (last sample = first): (TABLE_SIZE + 1,)."""
    amps = harmonic_amplitudes(timbre, n_harmonics)
    u = np.arange(TABLE_SIZE + 1) / TABLE_SIZE  # (S,)
    k = np.arange(1, n_harmonics + 1)[:, None]  # (K, 1)
    table = amps @ np.sin(2 * np.pi * k * u[None, :])  # (S,)
    table.setflags(write=False)
    return table


def oscillator(timbre: str, f0: float, n_samples: int, sample_rate: int, phase0: float) -> np.ndarray:
    """A tone at `f0` Hz with the given timbre, normalised to unit RMS: (n_samples,)."""
    t = np.arange(n_samples) / sample_rate  # (N,)
    if timbre == "fm_bell":
        x = np.sin(2 * np.pi * (f0 * t + phase0) + FM_INDEX * np.sin(2 * np.pi * FM_RATIO * f0 * t))
        return x / np.sqrt(np.mean(x**2))
    if timbre == "vibrato":  # a triangle wave whose pitch wobbles around f0
        freq = f0 * 2.0 ** (VIBRATO_SEMITONES / 12 * np.sin(2 * np.pi * VIBRATO_HZ * t))
        cycles = np.cumsum(freq) / sample_rate + phase0
        f_max = f0 * 2.0 ** (VIBRATO_SEMITONES / 12)
    else:
        cycles = f0 * t + phase0
        f_max = f0
    # Partials stop below 0.9x Nyquist at the highest instantaneous pitch: nothing aliases.
    table = _wavetable(timbre, max(1, int(0.45 * sample_rate / f_max)))
    x = np.interp((cycles % 1.0) * TABLE_SIZE, np.arange(TABLE_SIZE + 1), table)
    return x / np.sqrt(np.mean(x**2))


def envelope(n_samples: int, sample_rate: int) -> np.ndarray:
    """Raised-cosine attack and release around a flat sustain: (n_samples,) in [0, 1]."""
    env = np.ones(n_samples)
    n_attack, n_release = int(ATTACK_S * sample_rate), int(RELEASE_S * sample_rate)
    env[:n_attack] = 0.5 - 0.5 * np.cos(np.pi * np.arange(n_attack) / n_attack)
    env[n_samples - n_release :] = 0.5 + 0.5 * np.cos(np.pi * np.arange(1, n_release + 1) / n_release)
    return env


def render_audio(objects: tuple[SceneObject, ...], rng: np.random.Generator, sample_rate: int = 16000) -> np.ndarray:
    """Render a scene's sound.

    Args:
        objects: the scene's objects (at most one per position slot, so events never overlap).
        rng: the scene's audio generator; same generator state -> same samples.
        sample_rate: samples per second.

    Returns:
        (n_samples,) float64 waveform in [-1, 1], DURATION_S[0]..DURATION_S[1] seconds long.
    """
    n_total = int(round(rng.uniform(*DURATION_S) * sample_rate))
    clip = rng.normal(0.0, rng.uniform(*NOISE_RMS), size=n_total)  # (N,)
    n_event = int(round(EVENT_S * sample_rate))
    env = envelope(n_event, sample_rate)
    for obj in objects:
        f0 = PITCH_HZ[obj.colour] * 2.0 ** (rng.uniform(-PITCH_JITTER_CENTS, PITCH_JITTER_CENTS) / 1200)
        gain = REFERENCE_RMS * 10.0 ** ((GAIN_DB[obj.size] + rng.uniform(-GAIN_JITTER_DB, GAIN_JITTER_DB)) / 20)
        start = int(round((ONSET_S[obj.position] + rng.uniform(-ONSET_JITTER_S, ONSET_JITTER_S)) * sample_rate))
        tone = oscillator(TIMBRE[obj.shape], f0, n_event, sample_rate, phase0=rng.random())
        clip[start : start + n_event] += gain * env * tone
    return clip


def save_wav(waveform: np.ndarray, path: str, sample_rate: int) -> None:
    """Write 16-bit PCM WAV; quantised here, so identical samples give identical bytes."""
    pcm = np.clip(np.rint(waveform * 32767.0), -32768, 32767).astype(np.int16)
    buffer = io.BytesIO()  # libsndfile writes a file in many small seeks; one write is ~40x faster
    sf.write(buffer, pcm, sample_rate, subtype="PCM_16", format="WAV")
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())
