"""glibc's malloc keeps a step's freed memory for the next (mmembed/allocator.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mmembed.allocator import keep_freed_memory

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
                           reason="glibc's mallopt")

# In a fresh process: a 4 MB block (glibc as it starts maps it apart: its threshold is 128 KiB), then a
# training step's pattern, 288 MB of 1-8 MB blocks allocated and freed, six times, the page faults of the last
# four counted.
ROUNDS = textwrap.dedent("""
    import ctypes, json, resource, torch
    from mmembed.allocator import keep_freed_memory

    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                         "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Info
    out = {"taken": keep_freed_memory()}
    before = libc.mallinfo2().hblks
    block = torch.ones(2**20)
    out["mmapped"] = libc.mallinfo2().hblks - before
    del block
    for round in range(6):
        if round == 2:
            start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [torch.ones(2**18 * (1 + i % 8)) for i in range(64)]
        del blocks
    out["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
    print(json.dumps(out))
""")
PAGES = 4 * 288 * 2**20 // 4096  # the pages of the four rounds measured


def _rounds(env: dict[str, str]) -> dict:
    run = subprocess.run([sys.executable, "-c", ROUNDS], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True)
    return json.loads(run.stdout)


@glibc
def test_blocks_come_from_the_heap_and_are_reused_by_the_next_step():
    tuned, plain = _rounds({}), _rounds({"MMEMBED_MALLOC": "0"})
    assert tuned["taken"] and not plain["taken"]
    assert plain["mmapped"] == 1 and tuned["mmapped"] == 0  # below 32 MiB: the heap, not a mapping of its own
    # the freed blocks are reused (0-2,048 faults here); glibc as it is gave them back and faulted them in
    # again in some runs (up to 285k faults) and not in others, as the heap's top happened to be free or not
    assert tuned["faults"] < PAGES / 20, tuned


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("MMEMBED_MALLOC", "0")
    assert keep_freed_memory() is False
