"""Decoder with KV caches: a step given no positions continues after the cached tokens."""

from __future__ import annotations

import pytest
import torch

from encoders.blocks import Transformer
from mmembed.decoder import Decoder


@pytest.mark.parametrize("positional", ["learned", "sinusoidal", "rotary"])
def test_a_cached_step_without_positions_equals_the_full_pass(positional):
    """Without positions a cached step restarted them at 0 (logits 0.25 off the full pass)."""
    torch.manual_seed(0)
    dec = Decoder(50, width=32, layers=2, heads=4, max_len=16, positional=positional).double().eval()
    ids = torch.randint(0, 50, (2, 12))
    caches = dec.new_caches(2, 12)
    with torch.no_grad():
        chunks = [dec(ids[:, a:b], kv_caches=caches) for a, b in ((0, 7), (7, 8), (8, 12))]
        torch.testing.assert_close(torch.cat(chunks, dim=1), dec(ids), atol=1e-10, rtol=0)


@pytest.mark.parametrize("positional", ["sinusoidal", "rotary"])
def test_rolling_caches_without_positions_continue_past_the_window_and_the_context(positional):
    """A rolling cache holds only the window: the step's position is every token appended, not held."""
    torch.manual_seed(0)
    dec = Decoder(50, width=32, layers=2, heads=4, max_len=8, positional=positional, window=4).double().eval()
    ids = torch.randint(0, 50, (1, 20))  # past the 8-position context
    caches = dec.new_caches(1, 20)
    assert type(caches[0]).__name__ == "RollingKVCache"
    with torch.no_grad():
        steps = [dec(ids[:, :5], kv_caches=caches)] + [dec(ids[:, t:t + 1], kv_caches=caches) for t in range(5, 20)]
        torch.testing.assert_close(torch.cat(steps, dim=1), dec(ids), atol=1e-10, rtol=0)


def test_a_learned_table_refuses_a_cached_step_past_it():
    """The default positions go through the same check as given ones."""
    dec = Decoder(50, width=32, layers=1, heads=4, max_len=4, positional="learned").eval()
    caches = dec.new_caches(1, 6)
    with torch.no_grad():
        dec(torch.zeros(1, 4, dtype=torch.long), kv_caches=caches)
        with pytest.raises(ValueError, match=r"positions 4..4 lie outside the table of max_len=4"):
            dec(torch.zeros(1, 1, dtype=torch.long), kv_caches=caches)


def test_a_cache_that_records_no_length_asks_for_positions():
    """Where the caches cannot say how many tokens they hold, positions are required, not guessed."""

    class Bare:
        def update(self, positions, k, v):
            return k, v

    model = Transformer(8, 1, 2, positional="rotary", max_len=8).eval()
    with pytest.raises(ValueError, match="records no length.*pass positions"):
        model(torch.zeros(1, 2, 8), is_causal=True, kv_caches=[Bare()])
    model(torch.zeros(1, 2, 8), is_causal=True, positions=torch.arange(2), kv_caches=[Bare()])
