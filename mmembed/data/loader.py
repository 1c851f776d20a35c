"""DataLoader construction: a seeded, resumable epoch order, and skip accounting.

Order: `EpochBatchSampler` draws a permutation from (seed, epoch) alone and cuts it into
batches, so an epoch's batches are fixed before any sample is loaded. Resuming at batch k of
epoch e is `set_epoch(e, start_batch=k)`: the first k batches are never loaded, and the rest
are exactly the tail of the uninterrupted epoch. Distributed, the ranks deal the permutation
round-robin, so k global batches consume exactly its first k · batch · world_size indices;
`set_epoch(e, start_sample=s)` resumes after the first s of them with any number of ranks
(the position is re-derived: no sample is seen twice in an epoch). Each index travels with its own seed, drawn
from (seed, epoch, index), so augmentation does not depend on workers or resumes either
(see `ManifestDataset`).

Skips: bad rows travel inside batches (`batch.skipped`); the training loop feeds them to a
`SkipCounter`, which logs a rate-limited warning and summarises at the end of an epoch.
Those that filling a dataset's cache finds reach it through `build_loader(skips=...)`.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from mmembed.data.collate import collate
from mmembed.data.dataset import ManifestDataset

log = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of `(index, sample_seed)` for one epoch, optionally starting at batch k.

    Args:
        n: dataset size.
        batch_size: rows per batch.
        shuffle: permute per epoch (seeded by `seed + epoch`); else dataset order.
        seed: run seed.
        drop_last: drop a final partial batch.
        rank, world_size: distributed sharding; every rank draws the same permutation and
            takes every `world_size`-th index of what is left of it (the tail is trimmed so
            ranks get equal counts).

    Call `set_epoch(epoch, start_batch=0)` (or `start_sample=s`) before each epoch (the start
    persists until then).
    """

    def __init__(
        self, n: int, batch_size: int, *, shuffle: bool, seed: int = 0, drop_last: bool = False,
        rank: int = 0, world_size: int = 1,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch, self.start_sample = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0, *, start_sample: int | None = None) -> None:
        """Start `epoch` after its first `start_batch` batches of this world, or after the first
        `start_sample` indices of its permutation (consumed by a run of any world size)."""
        if start_batch < 0 or (start_sample is not None and start_sample < 0):
            raise ValueError(f"start must be >= 0, got start_batch={start_batch}, start_sample={start_sample}")
        self.epoch = epoch
        self.start_sample = start_batch * self.batch_size * self.world_size if start_sample is None else start_sample

    def indices(self) -> list[int]:
        """This rank's dataset indices for the rest of the current epoch, in order."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)  # DistributedSampler's convention
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        rest = order[self.start_sample:]
        usable = len(rest) - len(rest) % self.world_size
        return rest[self.rank : usable : self.world_size]

    def batches_per_epoch(self) -> int:
        """Batches per rank in a whole epoch."""
        return self._batches(self.n)

    def _batches(self, n: int) -> int:
        per_rank = n // self.world_size
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def __len__(self) -> int:
        return self._batches(max(0, self.n - self.start_sample))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.indices()
        for b in range(len(self)):
            chunk = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in chunk]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one (run seed, epoch, index) — splitmix64 finaliser."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


def seed_worker(worker_id: int) -> None:
    """worker_init_fn: torch already seeds each worker (base seed + id); align numpy and random."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_loader(
    dataset: ManifestDataset,
    batch_size: int,
    *,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
    pin_memory: bool | None = None,
    epoch: int = 0,
    start_batch: int = 0,
    start_sample: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    skips: SkipCounter | None = None,
) -> DataLoader:
    """A DataLoader over `dataset` yielding `Batch`es in a seeded, resumable order.

    Args:
        dataset: a ManifestDataset (its preprocessors collate the batches).
        batch_size, shuffle, drop_last: as in torch's DataLoader.
        num_workers: worker processes (persistent across epochs when > 0).
        seed: fixes the order of every epoch and the per-sample augmentation seeds.
        pin_memory: None → pin when CUDA is available.
        epoch, start_batch: where the first iteration starts (resume). Later epochs: call
            `loader.batch_sampler.set_epoch(e)` (or `set_epoch(e, start_batch=k)`).
        start_sample: instead of `start_batch`, the number of the epoch's indices already
            consumed (by every rank together), for a resume with another world size.
        rank, world_size: shard for distributed training.
        skips: counts the bad rows that filling a cached dataset's cache finds (with workers the
            cache is filled here, every row at once, so the rows of a batch `drop_last` drops are
            found too); give the counter that counts `batch.skipped`: a row is counted once.

    Returns:
        The DataLoader; `len(loader)` counts the batches still to come in the current epoch.
    """
    if getattr(dataset, "cache", None) is not None and num_workers > 0:
        _fill_cache(dataset, num_workers, skips)
    sampler = EpochBatchSampler(
        len(dataset), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last, rank=rank, world_size=world_size
    )
    sampler.set_epoch(epoch, start_batch, start_sample=start_sample)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=partial(collate, preprocessors=dataset.preprocessors),
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        worker_init_fn=seed_worker if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
    )


