"""Audio preprocessing: any rate/layout → mono 16 kHz log-mel; hostile clips → BadInput."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from mmembed.errors import BadInput, ConfigError
from mmembed.preprocess.audio import AudioPreprocessor, feature_stats
from mmembed.preprocess.filterbanks import LogFrequencySpectrogram, log_frequency_fbanks


def _tone(rate: int, seconds: float = 1.0, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * math.pi * freq * t)).astype(np.float32)


def _peak_hz(wave: torch.Tensor, rate: int) -> float:
    spectrum = torch.fft.rfft(wave).abs()
    return float(torch.argmax(spectrum)) * rate / wave.numel()


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_stereo_file_at_any_rate_becomes_mono_16k_keeping_pitch(tmp_path, rate):
    tone = _tone(rate)
    stereo = np.stack([tone, 0.5 * tone], axis=1)  # (T, C): mono mean = 0.75 * tone
    path = tmp_path / f"tone_{rate}.wav"
    sf.write(path, stereo, rate, subtype="FLOAT")
    pre = AudioPreprocessor()
    wave = pre.waveform(path)
    assert wave.shape == (16000,)  # 1 s at 16 kHz
    assert _peak_hz(wave, 16000) == pytest.approx(440.0, abs=1.0)
    # amplitude of the mono mix (middle of the clip, away from the resampler's edges)
    assert wave[2000:14000].abs().max().item() == pytest.approx(0.75 * 0.5, rel=0.02)
    feats = pre(path)
    assert feats.shape == (64, 16000 // 160 + 1)


def test_channel_layouts_and_pairs_agree():
    tone = _tone(22050)
    pre = AudioPreprocessor()
    ref = pre((tone, 22050))
    ct = np.stack([tone, tone])  # (C, T)
    assert torch.allclose(pre((ct, 22050)), ref, atol=1e-5)
    assert torch.allclose(pre((ct.T.copy(), 22050)), ref, atol=1e-5)  # (T, C)
    assert torch.allclose(pre((torch.from_numpy(ct), 22050.0)), ref, atol=1e-5)
    # a bare waveform is taken to be at the configured rate
    assert torch.equal(pre(_tone(16000)), pre((_tone(16000), 16000)))
    # integer PCM is scaled to [-1, 1]
    pcm = (_tone(16000) * 32767).astype(np.int16)
    assert torch.allclose(pre((pcm, 16000)), pre((pcm.astype(np.float32) / 32768, 16000)), atol=1e-5)
    assert torch.equal(pre((pcm.astype(">i2"), 16000)), pre((pcm, 16000)))  # big-endian samples too


def test_flac_decodes_like_wav(tmp_path):
    tone = _tone(16000, 0.5)
    sf.write(tmp_path / "a.wav", tone, 16000, subtype="PCM_16")
    sf.write(tmp_path / "a.flac", tone, 16000, subtype="PCM_16")
    pre = AudioPreprocessor()
    # libsndfile's float → PCM rounding differs by one LSB between the two encoders
    assert torch.allclose(pre.waveform(tmp_path / "a.flac"), pre.waveform(tmp_path / "a.wav"), atol=2**-14)
    assert torch.equal(pre((tmp_path / "a.wav").read_bytes()), pre(tmp_path / "a.wav"))


def test_crop_from_start_in_eval_and_random_when_training(tmp_path):
    long = np.concatenate([_tone(16000, 2.0, 440), _tone(16000, 2.0, 1000)])  # 4 s
    sf.write(tmp_path / "long.wav", long, 16000, subtype="FLOAT")
    pre = AudioPreprocessor(max_seconds=1.5)
    assert pre.max_frames == 24000 // 160 + 1
    feats = pre(tmp_path / "long.wav")
    assert feats.shape == (64, pre.max_frames)
    assert torch.allclose(feats, pre((long[:24000], 16000)), atol=1e-5)  # eval: the first 1.5 s
    train = AudioPreprocessor(max_seconds=1.5, train=True)
    assert train.stochastic
    crops = []
    for seed in range(3):
        torch.manual_seed(seed)
        crops.append(train.waveform(tmp_path / "long.wav"))
    assert all(c.shape == (24000,) for c in crops)
    assert any(not torch.equal(c, crops[0]) for c in crops[1:])
    torch.manual_seed(1)
    assert torch.equal(train.waveform(tmp_path / "long.wav"), crops[1])  # seeded → reproducible


def test_crop_happens_before_resampling_and_bounds_length():
    pre = AudioPreprocessor(max_seconds=0.5)
    wave = pre.waveform((_tone(48000, 3.0), 48000))
    assert wave.shape == (8000,)


def test_very_short_clip_is_padded_not_rejected():
    feats = AudioPreprocessor()((np.full(10, 0.1, np.float32), 16000))
    assert feats.shape[0] == 64 and feats.shape[1] >= 1 and torch.isfinite(feats).all()


def test_spec_augment_only_when_training_and_only_in_augment():
    clip = (_tone(16000), 16000)
    plain = AudioPreprocessor()(clip)
    evaluating = AudioPreprocessor(spec_augment=True)
    assert not evaluating.augments and torch.equal(evaluating.augment(plain), plain)
    aug = AudioPreprocessor(spec_augment=True, freq_mask=20, time_mask=40, random_crop=False, train=True)
    assert aug.augments and not aug.stochastic  # features stay cacheable: the masks come after
    assert torch.equal(aug(clip), plain)
    kept = plain.clone()
    torch.manual_seed(0)
    masked = aug.augment(plain)
    assert torch.equal(plain, kept)  # the input (a cached sample) is never written
    assert masked.shape == plain.shape and not torch.equal(masked, plain)
    changed = masked != plain
    assert (masked[changed] == 0).all()  # masks write the normalised mean
    rows = changed.all(dim=1).nonzero().flatten()  # the masked mel band: contiguous, <= freq_mask
    assert len(rows) <= 20 and (len(rows) == 0 or rows[-1] - rows[0] + 1 == len(rows))
    seeded = [aug.augment(plain, torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(seeded[0], seeded[1]) and not torch.equal(seeded[0], seeded[2])
    with pytest.raises(ConfigError, match="freq_mask=-1"):
        AudioPreprocessor(spec_augment=True, freq_mask=-1)


def test_frequency_shift_and_time_stretch_are_seeded_bounded_and_leave_masks_alone():
    feats = torch.randn(64, 100)
    kept = feats.clone()
    shift = AudioPreprocessor(freq_shift=3, random_crop=False, train=True)
    assert shift.augments and not AudioPreprocessor(freq_shift=3).augments  # training only
    seen = set()
    for seed in range(40):
        out = shift.augment(feats, torch.Generator().manual_seed(seed))
        assert out.shape == feats.shape
        k = next(k for k in range(-3, 4) if torch.equal(out, AudioPreprocessor._shift(feats, k)))
        if k > 0:  # bin i moved to i + k, the vacated low bins hold the mean
            assert torch.equal(out[k:], feats[:-k]) and (out[:k] == 0).all()
        seen.add(k)
    assert seen == set(range(-3, 4)) and torch.equal(feats, kept)
    stretch = AudioPreprocessor(time_stretch=0.2, random_crop=False, train=True, max_seconds=2.0)
    lengths = {stretch.augment(feats, torch.Generator().manual_seed(s)).shape[1] for s in range(40)}
    assert min(lengths) >= 80 and max(lengths) <= 120 and len(lengths) > 10
    ramp = torch.linspace(0, 1, 100).expand(64, 100)  # linear in time: stays linear, same ends
    out = stretch.augment(ramp, torch.Generator().manual_seed(1))
    assert torch.allclose(out, torch.linspace(0, 1, out.shape[1]).expand(64, -1), atol=1e-6)
    assert AudioPreprocessor(time_stretch=0.5, train=True, max_seconds=0.5).augment(
        torch.randn(64, 50), torch.Generator().manual_seed(3)).shape[1] <= 51  # never beyond max_frames
    # with SpecAugment too, the masks draw what they drew without the new options
    masks = AudioPreprocessor(spec_augment=True, train=True, random_crop=False)
    both = AudioPreprocessor(spec_augment=True, freq_shift=2, train=True, random_crop=False)
    a = masks.augment(feats, torch.Generator().manual_seed(5))
    b = both.augment(feats, torch.Generator().manual_seed(5))
    assert (a == 0).all(dim=0).any() and torch.equal((a == 0).all(dim=0), (b == 0).all(dim=0))  # same frames
    rows_a, rows_b = (a == 0).all(dim=1), (b == 0).all(dim=1)  # b's zero rows: a's band + the vacated ones
    assert torch.equal(rows_a & rows_b, rows_a)
    assert torch.equal(both.augment(feats, torch.Generator().manual_seed(5)), b)  # seeded
    for bad in ({"freq_shift": -1}, {"freq_shift": 64}, {"time_stretch": 1.0}, {"time_stretch": -0.1}):
        with pytest.raises(ConfigError, match="freq_shift="):
            AudioPreprocessor(**bad)


def test_hostile_audio_raises_badinput_with_reason(tmp_path):
    sf.write(tmp_path / "zero.wav", np.zeros(0, np.float32), 16000)
    nan = _tone(16000)
    nan[100] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT")
    (tmp_path / "text.wav").write_text("RIFF? no, this is not audio at all " * 10)
    (tmp_path / "empty.wav").write_bytes(b"")
    pre = AudioPreprocessor()
    cases = {
        tmp_path / "zero.wav": "zero-length",
        tmp_path / "nan.wav": "NaN",
        tmp_path / "text.wav": "not a readable audio file",
        tmp_path / "empty.wav": "empty file",
        tmp_path / "missing.wav": "missing file",
    }
    for path, reason in cases.items():
        with pytest.raises(BadInput, match=reason):
            pre(path)
    with pytest.raises(BadInput, match="zero-length"):
        pre((np.zeros(0, np.float32), 16000))
    with pytest.raises(BadInput, match="NaN/Inf"):
        pre(torch.full((1000,), float("inf")))
    with pytest.raises(BadInput, match="sample rate"):
        pre((_tone(16000), 0))
    with pytest.raises(BadInput, match="ambiguous"):
        pre(np.zeros((100, 200), np.float32))
    with pytest.raises(BadInput, match="unsupported audio dtype object"):
        pre(np.array([0.0] * 1000, dtype=object))


def test_collate_pads_with_a_frame_mask():
    pre = AudioPreprocessor()
    a, b = pre((_tone(16000, 0.5), 16000)), pre((_tone(16000, 1.0), 16000))
    batch, mask = pre.collate([a, b])
    assert batch.shape == (2, 64, b.shape[1])
    assert mask.tolist() == [[True] * a.shape[1] + [False] * (b.shape[1] - a.shape[1]), [True] * b.shape[1]]
    assert torch.equal(batch[0, :, : a.shape[1]], a) and (batch[0, :, a.shape[1] :] == 0).all()


def test_feature_stats_recovers_configured_normalisation():
    clips = [(_tone(16000, 0.5, f), 16000) for f in (300, 900)]
    mean, std = feature_stats(AudioPreprocessor(), clips)
    normed = torch.cat([AudioPreprocessor(mean=mean, std=std)(c).flatten() for c in clips])
    assert normed.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert normed.std().item() == pytest.approx(1.0, abs=1e-3)


def _harmonic(freq: float, rate: int = 16000, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return sum(0.1 / k * np.sin(2 * math.pi * k * freq * t) for k in range(1, int(7000 / freq)))


def test_log_frequency_axis_turns_a_pitch_change_into_a_shift():
    """12 bins per octave: a harmonic tone 7 semitones up is the same spectrum 7 bins up."""
    pre = AudioPreprocessor(frequency_scale="log", n_fft=2048, f_min=125.0, f_max=8000.0 / 2 ** (1 / 12),
                            n_mels=72, max_seconds=1.0, mean=0.0, std=1.0)
    low, high = pre((_harmonic(261.6), 16000)).mean(dim=1), pre((_harmonic(392.0), 16000)).mean(dim=1)  # (72,)
    assert int(low.argmax()) + 7 == int(high.argmax())
    assert pre((_harmonic(261.6), 16000)).shape == (72, 101)

    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    band = slice(10, 60)  # the fundamental and the partials of both tones, away from the edges
    shifted = corr(low[band], high[7:][band])
    assert shifted > 0.85 and corr(low[band], high[band]) < shifted - 0.5  # measured 0.90 vs 0.04
    # the mel axis is nearly linear below 1 kHz: there the same change of pitch is no shift
    mel = AudioPreprocessor(n_fft=2048, n_mels=72, max_seconds=1.0)
    mlow, mhigh = mel((_harmonic(261.6), 16000)).mean(dim=1), mel((_harmonic(392.0), 16000)).mean(dim=1)
    assert max(corr(mlow[band], mhigh[s:][band]) for s in range(12)) < shifted - 0.3  # measured 0.34


def test_log_frequency_fbanks_shape_peaks_and_errors():
    fb = log_frequency_fbanks(1025, 125.0, 8000.0, 64, 16000)
    assert fb.shape == (1025, 64) and fb.min() == 0
    assert (fb.amax(dim=0) > 0.5).all()  # every filter catches an STFT bin near its centre
    centres = fb.argmax(dim=0).double() * 16000 / 2048  # (64,) Hz
    ratios = centres[40:] / centres[39:-1]  # high bins: the STFT resolves the constant ratio
    assert torch.allclose(ratios, torch.full_like(ratios, 2 ** (6 / 64)), rtol=0.03)
    # the fast power spectrum equals torchaudio's Spectrogram(power=2) through the same filters
    spectrogram = LogFrequencySpectrogram(16000, 2048, 160, 125.0, None, 64)
    wave = torch.from_numpy(_harmonic(300.0, seconds=0.7)).float()
    reference = torchaudio.transforms.Spectrogram(n_fft=2048, hop_length=160, power=2.0)(wave).T @ spectrogram.fb
    torch.testing.assert_close(spectrogram(wave), reference.T, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="raise n_fft or f_min"):
        AudioPreprocessor(frequency_scale="log", n_fft=400, f_min=125.0)
    with pytest.raises(ConfigError, match="f_min"):
        AudioPreprocessor(frequency_scale="log", n_fft=2048, f_min=0.0)
    with pytest.raises(ConfigError, match="frequency_scale"):
        AudioPreprocessor(frequency_scale="bark")


# ---------------------------------------------------------------------------- sample rates (issue #13)


def _wav_claiming(path, rate: int) -> None:
    """A valid 16-bit mono WAV whose header is patched to claim `rate` Hz."""
    sf.write(path, _tone(16000, 0.1), 16000, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    assert data[24:28] == struct.pack("<I", 16000)
    data[24:28] = struct.pack("<I", rate)
    data[28:32] = struct.pack("<I", rate * 2 & 0xFFFFFFFF)  # byte rate = rate * block align
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("rate", [1, 3999, 192_001, 2_000_000_000])
def test_sample_rate_outside_the_accepted_range_is_refused(tmp_path, rate):
    path = tmp_path / "claim.wav"
    _wav_claiming(path, rate)
    assert sf.info(str(path)).samplerate == rate
    pre = AudioPreprocessor()
    for item, name in (((_tone(16000, 0.1), rate), "waveform"), (path, str(path)), (path.read_bytes(), "<bytes>")):
        with pytest.raises(BadInput, match=rf"sample rate {rate} Hz .*accepted range 4000-192000 Hz") as info:
            pre(item)
        assert name in str(info.value)
    assert not pre._resamplers  # refused before any kernel was built


def test_sample_rate_range_is_configurable_and_validated():
    pre = AudioPreprocessor(min_sample_rate=1000)
    assert _peak_hz(pre.waveform((_tone(2000), 2000)), 16000) == pytest.approx(440.0, abs=1.0)
    assert AudioPreprocessor(max_sample_rate=16000)(_tone(16000)).shape[0] == 64
    with pytest.raises(BadInput, match="accepted range 4000-16000 Hz"):
        AudioPreprocessor(max_sample_rate=16000)((_tone(22050), 22050))
    with pytest.raises(ConfigError, match="min_sample_rate"):
        AudioPreprocessor(min_sample_rate=20000)  # the target rate itself would be refused
    with pytest.raises(ConfigError, match="max_sample_rate"):
        AudioPreprocessor(sample_rate=8000, min_sample_rate=4000, max_sample_rate=6000)


@pytest.mark.parametrize("rate", [44101, 96001])  # primes: gcd(rate, 16000) = 1
def test_prime_rate_is_resampled_with_a_bounded_kernel_keeping_pitch(rate):
    """The exact ratio 44101/16000 needs a 16000 x 44135 kernel (2.8 GB); 96001 one of 6.1 GB."""
    pre = AudioPreprocessor()
    wave = pre.waveform((_tone(rate), rate))
    assert abs(wave.numel() - 16000) <= 2
    assert _peak_hz(wave, 16000) == pytest.approx(440.0, abs=1.0)
    (resampler,) = pre._resamplers.values()
    assert resampler.kernel.numel() <= 2**20  # 4 MB of float32
    assert resampler.orig_freq / resampler.new_freq == pytest.approx(rate / 16000, rel=1e-4)


def test_common_rates_keep_their_exact_ratio():
    pre = AudioPreprocessor()
    for rate in (8000, 11025, 22050, 32000, 44100, 48000, 88200, 96000, 192000):
        pre.waveform((_tone(rate, 0.1), rate))
        resampler = pre._resamplers[rate]
        assert resampler.orig_freq * 16000 == resampler.new_freq * rate


def test_resampler_cache_is_a_bounded_lru():
    pre = AudioPreprocessor()
    rates = [20000 + 1000 * i for i in range(20)]
    for rate in rates:
        pre.waveform((_tone(rate, 0.05), rate))
        assert len(pre._resamplers) <= 8
    assert list(pre._resamplers) == rates[-8:]
    kept = pre._resamplers[rates[-8]]
    pre.waveform((_tone(rates[-8], 0.05), rates[-8]))  # a hit: reused, and now the most recent
    pre.waveform((_tone(44100, 0.05), 44100))  # evicts the least recently used: rates[-7]
    assert pre._resamplers[rates[-8]] is kept and rates[-7] not in pre._resamplers
    assert len(pre._resamplers) == 8


@pytest.mark.parametrize("bad", [{"f_min": 9000.0}, {"f_min": 100.0, "f_max": 50.0}, {"f_max": 9000.0},
                                 {"max_seconds": math.inf}, {"max_seconds": math.nan}, {"mean": math.nan},
                                 {"std": math.inf}, {"max_seconds": 36000.0}])  # 10 hours: a 29 GB allocation
def test_unusable_settings_are_config_errors(bad):
    """Each used to be a raw ValueError / OverflowError, or every clip skipped or zeroed later."""
    with pytest.raises(ConfigError, match="audio preprocess"):
        AudioPreprocessor(**bad)


@pytest.mark.parametrize("shape", [(0, 2), (2, 0), (0,)])
def test_zero_length_audio_of_any_layout_says_so(shape):
    with pytest.raises(BadInput, match="zero-length audio"):  # (0, 2) was "audio contains NaN/Inf samples"
        AudioPreprocessor().waveform((np.zeros(shape, dtype=np.float32), 16000))


def test_a_file_with_hundreds_of_channels_is_refused_before_it_is_read(tmp_path):
    """A few KB of compressed silence with 255 channels asked for GBs of float32 (crop length ×
    channels); arrays were limited to 32 channels, files were not."""
    import resource

    path = tmp_path / "wide.ogg"
    sf.write(path, np.zeros((16000, 40), np.float32), 16000, format="OGG")
    assert path.stat().st_size < 50_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(BadInput, match="wide.ogg has 40 channels; at most 32 are read"):
        AudioPreprocessor()(path)
    sf.write(tmp_path / "fine.wav", np.zeros((16000, 32), np.float32), 16000)  # 32 channels: read
    assert AudioPreprocessor()(tmp_path / "fine.wav").shape[0] == 64
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KB: nothing big allocated


def test_a_file_name_that_is_not_utf8_reads_and_content_errors_name_the_file(tmp_path):
    """libsndfile encodes a name strictly: a good file named with undecodable bytes was 'not a
    readable audio file'; 'audio contains NaN/Inf samples' of a file did not say which one."""
    import os

    sf.write(tmp_path / "ok.wav", _tone(16000, 0.2), 16000)
    odd = os.fsdecode(os.fsencode(str(tmp_path)) + b"/\xff\xfe.wav")
    os.rename(tmp_path / "ok.wav", odd)
    pre = AudioPreprocessor()
    assert pre(odd).shape[0] == pre.n_mels
    bad = _tone(16000, 0.2)
    bad[100] = np.nan
    sf.write(tmp_path / "nan.wav", bad, 16000, subtype="FLOAT")
    with pytest.raises(BadInput, match=r"NaN/Inf samples: \S*nan.wav$"):
        pre(tmp_path / "nan.wav")


