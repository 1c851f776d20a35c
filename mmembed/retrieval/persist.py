"""On-disk index format: a folder with three files, replaced as a whole by every save.

    index.json           header: format, dim, count, fingerprint, backend (+ args), storage,
                         next_id, modality names, a generation token, the two files' checksums
    vectors.safetensors  vectors (N, D) fp32/fp16, ids (N,) int64, modality codes (N,) int8
    metadata.jsonl       one JSON object per row, in row order, "\\n"-terminated; pure ASCII (every
                         other character is a \\uXXXX escape), so no caption can hold a line break.
                         Any str round-trips except one holding lone surrogates (not Unicode text,
                         and JSON cannot tell "\\ud800\\udfff" from U+103FF): the save refuses it

A save holds an exclusive lock named by the index's path in the temporary folder (one save of an
index at a time; a second waits its turn) and writes the files into a sibling folder
`<name>.tmp-<pid>-<hex>` (each file fsynced), then
swaps it in: the old folder is renamed to `<name>.old-<pid>-<hex>`, the new one renamed to
`<name>`, the old one deleted. A kill at any point leaves a loadable index: before the swap the
old folder is untouched; between the two renames `read_index` reads the `.old` folder, and the
next save renames it back. The next save also deletes leftover temporary folders; reading never
writes. The header names the generation token stored in the safetensors metadata and the sha256
of both files, so a reader whose files come from two saves (a swap mid-read) notices and reads
again, and a file changed on disk is refused (indexes saved before the vectors' checksum load
without that check). No pickle anywhere; FAISS structures are not saved, they are rebuilt at first search.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from mmembed.checkpoint import (atomic_write_json, atomic_write_text, file_above, fsync_dir, load_tensors, read_json,
                                save_tensors, unwritable_above, utf8_name)
from mmembed.errors import CheckpointError, UserError
from mmembed.file_lock import exclusive
from mmembed.modality import Modality
from mmembed.retrieval.store import ID_LIMIT, MODALITY_CODES, STORAGE_DTYPES, VectorStore, non_str_keys

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
HEADER, VECTORS, METADATA = "index.json", "vectors.safetensors", "metadata.jsonl"
# JSON would read two adjacent lone surrogates back as one astral character: they are refused
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LEFTOVER = re.compile(r"\.(tmp|old)-\d+-[0-9a-f]{8}")  # suffix of a save's sibling folders
# atomic_write's temporary files, left in the index folder by a save killed in older versions
_PARTIAL_FILE = re.compile(r"\.(?:%s)\.\w+\.tmp" % "|".join(map(re.escape, (HEADER, VECTORS, METADATA))))


@dataclass
class SavedIndex:
    header: dict[str, Any]
    store: VectorStore


def write_index(directory: str | Path, store: VectorStore, header: dict[str, Any]) -> Path:
    """Write a compacted store and its header as the folder `directory`, replacing any index there.

    Raises UserError when `directory` holds anything besides an index (it would be deleted).
    """
    if store.n_dead:
        raise RuntimeError("compact the store before writing it")  # Index.save does
    header = _writable_header(header)  # before anything is written: the old index stays as it was
    directory = Path(directory)
    target = directory.resolve()  # through a symlink: the swap renames the real folder
    text = "".join(_metadata_line(m, int(i)) for m, i in zip(store.metadata, store.ids.tolist()))
    check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # one save of an index at a time: a second one's recovery deleted the first's staging folder
    # mid-write, and the two swaps could leave no index at all. A second save waits its turn.
    with exclusive(_lock_file(target), lambda holder: f"{holder} has been saving {target} for "
                                                      f"{_SAVE_WAIT:.0f} s; save again when it is done",
                   wait=_SAVE_WAIT):
        _recover(target)
        _check_replaceable(target)
        staging = _sibling(target, "tmp")
        os.mkdir(staging)  # mode 0777 & ~umask (tempfile.mkdtemp would make it 0700)
        try:
            _write_files(staging, store, header, text)
            _swap(staging, target)
        except BaseException:  # Ctrl-C too: it left the whole staged index beside the target
            _recover(target)  # a kill skips this; the next save does it
            raise
    return directory


def check_target(target: str | Path) -> None:
    """UserError unless an index can be saved as `target`: it is absent, an index or an empty
    folder, and every existing folder above it is a folder (checked before any work, so a
    mistyped --out costs no embedding)."""
    target = Path(target).resolve()
    if (parent := file_above(target)) is not None:
        raise UserError(f"cannot save an index as {target}: {parent} is a file, not a folder")
    if (parent := unwritable_above(target)) is not None:
        raise UserError(f"cannot save an index as {target}: {parent} cannot be written (read-only, or no permission)")
    _check_replaceable(target)


def read_index(directory: str | Path) -> SavedIndex:
    """Read and cross-check the three files; any inconsistency is a CheckpointError.

    A save that swaps the folder in mid-read makes the files disagree for a moment: when the
    header's generation (or the folder read) changed meanwhile, the read is tried again
    (`_READ_TRIES` times in all). (The folder's inode could not tell: a file system reuses them.)"""
    directory = Path(directory)
    for attempt in range(_READ_TRIES):
        before = _version(directory)
        try:
            return _read_folder(_live_folder(directory))
        except (CheckpointError, OSError) as e:
            # a folder no save touched meanwhile is as it will stay: its error is real (retrying a
            # corrupt index re-read and re-hashed it, 5x slower to refuse)
            if attempt == _READ_TRIES - 1 or _version(directory) == before:
                raise e if isinstance(e, CheckpointError) else CheckpointError(f"{directory}: {e}") from None
            time.sleep(0.02 * (attempt + 1))
    raise AssertionError("unreachable")


def _version(directory: Path) -> tuple[str, str | None]:
    """Which folder a read would take and the generation its header names: a save changes one."""
    try:
        live = _live_folder(directory)
        return str(live), read_json(live / HEADER).get("generation")
    except (UserError, CheckpointError, OSError, AttributeError):
        return "", None


_READ_TRIES = 4


def _write_files(folder: Path, store: VectorStore, header: dict[str, Any], text: str) -> None:
    generation = uuid.uuid4().hex
    names = [m.value for m in sorted(MODALITY_CODES, key=MODALITY_CODES.get)]
    tensors = {"vectors": store.vectors, "ids": store.ids, "modality": store.codes}
    save_tensors(folder / VECTORS, tensors, metadata={"generation": generation})
    atomic_write_text(folder / METADATA, text)
    full = {**header, "format": FORMAT_VERSION, "dim": store.dim, "count": store.n_rows,
            "next_id": store.next_id, "modalities": names, "generation": generation,
            "metadata_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "vectors_sha256": _file_sha256(folder / VECTORS)}
    atomic_write_json(folder / HEADER, full)


def _swap(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`; an existing `target` is moved aside first, since rename
    cannot replace a non-empty folder."""
    old = None
    if target.exists():
        old = _sibling(target, "old")
        os.rename(target, old)
    os.rename(staging, target)
    fsync_dir(target.parent)  # the new index is durable before the old one goes
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _recover(target: Path) -> None:
    """Undo what an interrupted save left beside `target`: put the old index back if the save
    stopped between its two renames, then delete the leftover folders."""
    leftovers = _leftovers(target)
    previous = _previous(target)
    if previous is not None and not target.exists():
        os.rename(previous, target)
        leftovers.remove(previous)
    for folder in leftovers:
        shutil.rmtree(folder, ignore_errors=True)


def _check_replaceable(target: Path) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise UserError(f"cannot save an index as {target}: it is a file")
    foreign = sorted(p.name for p in target.iterdir()
                     if p.name not in (HEADER, VECTORS, METADATA) and not _PARTIAL_FILE.fullmatch(p.name))
    if foreign:
        raise UserError(f"cannot save an index into {target}: it holds other files ({', '.join(foreign[:5])}), "
                        "and a save replaces the whole folder; choose a new or empty folder")


def _live_folder(directory: Path) -> Path:
    """`directory`, or the previous index while a save is between its two renames (or died there)."""
    if directory.is_dir():
        return directory
    previous = _previous(directory.resolve())
    if previous is None:
        if directory.exists():  # a manifest given where the index goes
            raise UserError(f"{directory} is a file, not an index folder")
        raise UserError(f"index folder not found: {directory}")
    log.warning("%s: a save was interrupted; reading the previous index from %s", directory, previous)
    return previous


_SAVE_WAIT = 120.0  # seconds a save waits for another save of the same index


def _lock_file(target: Path) -> Path:
    """The lock of saves of `target`: a file named by the hash of its real path in the temporary
    folder (every process of this machine finds the same one, and the user's folder gets none)."""
    name = hashlib.sha256(str(target.resolve()).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return Path(tempfile.gettempdir()) / f"mmembed-{_user()}" / "index-saves" / f"{name}.lock"


def _user() -> str:
    return str(os.getuid()) if hasattr(os, "getuid") else "user"


def _sibling(target: Path, kind: str) -> Path:
    return target.with_name(f"{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _leftovers(target: Path, kind: str | None = None) -> list[Path]:
    if not target.parent.is_dir():
        return []
    found = []
    for path in target.parent.iterdir():
        match = path.name.startswith(target.name) and _LEFTOVER.fullmatch(path.name[len(target.name):])
        if match and kind in (None, match.group(1)):
            found.append(path)
    return sorted(found)


def _previous(target: Path) -> Path | None:
    """The index a save moved aside; there is at most one unless saves were interrupted twice."""
    olds = _leftovers(target, "old")
    return max(olds, key=lambda p: p.stat().st_mtime_ns) if olds else None


def _read_folder(directory: Path) -> SavedIndex:
    header = read_json(directory / HEADER)
    _check_header(header, directory)
    tensors = load_tensors(directory / VECTORS)
    if _generation(directory / VECTORS) != header["generation"]:
        raise CheckpointError(f"{directory}: {VECTORS} does not belong to {HEADER} (interrupted save?)")
    if "vectors_sha256" in header and _file_sha256(directory / VECTORS) != header["vectors_sha256"]:
        raise CheckpointError(f"{directory / VECTORS}: checksum does not match {HEADER} (the file changed)")
    vectors, ids, codes = _check_tensors(tensors, header, directory)
    metadata = _read_metadata(directory / METADATA, header)
    store = VectorStore(header["dim"], STORAGE_DTYPES[header["storage"]], capacity=max(1, vectors.shape[0]))
    by_code = _code_map(header["modalities"], directory)
    start = 0
    runs, counts = torch.unique_consecutive(codes, return_counts=True)
    for code, count in zip(runs.tolist(), counts.tolist()):  # saved row order is kept
        end = start + count
        if code not in by_code:
            raise CheckpointError(f"{directory}: modality code {code} is not in the header's list")
        store.append(vectors[start:end], by_code[code], metadata[start:end], ids[start:end].tolist())
        start = end
    store.next_id = max(store.next_id, int(header["next_id"]))
    return SavedIndex(header, store)


def _writable_header(header: dict[str, Any]) -> dict[str, Any]:
    """`header` as index.json will hold it (a Path a str, as in metadata); UserError for what JSON cannot
    write or `read_index` would refuse (a save then replaced a good index with one no load reads)."""
    written = {}
    for key, value in header.items():
        if bad := non_str_keys(value):  # JSON would make it a str: the value would change across the save
            raise UserError(f"cannot save the index: its {key} has a key that is not a str: {bad[0]!r}")
        try:
            written[key] = json.loads(json.dumps(value, default=_json_default))
        except (TypeError, ValueError) as e:  # a date, a set, a loop
            raise UserError(f"cannot save the index: its {key} cannot be written as JSON ({e}); "
                            "use str, numbers, lists and dicts") from None
    if problem := _header_problem(written):
        raise UserError(f"cannot save the index: its {problem}")
    return written


def _metadata_line(meta: dict[str, Any], item_id: int) -> str:
    return metadata_json(meta, f"metadata of item {item_id}") + "\n"


def metadata_json(meta: dict[str, Any], what: str) -> str:
    """`meta` as the one ASCII JSON line a save writes; UserError naming `what` for what no save can
    write (a lone surrogate, bytes, an array): `Index.add` checks with it, so a save never fails late."""
    try:
        line = json.dumps(meta, default=_json_default)  # ASCII: U+2028 & co. become escapes too
        if _SURROGATE_ESCAPE.search(line):  # an astral character, or a lone surrogate?
            json.dumps(meta, ensure_ascii=False, default=_json_default).encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{what} holds a lone surrogate U+{ord(e.object[e.start]):04X}, which is not Unicode text "
                        "and cannot be saved") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{what} cannot be saved as JSON ({e})") from None
    return line


def saved_metadata(meta: dict[str, Any], what: str) -> dict[str, Any]:
    """`meta` as a load reads it back (a 0-d tensor or numpy scalar a number, a tuple a list, a Path a str),
    so a filter matches the same items before and after a save; UserError naming `what` for what
    no save can write."""
    if bad := non_str_keys(meta):  # JSON would make it a str
        raise UserError(f"{what} has a key that is not a str: {bad[0]!r}")
    return json.loads(metadata_json(meta, what))


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


# every header field a load relies on, with its type (ints also >= 0); backend_args, info,
# fingerprint and vectors_sha256 may be missing
_HEADER_TYPES: dict[str, type | tuple[type, ...]] = {
    "dim": int, "count": int, "next_id": int, "storage": str, "backend": str, "generation": str,
    "modalities": list, "metadata_sha256": str, "backend_args": dict, "info": dict,
    "fingerprint": (str, type(None)), "vectors_sha256": str,
}
_INFO_PATHS = ("run_dir", "manifest")  # the paths `info` may hold


def _check_header(header: Any, directory: Path) -> None:
    required = ("format", "dim", "count", "storage", "backend", "generation", "modalities", "next_id",
                "metadata_sha256")
    if not isinstance(header, dict) or any(k not in header for k in required):
        raise CheckpointError(f"{directory / HEADER}: not an mmembed index header (needs {', '.join(required)})")
    if header["format"] != FORMAT_VERSION or isinstance(header["format"], bool):  # "1" printed as 1
        raise CheckpointError(f"{directory}: index format {header['format']!r} is not supported "
                              f"(this mmembed reads format {FORMAT_VERSION})")
    if problem := _header_problem(header):
        raise CheckpointError(f"{directory / HEADER}: {problem}")
    if header["next_id"] < header["count"]:
        raise CheckpointError(f"{directory / HEADER}: next_id {header['next_id']} is below the item count "
                              f"{header['count']}: new items would reuse ids")


def _header_problem(header: dict[str, Any]) -> str | None:
    """What is wrong with the fields `header` holds ("field 'info' is None, not a valid dict"), else None:
    the rules of a load, which a save applies before writing (missing fields are for the load to judge)."""
    for key, kinds in _HEADER_TYPES.items():
        if key not in header:
            continue
        value = header[key]
        if not isinstance(value, kinds) or isinstance(value, bool) or (kinds is int and value < 0):
            names = " or ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
            return f"field {key!r} is {value!r:.80}, not a valid {names}"
        if key == "next_id" and value > ID_LIMIT:  # an add then raised "Overflow when unpacking long long"
            return f"field 'next_id' is {value}, beyond int64 ids"
    for key in _INFO_PATHS:  # `mmembed search` and `serve` open them: a number was a TypeError traceback there
        value = header.get("info", {}).get(key)
        if not isinstance(value, (str, type(None))):
            return f"field 'info.{key}' is {value!r:.80}, not a path (str)"
    if "storage" in header and header["storage"] not in STORAGE_DTYPES:
        return f"field 'storage' is {header['storage']!r}, not one of {', '.join(STORAGE_DTYPES)}"
    return None


def _generation(path: Path) -> str | None:
    try:
        if not utf8_name(path):  # safetensors opens UTF-8 names only: read the header itself
            return (_header_metadata(path) or {}).get("generation")
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("generation")
    except Exception as e:  # noqa: BLE001 - gone (a save swapped the folder) or unreadable: for the retry
        raise CheckpointError(f"{path}: cannot read its header ({type(e).__name__}: {e})") from None


def _header_metadata(path: Path) -> dict[str, str] | None:
    """A safetensors file's `__metadata__`: its header is an 8-byte little-endian length, then JSON."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 2 <= size <= 100_000_000:  # safetensors' own bound on a header
            raise ValueError(f"a header of {size} bytes")
        return json.loads(f.read(size)).get("__metadata__")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _check_tensors(tensors: dict[str, Tensor], header: dict[str, Any], directory: Path):
    missing = {"vectors", "ids", "modality"} - set(tensors)
    if missing:
        raise CheckpointError(f"{directory / VECTORS}: missing tensors {sorted(missing)}")
    vectors, ids, codes = tensors["vectors"], tensors["ids"], tensors["modality"]
    n, dim = header["count"], header["dim"]
    if tuple(vectors.shape) != (n, dim) or ids.shape != (n,) or codes.shape != (n,):
        raise CheckpointError(f"{directory}: vectors {tuple(vectors.shape)} do not match the header "
                              f"(count {n}, dim {dim})")
    if vectors.dtype != STORAGE_DTYPES[header["storage"]]:
        raise CheckpointError(f"{directory}: vectors are {vectors.dtype}, header says {header['storage']}")
    if not bool(torch.isfinite(vectors).all()):
        raise CheckpointError(f"{directory}: stored vectors contain NaN or Inf")
    if ids.unique().numel() != n:
        raise CheckpointError(f"{directory}: duplicate item ids")
    return vectors, ids, codes


def _read_metadata(path: Path, header: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"index metadata not found: {path}") from None
    if hashlib.sha256(raw).hexdigest() != header["metadata_sha256"]:
        raise CheckpointError(f"{path}: checksum does not match {HEADER} (file changed or interrupted save)")
    # "\n" only: str.splitlines also breaks on U+2028, U+0085, \x1c..., which files written before
    # the ASCII-only format may hold raw inside strings
    lines = raw.decode("utf-8").split("\n")
    rows = [json.loads(line) for line in lines[:-1]]  # each row ends with "\n": the last piece is ""
    if len(rows) != header["count"]:
        raise CheckpointError(f"{path}: {len(rows)} rows, header says {header['count']}")
    return rows


def _code_map(names: list[str], directory: Path) -> dict[int, Modality]:
    try:
        return {code: Modality(name) for code, name in enumerate(names)}
    except ValueError as e:
        raise CheckpointError(f"{directory}: {e} (saved by a newer mmembed?)") from None
