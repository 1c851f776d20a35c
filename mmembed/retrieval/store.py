"""Row storage behind an `Index`: unit vectors, stable ids, modality codes, metadata, tombstones.

Rows are append-only between compactions: `remove` only clears a row's `alive` bit, so row
positions (which FAISS backends use as their internal ids) stay valid. `compact` drops dead
rows and renumbers positions; ids, which users see, never change and are never reused. The masks
searches derive from the rows (`eligible`, dict filters' columns) are kept until the rows change,
and never pickled.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmembed.errors import BadInput, UserError
from mmembed.modality import Modality
from mmembed.retrieval.masks import MetadataColumns, dict_filter
from mmembed.retrieval.metadata_rows import MetadataRows

STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
MODALITY_CODES = {m: i for i, m in enumerate(Modality)}  # saved files store names, not codes
ID_LIMIT = 2**63  # ids are int64: every id is below this, `next_id` at most this
# rows unit-norm within this are stored bit-exact: a float32 normalisation leaves norms within 4e-7
# of 1 (D up to 4096); a row further off is divided by its norm, so no score passes 1 by more (1e-4
# let scores reach 1.0001)
_UNIT_TOL = 1e-6
_TINY_NORM = 1e-15  # below, a row's float32 squares lose precision to subnormals


def storage_dtype(storage: str) -> torch.dtype:
    if storage not in STORAGE_DTYPES:
        raise UserError(f"unknown storage {storage!r} (valid: {', '.join(STORAGE_DTYPES)})")
    return STORAGE_DTYPES[storage]


def check_vectors(vectors: Any, dim: int, what: str = "vectors") -> Tensor:
    """Validate and convert to a float32 (N, D) CPU tensor, rows normalised to unit length.

    Raises BadInput (a ValueError) naming the first row that is NaN/Inf or zero, and for a
    wrong shape or container. A (D,) vector is taken as one row.
    """
    if isinstance(vectors, np.ndarray) and any(step < 0 for step in vectors.strides):
        vectors = vectors.copy()  # a reversed view (a[::-1]): torch refuses negative strides
    try:
        v = torch.as_tensor(vectors)
    except (TypeError, ValueError, RuntimeError):  # a list of vectors, a str, None: torch's own message
        raise BadInput(f"{what} must be an (N, {dim}) tensor or array, got {type(vectors).__name__} "
                       f"(a list of ({dim},) vectors: torch.stack(vectors))") from None
    if not (v.is_floating_point()):
        raise BadInput(f"{what} must be floating point, got {v.dtype}")
    v = v.detach().to(device="cpu", dtype=torch.float32)
    shape = tuple(v.shape)  # as given, for the message
    if v.dim() == 1:
        v = v.unsqueeze(0)
    if v.dim() != 2 or v.shape[1] != dim:
        raise BadInput(f"{what}: shape {shape}, but the shared space has dimension {dim} "
                       f"(expected ({dim},) or (N, {dim}))")
    finite = torch.isfinite(v).all(dim=1)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0])
        raise BadInput(f"{what}: row {row} contains NaN or Inf")
    return unit_rows(v, lambda row: BadInput(f"{what}: row {row} is the zero vector (it has no direction to "
                                             "compare)"))


def unit_rows(v: Tensor, zero: Callable[[int], Exception]) -> Tensor:
    """The finite float32 rows `v` (N, D) scaled to unit length (rows unit to float32 rounding kept as
    they are); `zero(row)` is raised for the first row with no direction.

    float32's squares overflow past ~1e19 (such a row came out as zeros) and lose tiny rows to
    subnormals: those rows alone are measured and scaled in float64 (the whole matrix would double
    the memory). A query's vector and an indexed one are scaled alike."""
    norms = v.norm(dim=1)  # (N,)
    extreme = ~torch.isfinite(norms) | (norms < _TINY_NORM)
    exact = v[extreme].double().norm(dim=1) if bool(extreme.any()) else norms.new_zeros(0, dtype=torch.float64)
    if bool((exact == 0).any()):
        raise zero(int(extreme.nonzero()[int((exact == 0).nonzero()[0])]))
    off = ((norms - 1).abs() > _UNIT_TOL) & ~extreme
    if bool(off.any()) or exact.numel():
        v = v.clone()
        v[off] = v[off] / norms[off, None]
        v[extreme] = (v[extreme].double() / exact[:, None]).float()
    return v.contiguous()


