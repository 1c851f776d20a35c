"""Positional encodings: the sinusoidal formula, learned parameters, rotary relativity and norms."""

from __future__ import annotations

import math

import pytest
import torch

from encoders import POSITIONAL, build_positional
from encoders.positional import LearnedPositional, RotaryPositional, SinusoidalPositional, sinusoidal_table_2d


def test_registry_has_exact_names_and_unknown_name_lists_them():
    assert set(POSITIONAL) == {"sinusoidal", "learned", "rotary", "none"}
    with pytest.raises(ValueError, match="valid: sinusoidal, learned, rotary, none"):
        build_positional("alibi", 16, 2, 8)


def test_sinusoidal_matches_formula_and_is_fixed():
    d = 16
    pe = SinusoidalPositional(d, max_len=64)
    assert list(pe.parameters()) == []
    assert "table" not in pe.state_dict()  # deterministic: rebuilt, never stored
    torch.testing.assert_close(pe.table, SinusoidalPositional(d, max_len=64).table, atol=0, rtol=0)
    for p in (0, 1, 7, 63):
        for i in range(d // 2):
            angle = p / 10000 ** (2 * i / d)
            assert pe.table[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe.table[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    x = torch.zeros(2, 5, d)
    torch.testing.assert_close(pe(x), pe.table[:5].expand(2, 5, d))
    positions = torch.tensor([[3, 4, 5, 6, 7], [0, 0, 1, 2, 3]])
    torch.testing.assert_close(pe(x, positions), pe.table[positions])


def test_sinusoidal_2d_encodes_rows_and_columns():
    table = sinusoidal_table_2d(3, 4, 8).view(3, 4, 8)
    # First half depends on the row only, second half on the column only.
    assert torch.equal(table[:, 0, :4], table[:, 3, :4])
    assert torch.equal(table[0, :, 4:], table[2, :, 4:])
    assert not torch.equal(table[0, 0], table[1, 0]) and not torch.equal(table[0, 0], table[0, 1])


def test_learned_is_a_trained_parameter():
    pe = LearnedPositional(8, max_len=10)
    params = list(pe.parameters())
    assert len(params) == 1 and params[0].shape == (10, 8) and params[0].requires_grad
    x = torch.zeros(1, 4, 8, requires_grad=True)
    pe(x).sum().backward()
    assert params[0].grad[:4].abs().sum() > 0 and params[0].grad[4:].abs().sum() == 0


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    rope = RotaryPositional(dim=64, heads=2, max_len=512)
    q = torch.randn(1, 2, 1, 32)
    k = torch.randn(1, 2, 1, 32)

    def score(i: int, j: int) -> torch.Tensor:
        return (rope(q, torch.tensor([i])) * rope(k, torch.tensor([j]))).sum(-1)

    for i, j in [(0, 0), (3, 1), (5, 9), (17, 2)]:
        for shift in (1, 13, 200):
            torch.testing.assert_close(score(i + shift, j + shift), score(i, j), atol=1e-5, rtol=0)
    # Not vacuous: different relative offsets give different scores.
    assert not torch.allclose(score(3, 1), score(3, 2), atol=1e-3)


def test_rotary_preserves_norms_and_is_identity_at_position_zero():
    torch.manual_seed(1)
    rope = RotaryPositional(dim=32, heads=4, max_len=128)
    x = torch.randn(2, 4, 100, 8)
    rotated = rope(x)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rotated[:, :, 0], x[:, :, 0])
    assert not torch.allclose(rotated[:, :, 1:], x[:, :, 1:], atol=1e-3)
    assert list(rope.parameters()) == [] and rope.state_dict() == {}
    # Per-row positions (B, T) broadcast over heads.
    per_row = rope(x, torch.arange(100).expand(2, 100))
    torch.testing.assert_close(per_row, rotated)


def test_rotary_needs_even_head_dim():
    with pytest.raises(ValueError, match="even head dimension"):
        RotaryPositional(dim=12, heads=4)
    with pytest.raises(ValueError, match="width 36 is not divisible by heads=8"):  # the cause, not its symptom
        RotaryPositional(dim=36, heads=8)


@pytest.mark.parametrize("kind", ["learned", "sinusoidal", "rotary"])
@pytest.mark.parametrize("position", [-1, 4, 7])
def test_explicit_positions_outside_the_table_are_a_value_error(kind, position):
    """Past the table was a bare IndexError; a negative position silently read the table's last rows."""
    from encoders.blocks import Transformer

    model = Transformer(dim=8, depth=2, heads=2, positional=kind, max_len=4).eval()
    x = torch.zeros(1, 1, 8)
    with pytest.raises(ValueError, match=r"lie outside the table of max_len=4 \(valid: 0..3\)"):
        model(x, positions=torch.tensor([position]))
    model(x, positions=torch.tensor([3]))  # the last row is still there
    none = Transformer(dim=8, depth=1, heads=2, positional="none", max_len=4).eval()
    none(x, positions=torch.tensor([7]))  # no table, no limit