def _misstate_flac_length(path, total: int) -> None:
    """Rewrite the 36-bit total_samples of a FLAC's STREAMINFO (0 = unknown, as a stream to a pipe)."""
    data = bytearray(path.read_bytes())
    bits = int.from_bytes(data[18:26], "big") & ~((1 << 36) - 1)
    data[18:26] = (bits | total).to_bytes(8, "big")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("total", [0, 160_000])
def test_a_flac_of_unknown_or_overstated_length_reads_in_training_and_eval(tmp_path, total):
    """A FLAC streamed to a pipe (total_samples 0) or overstating its length failed the random crop's
    seek, and any read through its real end: 'Internal psf_fseek() failed', skipped on every draw."""
    path = tmp_path / "s.flac"
    sf.write(path, _tone(16000, 1.0), 16000, subtype="PCM_16")
    whole = AudioPreprocessor(max_seconds=2.0).waveform(path)  # (16000,)
    _misstate_flac_length(path, total)
    assert torch.equal(AudioPreprocessor(max_seconds=2.0).waveform(path), whole)  # eval reads through the end
    assert torch.equal(AudioPreprocessor(max_seconds=2.0).waveform(path.read_bytes()), whole)
    train = AudioPreprocessor(max_seconds=0.5, train=True)
    for seed in range(6):
        torch.manual_seed(seed)
        crop = train.waveform(path)
        assert crop.shape == (8000,)
        assert any(torch.equal(crop, whole[s : s + 8000]) for s in range(0, 8001, 1))  # a crop of the file


