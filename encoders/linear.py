"""`Linear`: `nn.Linear` whose CPU products run through oneDNN's matmul.

torch's CPU `F.linear` calls MKL's SGEMM/SGEMV, and MKL picks its code path by CPU vendor: on an
AMD EPYC with AVX-512 it runs a generic path (`MKL_VERBOSE` names "Intel(R) Architecture
processors", not AVX-512), which measured 1.6-2.3× slower than oneDNN's matmul (the library
torch's own CPU convolutions use) from 8 to 4,096 rows, and made greedy decoding of GPT-2 124M
1.9× slower (docs/performance.md, "Decoding speed"). On Intel CPUs MKL takes its AVX-512 path too.

So `linear` on float32 CPU tensors with a contiguous weight, for products large enough to earn
oneDNN's per-call cost (`_MIN_MACS`, `_BIG_WEIGHT`), calls `torch.ops.mkldnn._linear_pointwise`,
which reads the weight where it lies (no packed copy, nothing cached): at inference directly, in
training through an autograd function whose backward computes the input's gradient with oneDNN too
(a linear layer's training step 1.5× faster at 8,192 rows; `_Linear`). Under autocast,
`torch.compile`, `torch.func` transforms or a dispatch mode (FLOP counting, fake tensors), on GPUs,
DTensors and other dtypes it is `F.linear`. The two agree to float rounding (about 1e-6 relative);
`onednn(False)` switches the fast path off inside a block, for comparisons, and the environment
variable `MMEMBED_ONEDNN=0` for a whole process. The op is private to torch (Inductor's CPU
linear), so it is probed once against `F.linear` and left unused if it is missing or disagrees.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

log = logging.getLogger(__name__)

_enabled = os.environ.get("MMEMBED_ONEDNN", "1") != "0"  # MMEMBED_ONEDNN=0: F.linear everywhere
# oneDNN costs ~10 µs more per call than MKL, which a small product does not earn back: with a
# 128-wide layer's weight in the cache it is 0.2-0.9× MKL's speed below 4M multiply-adds (rows ×
# in × out) and 1.2-2.0× above. A weight of a megabyte or more is read from memory in a model's
# decoding step, where oneDNN is faster even for one row (1.2-1.4 ms against 3.0-3.2 ms through
# the 6 × 384 model's 24 layers and head).
_MIN_MACS = 1 << 22
_BIG_WEIGHT = 1 << 18  # elements (1 MB of float32)
_works: bool | None = None  # probe result, once


def _probe() -> bool:
    """Whether oneDNN's linear exists here and matches `F.linear` on a small case."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            x, w, b = (torch.randn(*s, generator=g) for s in ((3, 2, 16), (24, 16), (24,)))
            same = torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), rtol=1e-4, atol=1e-5)
    except RuntimeError as err:  # a build without the kernel
        log.debug("oneDNN linear unavailable: %s", err)
        return False
    if not same:
        log.warning("oneDNN linear disagrees with F.linear here; using F.linear")
    return same


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`, i.e. x @ weightᵀ + bias, through oneDNN on float32 CPU tensors
    (see the module docstring for when it is torch's own).

    Shapes:
        x (..., in), weight (out, in), bias (out,) → (..., out).
    """
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if not _fast(x, weight, tensors):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _Linear.apply(x, weight, bias)
    return _kernel(x, weight, bias)


def _kernel(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _fast(x: Tensor, weight: Tensor, tensors: tuple[Tensor, ...]) -> bool:
    """Whether this product takes oneDNN; `tensors` are all its operands (bias included)."""
    global _works
    if not _enabled or not weight.is_contiguous() or torch.is_autocast_enabled("cpu"):
        return False  # autocast picks the dtype: torch's own
    if weight.numel() < _BIG_WEIGHT and x.numel() // max(x.shape[-1], 1) * weight.numel() < _MIN_MACS:
        return False  # too small to earn oneDNN's per-call cost
    if any(type(t) not in (Tensor, nn.Parameter) or t.device.type != "cpu" or t.dtype != torch.float32
           for t in tensors):
        return False  # DTensors, GPUs, other dtypes
    if (torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()
            or _get_current_dispatch_mode() is not None):
        return False  # graphs, transforms and dispatch modes (FLOP counters, fake tensors) know F.linear
    if _works is None:
        _works = _probe()
    return _works


class _Linear(torch.autograd.Function):
    """y = x Wᵀ + b with oneDNN computing y and ∂L/∂x = g W; ∂L/∂W = gᵀ x, a reduction over every
    row into a small matrix, stays torch's `mm`, which oneDNN does not beat there (8,192 rows of
    width 128-512: 3.5-7.1 ms against 3.8-5.6). A backward that builds a graph (`create_graph`)
    uses torch's ops throughout, so higher derivatives work."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return _kernel(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1])  # (R, out)
        graph = torch.is_grad_enabled()
        gx = gw = gb = None
        if need_x:
            gx = (g @ weight if graph else _kernel(g, weight.t().contiguous())).reshape(x.shape)
        if need_w:
            gw = g.t() @ x.reshape(-1, x.shape[-1])  # (out, in)
        if need_b and ctx.has_bias:
            gb = g.sum(0)
        return gx, gw, gb


@contextlib.contextmanager
def onednn(enabled: bool) -> Iterator[None]:
    """Turn the oneDNN path on or off inside the block (process-wide; for benchmarks and tests)."""
    global _enabled
    before, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = before


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, state dict and initialisation) computed by `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def use_linear_(module: nn.Module) -> int:
    """Make every plain `nn.Linear` inside `module` (one built by another library, e.g. open_clip)
    a `Linear`, in place: the same object, parameters and state dict, computed by `linear`.
    Returns how many were switched."""
    plain = [m for m in module.modules() if type(m) is nn.Linear]
    for m in plain:
        m.__class__ = Linear
    return len(plain)
