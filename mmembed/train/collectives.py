"""Collectives every rank calls alike: barriers, rank 0 first, objects and values shared,
gathered or reduced, and the differentiable gathers the distributed losses use.

In a single process each is a no-op (the value itself). The process group they run in, and the
model wrapped for it, are distributed.py's; losses_distributed.py holds the losses built on them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from mmembed.errors import ConfigError, UserError
from mmembed.train.distributed import current_world


def barrier() -> None:
    if current_world().active:
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (writes data, a tokenizer), then the others (which read it).
    A UserError rank 0 raises in it is raised on every rank, as one line each (the others,
    waiting, said rank 0 was lost)."""
    world = current_world()
    if not world.active:
        yield
        return
    if not world.main:
        _raise_shared(broadcast_object(None))
        yield
        return
    try:
        yield
    except UserError as e:
        broadcast_object((isinstance(e, ConfigError), str(e)))
        raise
    broadcast_object(None)


def _raise_shared(refused: tuple[bool, str] | None) -> None:
    """Raise what rank 0 refused (`main_first`): a ConfigError or a UserError with its message."""
    if refused is not None:
        config, message = refused
        raise (ConfigError if config else UserError)(message)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` as rank `src` has it, on every rank."""
    if not current_world().active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order."""
    world = current_world()
    if not world.active:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def check_same_everywhere(settings: dict[str, Any], what: str) -> None:
    """ConfigError on every rank when some rank's `settings` (a nested dict) differ from rank 0's,
    naming the first key that differs: a node started with another batch size trained on a global
    batch the others did not expect, then hung for `train.dist_timeout_minutes`."""
    gathered = all_gather_objects(_flat(settings))
    for rank, other in enumerate(gathered[1:], 1):
        if other != gathered[0]:
            key = min(k for k in gathered[0].keys() | other.keys() if gathered[0].get(k) != other.get(k))
            raise ConfigError(f"{what} differs between the processes: {key} is {gathered[0].get(key)!r} on rank 0 "
                              f"and {other.get(key)!r} on rank {rank} (start every process with the same command)")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(_flat(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return out


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's `obj` in rank order on rank 0 (None elsewhere); only rank 0 receives."""
    world = current_world()
    if not world.active:
        return [obj]
    out: list[Any] | None = [None] * world.size if world.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_reduce_values(values: list[float], op: str = "mean") -> list[float]:
    """Element-wise mean, sum, max or min of a list of floats over the ranks (one collective)."""
    world = current_world()
    if not world.active or not values:
        return list(values)
    if op not in ("mean", "sum", "max", "min"):
        raise ValueError(f"op {op!r}: valid: mean, sum, max, min")
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op={"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}.get(op, dist.ReduceOp.SUM))
    if op == "mean":
        t /= world.size
    return t.tolist()


def any_rank(flags: list[bool]) -> list[bool]:
    """Element-wise: whether each flag holds on any rank (every rank gets the same answer)."""
    return [v > 0 for v in all_reduce_values([float(f) for f in flags], "max")]


def gather(x: Tensor) -> Tensor:
    """Every rank's `x` (equal shapes), concatenated along dim 0, without gradient."""
    world = current_world()
    if not world.active:
        return x
    out = [torch.empty_like(x) for _ in range(world.size)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def gather_with_grad(x: Tensor) -> Tensor:
    """Every rank's `x` concatenated along dim 0; gradients flow back to each rank's own rows
    (summed over the ranks that used them), as open_clip's `gather_with_grad`."""
    if not current_world().active:
        return x
    return _GatherWithGrad.apply(x)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward: the gradient of the gathered tensor summed over the
    ranks, each rank keeping its own rows (reduce-scatter on NCCL; all-reduce elsewhere, as gloo
    has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.rows = x.shape[0]
        return gather(x)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        world, grad = current_world(), grad.contiguous()
        if dist.get_backend() == "nccl":
            out = torch.empty((ctx.rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad)
            return out
        dist.all_reduce(grad)
        return grad[world.rank * ctx.rows:(world.rank + 1) * ctx.rows].clone()


class _NeighbourExchange(torch.autograd.Function):
    """Send a tensor to one rank while receiving the same-shaped tensor from another; the
    backward pass sends the gradient the other way round."""

    @staticmethod
    def forward(ctx, x: Tensor, to_rank: int, from_rank: int) -> Tensor:  # type: ignore[override]
        ctx.to_rank, ctx.from_rank = to_rank, from_rank
        return _exchange(x, to_rank, from_rank)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return _NeighbourExchange.apply(grad, ctx.from_rank, ctx.to_rank), None, None


def _exchange(x: Tensor, to_rank: int, from_rank: int) -> Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x, to_rank), dist.P2POp(dist.irecv, out, from_rank)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


def neighbour_exchange(x: Tensor, to_rank: int, from_rank: int) -> Tensor:
    """Pass `x` to `to_rank` and return what `from_rank` passed, differentiably (SigLIP's ring)."""
    if x.requires_grad:
        return _NeighbourExchange.apply(x, to_rank, from_rank)
    return _exchange(x, to_rank, from_rank)


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
