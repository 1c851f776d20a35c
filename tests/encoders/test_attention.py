"""Multi-head attention: equality with a naive float64 reference, exact padding, causality, caching."""

from __future__ import annotations

import math

import pytest
import torch

from encoders import MultiHeadAttention, Transformer
from encoders.positional import RotaryPositional


def naive_attention(attn: MultiHeadAttention, x: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V per head, written out directly; allowed: (B, T, T) bool."""
    B, T, C = x.shape
    H, d = attn.heads, attn.head_dim
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(C, dim=-1)
    q, k, v = (t.reshape(B, T, H, d).transpose(1, 2) for t in (q, k, v))  # (B, H, T, d)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, H, T, T)
    if allowed is not None:
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(B, T, C)
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.fixture
def attn() -> MultiHeadAttention:
    torch.manual_seed(0)
    return MultiHeadAttention(dim=32, heads=4).double().eval()


def _padding(lengths: list[int], T: int) -> torch.Tensor:
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]  # (B, T)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_equals_naive_reference_float64(attn, causal, masked):
    torch.manual_seed(1)
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    mask = _padding([7, 4, 1], 7) if masked else None
    allowed = torch.ones(3, 7, 7, dtype=torch.bool)
    if masked:
        allowed &= mask[:, None, :]
    if causal:
        allowed &= torch.ones(7, 7, dtype=torch.bool).tril()
    out = attn(x, mask, is_causal=causal)
    ref = naive_attention(attn, x, allowed)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


def test_padded_positions_are_ignored_exactly(attn):
    torch.manual_seed(2)
    attn = attn.float()
    x = torch.randn(2, 9, 32)
    mask = _padding([5, 3], 9)
    garbage = x.clone()
    garbage[~mask] = torch.randn(int((~mask).sum()), 32) * 100
    out, out_garbage = attn(x, mask), attn(garbage, mask)
    torch.testing.assert_close(out[mask], out_garbage[mask], atol=1e-6, rtol=0)
    # The garbage really is seen without the mask, so the check above is not vacuous.
    assert not torch.allclose(attn(x)[mask], attn(garbage)[mask], atol=1e-3)


def test_fully_masked_rows_are_zero_not_nan(attn):
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    mask = _padding([5, 0], 5)
    out = attn(x, mask, is_causal=True)
    assert torch.isfinite(out).all()
    # The empty row returns the output projection of zeros: its bias.
    torch.testing.assert_close(out[1], attn.proj.bias.expand(5, -1))


def test_mask_must_be_bool(attn):
    with pytest.raises(TypeError, match="bool"):
        attn(torch.randn(1, 3, 32, dtype=torch.float64), torch.ones(1, 3))


def test_a_mask_that_does_not_fit_the_keys_is_refused(attn):
    """A (B, 1) mask (a cached step's new token only) was broadcast over every key: a padded slot
    became visible again, with no error; other widths failed in a bare broadcasting error."""
    x = torch.randn(2, 3, 32, dtype=torch.float64)
    for mask in (torch.ones(2, 1), torch.ones(2, 4), torch.ones(2, 2, 3), torch.ones(2, 1, 3, 2)):
        with pytest.raises(ValueError, match=r"does not fit 3 queries over 3 keys .*a key padding mask is \(B, 3\)"):
            attn(x, mask.bool())
    cache = _ListCache()
    attn(x[:, :2], torch.ones(2, 2, dtype=torch.bool), kv_cache=cache)
    with pytest.raises(ValueError, match=r"does not fit 1 queries over 3 keys"):
        attn(x[:, 2:], torch.ones(2, 1, dtype=torch.bool), kv_cache=cache)
    for mask in (torch.ones(2, 3), torch.ones(2, 3, 3), torch.ones(2, 1, 1, 3)):  # every shape that fits
        attn(x, mask.bool())


class _ListCache:
    """Minimal append-only KV cache (the decoder owns the real one)."""

    def __init__(self) -> None:
        self.k = self.v = None
        self.length = 0  # slots appended: where a call given no positions continues

    def update(self, positions, k, v):
        self.length += k.shape[2]
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


def test_incremental_decoding_with_cache_and_rotary_equals_full_causal_pass():
    torch.manual_seed(3)
    model = Transformer(dim=32, depth=2, heads=4, positional="rotary", max_len=16).double().eval()
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    full = model(x, is_causal=True)
    caches = [_ListCache() for _ in model.blocks]
    prefix = model(x[:, :4], is_causal=True, kv_caches=caches)  # prompt in one call
    steps = [model(x[:, t : t + 1], is_causal=True, positions=torch.tensor([t]), kv_caches=caches) for t in (4, 5)]
    torch.testing.assert_close(torch.cat([prefix, *steps], dim=1), full, atol=1e-12, rtol=1e-12)


def test_rotary_is_shared_and_applied_inside_attention():
    model = Transformer(dim=32, depth=2, heads=4, positional="rotary", max_len=16)
    assert isinstance(model.positional, RotaryPositional)
    assert all(block.attn.positional is model.positional for block in model.blocks)
    # Rotary must change attention relative to the same weights without it.
    torch.manual_seed(4)
    attn = MultiHeadAttention(32, 4, positional=model.positional)
    x = torch.randn(1, 5, 32)
    with torch.no_grad():
        rotated = attn(x)
        attn.positional = None
        plain = attn(x)
    assert not torch.allclose(rotated, plain, atol=1e-3)


def test_sequence_longer_than_max_len_is_a_clear_error():
    model = Transformer(dim=16, depth=1, heads=2, positional="learned", max_len=4)
    with pytest.raises(ValueError, match="max_len=4"):
        model(torch.randn(1, 5, 16))
