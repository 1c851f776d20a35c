"""Checkpoint I/O: atomic writes, safetensors weights, and nothing that unpickles code.

A run directory holds `model.safetensors`, `config.yaml`, `tokenizer.json` and, for resume,
`trainer.safetensors` (optimizer tensors) + `trainer.json` (step, RNG states, data position).
Every file is written to a temporary name in the same folder, fsynced, then renamed, so a crash
mid-write leaves the previous file intact and never a partial file under the final name.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file, save_file

from encoders.weights import is_safetensors, load_failure
from mmembed.errors import CheckpointError, UserError


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, fsync it, then rename onto `path`.
    An OSError (a full disk, a read-only folder) names `path`, not the temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; give the mode a plain open() would
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename in (None, str(tmp)):  # a failed write or fsync names no file
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save a flat tensor dict as safetensors, atomically. Shared storage is copied apart."""
    flat = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}

    def write(tmp: Path) -> None:
        try:
            save_file(flat, str(tmp), metadata=metadata)
        except SafetensorError as e:  # the Rust writer's I/O errors ("... (os error 28)") are no OSError
            code = re.search(r"os error (\d+)", str(e))
            errno_ = int(code.group(1)) if code else errno.EIO
            raise OSError(errno_, os.strerror(errno_), str(path)) from None

    atomic_write(Path(path), write)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, truncated or non-safetensors file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        if not utf8_name(path):  # safetensors opens UTF-8 names only; a run or index may have another
            return safetensors_load(path.read_bytes())
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def tensor_metadata(path: Path) -> dict[str, str]:
    """The `metadata` a safetensors file was saved with ({} for none), read from its header alone."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if 0 < size <= 100_000_000 else None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a readable safetensors file (no header)")
    meta = header.get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def utf8_name(path: Path) -> bool:
    """Whether `path` is valid UTF-8 (Linux names may hold any bytes; Python keeps the undecodable
    ones as lone surrogates, which libraries taking a UTF-8 str refuse)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def load_torch_weights(path: Path) -> dict[str, Any]:
    """Load a foreign `.pt`/`.bin` state dict with `weights_only=True`: pickles that would run
    code are refused (torch raises UnpicklingError before executing anything)."""
    path = Path(path)
    if path.suffix == ".safetensors" or is_safetensors(path):  # by content too: a .bin may hold safetensors
        return load_tensors(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError (truncated zip), EOFError...
        raise CheckpointError(f"{path}: refused or unreadable weights file ({load_failure(e, path)})") from None


def read_json(path: Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupted JSON ({e})") from None


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (best effort: some filesystems refuse directory fsync)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_above(path: str | Path) -> Path | None:
    """The file standing where a folder above `path` must go (the nearest existing ancestor, when it
    is not a folder), or None: checked before any work that would write `path`."""
    for parent in Path(path).resolve().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def unwritable_above(path: str | Path) -> Path | None:
    """The nearest existing folder above `path` when this process cannot write into it (a
    read-only file system, no permission), else None: checked before any work that would write
    `path` (an index, a report), which failed only after all the work otherwise."""
    for parent in Path(path).resolve().parents:
        if parent.is_dir():
            return None if os.access(parent, os.W_OK | os.X_OK) else parent
    return None


def check_output_file(out: str | Path, flag: str) -> None:
    """UserError unless a file can be written at `out`: not a folder, not under a file, not in a
    folder this process cannot write. Checked before the work (it failed after it: "Is a directory")."""
    if Path(out).is_dir():
        raise UserError(f"{flag} {out} is a folder; name the file to write")
    if (parent := file_above(out)) is not None:
        raise UserError(f"{flag} {out}: {parent} is a file, not a folder")
    if (parent := unwritable_above(out)) is not None:
        raise UserError(f"{flag} {out}: {parent} cannot be written (read-only, or no permission)")


def make_output_folder(folder: str | Path, flag: str = "--out") -> Path:
    """Create `folder` (and its parents) before any long work writes into it: a path under a file,
    or one that cannot be created, is one UserError now, not a traceback after the work. An empty
    name is refused (Path("") is the working directory, where the files would land unasked)."""
    if not str(folder).strip():
        raise UserError(f"{flag} is empty; give the folder to write into")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file; give the folder to write into")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {folder}: cannot create the folder ({e.strerror or e})") from None
    return folder
