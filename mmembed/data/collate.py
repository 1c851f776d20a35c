"""Collate: a list of samples (and skip markers) → one `Batch`.

Rows lack modalities freely, so a batch stores each modality's tensor only for the rows that
have it (`inputs[m]`, in row order) plus a (B,) `present[m]` mask that places them. Encoders
run on `inputs[m]` alone; the loss scatters their outputs back with `present[m]`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from mmembed.data.dataset import Sample, Skipped
from mmembed.modality import Modality


@dataclass
class Batch:
    """B rows of a dataset, ready for the model.

    Attributes:
        inputs: modality → tensor for the rows that have it, in row order (N_m ≤ B rows).
            Only modalities at least one row has appear.
        masks: modality → padding mask for `inputs[m]` (True = valid), or None (images).
        present: modality → (B,) bool, which rows have it; one entry per modality the
            preprocessors handle, all-False when no row has it. `present[m].sum() == N_m`.
        labels: (B,) long, equal `label` strings → equal ids (a 63-bit hash of the string, so
            ids agree across batches and processes), -1 for rows without a label.
        rows: (B,) long manifest line numbers.
        keys: per row, the `label` string (scene identity) or None.
        skipped: (line, reason) of the rows dropped while building this batch. B can be 0
            when every row was skipped: check `len(batch)` before a step.
    """

    inputs: dict[Modality, Tensor]
    masks: dict[Modality, Tensor | None]
    present: dict[Modality, Tensor]
    labels: Tensor
    rows: Tensor
    keys: list[str | None]
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.rows.numel())

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on `device`."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) for custom batch types."""
        return self._map(lambda t: t.pin_memory())

    def _map(self, fn) -> Batch:
        return Batch(
            inputs={m: fn(t) for m, t in self.inputs.items()},
            masks={m: None if t is None else fn(t) for m, t in self.masks.items()},
            present={m: fn(t) for m, t in self.present.items()},
            labels=fn(self.labels),
            rows=fn(self.rows),
            keys=list(self.keys),
            skipped=list(self.skipped),
        )


def collate(samples: Sequence[Sample | Skipped], preprocessors: Mapping[Modality, Any]) -> Batch:
    """Build a `Batch` from dataset results, padding each modality with its preprocessor.

    Args:
        samples: what `ManifestDataset.__getitem__` returned for each index of the batch.
        preprocessors: modality → preprocessor (its `collate` pads/stacks that modality).

    Returns:
        A `Batch` over the kept samples; `Skipped` markers go to `batch.skipped`.

    Shapes: inputs[m] (N_m, ...) as the preprocessor's collate makes it; present[m] (B,).
    """
    kept = [s for s in samples if isinstance(s, Sample)]
    skipped = [(s.line, s.reason) for s in samples if isinstance(s, Skipped)]
    inputs: dict[Modality, Tensor] = {}
    masks: dict[Modality, Tensor | None] = {}
    present: dict[Modality, Tensor] = {}
    for modality, pre in preprocessors.items():
        has = [modality in s.inputs for s in kept]
        present[modality] = torch.tensor(has, dtype=torch.bool)  # (B,)
        items = [s.inputs[modality] for s in kept if modality in s.inputs]
        if items:
            inputs[modality], masks[modality] = pre.collate(items)
    keys = [s.label for s in kept]
    return Batch(
        inputs=inputs,
        masks=masks,
        present=present,
        labels=label_ids(keys),
        rows=torch.tensor([s.line for s in kept], dtype=torch.long),
        keys=keys,
        skipped=skipped,
    )


def label_ids(keys: Sequence[str | None]) -> Tensor:
    """(B,) long ids, equal exactly where labels are equal, in any batch and on any rank (the
    distributed loss compares the ids of every rank's rows): a 63-bit hash of the label, stable
    across processes as Python's `hash` is not. None → -1."""
    return torch.tensor([-1 if k is None else _label_hash(k) for k in keys], dtype=torch.long)


def _label_hash(label: str) -> int:
    return int.from_bytes(hashlib.blake2b(label.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little") >> 1  # >= 0
