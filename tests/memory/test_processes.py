"""Faults and concurrency across processes: SIGKILL loses no acknowledged item; readers and writers
running together never see "database is locked"."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmembed.memory import Memory

ROOT = Path(__file__).resolve().parents[2]
USER = "ada"


def start(kind: str, db: Path, seconds: float) -> subprocess.Popen:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # keep what the parent imports from
    return subprocess.Popen([sys.executable, "-m", "tests.memory.worker", kind, str(db), str(seconds)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": path})


def wait_ready(*procs: subprocess.Popen) -> None:
    for p in procs:
        line = p.stdout.readline()
        if line.strip() != "ready":
            p.kill()
            pytest.fail(f"worker did not start: {line!r} {p.stderr.read()}")
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()


def test_sigkill_mid_stream_loses_no_acknowledged_item(tmp_path):
    db = tmp_path / "memory.db"
    rng = random.Random(0)
    acknowledged: list[int] = []
    for round_ in range(2):  # the second writer starts on a file whose last writer was killed
        writer = start("write", db, 120)
        wait_ready(writer)
        target = len(acknowledged) + rng.randint(40, 160)
        while len(acknowledged) < target:
            line = writer.stdout.readline()
            assert line, f"writer ended early: {writer.stderr.read()}"
            acknowledged.append(int(line))
        time.sleep(rng.uniform(0.0, 0.05))
        writer.send_signal(signal.SIGKILL)
        rest, _ = writer.communicate(timeout=30)
        acknowledged += [int(x) for x in rest.splitlines() if x.strip()]  # full lines were printed after commit
        assert writer.returncode == -signal.SIGKILL
        with Memory(db) as mem:
            assert mem.integrity_check() == "ok"
            present = {h.id for h in mem.get(acknowledged)}
            assert present == set(acknowledged), f"round {round_}: lost {sorted(set(acknowledged) - present)[:10]}"
            assert mem.count(USER) >= len(acknowledged)
            top = mem.search(USER, _vector(mem, acknowledged[-1]), k=5)
            assert len(top) == 5 and top[0].score == pytest.approx(1.0, abs=1e-5)


def _vector(mem: Memory, item_id: int):
    """The stored vector of an item, read back from the file (what a restarted process would search with)."""
    import numpy as np
    import torch

    row = mem._store.conn.execute("SELECT embedding FROM items WHERE id = ?", (item_id,)).fetchone()
    return torch.from_numpy(np.frombuffer(row[0], dtype="<f4").copy())


def run_readers_and_writers(tmp_path: Path, seconds: float, writers: int = 1) -> None:
    db = tmp_path / "memory.db"
    procs = [start("write", db, seconds) for _ in range(writers)] + [start("read", db, seconds)]
    wait_ready(*procs)
    outputs = [p.communicate(timeout=seconds + 120) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert "locked" not in err and "busy" not in err.lower(), err
        assert p.returncode == 0, err
    ids = [int(x) for out, _ in outputs[:-1] for x in out.split()]
    summary = json.loads(outputs[-1][0].strip().splitlines()[-1])
    assert len(ids) > 50 and len(set(ids)) == len(ids)
    assert summary["searches"] > 10 and summary["largest"] > 0
    with Memory(db) as mem:
        assert mem.count(USER) == len(ids) and mem.integrity_check() == "ok"


def test_reader_and_writer_processes_never_see_database_is_locked(tmp_path):
    run_readers_and_writers(tmp_path, seconds=5)


@pytest.mark.slow
def test_a_reader_and_two_writers_for_30_seconds(tmp_path):
    run_readers_and_writers(tmp_path, seconds=30, writers=2)
