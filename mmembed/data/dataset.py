"""ManifestDataset: manifest rows + per-modality preprocessors → samples (or skip markers).

A row whose file is missing, empty, corrupt or otherwise unusable is skipped WHOLE: its other
modalities are not kept as a partial row. A partial row would silently change which pairs the
loss sees (a bad image would turn an image–text–audio triple into a text–audio pair), and the
point of skipping is that data problems are visible and counted, not absorbed. The skip is a
`Skipped(line, reason)` marker that travels inside the batch (see `collate`), so counting
works identically with any number of DataLoader workers.

Randomness: when the sampler hands out `(index, seed)` keys (see `loader.EpochBatchSampler`)
and a preprocessor is stochastic, preprocessing runs under `torch.manual_seed(seed)` in a forked
RNG; a preprocessor's `augment` step (SpecAugment) runs after the cache, on a generator seeded
with the same seed, so caching and augmentation combine. Augmentations are then a pure function
of (seed, epoch, index): the same with 0 or 8 workers, cached or not, and after a resume.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mmembed.data.manifest import Manifest, Row
from mmembed.errors import BadInput, UserError
from mmembed.modality import Modality

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One preprocessed row: a tensor per modality the row has."""

    line: int
    inputs: dict[Modality, Tensor]
    label: str | None = None


@dataclass(frozen=True)
class Skipped:
    """A row left out of the batch, and why."""

    line: int
    reason: str


