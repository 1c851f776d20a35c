"""A run folder belongs to one run and one trainer at a time.

- A fresh run refuses a folder that already holds files: an older run's checkpoints would
  survive its pruning and a later `--resume` would restore *that* run. `overwrite=True`
  (`--overwrite`) deletes the folder first; `resume=True` continues what is there. A folder a
  fresh run marked `.unstarted` and that holds only the config and tokenizer it wrote before its
  first step (a run a config error or unusable data stopped) is replaced without asking.
- While a stage trains, it holds an exclusive lock on `<run>/.lock` (flock, released by the
  kernel when the process dies, so a killed trainer never leaves a stale lock); the file names
  the holder's pid for the message a second trainer gets.
- Under torchrun, rank 0 alone prepares and locks the folder (`lock_run`); the others wait.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mmembed.checkpoint import make_output_folder
from mmembed.errors import UserError
from mmembed.file_lock import exclusive

LOCK = ".lock"
DEMO = ".demo"  # marks a folder `mmembed demo` writes (demo.py): an overwrite keeps it, as it keeps the lock
TRASH = ".overwritten-"  # + pid: what `--overwrite` moved aside and is deleting
CHECKPOINTS = "checkpoints"  # `state.CKPT_DIR` (not imported: state imports torch)
# a fresh align stage writes this marker, then its config and tokenizer, and removes the marker at
# its first step: a folder of just these was a start that stopped before it (a config error, no usable row)
UNSTARTED = ".unstarted"
# (`model.CONFIG`, `model.TOKENIZER`, and the trainer's log, opened before its first step)
UNTRAINED = {UNSTARTED, "config.yaml", "tokenizer.json", "metrics.jsonl"}


def prepare_run_dir(run_dir: Path, *, resume: bool, overwrite: bool, keep: Sequence[str | Path] = ()) -> None:
    """Make `run_dir` ready for a fresh run (or check it for a resumed one).

    Args:
        keep: what the run reads (its data root, a run it starts from): `overwrite` refuses a
            folder that is or holds one of them.

    Raises:
        UserError: a fresh run into a non-empty folder without `overwrite`; `overwrite` on a
        folder that contains the working directory or a `keep` path; `resume` of a missing folder.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"train.out_dir {run_dir} is a file, not a folder")
    if resume and not run_dir.exists():  # before anything is made: it left empty folders and a .lock
        raise UserError(f"train.out_dir {run_dir} does not exist, so there is no run to resume: give the run's "
                        "folder, or drop --resume to start a fresh run there")
    if resume or not run_dir.exists():
        make_output_folder(run_dir, "train.out_dir")  # a file above it: one line, exit 2
        if resume:
            _remove_trash(run_dir)
        return
    names = _entries(run_dir)
    if not names:
        _remove_trash(run_dir)  # what an interrupted --overwrite left is no run
        return
    if not overwrite and needs_overwrite(run_dir):
        from mmembed.train.state import latest_checkpoint

        if latest_checkpoint(run_dir) is None and "model.safetensors" not in names:  # --resume would refuse it
            raise UserError(f"{run_dir} already holds files but no checkpoint to resume (a run stopped before its "
                            "first one?): start over with --overwrite (overwrite=True), which deletes them, or "
                            "choose another train.out_dir")
        raise UserError(f"{run_dir} already holds a run: continue it with --resume (resume=True), start over with "
                        "--overwrite (overwrite=True), or choose another train.out_dir")
    if Path.cwd().resolve().is_relative_to(run_dir.resolve()):
        raise UserError(f"--overwrite would delete {run_dir}, which contains the working directory")
    for path in keep:
        if Path(path).resolve().is_relative_to(run_dir.resolve()):
            raise UserError(f"--overwrite would delete {run_dir}, which holds {path} that this run reads: "
                            "choose another train.out_dir")
    with run_lock(run_dir):  # never delete a folder another trainer is using
        _clear(run_dir)


def needs_overwrite(run_dir: Path) -> bool:
    """Whether a fresh run (no `--resume`) into `run_dir` must be given `--overwrite`: the folder
    holds files, and not just those of a start a config error stopped (replaced without asking)."""
    names = _entries(run_dir) if Path(run_dir).is_dir() else set()
    return bool(names) and not (UNSTARTED in names and names <= UNTRAINED)


def _entries(run_dir: Path) -> set[str]:
    return {p.name for p in Path(run_dir).iterdir() if p.name not in (LOCK, DEMO) and not p.name.startswith(TRASH)}


def _clear(run_dir: Path) -> None:
    """Empty a run folder for `--overwrite`, its checkpoints first and by one rename into a trash
    folder: an interrupted delete (Ctrl+C among large checkpoints) left the old run's newest
    checkpoints behind its deleted logs, and a `--resume` then continued that half-deleted run.
    A trash folder a killed delete left is removed first."""
    _remove_trash(run_dir)
    trash = run_dir / f"{TRASH}{os.getpid()}"
    trash.mkdir()
    entries = sorted((e for e in run_dir.iterdir() if e.name not in (LOCK, DEMO, trash.name)),
                     key=lambda e: e.name != CHECKPOINTS)  # the checkpoints go first: nothing to resume
    for entry in entries:
        os.replace(entry, trash / entry.name)
    shutil.rmtree(trash)


