"""fit_power_law recovers known laws; FLOP counts equal a hand count."""

import numpy as np
import pytest
import torch

from mmembed.decoder.model import Decoder
from mmembed.insight.flops import estimated_training_flops, measured_flops
from mmembed.insight.power_law import fit_power_law


def test_exact_power_law_with_offset_is_recovered():
    x = np.geomspace(1e4, 1e7, 7)
    fit = fit_power_law(x, 1.7 + 400 * x ** -0.34, bootstrap=0)
    assert fit.E == pytest.approx(1.7, rel=1e-6)
    assert fit.A == pytest.approx(400, rel=1e-5)
    assert fit.alpha == pytest.approx(0.34, rel=1e-6)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.predict(1e8) == pytest.approx(1.7 + 400 * 1e8 ** -0.34, rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noisy_power_law_parameters_inside_bootstrap_intervals(seed):
    rng = np.random.default_rng(seed)
    x = np.geomspace(1e3, 1e9, 12)  # FLOP-like magnitudes: the fit rescales x internally
    truth = dict(E=0.8, A=30.0, alpha=0.25)
    y = (truth["E"] + truth["A"] * x ** -truth["alpha"]) * (1 + 0.005 * rng.standard_normal(len(x)))
    fit = fit_power_law(x, y, bootstrap=300, seed=seed)
    assert fit.alpha == pytest.approx(truth["alpha"], rel=0.1)
    assert fit.E == pytest.approx(truth["E"], rel=0.1)
    assert fit.r2 > 0.99
    for name, value in truth.items():
        lo, hi = fit.ci[name]
        assert lo <= value <= hi, (name, lo, value, hi)


def test_too_few_points_for_an_interval_give_none_not_a_zero_width_one():
    """3 points and 3 parameters: every usable resample is the same points, refitted exactly."""
    assert fit_power_law([1e4, 1e5, 1e6], [3.0, 2.5, 2.2], bootstrap=200).ci == {}
    wide = fit_power_law([1e4, 1e5, 1e6, 1e7, 1e8], [3.0, 2.52, 2.2, 2.05, 1.93], bootstrap=200).ci
    assert set(wide) == {"E", "A", "alpha"} and wide["alpha"][1] > wide["alpha"][0]


def test_pure_power_law_and_no_offset_mode():
    x = np.array([10.0, 30.0, 100.0, 300.0, 1000.0])
    y = 5.0 * x ** -0.5
    for offset in (True, False):
        fit = fit_power_law(x, y, offset=offset, bootstrap=0)
        assert fit.E == pytest.approx(0.0, abs=1e-9)
        assert (fit.A, fit.alpha) == (pytest.approx(5.0, rel=1e-6), pytest.approx(0.5, rel=1e-6))
    # without an offset the fit cannot absorb a floor: it fits worse than with one
    y2 = 2.0 + y
    assert fit_power_law(x, y2, offset=False, bootstrap=0).r2 < fit_power_law(x, y2, bootstrap=0).r2


def test_points_that_follow_no_power_law_are_flagged(caplog):
    x = [1e5, 2e5, 4e5, 8e5, 1.6e6]
    fit = fit_power_law(x, [1.61, 1.48, 1.47, 1.55, 1.49], bootstrap=0)  # a real tower sweep that failed
    assert fit.r2 < 0.9
    assert "do not follow L = E + A·x^(−α)" in caplog.text
    caplog.clear()
    fit_power_law(x, [1.7 + 400 * v ** -0.34 for v in x], bootstrap=0)
    assert "do not follow" not in caplog.text
    for rising in ([1.0, 1.1, 1.2, 1.3, 1.4], [2.0] * 5):  # A = 0: α drifted to 1.02e-3, just inside the old bound
        caplog.clear()
        fit = fit_power_law(x, rising, bootstrap=0)
        assert fit.A == 0 and "do not follow" in caplog.text


@pytest.mark.parametrize("x, y, match", [
    ([1, 2], [3, 2], "at least 3 distinct"),
    ([1, 1, 1, 2], [3, 3, 3, 2], "at least 3 distinct"),
    ([1, 2, 3], [1, 0, 1], "positive"),
    ([1, 2, float("nan")], [1, 2, 3], "finite"),
    ([1, 2, 3], [1, 2], "differ in length"),
])
def test_bad_inputs_are_refused(x, y, match):
    with pytest.raises(ValueError, match=match):
        fit_power_law(x, y)


def _hand_count(B, T, C, L, V):
    """Forward FLOPs of the decoder: per token and layer q,k,v,out (4C²) and MLP (8C²) products at
    2 FLOPs per multiply-add, attention scores and weighted values 2·2·T·C, then the head 2·C·V."""
    linear = B * T * (L * 24 * C * C + 2 * C * V)
    attention = B * T * L * 4 * T * C
    return linear, attention


def test_decoder_flops_match_a_hand_count():
    B, T, C, L, V = 3, 16, 32, 2, 50
    torch.manual_seed(0)
    decoder = Decoder(V, C, L, heads=2, max_len=T)
    ids = torch.randint(0, V, (B, T))
    linear, attention = _hand_count(B, T, C, L, V)
    assert measured_flops(lambda: decoder(ids), backward=False) == linear + attention
    # backward: two products per linear product (input and weight gradients); attention's
    # backward recomputes the scores: 2.5× its forward (PyTorch's SDPA formula)
    loss = lambda: decoder(ids).logsumexp(-1).sum()  # noqa: E731
    assert measured_flops(loss) == 3 * linear + attention + int(2.5 * attention)


def test_six_n_d_estimate_is_close_to_the_measured_count_when_width_dominates():
    B, T, C, L, V = 2, 8, 128, 2, 16
    decoder = Decoder(V, C, L, heads=4, max_len=T, tie_embeddings=False)
    ids = torch.randint(0, V, (B, T))
    measured = measured_flops(lambda: decoder(ids).logsumexp(-1).sum())
    estimate = estimated_training_flops(decoder.num_parameters(non_embedding=True), B * T)
    assert estimate == 6 * decoder.num_parameters() * B * T
    assert estimate == pytest.approx(measured, rel=0.05)  # attention (T ≪ C) and the head (V ≪ C) are small


def test_three_points_for_three_parameters_are_flagged_as_an_exact_fit(caplog):
    """3 rungs (the fewest a sweep takes) were fitted exactly, R² = 1.0000, with no warning."""
    fit = fit_power_law([1e4, 1e5, 1e6], [3.0, 2.5, 2.2], bootstrap=0)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)
    assert "exact interpolation" in caplog.text
    assert "exact interpolation: R² says nothing" in fit.notes and "R² says nothing" in str(fit)
    assert fit.to_dict()["notes"] == list(fit.notes)
    caplog.clear()
    fit_power_law([1e4, 1e5, 1e6], [3.0, 2.5, 2.2], offset=False, bootstrap=0)  # 2 parameters: one to spare
    assert "exact interpolation" not in caplog.text