def _fill_cache(dataset: ManifestDataset, num_workers: int, skips: SkipCounter | None) -> None:
    """Fill the cache before the workers fork (they then share it); a later epoch finds it full."""
    todo, t0 = len(dataset) - len(dataset.cache), time.perf_counter()
    skipped = dataset.materialize(num_workers=num_workers)
    if todo:
        log.info("cached %d rows in %.1fs (%d skipped)", todo, time.perf_counter() - t0, len(skipped))
    if skips is not None:
        skips.update(skipped)  # the same rows again in a later epoch or a resume: counted once


class SkipCounter:
    """Counts skipped rows by kind of reason and warns at most once every `every_s` seconds. A row
    is counted once, however many epochs skip it again.

    Args:
        every_s: minimum seconds between two warnings (the first skip warns at once).
        logger: where the warnings go (default: this module's logger).
        clock: time source, injectable for tests.

    Feed it `batch.skipped` (and `manifest.skipped` once); `summary()` at the end of an epoch.
    """

    def __init__(
        self, *, every_s: float = 30.0, logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.every_s, self.logger, self.clock = every_s, logger or log, clock
        self.reset()

    def reset(self) -> None:
        self.total = 0
        self.by_kind: Counter[str] = Counter()
        self.example: dict[str, tuple[int, str]] = {}
        self._seen: set[tuple[str, int]] = set()  # (kind, line) of every row counted
        self._last_warning: float | None = None
        self._since_warning = 0

    def update(self, skipped: Iterable[tuple[int, str]]) -> None:
        latest = None
        for line, reason in skipped:
            kind = reason_kind(reason)
            if (kind, line) in self._seen:  # the same bad row in a later epoch
                continue
            self._seen.add((kind, line))
            self.total += 1
            self._since_warning += 1
            self.by_kind[kind] += 1
            self.example.setdefault(kind, (line, reason))
            latest = (line, reason)
        if latest is None:
            return
        now = self.clock()
        if self._last_warning is None or now - self._last_warning >= self.every_s:
            self.logger.warning(
                "skipped %d bad row(s) (%d since the last warning); latest: line %d: %s",
                self.total, self._since_warning, *latest,
            )
            self._last_warning, self._since_warning = now, 0

    def state_dict(self) -> dict[str, Any]:
        """The rows counted so far (JSON), for a checkpoint: a resumed run's summary counts them too."""
        return {"seen": sorted([kind, line] for kind, line in self._seen),
                "example": {kind: list(ex) for kind, ex in self.example.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Add the rows of `state` (a checkpoint's, or another process's) to this counter."""
        for kind, line in state.get("seen", []):
            if (kind, line) not in self._seen:
                self._seen.add((kind, line))
                self.total += 1
                self.by_kind[kind] += 1
        for kind, (line, reason) in state.get("example", {}).items():
            self.example.setdefault(kind, (line, reason))

    def summary(self) -> str:
        """One line: the total and the count per kind, with an example line for each; "" if none."""
        if not self.total:
            return ""
        parts = [f"{n} × {kind} (e.g. line {self.example[kind][0]})" for kind, n in self.by_kind.most_common()]
        return f"skipped {self.total} row(s): " + "; ".join(parts)


# a path: absolute, home- or dot-relative, or a relative one with a file suffix ("NaN/Inf" is words);
# a number, whole, unless it ends a name ("UTF-8", "float32": "invalid UTF-… at byte …" hid the reason)
_VARIABLE = re.compile(r"'[^']*'|\"[^\"]*\"|<bytes>|(?<!\S)(?:[/~.]\S*|\S*/\S*\.\w+)"
                       r"|(?<!\d)(?<![^\W\d_]{2})(?<![^\W\d_]{2}-)\d+")


# a path may hold spaces ("cat one.jpg"), so where a reason announces one its whole rest is the
# path: after "file" ("missing file …", "not a file: …", "audio file: …"), and after a ": " a
# path-like word on to the first word with a file suffix ("audio: /d/my clip.wav has 3 channels")
_ANNOUNCED_PATH = re.compile(r"(?<=\bfile )\S.*|(?<=\bfile: )\S.*")
_PATH_AFTER_COLON = re.compile(r"(?<=: )(?:[/~.]|[^\s:]*/)[^:]*?\.[A-Za-z]\w*(?!\S)")


def reason_kind(reason: str) -> str:
    """A reason with its specifics removed, for grouping: paths, quotes, numbers → '…'."""
    head = reason.split(" (", 1)[0]
    head = _PATH_AFTER_COLON.sub("…", _ANNOUNCED_PATH.sub("…", head, count=1))
    return _VARIABLE.sub("…", head).strip()
