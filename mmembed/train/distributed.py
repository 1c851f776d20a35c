"""Many processes, one run: torchrun's environment, PyTorch's DDP, rank-0 duties.

    torchrun --nproc_per_node N -m mmembed train CONFIG
      └─ each process: init_distributed() ─► World(rank, size) ─► the same stage code
           data   EpochBatchSampler deals each epoch's permutation round-robin
                  (global batch = batch_size × N)
           model  parallelize(module, forward) ─► DDP (gradients averaged over the ranks)
           loss   gather_with_grad / neighbour_exchange: each rank scores its rows against
                  the global batch (see losses_distributed.py)
           rank 0 checkpoints, metrics, evaluation (its result broadcast), the run-folder lock

This file holds the process group, the devices and the model across ranks; the collectives
(barrier, main_first, broadcast, gathers, reductions) are in collectives.py. Without torchrun a
process is a World of size 1 and every helper is a no-op, so the stages never branch on
"distributed or not" beyond asking `world.main`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mmembed.errors import PeerLostError, UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place among the processes of a run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes checkpoints, metrics and the saved model."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def current_world() -> World:
    """The world of the initialised process group, or a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> World:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment); a no-op
    otherwise or when already joined. Backend: nccl when the run uses CUDA, else gloo."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            _check_gpus_per_machine(local_rank)
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=timeout_minutes))
        world = current_world()
        # ranks > 0 are quieted to warnings only later (distributed_command): one INFO line, rank 0's
        (log.info if world.main else log.debug)("process %d of %d joined (%s backend)", world.rank, world.size,
                                                dist.get_backend())
    return current_world()


def _check_gpus_per_machine(local_rank: int) -> None:
    """One GPU per process: more processes on this machine than GPUs is one clear line on every
    rank, before any joins (set_device would fail on some ranks with CUDA's "invalid device ordinal")."""
    local = max(int(os.environ.get("LOCAL_WORLD_SIZE", "0")), local_rank + 1)
    gpus = torch.cuda.device_count()
    if local > gpus:
        raise UserError(f"torchrun starts {local} processes on this machine but CUDA sees {gpus} GPU(s): one GPU "
                        f"per process, so use --nproc-per-node {gpus}, or run on the CPU (train.device=cpu, or "
                        "CUDA_VISIBLE_DEVICES= for commands without a device option)")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _Terminated(Exception):
    pass


# what the backends say when a peer is gone or silent
_PEER_LOST = ("connection reset", "connection closed", "connection refused", "broken pipe", "timed out", "timeout",
              "nccl", "gloo", "socket")


@contextlib.contextmanager
def distributed_command(device: str = "auto", timeout_minutes: float = 30.0, run_dir: str | Path | None = None
                        ) -> Iterator[World]:
    """One CLI command as a process of a torchrun job (or alone): join the process group, keep
    ranks > 0 to warnings in the log, and turn a lost peer — a collective failing because another
    process died, or torchrun's SIGTERM after one did — into one `PeerLostError` line naming the
    checkpoint to resume from; leave the group at the end. After an error the process stays deaf
    to SIGTERM, so that torchrun cannot cut its line short: it is for commands, which print the
    error and exit, not for a caller that goes on working."""
    world = init_distributed(device, timeout_minutes)
    if not world.active:
        yield world
        return
    if not world.main:
        logging.getLogger().setLevel(logging.WARNING)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield world
        # Every rank leaves together: a rank whose last collective finished early (a non-root's
        # send in gather_object) must not tear down gloo's connections while a peer is still in
        # one; doing so aborted that rank now and then ("terminate called without an active
        # exception", CI, 2026-12-03).
        dist.barrier()
    except (_Terminated, RuntimeError) as e:  # gloo and NCCL raise RuntimeError (DistBackendError is one)
        # a second SIGTERM must not cut the message short: torchrun's, sent once it sees the peer gone,
        # can land while the hint reads the checkpoints (a traceback instead of the line, 2026-12-05)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # with DataLoader workers, the SIGTERM kills them too, and their "DataLoader worker (pid N) is
        # killed by signal" replaced the stop (or the lost peer) being unwound: 86 lines of traceback
        if (said := _stopped(e, world.rank, run_dir)) is None:
            raise
        raise PeerLostError(said) from None
    except Exception:  # this rank's own error (a UserError every rank raises): torchrun's SIGTERM, sent when
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a faster rank exits with it, must not cut its line
        raise
    finally:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:  # a failing rank stays deaf until it has said why
            signal.signal(signal.SIGTERM, previous)
        shutdown()


def _raise_terminated(signum, frame) -> None:
    raise _Terminated


