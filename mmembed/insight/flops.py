"""Training compute: the 6·N·D estimate beside a measured count.

A dense transformer spends 2·N FLOPs per token forward
(one multiply and one add per parameter) and twice that backward, so training on D tokens
costs C ≈ 6·N·D (Kaplan et al., 2020). The estimate leaves out attention's T×T products
(≈ 4·n_layers·T·width per token forward as counted here: QKᵀ and A·V over the whole T×T, which
Kaplan's 2·n_layers·T·width halves for the causal mask; small while width ≫ T/6) and counts
every parameter as if used once per token.

`measured_training_flops` counts what really runs: `torch.utils.flop_counter` dispatches each
aten op and sums its FLOPs, forward and backward. PyTorch's own table has no entry for the CPU
fused attention kernel, so it is added here with PyTorch's own SDPA formula; without it the
count would silently drop attention on CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def estimated_training_flops(params: int, tokens: int) -> int:
    """C ≈ 6 · N · D: forward 2·N and backward 4·N FLOPs per token, `tokens` tokens."""
    return 6 * int(params) * int(tokens)


def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _custom_mapping() -> dict:
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward
    return mapping


def measured_flops(fn: Callable[[], Tensor | None], backward: bool = True) -> int:
    """FLOPs that `fn()` runs (and, with `backward`, the backward pass of the scalar it returns).

    Args:
        fn: computes a scalar loss (or anything, when `backward` is False).
        backward: also run and count `loss.backward()`.

    Returns:
        Total FLOPs counted (matrix products and attention; elementwise ops count 0, as in
        every FLOP convention used for scaling laws).
    """
    with FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
        out = fn()
        if backward:
            if not isinstance(out, Tensor) or out.numel() != 1:
                raise ValueError("with backward=True, fn must return a scalar tensor")
            out.backward()
    return int(counter.get_total_flops())