def test_a_step_is_flagged_as_a_weak_fit_and_a_good_noisy_fit_is_not(caplog):
    """A step (README: 0.55 until the last rung, then 0.45) fitted with R² 0.46 and no warning."""
    fit = fit_power_law([1e3, 2e3, 4e3, 8e3, 16e3], [0.55, 0.55, 0.55, 0.55, 0.45], bootstrap=0)
    assert fit.r2 < 0.9 and "weak fit" in caplog.text
    assert fit.notes == ("weak fit: R² < 0.9",) and "weak fit" in str(fit)
    caplog.clear()
    rng = np.random.default_rng(0)
    x = np.geomspace(1e4, 1e6, 5)
    fit = fit_power_law(x, (0.8 + 30 * x ** -0.3) * (1 + 0.003 * rng.standard_normal(5)), bootstrap=0)
    assert 0.9 < fit.r2 < 1 and fit.notes == () and caplog.text == ""


def test_three_points_the_bound_keeps_from_interpolating_are_not_called_exact(caplog):
    """Where E >= 0 binds, 3 points are not interpolated (the data sweep's R² = 0.9891), yet the
    fit said "exact interpolation: R² says nothing"."""
    fit = fit_power_law([7680, 15872, 31744], [5.1195, 4.5861, 3.9449], bootstrap=0)  # falls faster than any E >= 0 law
    assert fit.E == 0 and 0.98 < fit.r2 < 0.995
    assert "exact interpolation" not in caplog.text and not any("exact" in note for note in fit.notes)
    assert fit.notes == ("as many points as parameters (3), not interpolated: R² says little",)
    assert "as many points as parameters" in str(fit) and "not interpolated" in caplog.text
