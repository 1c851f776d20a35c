"""How large a dataset's in-memory cache grows, and whether it fits, checked before training starts.

A cache keeps every row's preprocessed tensors for the whole run; filled lazily (no workers), it
ran out of memory late in the first epoch. The estimate is the mean tensor bytes of a few rows
spread over the dataset, preprocessed now (not cached), times the rows. It counts tensors only:
on the demo the process grew by about 1.5× that (the allocator's overhead), which is why a cache
may take at most `CACHE_SHARE` of the memory available at the start.

Validation caches when `data.cache` is true (checked as training's cache is), or when its
estimate is at most `VAL_CACHE_BUDGET` (and fits that share); else it streams.
"""

from __future__ import annotations

import logging
import os

import torch

from mmembed.data.dataset import ManifestDataset, Sample
from mmembed.errors import ConfigError

log = logging.getLogger(__name__)

CACHE_SHARE = 0.5  # of the available memory: the rest is the allocator's overhead, the model, the batches
VAL_CACHE_BUDGET = 512_000_000  # bytes a validation set is cached within unless data.cache=true
_PROBES = 8  # rows preprocessed for the estimate


def available_memory() -> int | None:
    """Bytes of memory available without swapping (Linux: MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the line reads in kB
    except (OSError, ValueError, IndexError):
        pass
    try:  # other Unixes: free pages (lower than Linux's figure, which counts reclaimable caches)
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): no check
        return None


def local_processes() -> int:
    """Training processes on this machine (torchrun's LOCAL_WORLD_SIZE): each holds its own cache."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def estimate_cache_bytes(dataset: ManifestDataset) -> int:
    """About how many bytes of tensors `dataset`'s cache holds once full: the mean over up to
    `_PROBES` rows spread over it (a skipped row holds none) times its rows."""
    n = len(dataset)
    sizes = []
    # a stochastic preprocessor would draw from the global generator: the run's random stream stays as it was
    with torch.random.fork_rng(devices=[]):
        for index in sorted({i * n // _PROBES for i in range(_PROBES)} & set(range(n))):
            result = dataset.load(index)
            if isinstance(result, Sample):
                sizes.append(sum(t.numel() * t.element_size() for t in result.inputs.values()))
    return round(n * sum(sizes) / len(sizes)) if sizes else 0


def check_cache_fits(dataset: ManifestDataset, what: str) -> int:
    """Log the estimate of `dataset`'s cache (`what`: "training set"), over every process of this
    machine; ConfigError when it exceeds `CACHE_SHARE` of the available memory. Returns the estimate."""
    copies, free = local_processes(), available_memory()
    size = estimate_cache_bytes(dataset) * copies
    per = "rows" if copies == 1 else f"rows × {copies} processes on this machine"
    log.info("data.cache: the %s's cache of %d rows will hold about %s (an estimate: bytes per row × %s)%s", what,
             len(dataset), _gb(size), per, "" if free is None else f"; {_gb(free)} of memory available")
    if free is not None and size > CACHE_SHARE * free:
        raise ConfigError(f"data.cache=true: caching the {what} ({len(dataset):,} rows) would hold about {_gb(size)} "
                          f"(an estimate: preprocessed bytes per row × {per}), more than {CACHE_SHARE:.0%} of the "
                          f"{_gb(free)} of memory available; set data.cache=false (rows are then decoded every "
                          "epoch; data.num_workers decodes them in parallel)")
    return size


def keep_validation_cached(dataset: ManifestDataset, asked: bool) -> bool:
    """Whether to cache the validation set: always when `asked` (data.cache=true, refused as
    training's cache is when too large), else when its estimate fits `VAL_CACHE_BUDGET`."""
    if asked:
        check_cache_fits(dataset, "validation set")
        return True
    size, free = estimate_cache_bytes(dataset) * local_processes(), available_memory()
    keep = size <= VAL_CACHE_BUDGET and (free is None or size <= CACHE_SHARE * free)
    log.info("validation: %s its %d rows (about %s preprocessed, estimate; cached up to %s, or with data.cache=true)",
             "caching" if keep else "streaming", len(dataset), _gb(size), _gb(VAL_CACHE_BUDGET))
    return keep


def _gb(size: float) -> str:
    return f"{size / 1e9:.3g} GB" if size >= 1e9 else f"{size / 1e6:.3g} MB"
