"""On-disk index format: a folder with three files, each written atomically.

    index.json           header: format, dim, count, fingerprint, backend (+ args), storage,
                         next_id, modality names, a generation token, metadata checksum
    vectors.safetensors  vectors (N, D) fp32/fp16, ids (N,) int64, modality codes (N,) int8
    metadata.jsonl       one JSON object per row, in row order

The header is written last and is the commit point: it names the generation token stored in
the safetensors metadata and the sha256 of the metadata file, so a save interrupted between
files (new vectors beside an old header) is detected at load instead of silently mixing two
indexes. No pickle anywhere; FAISS structures are not saved, they are rebuilt at first search.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from mmembed.checkpoint import atomic_write_json, atomic_write_text, load_tensors, read_json, save_tensors
from mmembed.errors import CheckpointError, UserError
from mmembed.modality import Modality
from mmembed.retrieval.store import MODALITY_CODES, STORAGE_DTYPES, VectorStore

FORMAT_VERSION = 1
HEADER, VECTORS, METADATA = "index.json", "vectors.safetensors", "metadata.jsonl"


@dataclass
class SavedIndex:
    header: dict[str, Any]
    store: VectorStore


def write_index(directory: str | Path, store: VectorStore, header: dict[str, Any]) -> Path:
    """Write a compacted store and its header into `directory` (created if needed)."""
    if store.n_dead:
        raise RuntimeError("compact the store before writing it")  # Index.save does
    directory = Path(directory)
    generation = uuid.uuid4().hex
    names = [m.value for m in sorted(MODALITY_CODES, key=MODALITY_CODES.get)]
    tensors = {"vectors": store.vectors, "ids": store.ids, "modality": store.codes}
    save_tensors(directory / VECTORS, tensors, metadata={"generation": generation})
    text = "".join(_metadata_line(m, int(i)) for m, i in zip(store.metadata, store.ids.tolist()))
    atomic_write_text(directory / METADATA, text)
    full = {**header, "format": FORMAT_VERSION, "dim": store.dim, "count": store.n_rows,
            "next_id": store.next_id, "modalities": names, "generation": generation,
            "metadata_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
    atomic_write_json(directory / HEADER, full)
    return directory


def read_index(directory: str | Path) -> SavedIndex:
    """Read and cross-check the three files; any inconsistency is a CheckpointError."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"index folder not found: {directory}")
    header = read_json(directory / HEADER)
    _check_header(header, directory)
    tensors = load_tensors(directory / VECTORS)
    if _generation(directory / VECTORS) != header["generation"]:
        raise CheckpointError(f"{directory}: {VECTORS} does not belong to {HEADER} (interrupted save?)")
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


def _metadata_line(meta: dict[str, Any], item_id: int) -> str:
    try:
        return json.dumps(meta, ensure_ascii=False, default=_json_default) + "\n"
    except (TypeError, ValueError) as e:
        raise UserError(f"metadata of item {item_id} cannot be saved as JSON ({e})") from None


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Tensor) and value.numel() == 1:
        return value.item()
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _check_header(header: Any, directory: Path) -> None:
    required = ("format", "dim", "count", "storage", "backend", "generation", "modalities", "next_id",
                "metadata_sha256")
    if not isinstance(header, dict) or any(k not in header for k in required):
        raise CheckpointError(f"{directory / HEADER}: not an mmembed index header (needs {', '.join(required)})")
    if header["format"] != FORMAT_VERSION:
        raise CheckpointError(f"{directory}: index format {header['format']} is not supported "
                              f"(this mmembed reads format {FORMAT_VERSION})")
    if header["storage"] not in STORAGE_DTYPES:
        raise CheckpointError(f"{directory}: unknown storage {header['storage']!r}")


def _generation(path: Path) -> str | None:
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("generation")


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
    rows = [json.loads(line) for line in raw.decode("utf-8").splitlines()]
    if len(rows) != header["count"]:
        raise CheckpointError(f"{path}: {len(rows)} rows, header says {header['count']}")
    return rows


def _code_map(names: list[str], directory: Path) -> dict[int, Modality]:
    try:
        return {code: Modality(name) for code, name in enumerate(names)}
    except ValueError as e:
        raise CheckpointError(f"{directory}: {e} (saved by a newer mmembed?)") from None
