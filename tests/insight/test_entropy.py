"""Entropy view: the helpers' numbers (uniform = log V, one-hot = 0), agreement with what sampling
reports, the model's own entropy, distinct-n, and a temperature sweep on a seeded lively model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmembed.decoder import Sampling, Stops, choose, generate, resolve_prompts
from mmembed.insight import (distinct_n, logits_entropy, model_entropy, plot_sweep, sweep_table, temperature_sweep,
                             token_entropy)
from mmembed.insight.entropy import entropy
from tests.decoder.helpers import DIM, fake_embed, lively, prompt_model
from tests.decoder.test_generate import PROMPTS

CPU = torch.device("cpu")
PNG = b"\x89PNG\r\n\x1a\n"


def resolved(prompt=PROMPTS[0]):
    (r,) = resolve_prompts([prompt], fake_embed, DIM, CPU)
    return r


@pytest.fixture(scope="module")
def pm():
    return lively(prompt_model(), std=0.5)  # varied but not uniform next-token distributions


@pytest.mark.parametrize("V", [1, 2, 7, 50_257])
def test_uniform_is_log_v_and_one_hot_is_zero(V):
    assert float(entropy(torch.full((V,), 1.0 / V))) == pytest.approx(math.log(V), abs=1e-5)
    one_hot = torch.zeros(3, V)
    one_hot[:, V // 2] = 1.0
    assert entropy(one_hot).tolist() == [0.0, 0.0, 0.0]
    for t in (0.3, 1.0, 4.0):  # equal logits are uniform at any temperature
        assert float(logits_entropy(torch.full((V,), 2.5), t)) == pytest.approx(math.log(V), abs=1e-4)
    assert float(logits_entropy(torch.randn(V), 0.0)) == 0.0  # greedy: a point mass


def test_two_point_distribution_and_tempered_logits():
    p = torch.tensor([0.25, 0.75])
    assert float(entropy(p)) == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)
    z = torch.randn(4, 30, generator=torch.Generator().manual_seed(0)) * 3
    for t in (0.5, 1.0, 2.0):
        torch.testing.assert_close(logits_entropy(z, t), entropy((z / t).softmax(-1)), atol=1e-5, rtol=0)
    # a -inf logit (a token filtered out) contributes nothing
    masked = torch.tensor([0.0, 0.0, float("-inf")])
    assert float(logits_entropy(masked)) == pytest.approx(math.log(2), abs=1e-6)
    # sharper with lower temperature
    hs = [float(logits_entropy(z[0], t)) for t in (0.25, 0.5, 1.0, 2.0, 8.0)]
    assert hs == sorted(hs) and hs[0] < hs[-1] - 0.5
    # z / T past float32's range: two tied best tokens are still ln 2 (it said 0: inf - inf = NaN)
    for logits, t in (([1.0, 1.0, float("-inf")], 1e-40), ([3e38, 3e38, 0.0], 0.5)):
        assert float(logits_entropy(torch.tensor(logits), t)) == pytest.approx(math.log(2), abs=1e-6)
    drawn = choose(torch.tensor([[1.0, 1.0, float("-inf")]]), Sampling(1e-40), torch.Generator().manual_seed(0))
    assert float(drawn.entropy) == pytest.approx(math.log(2), abs=1e-6)  # what sampling reports agrees
    # a NaN or +inf logit, or no finite one, is no distribution: NaN, not 0 nats ("certain")
    bad = torch.tensor([[0.0, float("nan"), 1.0], [0.0, float("inf"), 1.0], [float("-inf")] * 3, [0.0, 0.0, 0.0]])
    h = logits_entropy(bad)
    assert h[:3].isnan().all() and float(h[3]) == pytest.approx(math.log(3), abs=1e-6)
    greedy = logits_entropy(bad, 0.0)  # T = 0 called the broken rows certain too (0 nats)
    assert greedy[:3].isnan().all() and float(greedy[3]) == 0.0
    for t in (-1.0, float("nan"), float("inf")):  # -1 gave the entropy of softmax(-z)
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            logits_entropy(torch.zeros(3), t)


def test_a_temperature_is_any_real_number_numpys_and_0d_tensors_included():
    """np.float32(0.5), np.int64(1) and torch.tensor(0.5) were refused: "temperature must be a finite
    number >= 0, got np.float32(0.5)"."""
    import numpy as np

    z = torch.randn(3, 30, generator=torch.Generator().manual_seed(0))
    for t, same in ((np.float32(0.5), 0.5), (np.int64(1), 1.0), (torch.tensor(0.5), 0.5), (torch.tensor(2), 2.0),
                    (np.float64(0.0), 0.0)):
        torch.testing.assert_close(logits_entropy(z, t), logits_entropy(z, same), atol=0, rtol=0)
    for t in (True, np.bool_(True), torch.tensor(True), torch.tensor([0.5]), "0.5", None, np.float32(-1.0),
              torch.tensor(float("nan"))):
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            logits_entropy(z, t)


