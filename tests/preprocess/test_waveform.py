"""Waveform pairs: the sample rate's forms, the samples the peak check reads, read-only arrays."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from mmembed.errors import BadInput
from mmembed.preprocess.audio import AudioPreprocessor
from mmembed.preprocess.waveform import split_pair


def _tone(rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * math.pi * 440.0 * t)).astype(np.float32)


@pytest.mark.parametrize("rate", [np.array(16000), np.array(16000.0), torch.tensor(16000), torch.tensor(16000.0),
                                  np.int32(16000)], ids=["ndarray", "float-ndarray", "tensor", "float-tensor", "np.int32"])
def test_a_zero_d_array_or_tensor_is_a_sample_rate(rate):
    """A 0-d rate (np.load(".npz")["sr"], torch.tensor(16000)) made the pair 'unsupported audio input of type tuple'."""
    wave = _tone(16000, 0.5)
    data, got = split_pair((wave, rate), 8000)
    assert got == 16000 and type(got) is int
    assert torch.equal(data, torch.from_numpy(wave))
    pre = AudioPreprocessor(max_seconds=1.0)
    assert torch.equal(pre.waveform((wave, rate)), pre.waveform((wave, 16000)))


@pytest.mark.parametrize("rate, reason", [(np.array(0), "a positive integer, got 0"),
                                          (torch.tensor(16000.5), "a positive integer, got 16000.5"),
                                          (np.array(np.nan), "a positive integer, got nan"),
                                          (np.array(True), "a number, got bool"),
                                          (np.array("16000"), "a number, got str")])
def test_a_zero_d_sample_rate_gets_the_checks_a_number_gets(rate, reason):
    with pytest.raises(BadInput, match=f"^sample rate must be {reason}$"):
        split_pair((_tone(16000, 0.1), rate), 8000)


@pytest.mark.parametrize("stereo", [False, True])
def test_a_loud_float_sample_past_the_crop_is_judged_as_a_float_files_is(tmp_path, stereo):
    """The pair's peak was measured over the whole array, the file's over the crop: the file was taken, the pair refused."""
    x = _tone(16000, 3.0)
    x[-10] = 20.0  # past the 1.3 s crop
    x = np.stack([x, 0.5 * x], axis=1) if stereo else x  # (T, C)
    path = tmp_path / "spike.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    pre = AudioPreprocessor(max_seconds=1.3)
    assert torch.equal(pre.waveform((x, 16000)), pre.waveform(path))
    x[100] = 20.0  # inside the crop: both refuse
    sf.write(path, x, 16000, subtype="FLOAT")
    for item in ((x, 16000), path):
        with pytest.raises(BadInput, match="peak 20"):
            pre.waveform(item)


def test_a_channel_first_pair_is_cropped_along_time_when_the_crop_is_shorter_than_the_channels():
    """Cropping before the channel mix must keep the channel axis of the whole waveform."""
    wave = torch.arange(8 * 100, dtype=torch.float32).reshape(8, 100) / 1000  # (C, T)
    pre = AudioPreprocessor(sample_rate=4000, max_seconds=0.001)  # a crop of 5 samples < 8 channels
    assert torch.allclose(pre.waveform((wave, 4000)), wave.mean(dim=0)[:4])


def test_a_read_only_waveform_raises_no_warning(monkeypatch):
    """np.frombuffer(pcm_bytes, np.int16) made torch warn 'The given NumPy array is not writable'
    (torch warns once per process, so the test checks what torch is handed: a writable array)."""
    pcm = (_tone(16000, 0.5) * 32767).astype(np.int16)
    frozen = np.frombuffer(pcm.tobytes(), np.int16)
    assert not frozen.flags.writeable
    handed, from_numpy = [], torch.from_numpy
    monkeypatch.setattr(torch, "from_numpy", lambda a: handed.append(a.flags.writeable) or from_numpy(a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data, rate = split_pair((frozen, 16000), 8000)
    assert handed == [True]
    assert rate == 16000 and torch.equal(data, from_numpy(pcm) / 32768.0)