def _item_id(value: Any) -> int:
    """An id of any integer type; UserError otherwise (int() read the characters of "12" as ids 1
    and 2, and 3.5 as 3)."""
    if isinstance(value, bool):
        raise UserError(f"item ids are integers, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise UserError(f"item ids are integers, got {value!r}") from None


def padded(rows: np.ndarray) -> bool:
    """Whether any answer in these (Q, k) rows came up short. Backends put a short answer's -1
    padding after its hits, so the last column tells: for one query an item read rather than a
    reduction, which costs ~10-30 µs on the cold cache a FAISS search leaves (B-ann)."""
    if rows.size == 0:
        return False
    return int(rows[0, -1]) < 0 if rows.shape[0] == 1 else bool(rows[:, -1].min() < 0)


class VectorStore:
    """Growable (capacity-doubling) columns: vectors (N, D), ids (N,), modality codes (N,), alive (N,)."""

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32, capacity: int = 1024):
        self.dim = dim
        self.dtype = dtype
        self.n_rows = 0
        self.next_id = 0
        self._vectors = torch.empty(capacity, dim, dtype=dtype)
        self._ids = torch.empty(capacity, dtype=torch.int64)
        self._ids_view = self._ids.numpy()  # shares `_ids`' memory; renewed when it is reallocated
        self._ids_are_rows = True  # every id equals its row (ids given in order, none compacted away)
        self._codes = torch.empty(capacity, dtype=torch.int8)
        self._alive = torch.empty(capacity, dtype=torch.bool)
        self.metadata = MetadataRows()  # each row's as JSON text; reading a row decodes a copy
        self._row_of: dict[int, int] = {}
        self.version = 0  # bumped whenever row positions change (compaction, reload)
        self._caches()

    def _caches(self) -> None:
        """Empty caches of what searches derive from the rows (`eligible`, `metadata_mask`)."""
        self._eligible: dict[Modality | None, Tensor | None] = {}  # dropped at every append and remove
        self._columns = MetadataColumns()  # extended at an append, dropped when rows move

    # a copy or pickle of `_ids_view` is an array of its own, which later appends never reach: a
    # copied index's new rows came back with stale ids after a compaction; the caches are rebuilt
    _UNSAVED = frozenset({"_ids_view", "_eligible", "_columns"})

    def __getstate__(self) -> dict[str, Any]:
        return {name: value for name, value in self.__dict__.items() if name not in self._UNSAVED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._ids_view = self._ids.numpy()
        self._caches()

    # ---- views over the used rows ----------------------------------------------------------

    @property
    def vectors(self) -> Tensor:
        return self._vectors[: self.n_rows]  # (N, D)

    @property
    def ids(self) -> Tensor:
        return self._ids[: self.n_rows]

    def ids_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """The ids at these (Q, k) row positions, -1 where a row is -1 (padding after the hits of a
        short answer); numpy in and out, through a numpy view of the ids (see `Backend.search`)."""
        if self._ids_are_rows:  # the usual index, filled and never compacted: no lookup (B-ann, one query)
            return rows.copy()
        ids = self._ids_view[rows]  # a -1 row reads the last slot of the buffer, replaced below
        if padded(rows):
            ids[rows < 0] = -1
        return ids

    @property
    def codes(self) -> Tensor:
        return self._codes[: self.n_rows]

    @property
    def alive(self) -> Tensor:
        return self._alive[: self.n_rows]

    @property
    def n_alive(self) -> int:
        return len(self._row_of)

    @property
    def n_dead(self) -> int:
        return self.n_rows - self.n_alive

    def has(self, item_id: int) -> bool:
        return item_id in self._row_of

    def row_of(self, item_id: int) -> int:
        try:  # `_item_id`: int() read 1.9 and "1" as item 1 (`remove` and `in` refused them)
            return self._row_of[_item_id(item_id)]
        except KeyError:
            raise UserError(f"no item with id {item_id} in the index") from None

    def modality_of(self, row: int) -> Modality:
        return _MODALITIES[int(self._codes[row])]

    def modalities_of(self, rows: np.ndarray) -> list[list[Modality]]:
        """The modality of every row of a (Q, k) array of row positions, read in one go."""
        return [[_MODALITIES[c] for c in line] for line in self._codes.numpy()[rows].tolist()]

    # ---- mutation ----------------------------------------------------------------------------

    def append(self, vectors: Tensor, modality: Modality, metadata: Sequence[str],
               ids: Sequence[int] | None = None) -> list[int]:
        """Append checked float32 rows and their metadata as JSON object texts (`Index.add` and a load
        check them); returns their new ids (or keeps `ids` when reloading)."""
        n = vectors.shape[0]
        if len(metadata) != n:
            raise UserError(f"{len(metadata)} metadata rows for {n} vectors")
        if not all(type(line) is str for line in metadata):
            raise TypeError("VectorStore.append takes metadata as JSON object texts (Index.add makes them)")
        if ids is None:
            if self.next_id + n > ID_LIMIT:  # (a hand-edited next_id) torch raised "Overflow when unpacking long long"
                raise UserError(f"the index has no ids left for {n} new items: its next id is {self.next_id}, "
                                f"and ids are int64 (below {ID_LIMIT})")
            new_ids = list(range(self.next_id, self.next_id + n))
        else:
            new_ids = [int(i) for i in ids]
        self._reserve(self.n_rows + n)
        start, end = self.n_rows, self.n_rows + n
        self._vectors[start:end] = vectors.to(self.dtype)
        self._ids[start:end] = torch.tensor(new_ids, dtype=torch.int64)
        self._codes[start:end] = MODALITY_CODES[modality]
        self._alive[start:end] = True
        self.metadata.extend(metadata)
        for offset, item_id in enumerate(new_ids):
            self._row_of[item_id] = start + offset
        self.n_rows = end
        self._ids_are_rows = self._ids_are_rows and new_ids == list(range(start, end))
        self.next_id = max([self.next_id, *(i + 1 for i in new_ids)])
        self._eligible = {}
        return new_ids

    def remove(self, ids: Iterable[int]) -> None:
        """Tombstone rows. All ids are checked first, so an unknown id changes nothing."""
        ids = [_item_id(i) for i in ids]
        rows = [self.row_of(i) for i in ids]
        for item_id, row in zip(ids, rows):
            self._alive[row] = False
            self._row_of.pop(item_id, None)
        self._eligible = {}

    def compact(self) -> None:
        """Drop dead rows; positions change (`version` bumps), ids do not."""
        if self.n_dead == 0:
            return
        keep = self.alive.nonzero().squeeze(1)  # (N_alive,)
        n = keep.numel()
        self._vectors[:n] = self.vectors.index_select(0, keep)
        self._ids[:n] = self.ids.index_select(0, keep)
        self._codes[:n] = self.codes.index_select(0, keep)
        self._alive[:n] = True
        self.metadata.keep(keep.tolist())
        self.n_rows = n
        self._row_of = {int(i): r for r, i in enumerate(self.ids.tolist())}
        self._ids_are_rows = bool(torch.equal(self.ids, torch.arange(n)))
        self.version += 1
        self._caches()

    def _reserve(self, rows: int) -> None:
        capacity = self._vectors.shape[0]
        if rows <= capacity:
            return
        new_cap = max(rows, math.ceil(capacity * 1.5), 1024)
        for name in ("_vectors", "_ids", "_codes", "_alive"):
            old = getattr(self, name)
            grown = torch.empty((new_cap, *old.shape[1:]), dtype=old.dtype)
            grown[: self.n_rows] = old[: self.n_rows]
            setattr(self, name, grown)
        self._ids_view = self._ids.numpy()

    # ---- masks -------------------------------------------------------------------------------

    def modality_mask(self, modality: Modality) -> Tensor:
        return self.codes == MODALITY_CODES[modality]  # (N,) bool

    def eligible(self, target: Modality | None) -> Tensor | None:
        """(N,) bool of the live rows (of `target`: None, every modality), or None when that is every
        row. Kept until rows are added or removed, so the searches between share one (read-only)
        object and a backend can keep what it derives from it (B-ann: one removal made every FAISS
        query rebuild and count an (N,) mask, 0.14 -> 0.43 ms at 100k rows)."""
        if target not in self._eligible:
            mask = self.alive.clone() if self.n_dead else None
            if target is not None:
                by_modality = self.modality_mask(target)
                mask = by_modality if mask is None else mask & by_modality
            self._eligible[target] = mask
        return self._eligible[target]

    def metadata_mask(self, keep: Any) -> Tensor:
        """(N,) bool: rows whose metadata passes `keep` (a predicate, or a dict of required values).

        A dict matches when every key is present with an equal value; a list/tuple/set value
        means "any of these". Dead rows are not evaluated (their bit is False). A predicate runs
        on every live row at every call, on the rows decoded once and kept (`metadata_rows.py`; a
        predicate must not edit them); a dict filter compares cached per-key code columns
        (`masks.py`: one pass over the rows at a key's first filter, then numpy).
        """
        if callable(keep):
            alive = self.alive.tolist()
            return torch.tensor([a and bool(keep(m)) for a, m in zip(alive, self.metadata.decoded())],
                                dtype=torch.bool)
        return torch.from_numpy(self._columns.mask(self.metadata, self.alive.numpy(), dict_filter(keep)))


_MODALITIES = list(Modality)


def non_str_keys(value: Any) -> list[Any]:
    """Every dict key that is not a str, anywhere in `value`."""
    if isinstance(value, dict):
        return [k for k in value if not isinstance(k, str)] + [b for v in value.values() for b in non_str_keys(v)]
    if isinstance(value, (list, tuple)):
        return [b for v in value for b in non_str_keys(v)]
    return []