def test_sampling_logits_that_are_not_finite_is_one_clear_error():
    """searchsorted over a NaN running sum pointed past the row: an IndexError from deep inside."""
    for row in ([float("inf"), 0.0, 0.0], [float("-inf")] * 3, [float("nan"), 0.0, 1.0]):
        with pytest.raises(ValueError, match="not finite"):
            choose(torch.tensor([row]), Sampling(1.0), torch.Generator().manual_seed(0))


def test_sampling_reports_the_entropy_of_the_tempered_distribution():
    """What `Generation.entropy` holds (sampling.choose) is H(softmax(z / T)): the helper's number."""
    z = torch.randn(3, 40, generator=torch.Generator().manual_seed(1)) * 2
    for t in (0.5, 1.0, 1.7):
        torch.testing.assert_close(choose(z, Sampling(t), torch.Generator().manual_seed(0)).entropy,
                                   logits_entropy(z, t), atol=1e-5, rtol=0)


def test_model_entropy_teacher_forced_equals_what_generation_reported_at_t1(pm):
    """At T = 1 without top-k/p the distribution drawn from is the model's own: the teacher-forced
    recomputation (one batch, right-padded answers) gives the cached run's entropies."""
    r = resolved()
    outs = generate(pm.lm, pm.fmt, [r] * 4, 10, Sampling(1.0), Stops(), 3, CPU)
    model = model_entropy(pm, r, [o.token_ids for o in outs])
    assert [len(m) for m in model] == [len(o.token_ids) for o in outs]
    for o, m in zip(outs, model):
        assert m == pytest.approx(o.entropy, abs=1e-4)
    assert len({round(h, 3) for m in model for h in m}) > 5  # varied: a constant would not test much
    view = token_entropy(pm, r, outs[0])
    assert len(view.labels) == len(view.drawn) == len(view.model) == len(outs[0].token_ids)


def test_distinct_n_counts_unique_over_total_ngrams():
    assert distinct_n([[1, 2, 1, 2]], 1) == 0.5
    assert distinct_n([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)
    assert distinct_n([[1, 2], [2, 1]], 2) == 1.0  # n-grams never cross answers
    assert distinct_n([[5, 5, 5], [5, 5, 5]], 1) == pytest.approx(1 / 6)
    assert distinct_n([[], [3]], 2) == 0.0


def test_sweep_entropy_grows_with_temperature_and_distinct_stays_in_range(pm):
    temperatures = [0.0, 0.5, 1.0, 2.0]
    rows = temperature_sweep(pm, resolved(), temperatures, CPU, samples=6, max_new_tokens=12, seed=0)
    assert [r.temperature for r in rows] == temperatures and all(r.samples == 6 for r in rows)
    drawn = [r.drawn_entropy for r in rows]
    assert drawn[0] == 0.0 and all(a < b for a, b in zip(drawn, drawn[1:])), drawn
    assert drawn[-1] > drawn[1] + 0.5
    assert rows[2].drawn_entropy == pytest.approx(rows[2].model_entropy, abs=1e-4)  # T = 1: the same distribution
    assert all(r.model_entropy > 0 for r in rows)  # the model's own entropy is never a point mass here
    for r in rows:
        assert 0.0 <= r.distinct_1 <= 1.0 and 0.0 <= r.distinct_2 <= 1.0
        assert 0 < r.tokens <= 6 * 12
    # greedy: six identical answers, so each distinct n-gram is counted six times over
    assert rows[0].distinct_1 < rows[-1].distinct_1 and rows[0].distinct_1 <= 1 / 6
    again = temperature_sweep(pm, resolved(), temperatures, CPU, samples=6, max_new_tokens=12, seed=0)
    assert again == rows  # seeded


def test_sweep_refuses_bad_arguments(pm):
    with pytest.raises(ValueError, match="samples"):
        temperature_sweep(pm, resolved(), [1.0], CPU, samples=0)
    with pytest.raises(ValueError, match="temperature"):
        temperature_sweep(pm, resolved(), [1.0, -0.5], CPU)
    for bad in (None, "1.0", torch.ones(2) > 0, []):  # None was a raw "'NoneType' object is not iterable"
        with pytest.raises(ValueError, match="temperature"):
            temperature_sweep(pm, resolved(), bad, CPU)


def test_one_temperature_is_a_sweep_of_one(pm):
    """A single number was a bare TypeError ("'float' object is not iterable")."""
    rows = temperature_sweep(pm, resolved(), [0.5], CPU, samples=2, max_new_tokens=4, seed=0)
    for one in (0.5, np.float32(0.5), np.array(0.5), torch.tensor(0.5)):
        got = temperature_sweep(pm, resolved(), one, CPU, samples=2, max_new_tokens=4, seed=0)
        assert got == rows


def test_plots_are_written(pm, tmp_path):
    r = resolved()
    rows = temperature_sweep(pm, r, [0.0, 1.0], CPU, samples=2, max_new_tokens=4, seed=0)
    table = sweep_table(rows).splitlines()
    assert len(table) == 4 and table[2].startswith("| 0 | 0.000 |")
    out = plot_sweep(rows, tmp_path / "a" / "sweep.png")
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 5_000
    (gen,) = generate(pm.lm, pm.fmt, [r], 6, Sampling(1.0), Stops(), 0, CPU)
    out = token_entropy(pm, r, gen).plot(tmp_path / "tokens.png")
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 5_000
