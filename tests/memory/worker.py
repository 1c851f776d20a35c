"""Child processes for the memory fault and concurrency tests.

    python -m tests.memory.worker write DB SECONDS   # adds items, printing each acknowledged id
    python -m tests.memory.worker read DB SECONDS    # searches, checking it sees every committed item

Both print "ready" once the memory is open and wait for a line on stdin, so the parent can
start them together. They use the deterministic `FakeModel` (no towers to import: a child
starts in a few seconds); what is under test is the file, not the embeddings.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from mmembed.memory import Memory
from tests.retrieval.fakes import FakeModel

USER = "ada"


def wait_for_go() -> None:
    print("ready", flush=True)
    sys.stdin.readline()


def write(db: str, seconds: float) -> None:
    """Single adds and 8-item batches, alternating; each id is printed after its commit returned."""
    mem = Memory(db, model=FakeModel())
    wait_for_go()
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        if n % 2:
            items = [f"batch item {n} {j}" for j in range(8)]
            ids = mem.add_many(USER, items, metas=[{"n": n}] * 8, session=f"s{n % 5}")
        else:
            ids = [mem.add(USER, f"item {n}", meta={"n": n}, session=f"s{n % 5}", turn=n)]
        sys.stdout.write("".join(f"{i}\n" for i in ids))
        sys.stdout.flush()
        n += 1


def read(db: str, seconds: float) -> None:
    """Every search must return at least the items counted before it and at most those counted after."""
    mem = Memory(db)
    wait_for_go()
    end, searches, largest = time.monotonic() + seconds, 0, 0
    g = torch.Generator().manual_seed(0)
    while time.monotonic() < end:
        before = mem.count(USER)
        hits = mem.search(USER, torch.randn(FakeModel().embed_dim, generator=g), k=1_000_000) if before else []
        after = mem.count(USER)
        if not before <= len(hits) <= after:
            raise AssertionError(f"search saw {len(hits)} items; count was {before} before and {after} after")
        mem.recent(USER, limit=5)
        mem.search(USER, torch.ones(FakeModel().embed_dim), k=3, session="s1") if before else None
        searches, largest = searches + 1, max(largest, len(hits))
    print(json.dumps({"searches": searches, "largest": largest}), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"write": write, "read": read}[sys.argv[1]](sys.argv[2], float(sys.argv[3]))