def _remove_trash(run_dir: Path) -> None:
    """Delete what an interrupted `--overwrite` left (its trash folders; never a run's files),
    holding the folder's lock: an overwrite under way moves its entries into its trash."""
    if not any(run_dir.glob(f"{TRASH}*")):
        return
    with run_lock(run_dir):
        for trash in run_dir.glob(f"{TRASH}*"):
            shutil.rmtree(trash, ignore_errors=True)


def lock_run(run_dir: Path, *, resume: bool, overwrite: bool,
             keep: Sequence[str | Path] = ()) -> contextlib.AbstractContextManager:
    """Rank 0 readies the run folder (`prepare_run_dir`) and takes its lock while the other ranks
    wait; returns the context manager that holds the lock (on rank 0; nothing on the others).
    A refusal is raised on every rank."""
    from mmembed.train.collectives import main_first
    from mmembed.train.distributed import current_world

    held = contextlib.ExitStack()
    with main_first():  # a refusal is raised on every rank (the others said rank 0 was lost)
        if current_world().main:
            prepare_run_dir(run_dir, resume=resume, overwrite=overwrite, keep=keep)
            held.enter_context(run_lock(run_dir))  # a busy folder too
    return held


def run_lock(run_dir: Path, busy: Callable[[str], str] | None = None) -> contextlib.AbstractContextManager:
    """Hold the run folder's exclusive lock; a second holder (another process) gets a UserError,
    `busy(holder)` if given (a command other than a trainer says what to do).

    Re-entrant within one process, so a stage may take it inside a pipeline that already has it.
    """
    return exclusive(Path(run_dir) / LOCK, busy or (lambda holder: (
        f"{Path(run_dir).resolve()} is in use by a trainer ({holder}); wait for it to finish, "
        "or train into another train.out_dir")))


def read_paths(config: Any) -> list[str]:
    """What a training run reads and an --overwrite of its folder must not delete: the data root,
    the run it starts its space from, the tokenizer file it is given, and the GPT-2 its decoder
    starts from."""
    decoder = getattr(config, "decoder", None)
    gpt2 = decoder.init_from_gpt2 if decoder is not None else None
    return [p for p in (config.data.root, config.model.init_from, config.tokenizer.path, gpt2) if p]


def check_resumed_folder(config_path: str | Path, out_dir: str | Path, overrides: Sequence[str] = (),
                         flag: str = "--resume") -> None:
    """UserError when `train RUN/config.yaml --resume` would continue another folder than RUN: a run's
    config.yaml records the train.out_dir it was trained in, so resuming a copy of the run (or a run
    moved since) from its own config continued, pruned and overwrote the original, or whatever run
    now sits there (and `--overwrite` deleted it). An override of train.out_dir says which folder
    is meant: never refused."""
    from mmembed.config import resolve_config_path

    if any(item.partition("=")[0].strip() in ("train", "train.out_dir") for item in overrides):
        return
    folder = _run_holding(resolve_config_path(config_path).parent)
    if folder.resolve() == Path(out_dir).resolve() or run_evidence(folder) is None:
        return
    from mmembed.model_load import _yaml_text  # an override as YAML reads it back (a `: ` in the name)

    fix = shlex.quote(f"train.out_dir={_yaml_text(str(folder))}")
    did = "continue" if flag == "--resume" else "replace"
    raise UserError(f"{config_path} is the config of the run in {folder}, but its train.out_dir is {out_dir}: "
                    f"{flag} would {did} that folder's run, not this one; for this one, add {fix}")


def _run_holding(folder: Path) -> Path:
    """The run a config's folder belongs to: itself, or the run above a checkpoint's folder
    (RUN/checkpoints/step_N, RUN/decoder/checkpoints/step_N)."""
    if folder.parent.name != CHECKPOINTS:
        return folder
    run = folder.parent.parent
    return run.parent if run.name == "decoder" else run  # (`decoder.DECODER_DIR`)


def run_evidence(folder: Path) -> str | None:
    """What shows `folder` to be a training run's, finished, under way or interrupted (weights
    are written when it ends; checkpoints, the trainer's lock and a fresh run's marker before);
    None for any other folder."""
    from mmembed.train.state import latest_checkpoint  # torch: only when asked

    if (folder / "model.safetensors").exists():
        return "it holds trained weights, model.safetensors"
    ckpt = latest_checkpoint(folder)
    if ckpt is not None:
        return f"it holds the checkpoint {ckpt.relative_to(folder)}"
    if (folder / LOCK).exists():
        return f"a trainer has used it: {LOCK}"
    if (folder / UNSTARTED).exists():
        return f"a run is starting in it: {UNSTARTED}"
    return None
