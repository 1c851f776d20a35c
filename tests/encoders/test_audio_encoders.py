"""Audio encoders: variable length through the frame mask, exact padding invariance, batching."""

from __future__ import annotations

import pytest
import torch

from encoders import AudioCNN, AudioTransformer
from encoders.audio import MaskedGroupNorm
from encoders.output import downsample_mask

N_MELS = 32
LENGTHS = [40, 21, 5]


def _ast(**kw) -> AudioTransformer:
    torch.manual_seed(0)
    args = dict(n_mels=N_MELS, patch_freq=8, patch_time=4, width=32, layers=2, heads=4, max_frames=64)
    return AudioTransformer(**(args | kw)).eval()


def _cnn(**kw) -> AudioCNN:
    torch.manual_seed(0)
    model = AudioCNN(**(dict(n_mels=N_MELS, channels=(8, 16, 32), time_strides=(2, 2, 1), groups=4) | kw))
    if kw.get("norm") == "batch":  # give BatchNorm non-trivial running statistics first
        model.train()
        with torch.no_grad():
            model(torch.randn(4, N_MELS, 40))
    return model.eval()


ENCODERS = {
    "ast_mean_sin": lambda: _ast(),
    "ast_cls_learned": lambda: _ast(pool="cls", positional="learned"),
    "ast_rotary": lambda: _ast(positional="rotary"),
    "ast_conv_stem": lambda: _ast(stem="conv", stem_channels=8),
    "ast_timbre": lambda: _ast(timbre_channels=8, timbre_kernel=9),
    "ast_templates": lambda: _ast(stem="templates", patch_freq=N_MELS, timbre_channels=8, timbre_kernel=9),
    "cnn_group": lambda: _cnn(),
    "cnn_batch": lambda: _cnn(norm="batch"),
}


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    T = max(LENGTHS)
    mel = torch.randn(len(LENGTHS), N_MELS, T)
    mask = torch.arange(T)[None] < torch.tensor(LENGTHS)[:, None]  # (B, T)
    mel[~mask[:, None, :].expand_as(mel)] = 1e3  # garbage beyond each clip (finite, large)
    return mel, mask


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_padded_batch_equals_each_clip_alone(name):
    model = ENCODERS[name]()
    mel, mask = _batch()
    with torch.no_grad():
        out = model(mel, mask)
        for i, n in enumerate(LENGTHS):
            alone = model(mel[i : i + 1, :, :n])
            assert alone.mask.all() and alone.tokens.shape[1] == int(out.mask[i].sum())
            torch.testing.assert_close(out.pooled[i], alone.pooled[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out.tokens[i][out.mask[i]], alone.tokens[0], atol=1e-5, rtol=1e-5)
    assert out.pooled.shape == (3, model.width) and out.mask.dtype == torch.bool
    assert out.tokens.shape[:2] == out.mask.shape and torch.isfinite(out.pooled).all()


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_garbage_changes_output_without_mask(name):
    """The invariance above comes from the mask: without it the garbage is seen."""
    model = ENCODERS[name]()
    mel, mask = _batch()
    with torch.no_grad():
        masked = model(mel[1:2], mask[1:2]).pooled
        unmasked = model(mel[1:2]).pooled
    assert not torch.allclose(masked, unmasked, atol=1e-3)


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_fully_padded_clip_is_finite(name):
    model = ENCODERS[name]()
    mel, mask = _batch()
    mask[2] = False
    out = model(mel, mask)
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()
    assert not out.mask[2].any()


def test_ast_token_layout_and_mask():
    model = _ast()
    mel, mask = _batch()
    out = model(mel, mask)
    # 40 frames / patch_time 4 = 10 time patches x 32 / 8 = 4 freq patches, time-major.
    assert out.tokens.shape == (3, 40, 32)
    assert out.mask.sum(1).tolist() == [40, 24, 8]  # ceil(21 / 4) * 4, ceil(5 / 4) * 4


def test_cnn_time_downsampling_and_mask():
    model = _cnn()
    mel, mask = _batch()
    out = model(mel, mask)
    assert model.width == 32 and out.tokens.shape == (3, 10, 32)  # 40 / 2 / 2
    assert out.mask.sum(1).tolist() == [10, 6, 2]  # ceil(ceil(n / 2) / 2)


def test_downsample_mask_matches_strided_lengths():
    mask = torch.arange(7)[None] < torch.tensor([7, 3, 0])[:, None]
    assert downsample_mask(mask, 2).tolist() == [[True] * 4, [True, True, False, False], [False] * 4]


def test_conv_stem_is_frequency_shift_equivariant():
    """Shifting the spectrum up by one patch shifts the stem's features by one frequency cell
    (away from the edges): a timbre is seen the same way at every pitch."""
    model = _ast(stem="conv", stem_channels=8, n_mels=64)
    mel = torch.zeros(1, 64, 16)
    mel[0, 27:31, 2:12] = torch.randn(4, 10)  # mid-axis: the receptive fields (±21 bins) miss both edges
    shifted = torch.roll(mel, shifts=8, dims=1)  # patch_freq = 8 mel bins up
    mask = torch.ones(1, 16, dtype=torch.bool)
    with torch.no_grad():
        a, b = mel[:, None], shifted[:, None]
        ma = mb = mask
        for stage in model.stem:
            a, ma = stage(a, ma)
            b, mb = stage(b, mb)
    # (1, C, F'=8, T'): the features of the shifted input are the shifted features.
    # Equal up to GroupNorm's normalised zeros meeting the zero padding at the edges (≈1% here).
    shifted_gap = (a[:, :, 3] - b[:, :, 4]).abs().max()
    unshifted_gap = (a[:, :, 3] - b[:, :, 3]).abs().max()
    assert a[:, :, 3].abs().max() > 0.1  # the compared cell holds the signal
    assert shifted_gap < 0.05 * unshifted_gap


def test_timbre_branch_is_pitch_invariant_and_time_local():
    """A spectral pattern moved along frequency (a new pitch on a log axis) gives the same
    branch output; a change at one patch time step changes that step's output only."""
    model = _ast(timbre_channels=8, timbre_kernel=9, n_mels=64)
    torch.manual_seed(3)
    x = torch.zeros(1, 1, 64, 16)
    x[0, 0, 20:26, :] = torch.randn(6, 16)  # away from both edges at every shift below
    with torch.no_grad():
        base = model.timbre(x)  # (1, W, 4)
        for shift in (1, 7, 20):
            torch.testing.assert_close(model.timbre(torch.roll(x, shift, dims=2)), base, atol=1e-6, rtol=1e-6)
        y = x.clone()
        y[0, 0, 22, 9] += 3.0  # inside patch time step 2 (frames 8-11)
        changed = (model.timbre(y) - base).abs().amax(dim=1)[0]  # (4,)
    assert changed[2] > 1e-3 and changed[[0, 1, 3]].max() == 0
    assert base.abs().max() > 0.01  # the invariance above is not that of a zero output
    # the branch reaches the encoder's output: silencing its projection changes it
    mel = x[:, 0]
    with torch.no_grad():
        before = model(mel).pooled
        model.timbre.proj.weight.zero_()
        model.timbre.proj.bias.zero_()
        assert (model(mel).pooled - before).abs().max() > 1e-3


def test_templates_stem_reads_what_and_where_from_the_same_responses():
    """stem='templates': one token per time step, built from the branch's two readouts only.
    The pitch map follows a pattern moved along frequency (its readout is equivariant), the
    timbre readout does not move (invariant), and without the pitch map a pitch change would
    be invisible: the two readouts together tell the same timbre at two pitches apart."""
    model = _ast(stem="templates", patch_freq=64, timbre_channels=8, timbre_kernel=9, n_mels=64)
    assert model.patchify is None and model.timbre.pitch is not None
    torch.manual_seed(3)
    x = torch.zeros(1, 1, 64, 16)
    x[0, 0, 20:26, :] = torch.randn(6, 16)  # away from both edges at every shift below
    branch = model.timbre
    with torch.no_grad():
        pooled = torch.nn.functional.avg_pool2d(x, (1, 4))  # (1, 1, 64, 4)
        responses = branch.conv(pooled)  # (1, C, 64, 4)
        where = responses.max(dim=1).values  # (1, 64, 4): the map the pitch readout reads
        moved = branch.conv(torch.roll(pooled, 7, dims=2)).max(dim=1).values
        torch.testing.assert_close(moved, torch.roll(where, 7, dims=1), atol=1e-6, rtol=1e-6)
        assert where.abs().max() > 0.01  # the equivariance above is not that of a zero map
        out, out_moved = model(x[:, 0]).pooled, model(torch.roll(x, 7, dims=2)[:, 0]).pooled
        tokens = model(x[:, 0]).tokens
    assert tokens.shape == (1, 4, 32)  # 16 frames / patch_time 4, one token per time step
    assert (out - out_moved).abs().max() > 1e-3  # a new pitch is a new embedding
    with torch.no_grad():  # ...and that comes from the pitch map alone: the timbre readout is blind to it
        branch.pitch.weight.zero_()
        branch.pitch.bias.zero_()
        torch.testing.assert_close(model(x[:, 0]).pooled, model(torch.roll(x, 7, dims=2)[:, 0]).pooled,
                                   atol=1e-5, rtol=1e-5)


def test_audio_errors():
    with pytest.raises(ValueError, match="multiple of patch_freq"):
        AudioTransformer(n_mels=30, patch_freq=8)
    with pytest.raises(ValueError, match=r"\(B, 32, frames\)"):
        _ast()(torch.randn(1, 16, 10))
    with pytest.raises(ValueError, match="max_frames=64"):
        _ast()(torch.randn(1, N_MELS, 65))
    with pytest.raises(ValueError, match="frame mask must be bool"):
        _ast()(torch.randn(1, N_MELS, 10), torch.ones(1, 10))
    with pytest.raises(ValueError, match="timbre_kernel=8"):
        _ast(timbre_channels=4, timbre_kernel=8)
    with pytest.raises(ValueError, match=r"stem='templates'.*timbre_channels > 0 \(got 0\)"):
        _ast(stem="templates", patch_freq=N_MELS)
    with pytest.raises(ValueError, match=r"patch_freq = n_mels \(got 8 and 32\)"):
        _ast(stem="templates", timbre_channels=4, timbre_kernel=3)
    with pytest.raises(ValueError, match="valid: patch, conv, templates"):
        _ast(stem="mel")
    with pytest.raises(ValueError, match="groups=3"):
        AudioCNN(channels=(8, 16), time_strides=(2, 2), groups=3)
    # sizes a config can get wrong fail at construction with the key, not in the first forward
    for kwargs, message in [({"channels": (), "time_strides": ()}, "channels is empty"),
                            ({"groups": 0}, "groups must be an integer >= 1, got 0"),
                            ({"time_strides": (0, 2)}, r"time_strides\[0\] must be an integer >= 1, got 0"),
                            ({"channels": (0, 8), "norm": "batch"}, r"channels\[0\] must be an integer >= 1"),
                            ({"n_mels": 0}, "n_mels must be an integer >= 1, got 0")]:
        with pytest.raises(ValueError, match=message):
            AudioCNN(**{"channels": (8, 16), "time_strides": (2, 2), "groups": 4, **kwargs})
    with pytest.raises(ValueError, match="timbre_channels must be an integer >= 1, got -3"):
        _ast(timbre_channels=-3)


def test_conv_stem_of_any_channel_count_builds():
    """stem_channels 36 (not a multiple of 8 groups) builds with a group count that divides it."""
    model = _ast(stem="conv", stem_channels=36)
    assert model(torch.randn(1, N_MELS, 16)).pooled.shape[0] == 1


def test_masked_group_norm_equals_group_norm_on_valid_frames():
    torch.manual_seed(2)
    norm = MaskedGroupNorm(4, 8)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 8, 5, 12)
    full = torch.ones(2, 12, dtype=torch.bool)
    reference = torch.nn.functional.group_norm(x, 4, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(norm(x, full), reference, atol=1e-5, rtol=1e-5)
    # With padding, the valid part is normalised as if the padding were absent.
    mask = torch.arange(12)[None] < torch.tensor([12, 7])[:, None]
    padded = x.clone()
    padded[1, :, :, 7:] = 1e3
    alone = torch.nn.functional.group_norm(x[1:, :, :, :7], 4, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(norm(padded, mask)[1:, :, :, :7], alone, atol=1e-5, rtol=1e-5)
