"""Sampling settings and the top-k / top-p filters (decoder/sampling.py); the comparisons against
transformers' warpers are in test_generate.py."""

import numpy as np
import pytest
import torch

from mmembed.decoder import Sampling, Stops, generate, resolve_prompts
from mmembed.decoder.sampling import NUCLEUS_CANDIDATES, distribution
from tests.decoder.helpers import DIM, fake_embed, prompt_model

CPU = torch.device("cpu")


def test_zero_d_tensors_are_sampling_numbers():
    """torch.tensor(0.5) was 'temperature must be a finite number >= 0, got tensor(0.5000)' (top_k, top_p too)."""
    want = Sampling(0.5, 3, 0.5)
    assert Sampling(torch.tensor(0.5), torch.tensor(3), torch.tensor(0.5)) == want
    assert Sampling(torch.tensor(0.5, dtype=torch.float64), torch.tensor(3, dtype=torch.int32),
                    torch.tensor(0.5, dtype=torch.bfloat16)) == want
    assert Sampling(np.float32(0.5), np.int64(3), np.float64(0.5)) == want
    assert type(Sampling(torch.tensor(1)).temperature) is float and type(Sampling(1.0, torch.tensor(3)).top_k) is int
    pm = prompt_model()
    (resolved,) = resolve_prompts([["describe the picture"]], fake_embed, DIM, CPU)
    (a,) = generate(pm.lm, pm.fmt, [resolved], 6, Sampling(torch.tensor(0.7), torch.tensor(5), torch.tensor(0.9)),
                    Stops(), 3, CPU)
    (b,) = generate(pm.lm, pm.fmt, [resolved], 6, Sampling(0.7, 5, 0.9), Stops(), 3, CPU)
    assert a.token_ids == b.token_ids
    from mmembed.insight.entropy import temperature_sweep

    sweep = temperature_sweep(pm, resolved, [torch.tensor(0.5), 0.5], CPU, samples=2, max_new_tokens=3,
                              top_k=torch.tensor(5), top_p=torch.tensor(0.9))
    assert sweep[0] == sweep[1] and sweep[0].temperature == 0.5


@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": torch.tensor(True)}, "temperature"), ({"temperature": torch.tensor([0.5])}, "temperature"),
    ({"temperature": torch.tensor(0.5j)}, "temperature"), ({"temperature": torch.tensor(-0.5)}, "temperature"),
    ({"top_k": torch.tensor(3.0)}, "top_k"), ({"top_k": torch.tensor([3])}, "top_k"),
    ({"top_k": torch.tensor(True)}, "top_k"), ({"top_k": torch.tensor(0)}, "top_k"),
    ({"top_p": torch.tensor([0.5])}, "top_p"), ({"top_p": torch.tensor(1.5)}, "top_p"),
    ({"top_p": torch.tensor(False)}, "top_p"),
])
def test_a_bool_or_non_scalar_tensor_is_still_refused(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        Sampling(**{"temperature": 1.0, **kwargs})


def test_top_p_keeps_every_token_tied_with_the_last_it_keeps():
    """Of tokens tied at the top-p edge it kept those the sort put first: [2, 1, 1, 0] at 0.7 kept
    ids {0, 1}, transformers {0, 2}; which survived depended on the sort kernel."""
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 2.0]])
    expected = torch.tensor([2.0, 1.0, 1.0]).softmax(dim=0)
    ours = distribution(logits, Sampling(1.0, top_p=0.7))
    torch.testing.assert_close(ours[0, :3], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[1, 1:], expected.flip(0), rtol=0, atol=1e-6)
    assert float(ours[0, 3]) == 0 == float(ours[1, 0])


@pytest.mark.parametrize("vocab", [12, 300, 3 * NUCLEUS_CANDIDATES])  # the last: candidates, then a full sort
@pytest.mark.parametrize("settings", [
    {"temperature": 1.0, "top_p": 0.3}, {"temperature": 0.7, "top_p": 0.9}, {"temperature": 1.3, "top_p": 0.99},
    {"temperature": 1.0, "top_k": 5, "top_p": 0.6},
])
def test_with_tied_logits_the_kept_set_is_closed_under_ties_and_ignores_token_order(vocab, settings):
    """Half-precision logits tie often: the nucleus kept some of the tokens tied at its edge, so
    permuting the vocabulary changed which ones could be sampled."""
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randint(-6, 6, (6, vocab), generator=g).float() * 0.5  # 24 values: ties everywhere
    s = Sampling(**settings)
    ours = distribution(logits, s)
    kept = ours > 0
    weakest = logits.masked_fill(~kept, float("inf")).amin(dim=-1, keepdim=True)  # (B, 1)
    assert torch.equal(kept, logits >= weakest)  # a token as likely as a kept one is kept
    for _ in range(3):
        perm = torch.randperm(vocab, generator=g)
        permuted = distribution(logits[:, perm], s)
        assert torch.equal(permuted > 0, kept[:, perm])
        torch.testing.assert_close(permuted, ours[:, perm], rtol=0, atol=1e-6)
