"""`encoders.linear`: oneDNN for large enough float32 CPU products, at inference and in training;
`F.linear` everywhere else."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import encoders.linear as lin
from encoders.linear import Linear, linear, onednn, use_linear_

needs_onednn = pytest.mark.skipif(not lin._probe(), reason="no working oneDNN linear in this torch build")


@pytest.fixture(autouse=True)
def _small_products_too(monkeypatch):
    """These tests use small, fast shapes: let them take oneDNN (`test_size_rule` checks the rule)."""
    monkeypatch.setattr(lin, "_MIN_MACS", 0)


def _case(rows: tuple[int, ...], n_in: int, n_out: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*rows, n_in, generator=g), torch.randn(n_out, n_in, generator=g), torch.randn(n_out, generator=g)


@needs_onednn
@pytest.mark.parametrize("rows", [(1,), (8,), (3, 5), (2, 4, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_inference_matches_f_linear(rows, bias):
    x, w, b = _case(rows, 48, 80)
    b = b if bias else None
    with torch.inference_mode():
        ours, ref = linear(x, w, b), F.linear(x, w, b)
    assert lin._works  # the probe found the kernel here, so the line above took it
    assert ours.shape == ref.shape == (*rows, 80)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_plain_tensors_with_grad_mode_on(monkeypatch):
    """Grad mode on but nothing requiring a gradient (a search over stored vectors): oneDNN."""
    x, w, b = _case((6,), 48, 80)
    with torch.no_grad():
        linear(x, w, b)  # the one-time probe, before counting
    calls = []
    kernel = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(1) or kernel(*a))
    assert torch.is_grad_enabled()
    torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert calls
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides the dtype: torch's own
        assert linear(x, w, b).dtype == F.linear(x, w, b).dtype == torch.bfloat16
    assert len(calls) == 1


@needs_onednn
def test_non_contiguous_input():
    x, w, b = _case((6,), 48, 80)
    xt = torch.randn(48, 6).t()  # (6, 48), strided
    with torch.no_grad():
        torch.testing.assert_close(linear(xt, w, b), F.linear(xt, w, b), rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("wanted", ["all", "input", "weight"])
def test_training_gradients_match_f_linear(bias, wanted):
    """The autograd path (oneDNN forward and input gradient, torch's weight gradient) gives
    F.linear's output and gradients to float rounding, for whichever inputs want one."""
    x, w, b = _case((4, 3), 16, 24)
    b = b if bias else None
    grads = []
    for fn in (linear, F.linear):
        xs = x.clone().requires_grad_(wanted in ("all", "input"))
        ws = w.clone().requires_grad_(wanted in ("all", "weight"))
        bs = None if b is None else b.clone().requires_grad_(wanted == "all")
        y = fn(xs, ws, bs)
        y.pow(2).sum().backward()
        grads.append([y.detach(), xs.grad, ws.grad, None if bs is None else bs.grad])
    for ours, ref in zip(*grads):
        if ref is None:
            assert ours is None
        else:
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_second_derivatives():
    """A backward that builds a graph (a gradient penalty) differentiates again like F.linear."""
    x, w, b = _case((5,), 16, 24)
    out = []
    for fn in (linear, F.linear):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        (gx,) = torch.autograd.grad(fn(xs, ws, b).tanh().sum(), xs, create_graph=True)
        gx.pow(2).sum().backward()
        out.append(ws.grad)
    torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-4)


def test_torch_func_transforms_take_f_linear():
    x, w, b = _case((5,), 16, 24)
    loss = lambda w_: linear(x, w_, b).pow(2).sum()  # noqa: E731
    ref = lambda w_: F.linear(x, w_, b).pow(2).sum()  # noqa: E731
    assert torch.equal(torch.func.grad(loss)(w), torch.func.grad(ref)(w))


@pytest.mark.parametrize("case", ["switched_off", "strided_weight", "float64"])
def test_falls_back_to_f_linear(case):
    x, w, b = _case((5,), 16, 24)
    if case == "strided_weight":
        w = w.t().contiguous().t()  # column-major: oneDNN would copy it every call
    if case == "float64":
        x, w, b = x.double(), w.double(), b.double()
    with torch.no_grad(), onednn(case != "switched_off"):
        assert torch.equal(linear(x, w, b), F.linear(x, w, b))


def test_a_disagreeing_kernel_is_not_used(monkeypatch):
    def wrong(x, w, b, *args):
        return F.linear(x, w, b) + 1.0

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", wrong)
    monkeypatch.setattr(lin, "_works", None)
    x, w, b = _case((5,), 16, 24)
    with torch.no_grad():
        assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    assert lin._works is False


def test_module_is_an_nn_linear():
    """Same parameters and state dict as `nn.Linear`: checkpoints and `isinstance` checks carry over."""
    torch.manual_seed(0)
    ref = nn.Linear(16, 24)
    ours = Linear(16, 24)
    ours.load_state_dict(ref.state_dict())
    assert isinstance(ours, nn.Linear)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_use_linear_switches_plain_linears_in_place():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.MultiheadAttention(16, 2), nn.Linear(16, 4))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    first = net[0]
    assert use_linear_(net) == 2  # MultiheadAttention's out_proj is its own subclass: left alone
    assert net[0] is first and type(net[0]) is Linear and type(net[3]) is Linear
    assert type(net[2].out_proj) is not Linear
    after = net.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_environment_switch():
    """`MMEMBED_ONEDNN=0` turns the fast path off for the whole process."""
    code = "import encoders.linear as m; print(m._enabled)"
    for value, expected in (("0", "False"), ("1", "True")):
        env = dict(os.environ, MMEMBED_ONEDNN=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected


@needs_onednn
def test_size_rule(monkeypatch):
    """Small products stay F.linear's (bit for bit); many rows, or a weight of a megabyte, take oneDNN."""
    monkeypatch.setattr(lin, "_MIN_MACS", 1 << 22)
    calls = []
    kernel = torch.ops.mkldnn._linear_pointwise
    with torch.no_grad():
        linear(*_case((2,), 16, 24))  # the one-time probe, before counting
        monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a[0].shape) or kernel(*a))
        x, w, b = _case((8,), 128, 384)  # 0.4M multiply-adds
        assert torch.equal(linear(x, w, b), F.linear(x, w, b)) and not calls
        x, w, b = _case((128,), 128, 384)  # 6.3M
        linear(x, w, b)
        x, w, b = _case((1,), 512, 512)  # one row, a 1 MB weight
        linear(x, w, b)
    assert calls == [(128, 128), (1, 512)]
