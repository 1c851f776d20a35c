"""On-disk index format: the three files of an index folder, written and read back with every cross-check.

    index.json           header: format, dim, count, fingerprint, backend (+ args), storage,
                         next_id, modality names, a generation token, the two files' checksums
    vectors.safetensors  vectors (N, D) fp32/fp16, ids (N,) int64, modality codes (N,) int8
    metadata.jsonl       one JSON object per row, in row order, "\\n"-terminated; pure ASCII (every
                         other character is a \\uXXXX escape), so no caption can hold a line break.
                         Any str round-trips except one holding lone surrogates (not Unicode text,
                         and JSON cannot tell "\\ud800\\udfff" from U+103FF): the save refuses it

    structure.faiss      an IVF's or HNSW's built structure, in FAISS's own serialisation (only
                         for those backends; an index saved without it builds it at first search)

The header names the generation token stored in the safetensors metadata and the sha256 of every
file, so a reader whose files come from two saves (a swap mid-read) notices, and a file changed
on disk is refused (indexes saved before the vectors' checksum load without that check) — but for
structure.faiss, which is derived from the vectors: one missing, changed, unreadable by this FAISS
or unlike the vectors is built again from them, with a warning. No pickle anywhere. How a save replaces the folder as a whole, and a read retries, is `persist.py`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open
from torch import Tensor

from mmembed.checkpoint import atomic_write_json, atomic_write_text, load_tensors, read_json, save_tensors, utf8_name
from mmembed.errors import CheckpointError, UserError
from mmembed.modality import Modality
from mmembed.scalars import json_default
from mmembed.retrieval.store import ID_LIMIT, MODALITY_CODES, STORAGE_DTYPES, VectorStore, non_str_keys

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
HEADER, VECTORS, METADATA = "index.json", "vectors.safetensors", "metadata.jsonl"
STRUCTURE = "structure.faiss"  # a FAISS backend's built structure (`_FaissBackend.structure`)
# JSON would read two adjacent lone surrogates back as one astral character: they are refused
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


# a backend's structure as a save gets it: a writer handing its bytes to a sink, and its state
Structure = tuple[Callable[[Callable[[bytes], Any]], None], dict[str, Any]]


@dataclass
class SavedIndex:
    header: dict[str, Any]
    store: VectorStore
    # structure.faiss, open and checked against its checksum, and its state (None: none, or unusable)
    structure: tuple[BinaryIO, dict[str, Any]] | None = None


def _write_files(folder: Path, store: VectorStore, header: dict[str, Any], text: str,
                 structure: Structure | None = None) -> None:
    generation = uuid.uuid4().hex
    names = [m.value for m in sorted(MODALITY_CODES, key=MODALITY_CODES.get)]
    tensors = {"vectors": store.vectors, "ids": store.ids, "modality": store.codes}
    save_tensors(folder / VECTORS, tensors, metadata={"generation": generation})
    atomic_write_text(folder / METADATA, text)
    full = {**header, "format": FORMAT_VERSION, "dim": store.dim, "count": store.n_rows,
            "next_id": store.next_id, "modalities": names, "generation": generation,
            "metadata_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "vectors_sha256": _file_sha256(folder / VECTORS)}
    if structure is not None:
        write, state = structure
        digest = hashlib.sha256()
        with open(folder / STRUCTURE, "wb") as f:  # (the staging folder: it is swapped in whole)
            def sink(piece: bytes) -> int:
                digest.update(piece)
                return f.write(piece)
            write(sink)
            f.flush()
            os.fsync(f.fileno())
        full["structure"] = {"sha256": digest.hexdigest(), "state": state}
    atomic_write_json(folder / HEADER, full)


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
    return SavedIndex(header, store, _read_structure(directory, header))


def _read_structure(directory: Path, header: dict[str, Any]) -> tuple[BinaryIO, dict[str, Any]] | None:
    """structure.faiss, open at its start once its bytes match the header's checksum, and its state;
    None when none was saved, or (with a warning: the vectors are what the index is, and the
    structure is built again from them) when it is missing or changed."""
    saved = header.get("structure")
    if saved is None:
        return None
    path = directory / STRUCTURE
    if not isinstance(saved.get("sha256"), str) or not isinstance(saved.get("state", {}), dict):
        log.warning("%s: its 'structure' entry is not valid: building the structure again from the vectors",
                    directory / HEADER)
        return None
    try:
        f = open(path, "rb")  # read through this one file: a save swapping the folder in meanwhile cannot mix
    except OSError as e:
        log.warning("%s: cannot read it (%s): building the structure again from the vectors", path,
                    e.strerror or e)
        return None
    digest = hashlib.sha256()
    while chunk := f.read(1 << 22):
        digest.update(chunk)
    if digest.hexdigest() != saved["sha256"]:
        f.close()
        log.warning("%s: checksum does not match %s (the file changed): building the structure again from the "
                    "vectors", path, HEADER)
        return None
    f.seek(0)
    return f, saved.get("state", {})


def _writable_header(header: dict[str, Any]) -> dict[str, Any]:
    """`header` as index.json will hold it (a Path a str, as in metadata); UserError for what JSON cannot
    write or `read_index` would refuse (a save then replaced a good index with one no load reads)."""
    written = {}
    for key, value in header.items():
        _check_keys(value, f"cannot save the index: its {key}")
        try:
            written[key] = json.loads(json.dumps(value, default=json_default))
        except (TypeError, ValueError) as e:  # a date, a set, a loop
            raise UserError(f"cannot save the index: its {key} cannot be written as JSON ({e}); "
                            "use str, numbers, lists and dicts") from None
    if problem := _header_problem(written):
        raise UserError(f"cannot save the index: its {problem}")
    return written


def metadata_json(meta: dict[str, Any], what: str) -> str:
    """`meta` as the one ASCII JSON line a save writes; UserError naming `what` for what no save can
    write (a lone surrogate, bytes, an array): `Index.add` checks with it, so a save never fails late."""
    try:
        line = json.dumps(meta, default=json_default)  # ASCII: U+2028 & co. become escapes too
        if _SURROGATE_ESCAPE.search(line):  # an astral character, or a lone surrogate?
            json.dumps(meta, ensure_ascii=False, default=json_default).encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{what} holds a lone surrogate U+{ord(e.object[e.start]):04X}, which is not Unicode text "
                        "and cannot be saved") from None
    except (TypeError, ValueError, RecursionError) as e:  # RecursionError: nested past json's depth limit
        raise UserError(f"{what} cannot be saved as JSON ({e})") from None
    return line


def metadata_text(meta: Any, what: str) -> str:
    """`meta` as the index keeps it and a save writes it: one ASCII JSON object (a 0-d tensor or numpy
    scalar its number, a tuple a list, a Path a str), so a filter matches the same items before and
    after a save; UserError naming `what` for what no save can write."""
    if not isinstance(meta, dict):
        raise UserError(f"{what} must be a dict, got {type(meta).__name__}")
    _check_keys(meta, what)
    return metadata_json(meta, what)


def _check_keys(value: Any, what: str) -> None:
    """UserError naming `what` for a dict key that is not a str (JSON would make it one: the value would
    change across a save) and for a dict or list that holds itself."""
    try:
        bad = non_str_keys(value)
    except RecursionError:  # a loop (or nesting past Python's stack): a traceback of 1,000 frames
        raise UserError(f"{what} holds itself (or nests too deep), which JSON cannot write; "
                        "use str, numbers, lists and dicts") from None
    if bad:
        raise UserError(f"{what} has a key that is not a str: {bad[0]!r}")


# every header field a load relies on, with its type (ints also >= 0); backend_args, info,
# fingerprint, vectors_sha256 and structure may be missing
_HEADER_TYPES: dict[str, type | tuple[type, ...]] = {
    "dim": int, "count": int, "next_id": int, "storage": str, "backend": str, "generation": str,
    "modalities": list, "metadata_sha256": str, "backend_args": dict, "info": dict,
    "fingerprint": (str, type(None)), "vectors_sha256": str, "structure": dict,
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


def _read_metadata(path: Path, header: dict[str, Any]) -> list[str]:
    """metadata.jsonl's rows, as the JSON object texts the store keeps (each checked by decoding it)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"index metadata not found: {path}") from None
    if hashlib.sha256(raw).hexdigest() != header["metadata_sha256"]:
        raise CheckpointError(f"{path}: checksum does not match {HEADER} (file changed or interrupted save)")
    # "\n" only: str.splitlines also breaks on U+2028, U+0085, \x1c..., which files written before
    # the ASCII-only format may hold raw inside strings
    try:
        lines = raw.decode("utf-8").split("\n")
    except UnicodeDecodeError as e:  # a hand edit whose checksum was updated too, as below
        line = raw[:e.start].count(b"\n") + 1
        raise CheckpointError(f"{path}: line {line} is not UTF-8 (byte {e.start}: {e.reason})") from None
    rows = [_metadata_row(line, i + 1, path) for i, line in enumerate(lines[:-1])]  # the last piece is ""
    if len(rows) != header["count"]:
        raise CheckpointError(f"{path}: {len(rows)} rows, header says {header['count']}")
    return rows


def _metadata_row(line: str, number: int, path: Path) -> str:
    """One line of metadata.jsonl, as the ASCII JSON text a save writes; CheckpointError naming the file
    and line for one that is not a JSON object (a hand edit whose checksum was updated too)."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError) as e:
        detail = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise CheckpointError(f"{path}: line {number} is not JSON ({detail})") from None
    if not isinstance(row, dict):
        raise CheckpointError(f"{path}: line {number} is a {type(row).__name__}, not a JSON object")
    # a file written before the ASCII-only format: its line saved again as this one writes it
    return line if line.isascii() else json.dumps(row)


def _code_map(names: list[str], directory: Path) -> dict[int, Modality]:
    try:
        return {code: Modality(name) for code, name in enumerate(names)}
    except ValueError as e:
        raise CheckpointError(f"{directory}: {e} (saved by a newer mmembed?)") from None
