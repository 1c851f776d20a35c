"""Trainer checkpoints: everything needed to continue a run as if it had never stopped.

A checkpoint is a folder `checkpoints/step_0000200/` holding
  model.safetensors    the module's state dict
  trainer.safetensors  optimizer tensors and the torch/numpy RNG states (torch's of every rank)
  trainer.json         step, epoch, position in the epoch, optimizer hyper-parameters,
                       python RNG state, best metric and its step — written last
The folder is assembled under a temporary name and renamed into place, so a kill during the
write leaves the previous checkpoint as the latest complete one. Nothing is pickled.
The best checkpoint (by validation) is one of these folders: pruning keeps it besides the
newest `keep_last`, and `load_weights` copies its weights back at the end of a run.
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmembed.checkpoint import atomic_write_json, fsync_dir, load_tensors, read_json, save_tensors
from mmembed.errors import CheckpointError, UserError

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"


@dataclass
class Progress:
    step: int = 0  # optimizer steps taken
    epoch: int = 0  # current epoch
    batch_in_epoch: int = 0  # batches of `epoch` already consumed (per rank)
    samples_in_epoch: int | None = 0  # samples of `epoch`'s order consumed by all ranks (None: an older checkpoint)
    world_size: int = 1  # processes of the run that wrote the checkpoint
    batch_size: int | None = None  # its rows per batch and process, and micro-batches per step
    accum_steps: int | None = None  # (None: a checkpoint from before they were recorded)
    samples: int = 0
    best_metric: float | None = None  # best validation value of the early-stop metric so far
    best_step: int | None = None  # the step it was measured at; that step's checkpoint is kept
    best_loss: float | None = None  # the validation loss there: a tie of the metric goes to a lower loss
    best_of: str | None = None  # the early-stop metric they were kept by (None: none yet, or an older checkpoint)
    evals_since_best: int = 0
    last_metric: float | None = None  # the early-stop metric at the latest evaluation (None: none yet)
    bad_steps: int = 0  # non-finite steps skipped in total
    empty_batches: int = 0  # batches whose every row was skipped, or that had nothing to learn from (no step taken)
    seconds: float = 0.0  # wall seconds of training so far, over every fit (the time schedule's clock)
    stopped: str | None = None  # why the fit that wrote the checkpoint ended (None: it was still running)
    last_eval_step: int | None = None  # the step last evaluated (a resume does not evaluate it again)
    extra: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(run_dir: Path, module: nn.Module, optimizer: torch.optim.Optimizer, progress: Progress,
                    extra_files: dict[str, Path] | None = None, rank_rng: list[dict[str, torch.Tensor]] = (),
                    state: tuple[dict[str, torch.Tensor], dict] | None = None) -> Path:
    """Write `checkpoints/step_XXXXXXX/` atomically (temp folder + rename). Returns its path.
    `rank_rng`: every rank's `rng_state()` in rank order (distributed runs), kept for a resume.
    `state`: (weights, optimizer state dict) gathered from a sharded model, instead of
    `module.state_dict()` and `optimizer.state_dict()`."""
    final = checkpoint_dir(run_dir, progress.step)
    root = final.parent
    tmp = root / f".{final.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_checkpoint(tmp, module, optimizer, progress, extra_files, rank_rng, state)
    except BaseException:  # a full disk: its half is no use, and it holds the space another run needs
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, final)
    return final


def _write_checkpoint(tmp: Path, module: nn.Module, optimizer: torch.optim.Optimizer, progress: Progress,
                      extra_files: dict[str, Path] | None, rank_rng: list[dict[str, torch.Tensor]],
                      state: tuple[dict[str, torch.Tensor], dict] | None) -> None:
    weights, optim = state if state is not None else (module.state_dict(), optimizer.state_dict())
    save_tensors(tmp / "model.safetensors", weights)
    tensors, opt_meta = _flatten_optimizer(optim)
    tensors.update(_rng_tensors())
    for rank, state in enumerate(rank_rng):
        if rank:
            tensors.update({f"rng.rank{rank}.{k}": v for k, v in state.items()})
    save_tensors(tmp / "trainer.safetensors", tensors)
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, tmp / name)
        with open(tmp / name, "rb+") as f:  # on disk before the folder is renamed complete, as the weights
            os.fsync(f.fileno())
    atomic_write_json(tmp / "trainer.json", {"progress": asdict(progress), "optimizer": opt_meta,
                                             "python_rng": _python_rng()})


def _swap_in(tmp: Path, final: Path) -> None:
    root = final.parent
    if final.exists():  # re-saving a step: swap by renames, so `final` is always a whole checkpoint
        old = root / f".{final.name}.old{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
        fsync_dir(root)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """The folder of the checkpoint taken at `step` (which may not exist)."""
    return Path(run_dir) / CKPT_DIR / f"step_{step:07d}"


_STEP = re.compile(r"step_\d+")


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Clean up after a process killed while writing or pruning a checkpoint: delete half-written
    temporary folders and half-deleted ones, and put back a checkpoint that was set aside to be
    replaced but never was."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return
    for old in root.glob(".step_*.old*"):
        final = root / old.name[1:].split(".old")[0]
        if not final.exists() and _complete(old):
            os.replace(old, final)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in [*root.glob(".step_*.tmp*"), *root.glob(".step_*.del*")]:
        shutil.rmtree(tmp, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder (weights, optimizer state and trainer.json), or None."""
    done = complete_checkpoints(Path(run_dir) / CKPT_DIR)
    return done[-1] if done else None


