"""Several processes opening one new memory file at the same moment all succeed (each turns the
file to WAL; SQLite refuses all but one of those requests at once, without waiting)."""

import multiprocessing as mp

from mmembed.memory.store import Store

PROCESSES, TRIALS = 8, 20


def _open(path, barrier, results) -> None:
    barrier.wait()
    try:
        Store(path, 16, "fingerprint")
        results.put("ok")
    except Exception as e:  # reported to the parent, which fails the test
        results.put(f"{type(e).__name__}: {e}")


def test_processes_opening_a_new_file_together_never_see_database_is_locked(tmp_path):
    ctx = mp.get_context("fork")
    failures = []
    for trial in range(TRIALS):  # the race is lost in a few percent of trials: repeat it
        path = tmp_path / f"memory-{trial}.db"
        barrier, results = ctx.Barrier(PROCESSES), ctx.Queue()
        procs = [ctx.Process(target=_open, args=(path, barrier, results)) for _ in range(PROCESSES)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        failures += [f"trial {trial}: {o}" for o in outcomes if o != "ok"]
    assert not failures, failures[:3]
    store = Store(tmp_path / "memory-0.db", 16, "fingerprint")
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
