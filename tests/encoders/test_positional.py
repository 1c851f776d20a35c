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


def _rotate_half(x: torch.Tensor, positions: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The rotate-half reference, all in float64."""
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = positions.double()[:, None] * inv_freq  # (T, hd/2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * angles.cos() - x2 * angles.sin(), x1 * angles.sin() + x2 * angles.cos()], dim=-1)


@pytest.mark.parametrize("unbounded", [False, True])
def test_rotary_keeps_float64_and_float32_is_unchanged(unbounded):
    """Rotary rounded a float64 input to float32 (|rp(x) - x| = 1e-7 at position 0)."""
    torch.manual_seed(0)
    rope = RotaryPositional(dim=16, heads=2, max_len=32, unbounded=unbounded)
    x = torch.randn(2, 2, 6, 8, dtype=torch.float64)
    positions = torch.tensor([0, 1, 5, 17, 30, 31])
    got = rope(x, positions)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _rotate_half(x, positions, 8), atol=1e-12, rtol=0)
    assert torch.equal(rope(x)[:, :, 0], x[:, :, 0])  # position 0 is the identity, exactly
    # float32 still reads the float32 tables, bit for bit.
    x32 = x.float()
    cos, sin = rope.cos[positions], rope.sin[positions]
    x1, x2 = x32.chunk(2, dim=-1)
    assert torch.equal(rope(x32, positions), torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1))


@pytest.mark.parametrize("unbounded", [False, True])
def test_sinusoidal_keeps_float64_and_float32_is_unchanged(unbounded):
    """The float32 table rounded a float64 model's sinusoidal rows (2.9e-8 off the formula), where
    rotary's were exact."""
    from encoders.positional import SinusoidalPositional, sinusoidal_rows

    pe = SinusoidalPositional(dim=10, max_len=32, unbounded=unbounded)
    positions = torch.tensor([0, 1, 5, 17, 31])
    x = torch.zeros(2, 5, 10, dtype=torch.float64)
    p = positions.double()[:, None]
    i = torch.arange(0, 10, 2, dtype=torch.float64)
    formula = torch.stack([torch.sin(p / 10000 ** (i / 10)), torch.cos(p / 10000 ** (i / 10))], -1).flatten(1)
    got = pe(x, positions)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got[0], formula, atol=1e-15, rtol=0)
    torch.testing.assert_close(pe(x)[0], sinusoidal_rows(torch.arange(5), 10, dtype=torch.float64), atol=0, rtol=0)
    assert torch.equal(pe(x.float(), positions)[0], pe.table[positions])  # float32 reads its table, bit for bit


@pytest.mark.parametrize("positional", ["rotary", "learned", "sinusoidal"])
def test_float64_transformer_passes_gradcheck(positional):
    """gradcheck of a float64 rotary Transformer failed (Jacobian mismatch): rotary ran in float32."""
    from encoders.blocks import Transformer

    torch.manual_seed(0)
    model = Transformer(8, 1, 2, positional=positional, max_len=16).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: model(x, is_causal=True), (x,))


@pytest.mark.parametrize("kind", ["learned", "sinusoidal", "rotary"])
@pytest.mark.parametrize("positions", [[-1, 0], [7, 8]])
def test_a_module_alone_refuses_positions_outside_its_table(kind, positions):
    """On its own a module read row max_len - 1 for -1 and raised a bare IndexError past its table."""
    module = build_positional(kind, 16, 2, 8)
    x = torch.zeros(1, 2, 2, 8) if kind == "rotary" else torch.zeros(1, 2, 16)
    low, high = positions
    with pytest.raises(ValueError, match=rf"positions {low}..{high} lie outside the table of max_len=8 \(valid: 0..7\)"):
        module(x, torch.tensor(positions))
    module(x, torch.tensor([6, 7]))  # the last rows are still there


@pytest.mark.parametrize("kind", ["sinusoidal", "rotary"])
def test_an_unbounded_module_refuses_negative_positions_only(kind):
    """A negative position wrapped to the table's end (or was computed from a negative angle)."""
    module = build_positional(kind, 16, 2, 8, unbounded=True)
    x = torch.zeros(1, 2, 5, 8) if kind == "rotary" else torch.zeros(1, 5, 16)
    for positions in ([-2, -1, 0, 1, 2], [-1, 0, 1, 2, 100]):
        with pytest.raises(ValueError, match=r"max_len=unbounded \(valid: 0 or more\)"):
            module(x, torch.tensor(positions))
    module(x, torch.tensor([0, 1, 2, 99, 100]))  # past the table: computed


@pytest.mark.parametrize("kind", ["learned", "rotary"])
def test_a_transformer_checks_positions_once_per_forward(kind, monkeypatch):
    """Checking in the modules must not add a host sync per layer (rotary is called twice in each)."""
    import encoders.blocks
    import encoders.positional
    from encoders.blocks import Transformer

    calls = []
    real = encoders.positional.check_positions

    def counting(*args):
        calls.append(args)
        real(*args)

    monkeypatch.setattr(encoders.positional, "check_positions", counting)
    monkeypatch.setattr(encoders.blocks, "check_positions", counting)
    model = Transformer(dim=8, depth=3, heads=2, positional=kind, max_len=8).eval()
    model(torch.zeros(1, 2, 8), positions=torch.tensor([3, 4]))
    assert len(calls) == 1
    build_positional(kind, 8, 2, 8)(torch.zeros(1, 2, 2, 4) if kind == "rotary" else torch.zeros(1, 2, 8),
                                    torch.tensor([3, 4]))
    assert len(calls) == 2  # alone, the module checks them itself
