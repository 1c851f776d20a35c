"""`Linear`: `nn.Linear` whose CPU inference runs through oneDNN's matmul.

torch's CPU `F.linear` calls MKL's SGEMM/SGEMV, and MKL picks its code path by CPU vendor: on an
AMD EPYC with AVX-512 it runs a generic path (`MKL_VERBOSE` names "Intel(R) Architecture
processors", not AVX-512), which measured 1.6-2.3× slower than oneDNN's matmul (the library
torch's own CPU convolutions use) from 8 to 4,096 rows, and made greedy decoding of GPT-2 124M
1.9× slower (README, "Prompting": decoding speed). On Intel CPUs MKL takes its AVX-512 path too.

So where autograd records nothing (generation, embedding media, evaluation, scoring a search
index), `linear` on float32 CPU tensors with a contiguous weight calls
`torch.ops.mkldnn._linear_pointwise`, which reads the weight where it lies (no packed copy,
nothing cached). Everywhere else — training, autocast, GPUs, other dtypes — it is `F.linear`, so
gradients and training numerics are torch's own. The two agree to float rounding (about 1e-6
relative); `onednn(False)` switches the fast path off inside a block, for comparisons, and the
environment variable `MMEMBED_ONEDNN=0` for a whole process. The op is private to
torch (Inductor's CPU linear), so it is probed once against `F.linear` and left unused if it is
missing or disagrees.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

_enabled = os.environ.get("MMEMBED_ONEDNN", "1") != "0"  # MMEMBED_ONEDNN=0: F.linear everywhere
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
    """`F.linear(x, weight, bias)`, i.e. x @ weightᵀ + bias: through oneDNN on float32 CPU tensors
    when autograd records nothing and autocast is off.

    Shapes:
        x (..., in), weight (out, in), bias (out,) → (..., out).
    """
    if _fast(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def _fast(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    global _works
    tensors = (x, weight) if bias is None else (x, weight, bias)
    if not _enabled or not weight.is_contiguous() or torch.is_autocast_enabled("cpu"):
        return False
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False  # autograd records this product: torch's own
    if _works is None:
        _works = _probe()
    return _works


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