class ManifestDataset(Dataset):
    """Map-style dataset over manifest rows.

    Args:
        manifest: a `Manifest` (from `read_manifest`) or a list of `Row`.
        preprocessors: modality → preprocessor. Modalities a row has but no preprocessor
            handles are ignored (a text–image model can train on a manifest with audio).
        strict: raise `BadInput` naming the manifest, line and file instead of skipping.
        cache: keep each row's result (sample or skip) in memory after its first load.
            Refused when a preprocessor is stochastic (it would freeze one augmentation).
            The cache lives in the process that loads: with DataLoader workers each worker
            would hold its own partial copy, so `build_loader` first fills it in the main
            process with `materialize()`; forked workers then share it copy-on-write.

    `__getitem__` takes an index, or an `(index, seed)` pair, and returns `Sample | Skipped`.
    """

    def __init__(
        self,
        manifest: Manifest | Sequence[Row],
        preprocessors: Mapping[Modality | str, Any],
        *,
        strict: bool = False,
        cache: bool = False,
    ) -> None:
        self.rows: list[Row] = list(manifest.rows if isinstance(manifest, Manifest) else manifest)
        self.source: Path | None = manifest.path if isinstance(manifest, Manifest) else None
        self.preprocessors = {m: preprocessors[m] for m in Modality if m in preprocessors}
        unknown = set(map(str, preprocessors)) - {str(m) for m in Modality}
        if unknown:
            raise UserError(f"unknown modality {sorted(unknown)[0]!r} (valid: {', '.join(Modality)})")
        self.strict = strict
        self._check_overlap()
        stochastic = [m for m, p in self.preprocessors.items() if getattr(p, "stochastic", False)]
        if cache and stochastic:
            fixes = "; ".join(
                f"{m}: {', '.join(getattr(self.preprocessors[m], 'random_options', ())) or 'its random options'}"
                for m in stochastic
            )
            raise UserError(
                f"cache=True would freeze one random draw of the {', '.join(stochastic)} preprocessor(s) "
                f"built for training; set cache=False, or turn off ({fixes})"
            )
        self.stochastic = bool(stochastic)
        self.augmenting = [m for m, p in self.preprocessors.items() if getattr(p, "augments", False)]
        self.cache: dict[int, Sample | Skipped] | None = {} if cache else None

    def _check_overlap(self) -> None:
        present = {m for row in self.rows for m in row.items}
        if self.rows and not present & set(self.preprocessors):
            where = f"{self.source}: " if self.source else ""
            have = ", ".join(sorted(present)) or "none"
            raise UserError(f"{where}no row has a modality this model reads (rows have: {have}; model reads: "
                            f"{', '.join(self.preprocessors) or 'none'})")
        ignored = present - set(self.preprocessors)
        if ignored:
            log.info("ignoring manifest column(s) %s: no preprocessor for them", ", ".join(sorted(ignored)))

    @property
    def modalities(self) -> tuple[Modality, ...]:
        """Modalities this dataset yields (present in the rows and handled by a preprocessor)."""
        present = {m for row in self.rows for m in row.items}
        return tuple(m for m in self.preprocessors if m in present)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> Sample | Skipped:
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is not None and self.stochastic:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                result = self._cached_load(index)
        else:
            result = self._cached_load(index)
        return self._augment(result, seed)

    def _cached_load(self, index: int) -> Sample | Skipped:
        if self.cache is None:
            return self.load(index)
        if index not in self.cache:
            self.cache[index] = self.load(index)
        return self.cache[index]

    def _augment(self, result: Sample | Skipped, seed: int | None) -> Sample | Skipped:
        """Run the preprocessors' `augment` steps (seeded per sample); the cached input stays intact."""
        if not self.augmenting or isinstance(result, Skipped):
            return result
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        inputs = {m: self.preprocessors[m].augment(t, generator) if m in self.augmenting else t
                  for m, t in result.inputs.items()}
        return Sample(result.line, inputs, result.label)

    def load(self, index: int) -> Sample | Skipped:
        """Preprocess row `index` (no cache). A bad item skips the whole row."""
        row = self.rows[index]
        inputs: dict[Modality, Tensor] = {}
        for modality, item in row.items.items():
            pre = self.preprocessors.get(modality)
            if pre is None:
                continue
            try:
                inputs[modality] = pre(item)
            except BadInput as e:
                reason = f"{modality}: {e}"
                if self.strict:
                    where = f"{self.source}:{row.line}" if self.source else f"line {row.line}"
                    raise BadInput(f"{where}: {reason}") from None
                log.debug("skipping line %d: %s", row.line, reason)
                return Skipped(row.line, reason)
        if not inputs:
            return Skipped(row.line, f"no modality this model reads (row has {', '.join(row.items)})")
        return Sample(row.line, inputs, row.label)

    def materialize(self, num_workers: int = 0, chunk: int = 64) -> list[tuple[int, str]]:
        """Fill the cache for every row, in parallel with `num_workers` processes.

        Returns the (line, reason) of the skipped rows. Run it before the training loader forks
        its workers so that they inherit one shared cache instead of each building its own.
        """
        if self.cache is None:
            raise UserError("materialize() needs a dataset built with cache=True")
        todo = [i for i in range(len(self)) if i not in self.cache]
        if num_workers > 0 and todo:
            loader = DataLoader(_Subset(self, todo), batch_size=chunk, num_workers=num_workers, collate_fn=_as_list)
            for pairs in loader:
                for index, result in pairs:
                    self.cache[index] = _own_memory(result)
        for index in todo:
            self[index]  # fills whatever the workers did not (and everything when num_workers=0)
        return [(r.line, r.reason) for r in self.cache.values() if isinstance(r, Skipped)]


class _Subset(Dataset):
    """Indices of `dataset` to compute, returning (index, result) pairs; used by materialize."""

    def __init__(self, dataset: ManifestDataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, Sample | Skipped]:
        index = self.indices[i]
        return index, self.dataset.load(index)


def _as_list(batch: list) -> list:
    return batch


def _own_memory(result: Sample | Skipped) -> Sample | Skipped:
    """Copy worker tensors out of shared memory: one shm segment per cached tensor would
    exhaust file descriptors on a large dataset."""
    if isinstance(result, Skipped):
        return result
    return Sample(result.line, {m: t.clone() for m, t in result.inputs.items()}, result.label)
