"""`Linear`: `nn.Linear` whose CPU inference runs through oneDNN's matmul.

torch's CPU `F.linear` calls MKL's SGEMM/SGEMV, and MKL picks its code path by CPU vendor: on an
AMD EPYC with AVX-512 it runs a generic path (`MKL_VERBOSE` names "Intel(R) Architecture
processors", not AVX-512), which measured 1.6-2.3× slower than oneDNN's matmul (the library
torch's own CPU convolutions use) from 8 to 4,096 rows, and made greedy decoding of GPT-2 124M
1.9× slower (README, "Prompting": decoding speed). On Intel CPUs MKL takes its AVX-512 path too.

So with gradients off (generation, embedding media, evaluation), a `Linear` on a float32 CPU
tensor with a contiguous weight calls `torch.ops.mkldnn._linear_pointwise`, which reads the
weight where it lies (no packed copy, nothing cached). Everywhere else — training, autograd, GPUs,
other dtypes — it is `F.linear`, so gradients and training numerics are torch's own. The two
agree to float rounding (about 1e-6 relative); `onednn(False)` switches the fast path off, for
comparisons. The op is private to torch (Inductor's CPU linear), so it is probed once against
`F.linear` and left unused if it is missing or disagrees.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

_enabled = True
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
    """`F.linear(x, weight, bias)`, through oneDNN on the CPU when no gradient is recorded.

    Shapes:
        x (..., in), weight (out, in), bias (out,) → (..., out).
    """
    global _works
    if (_enabled and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.is_contiguous() and not torch.is_grad_enabled()):
        if _works is None:
            _works = _probe()
        if _works:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


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