def _stopped(e: BaseException, rank: int, run_dir: str | Path | None) -> str | None:
    """This rank's line when `e` (or what it was raised while handling) is a lost peer or torchrun's
    SIGTERM; None for an error of its own."""
    chain = _chain(e)
    if lost := next((c for c in chain if isinstance(c, RuntimeError) and _peer_lost(c)), None):
        return f"rank {rank}: lost contact with another process of the run ({_first_line(lost)}){_resume_hint(run_dir)}"
    if any(isinstance(c, _Terminated) for c in chain):
        # it said "another process failed: its error is above" when nothing had failed (a job stopped
        # from outside) or the process that died said nothing (SIGKILLed by the OOM killer)
        return (f"rank {rank}: stopped by SIGTERM (torchrun sends it to every process once one has ended: a "
                f"failed one's error, if it gave one, is above; or the job was stopped){_resume_hint(run_dir)}")
    return None


def _peer_lost(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, dist.DistError) or any(w in text for w in _PEER_LOST)


def _chain(e: BaseException) -> list[BaseException]:
    """`e` and the exceptions it was raised while handling, innermost last."""
    seen: list[BaseException] = []
    while e is not None and all(e is not s for s in seen):
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def _resume_hint(run_dir: str | Path | None) -> str:
    if run_dir is None:
        return ""
    from mmembed.train.state import latest_checkpoint

    stages = [Path(run_dir) / "decoder", Path(run_dir)]  # the decoder stage runs after the align stage
    ckpt = next((c for c in map(latest_checkpoint, stages) if c is not None), None)
    if ckpt is None:
        from mmembed.train.run_dir import needs_overwrite

        # a folder that holds this start's files (its config, metrics) refuses a plain restart
        again = " with --overwrite" if needs_overwrite(run_dir) else ""
        return f"; no checkpoint was written yet: start the run again{again}"
    return f"; the last checkpoint is {ckpt}: continue with --resume, on this or any other number of processes"


def _first_line(e: BaseException) -> str:
    line = next((part.strip() for part in str(e).splitlines() if part.strip()), type(e).__name__)
    return line if len(line) <= 200 else line[:200] + "…"


def seed_ranks(seed: int) -> None:
    """After every rank built the same model: a different RNG stream per rank, so that dropout
    masks differ between the ranks' rows (a no-op in a single process)."""
    world = current_world()
    if world.active:
        torch.manual_seed(seed + world.rank)


def resolve_device(name: str | torch.device, world: World | None = None) -> torch.device:
    """`auto`: this process's GPU (cuda:LOCAL_RANK) when there is one, else the CPU; any other name
    or device as `checked_device` takes it."""
    world = world or current_world()
    if name == "auto":
        return torch.device(f"cuda:{world.local_rank}" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and world.active:
        return checked_device(f"cuda:{world.local_rank}")  # no GPU: one line per rank, not a traceback
    return checked_device(name)


def checked_device(name: str | torch.device) -> torch.device:
    """`name` as a device this machine has and a model runs on: an unknown name, a type other than
    cpu, cuda and mps, or a GPU torch cannot see, is a UserError (torch's own RuntimeErrors came at
    the first tensor moved)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):  # torch's message lists every device type it knows, some thirty
        raise UserError(f"device {name!r} is not a device name (auto, cpu, cuda, cuda:N or mps)") from None
    if device.type not in ("cpu", "cuda", "mps"):  # 'meta' was taken, then failed at the first embed or step
        raise UserError(f"device {str(name)!r} is not one a model runs on (auto, cpu, cuda, cuda:N or mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r}: torch sees no CUDA GPU on this machine (use 'cpu' or 'auto')")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {name!r}: torch sees no Apple GPU (MPS) on this machine (use 'cpu' or 'auto')")
    return device


# --- the model across ranks -----------------------------------------------------------------

class Forward(nn.Module):
    """A stage's training forward as one module call, `fn(module, *args)`: what DDP
    wraps. Whatever the loss reads from the module (a logit scale) must be among its outputs."""

    def __init__(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(self.module, *args, **kwargs)


def as_output(param: nn.Parameter) -> Tensor:
    """A parameter to return from a `Forward` (a logit bias the loss reads): a view of it, as DDP
    finds the parameters an output depends on through its graph, and a bare parameter has none."""
    return param.view_as(param)


def parallelize(module: nn.Module, fn: Callable[..., Any], device: torch.device, *, fsdp: bool = False,
                bf16: bool = False, find_unused: bool = True) -> nn.Module:
    """`Forward(module, fn)`, wrapped for the current world: unwrapped in one process; with
    several, DistributedDataParallel — every rank holds the whole model and gradients are
    averaged in buckets during backward. `find_unused`: some trainable parameter may get no
    gradient in a forward (a tower whose modality a batch lacks); False spares DDP its graph walk
    and its warning when every parameter always has one. On GPUs, BatchNorm layers become SyncBatchNorm.
    `fsdp`: sharded instead (fsdp.py; `bf16` there: its mixed-precision policy on GPUs)."""
    if not current_world().active:
        return Forward(module, fn)
    if fsdp:
        from mmembed.train.fsdp import Sharded

        return Sharded.wrap(module, fn, device, bf16)
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)  # in place below the root
    return DistributedDataParallel(Forward(module, fn), device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused)


def no_sync(net: nn.Module) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce for an accumulation micro-batch (a no-op otherwise)."""
    return net.no_sync() if hasattr(net, "no_sync") else contextlib.nullcontext()
