"""Low-rank adaptation (LoRA, Hu et al. 2021): a frozen linear layer plus a trainable low-rank update.

    y = W x + b + (α / r) · B (A x)        W: (out, in) frozen; A: (r, in); B: (out, r), B starts at 0

so a wrapped layer starts as exactly the layer it wraps, and training moves r·(in + out) numbers
instead of in·out. After training, `merge_lora_` folds the update into W (W + (α/r)·B A) and puts
plain `Linear`s back: the merged model has the original layers, state-dict keys and speed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from encoders.linear import Linear, linear


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` with a trainable rank-`rank` update scaled by `alpha / rank`.

    Args:
        base: the layer to adapt; its parameters are frozen (requires_grad False).
        rank: r, the update's rank (>= 1).
        alpha: α; the update is scaled by α / r, so changing r keeps its size (as PEFT does).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
        self.base = base.requires_grad_(False)
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + linear(linear(x, self.lora_a), self.lora_b) * self.scale

    @torch.no_grad()
    def merged(self) -> Linear:
        """The base layer with the update folded into its weight (a new `Linear`)."""
        base = self.base
        out = Linear(base.in_features, base.out_features, bias=base.bias is not None,
                     device=base.weight.device, dtype=base.weight.dtype)
        out.weight.copy_(base.weight + self.scale * (self.lora_b @ self.lora_a))
        if base.bias is not None:
            out.bias.copy_(base.bias)
        return out


def add_lora_(module: nn.Module, rank: int, alpha: float) -> int:
    """Wrap every `nn.Linear` inside `module` in a `LoRALinear`, in place (layers already wrapped
    stay as they are). Returns how many were wrapped."""
    return _swap_children(module, lambda parent, child: isinstance(child, nn.Linear)
                          and not isinstance(parent, LoRALinear), lambda child: LoRALinear(child, rank, alpha))


def merge_lora_(module: nn.Module) -> int:
    """Replace every `LoRALinear` inside `module` by its merged `Linear`, in place. Returns how many."""
    def merge(child: LoRALinear) -> Linear:
        return child.merged().requires_grad_(child.base.weight.requires_grad)

    return _swap_children(module, lambda parent, child: isinstance(child, LoRALinear), merge)


def _swap_children(module: nn.Module, wanted, make) -> int:
    """Replace each child `wanted(parent, child)` picks, anywhere inside `module`, by `make(child)`."""
    targets = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
               if wanted(parent, child)]
    for parent, name, child in targets:
        setattr(parent, name, make(child))
    return len(targets)