def resume_checkpoint(run_dir: Path) -> Path:
    """The checkpoint `--resume` continues from (the newest complete one); UserError when none is."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise UserError(f"--resume: no complete checkpoint in {run_dir}/checkpoints (start the run without "
                        "--resume, with --overwrite if the folder holds its first files)")
    return ckpt


def check_same_rows(saved: str | None, current: str | None, keys: str, cause: str | None = None) -> None:
    """UserError when a checkpoint's training rows (fingerprint `saved`; None in older ones) are not
    the rows a resumed run now reads: its place in the epoch means those rows. `cause`: a changed
    setting that decides which rows are kept (`decoder.context 128 -> 256`), named instead of `keys`."""
    if saved is None or current is None or saved == current:
        return
    if cause is not None:  # the data may be untouched: blaming it sent users looking for a change they never made
        raise UserError(f"--resume: {cause} changed which training rows fit, so the checkpoint's place in the epoch "
                        "no longer matches their order: resume without the change, or start a new run (--overwrite, "
                        "or another train.out_dir)")
    raise UserError(f"--resume: the training rows ({keys}) are not those the checkpoint was trained on, and "
                    "its place in the epoch means those rows: restore them, or start over (--overwrite, or "
                    "another train.out_dir)")


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoint folders `step_<digits>` under `root`, oldest first, by their step (as
    names, step_10000000 would sort before step_9999000). Anything else there (a copy someone made,
    `step_0000004.bak`) is not a checkpoint."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP.fullmatch(p.name) and _complete(p)]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("model.safetensors", "trainer.safetensors", "trainer.json"))


def load_checkpoint(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0,
                    sharded: Any = None) -> Progress:
    """Restore module, optimizer and every RNG from `path`; returns the saved progress.

    `rank` > 0 (distributed) restores that rank's torch RNG when the checkpoint has it, else
    (a resume on more processes than wrote it) a stream derived from rank 0's and the rank.
    `sharded`: the model's `fsdp.Sharded` handle, which shards the full tensors into it.

    Raises:
        CheckpointError: a file is missing or corrupt, trainer.json has the wrong fields or types,
        or the weights do not fit this model (the config changed since the checkpoint).
    """
    meta = read_json(path / "trainer.json")
    weights = load_tensors(path / "model.safetensors")
    tensors = load_tensors(path / "trainer.safetensors")
    try:
        progress = Progress(**{"samples_in_epoch": None, **meta["progress"]})
        _check_progress(progress)
        if sharded is not None:
            sharded.load_full(weights, optimizer, _optimizer_state(optimizer, tensors, meta["optimizer"]))
        else:
            module.load_state_dict(weights)
            optimizer.load_state_dict(_optimizer_state(optimizer, tensors, meta["optimizer"]))
        _restore_rng(tensors, meta["python_rng"])
        if rank:
            _restore_rank_rng(tensors, rank)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise CheckpointError(f"{path}: cannot resume from this checkpoint ({type(e).__name__}: "
                              f"{_last_line(e)})") from None
    return progress


def _check_progress(p: Progress) -> None:
    """TypeError naming the first field of a (hand-edited or damaged) trainer.json that cannot be
    what the trainer wrote: a str or None there was a TypeError traceback deep in training."""
    def whole(value: Any, low: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def real(value: Any) -> bool:
        return number(value) and math.isfinite(value)

    rules = {**{name: (lambda v: whole(v, 0)) for name in ("step", "epoch", "batch_in_epoch", "samples",
                                                          "evals_since_best", "bad_steps", "empty_batches")},
             "world_size": lambda v: whole(v, 1),
             "samples_in_epoch": lambda v: v is None or whole(v, 0),
             "batch_size": lambda v: v is None or whole(v, 1), "accum_steps": lambda v: v is None or whole(v, 1),
             "best_metric": lambda v: v is None or real(v), "best_step": lambda v: v is None or whole(v, 0),
             "best_loss": lambda v: v is None or real(v), "best_of": lambda v: v is None or isinstance(v, str),
             "last_metric": lambda v: v is None or number(v),  # (NaN too: a diverged model's value)
             "last_eval_step": lambda v: v is None or whole(v, 0),
             "seconds": lambda v: real(v) and v >= 0, "extra": lambda v: isinstance(v, dict)}
    for name, ok in rules.items():
        if not ok(getattr(p, name)):
            raise TypeError(f"progress.{name} is {getattr(p, name)!r}")


def load_weights(path: Path, module: nn.Module, sharded: Any = None) -> None:
    """Copy the weights of checkpoint folder `path` into `module`, exactly (optimizer and RNGs
    untouched); `sharded`: through the model's `fsdp.Sharded` handle.

    Raises:
        CheckpointError: the weights file is missing or corrupt, or does not fit `module`.
    """
    weights = load_tensors(path / "model.safetensors")
    try:
        if sharded is not None:
            sharded.load_full(weights)
        else:
            module.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the weights do not fit this model ({_last_line(e)})") from None


def _last_line(e: BaseException) -> str:
    """The informative line of an exception (torch's load_state_dict puts the mismatch last)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def prune_checkpoints(run_dir: Path, keep_last: int, keep: set[Path] = frozenset()) -> None:
    """Delete all but the newest `keep_last` complete checkpoints and those in `keep` (the best).
    The newest is kept whatever `keep_last` says (0: the best and the newest): a resume starts there."""
    done = complete_checkpoints(Path(run_dir) / CKPT_DIR)
    for old in done[:-max(keep_last, 1)]:
        if old.resolve() not in {k.resolve() for k in keep}:
            _delete(old)


def _delete(folder: Path) -> None:
    """Remove a checkpoint folder by renaming it out of the step names first: a process killed
    half-way through the delete leaves a `.del` folder the next start removes, not an incomplete
    `step_*` one that no later prune would ever look at again."""
    doomed = folder.with_name(f".{folder.name}.del{os.getpid()}")
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The optimizer state dict a checkpoint holds, checked against `optimizer`'s parameters."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    groups = meta["param_groups"]
    if len(groups) != len(optimizer.param_groups) or any(
            len(g["params"]) != len(o["params"]) for g, o in zip(groups, optimizer.param_groups)):
        raise CheckpointError("checkpoint optimizer does not match this model's parameters")
    return {"state": state, "param_groups": groups}


def _rng_tensors() -> dict[str, torch.Tensor]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    out = {"rng.torch": torch.get_rng_state(),
           "rng.numpy.keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)),
           "rng.numpy.rest": torch.tensor([pos, has_gauss], dtype=torch.int64),
           "rng.numpy.gauss": torch.tensor([gauss], dtype=torch.float64)}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch RNG states (CPU, and each GPU's): what differs between ranks."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return out


def _restore_rank_rng(tensors: dict[str, torch.Tensor], rank: int) -> None:
    prefix = f"rng.rank{rank}."
    own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if "torch" not in own:
        torch.manual_seed(int(torch.randint(2**62, (1,))) + rank)  # after rank 0's state: reproducible
        return
    torch.set_rng_state(own["torch"])
    cuda = [own[k] for k in sorted((k for k in own if k.startswith("cuda.")), key=_device_number)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _device_number(key: str) -> int:
    """`rng.cuda.10` → 10: device states in device order (as strings, "10" would sort before "2")."""
    return int(key.rsplit(".", 1)[1])


def _python_rng() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _restore_rng(tensors: dict[str, torch.Tensor], python_rng: list) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    pos, has_gauss = tensors["rng.numpy.rest"].tolist()
    np.random.set_state(("MT19937", tensors["rng.numpy.keys"].numpy().astype(np.uint32), pos, has_gauss,
                         float(tensors["rng.numpy.gauss"][0])))
    version, internal, gauss = python_rng
    random.setstate((version, tuple(internal), gauss))
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=_device_number)]
        if states:
            torch.cuda.set_rng_state_all(states)


def restore_best(run_dir: Path, progress: Progress, metric: str, enabled: bool, module: nn.Module,
                 sharded: Any = None) -> int:
    """The end of a run with a best checkpoint: with `enabled` (`train.restore_best`), load its
    weights into `module` (unless the last step is the best); returns the step whose weights the
    module holds. A best checkpoint that cannot be read keeps the last weights, with a warning."""
    p = progress
    # None: a run resumed from a checkpoint older than `last_metric`, which evaluated nothing since
    last = "not recorded in the checkpoint resumed from" if p.last_metric is None else f"{p.last_metric:.4g}"
    if not enabled:
        log.info("kept the last weights (step %d, %s = %s); the best was step %d, %s = %.4g "
                 "(train.restore_best is off)", p.step, metric, last, p.best_step, metric, p.best_metric)
        return p.step
    if p.best_step == p.step:
        log.info("the last step is the best: step %d, %s = %.4g", p.step, metric, p.best_metric)
        return p.step
    try:
        load_weights(checkpoint_dir(run_dir, p.best_step), module, sharded)
    except CheckpointError as e:  # e.g. a run from before best checkpoints were kept
        log.warning("cannot restore the best checkpoint (step %d): %s; keeping the last weights", p.best_step, e)
        return p.step
    log.info("restored the best checkpoint: step %d, %s = %.4g (last: %s)", p.best_step, metric, p.best_metric, last)
    return p.best_step
