"""glibc's malloc kept from handing a training step's freed memory back to the kernel.

A training step frees and then allocates again the same few hundred MB of activations and
gradients. glibc serves a block above its mmap threshold (128 KiB at start, raised as such blocks
are freed, at most 32 MiB) with pages of its own mmap and unmaps them on free, and it gives the
heap's free top back to the kernel past its trim threshold (twice the mmap threshold): the next
step takes that memory back page by page, each page a fault the kernel fills with zeros. On the
demo's align stage that was about 24,000 page faults a step (≈ 100 MB); with the settings below,
about 1,700 (docs/performance.md, "Page faults"). PyTorch's CPU tuning guide swaps in jemalloc or
tcmalloc for the same reason; these two `mallopt` calls get it from the allocator already loaded.

`keep_freed_memory()` fixes the mmap threshold at glibc's largest (32 MiB), so blocks below it come
from the heap, and the trim threshold at 1 GiB, so up to that much freed memory stays for the next
step: a process's resident memory stays near its peak rather than falling between steps. Only
under glibc (elsewhere nothing changes); the environment variable `MMEMBED_MALLOC=0` leaves malloc
as it is. The command line calls it at start; a Python program may call it itself.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit): a larger value is refused
TRIM_THRESHOLD = 2**30


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds as above; True when both were taken."""
    if os.environ.get("MMEMBED_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: their malloc has no such knobs
            return False
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    taken = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    log.debug("malloc: mmap threshold %d, trim threshold %d: %s", MMAP_THRESHOLD, TRIM_THRESHOLD,
              "taken" if taken else "refused")
    return taken
