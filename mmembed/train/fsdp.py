"""Sharded data parallelism for towers and decoders too large for one device (`train.fsdp`).

PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`): each transformer block is its own unit
and the rest of the model the root unit; every rank keeps 1/W of each parameter, gradient and
optimizer moment, and gathers a unit's full parameters only while it runs (forward and backward).

    Forward(module, fn) ─► fully_shard(block) for every TransformerBlock, then fully_shard(root)
    scalars (the logit scale and bias) stay whole: FSDP2 shards along dim 0 only, so they are
    ignored by it and their gradients averaged here, before clipping

What the engine asks of a sharded model, besides the step (see `Sharded`): the gradient norm
and clipping over shards; every rank evaluating together (running a unit is a collective);
checkpoints gathered into the same full format a single process writes, so a sharded run
resumes on DDP or on one process and the other way round.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mmembed.train.distributed import Forward, current_world

PREFIX = "module."  # the module's parameter names inside its Forward wrapper


class Sharded:
    """A model wrapped with fully_shard, and what the engine needs to train and save it."""

    def __init__(self, net: Forward, ignored: list[nn.Parameter]) -> None:
        self.net, self.ignored = net, ignored

    @classmethod
    def wrap(cls, module: nn.Module, fn: Callable[..., Any], device: torch.device, bf16: bool = False) -> Forward:
        """`Forward(module, fn)` sharded over the current world; the result carries `.sharded`."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from encoders.blocks import TransformerBlock

        # bf16 compute with fp32 gradient reduction on GPUs (CPU autocast stays the engine's)
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if bf16 and device.type == "cuda" else MixedPrecisionPolicy())
        net = Forward(module, fn)
        for p in module.parameters():  # FSDP2 shards contiguous storage only (a transposed view is not)
            if not p.is_contiguous():
                p.data = p.data.contiguous()
        ignored = [p for p in module.parameters() if p.ndim == 0]
        for block in [m for m in module.modules() if isinstance(m, TransformerBlock)]:
            fully_shard(block, mp_policy=policy)
        fully_shard(net, mp_policy=policy, ignored_params=set(ignored))
        net.sharded = cls(net, ignored)
        return net

    # --- the step ---------------------------------------------------------------------------

    def clip_grads(self, params: list[nn.Parameter], max_norm: float | None) -> Tensor:
        """Average the ignored scalars' gradients, then the global gradient norm (shards summed
        over the ranks, whole tensors counted once) and, with `max_norm`, clip to it."""
        world = current_world()
        for p in self.ignored:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world.size
        grads = [p.grad for p in params if p.grad is not None]
        sharded = [g.to_local() for g in grads if _is_dtensor(g)]
        whole = [g for g in grads if not _is_dtensor(g)]
        shard_sq = torch.stack([g.float().square().sum() for g in sharded]).sum() if sharded else torch.zeros(())
        dist.all_reduce(shard_sq)
        whole_sq = torch.stack([g.float().square().sum() for g in whole]).sum() if whole else torch.zeros(())
        norm = (shard_sq + whole_sq).sqrt()
        if max_norm is not None and math.isfinite(float(norm)):
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for g in sharded + whole:
                g.mul_(coef.to(g.dtype))
        return norm

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """The root unit's full parameters for code that does not go through `forward`
        (evaluation calls the towers' `encode`); blocks gather themselves as they run."""
        self.net.unshard()
        try:
            yield
        finally:
            self.net.reshard()

    # --- checkpoints ------------------------------------------------------------------------

    def full_state(self, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
        """Collective: the module's full state dict and the optimizer's in `optimizer.state_dict()`
        form (parameters numbered in group order), on rank 0 (empty elsewhere)."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = get_model_state_dict(self.net, options=options)
        optim = get_optimizer_state_dict(self.net, optimizer, options=options)
        if not current_world().main:
            return {}, {}
        weights = {k.removeprefix(PREFIX): v for k, v in weights.items()}
        number = {name: i for i, name in enumerate(n for g in optim["param_groups"] for n in g["params"])}
        state = {number[name]: value for name, value in optim["state"].items()}
        groups = [{**g, "params": [number[n] for n in g["params"]]} for g in optim["param_groups"]]
        return weights, {"state": state, "param_groups": groups}

    def full_weights(self) -> dict[str, Tensor]:
        """Collective: the module's full state dict on rank 0 (empty elsewhere)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(self.net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix(PREFIX): v for k, v in weights.items()} if current_world().main else {}

    def load_full(self, weights: dict[str, Tensor], optimizer: torch.optim.Optimizer | None = None,
                  optim_state: dict | None = None) -> None:
        """Shard full weights (and an optimizer state in `state_dict()` form) into this model;
        every rank passes the same full tensors."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.net, {PREFIX + k: v for k, v in weights.items()}, options=options)
        if optimizer is None or optim_state is None:
            return
        names = {id(p): n for n, p in self.net.named_parameters()}
        order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        state = {order[int(i)]: value for i, value in optim_state["state"].items()}
        groups = [{**g, "params": [order[int(i)] for i in g["params"]]} for g in optim_state["param_groups"]]
        # not strict: a parameter that never had a gradient (an unused logit bias) has no moments,
        # exactly as in `optimizer.load_state_dict`
        set_optimizer_state_dict(self.net, optimizer, {"state": state, "param_groups": groups},
                                 options=StateDictOptions(full_state_dict=True, strict=False))


def _is_dtensor(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def sharded_of(net: nn.Module) -> Sharded | None:
    """The `Sharded` handle of a model `Sharded.wrap` returned, else None (DDP, one process)."""
    return getattr(net, "sharded", None)