def test_a_float_waveform_at_integer_scale_is_refused_with_the_fix():
    """int16 samples made float unscaled (peak ~16000) were embedded as if in [-1, 1]: a wrong
    embedding, silently; a float overshooting 1 a little (a resampled clip) still reads."""
    pcm = (_tone(16000, 0.5) * 32767).astype(np.int16)
    pre = AudioPreprocessor()
    with pytest.raises(BadInput, match=r"float audio of peak 1\.638e\+04 .*divide int16 samples by 32768"):
        pre((pcm.astype(np.float64), 16000))
    with pytest.raises(BadInput, match="divide int16 samples by 32768"):
        pre(torch.from_numpy(pcm).float())
    loud = _tone(16000, 0.5, amp=3.0)  # clipped-range overshoot: kept as given
    assert torch.equal(pre.waveform((loud, 16000)), torch.from_numpy(loud))
    assert torch.allclose(pre((pcm, 16000)), pre((pcm / 32768.0, 16000)), atol=1e-5)


@pytest.mark.parametrize("subtype", ["FLOAT", "DOUBLE"])
def test_a_float_file_at_integer_scale_is_refused_with_the_fix(tmp_path, subtype):
    """int16 samples written unscaled to a float WAV were embedded as if in [-1, 1] (only arrays were refused)."""
    pcm = _tone(16000, 0.5) * 32767
    sf.write(tmp_path / "loud.wav", pcm, 16000, subtype=subtype)
    pre = AudioPreprocessor()
    for item in (tmp_path / "loud.wav", (tmp_path / "loud.wav").read_bytes()):
        with pytest.raises(BadInput, match=r"holds float samples of peak 1\.638e\+04, .*write it as 16-bit PCM"):
            pre(item)
    mix = _tone(16000, 0.5, amp=3.0)  # a clipped mix over 1: read as stored, as the same array is
    sf.write(tmp_path / "mix.wav", mix, 16000, subtype=subtype)
    assert torch.equal(pre.waveform(tmp_path / "mix.wav"), pre.waveform((mix, 16000)))
    sf.write(tmp_path / "pcm.wav", pcm.astype(np.int16), 16000, subtype="PCM_16")  # libsndfile scales it
    assert pre.waveform(tmp_path / "pcm.wav").abs().max() <= 1


def test_a_random_crop_draws_from_the_generator_given_and_leaves_the_global_one(tmp_path):
    """The crop's offset came from the global RNG only: a dataset had to reseed it (shared by every thread)."""
    rng = np.random.default_rng(0)
    stereo = rng.uniform(-0.5, 0.5, (16000, 2)).astype(np.float32)
    sf.write(tmp_path / "clip.wav", stereo, 16000)
    pre = AudioPreprocessor(max_seconds=0.1, random_crop=True, train=True)
    for item in (tmp_path / "clip.wav", (stereo, 16000), (stereo.T.copy(), 16000), stereo[:, 0].copy()):
        torch.manual_seed(0)
        before = torch.get_rng_state()
        drawn = [pre.waveform(item, torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
        assert torch.equal(torch.get_rng_state(), before)
        assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], drawn[2])
        torch.manual_seed(7)  # the same crop as a global generator seeded alike: a seeded run draws as it did
        assert torch.equal(pre.waveform(item), drawn[0])
