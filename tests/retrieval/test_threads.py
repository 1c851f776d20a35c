"""An `Index` shared between threads: its calls run one at a time, under its lock."""

from __future__ import annotations

import os
import pickle
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from copy import deepcopy
from typing import Any

import pytest
import torch

from mmembed.retrieval import Index

D = 32


def unit(n: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, D, generator=torch.Generator().manual_seed(seed)), dim=1)


class _Overlaps:
    """Wraps a backend's search and counts the searches that began while another was running. Such a
    search is refused, not run: two at once crashed a FAISS index, and this test's process with it."""

    def __init__(self, search: Any) -> None:
        self.search, self.running, self.count = search, threading.Lock(), 0

    def __call__(self, *args: Any) -> Any:
        if not self.running.acquire(blocking=False):
            self.count += 1
            raise RuntimeError("a second search inside the backend")
        try:
            time.sleep(0.0005)  # a window for a racing search to fall into
            return self.search(*args)
        finally:
            self.running.release()


@pytest.mark.parametrize("backend", ["faiss_hnsw", "sq8"])
def test_threads_searching_right_after_an_add_get_every_answer_right(backend):
    """Searches synced the backend in several threads at once: FAISS crashed the process, sq8 gave wrong hits."""
    if backend.startswith("faiss"):
        pytest.importorskip("faiss")
    data, index, barrier = unit(600, 0), Index(D, backend=backend), threading.Barrier(4)
    index._backend.search = overlaps = _Overlaps(index._backend.search)
    answers: list[tuple[int, Any]] = []
    for end in range(200, 601, 200):
        index.add(data[end - 200:end], "image")

        def search(first: int) -> list[tuple[int, Any]]:
            barrier.wait()  # every thread's first search comes right after the add, when the backend syncs
            out = []
            for i in range(first, end, 20):
                try:
                    out.append((i, int(index.search_ids(data[i], k=1)[0])))
                except RuntimeError as e:
                    out.append((i, str(e)))
            return out

        with ThreadPoolExecutor(4) as pool:
            answers += [a for found in pool.map(search, range(4)) for a in found]
    assert overlaps.count == 0
    assert [i for i, got in answers if got != i] == []


def test_threads_adding_get_distinct_ids_holding_their_own_vector_and_metadata():
    """Two adds at once gave duplicate ids, and ids holding another item's vector or metadata."""
    data, index = unit(600, 1), Index(D)
    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(lambda i: index.add(data[i], "image", {"n": i})[0], range(600)))
    assert len(set(ids)) == len(index) == 600
    assert [i for i, item in enumerate(ids) if index.metadata(item) != {"n": i}] == []
    assert [i for i, item in enumerate(ids) if not torch.equal(index.vector(item), data[i])] == []


def test_a_save_while_another_thread_adds_writes_a_folder_that_loads(tmp_path):
    """A save during an add wrote vectors and a header of different counts: the load refused the folder."""
    data, index = unit(4000, 2), Index(D)
    index.add(data[:500], "image", [{"n": i} for i in range(500)])
    done = threading.Event()

    def add() -> None:
        for start in range(500, 4000, 25):
            if done.is_set():
                return
            index.add(data[start:start + 25], "image", [{"n": i} for i in range(start, start + 25)])

    adder = threading.Thread(target=add)
    adder.start()
    try:
        for _ in range(5):
            index.save(tmp_path / "index")
            back = Index.load(tmp_path / "index")
            assert [i for i in back.ids() if back.metadata(i) != {"n": i}] == []
            assert torch.equal(back.items()[0], data[:len(back)])
    finally:
        done.set()
        adder.join()


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_index_has_a_lock_of_its_own_and_finds_its_new_rows(how):
    """A copy's id lookup kept a copy of the original's ids: rows added after a compaction got stale ids."""
    data, index = unit(200, 4), Index(D)
    index.add(data[:100], "image")
    index.remove(range(0, 100, 2))  # compacts: ids are no longer rows
    copy = (lambda i: pickle.loads(pickle.dumps(i))) if how == "pickle" else deepcopy
    twin = copy(index)
    twin.add(data[100:110], "text")
    assert twin.search_ids(data[100:110], k=1)[0].squeeze(1).tolist() == list(range(100, 110))
    assert len(index) == 50 and len(twin) == 60
    with index._lock:  # held by this thread: another thread still uses the copy
        searcher = threading.Thread(target=lambda: twin.search(data[0]))
        searcher.start()
        searcher.join(5)
    assert not searcher.is_alive()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_while_another_thread_holds_the_lock_can_use_the_index():
    """A fork copies a lock another thread holds as held, and the child's first call would wait for ever."""
    index, held, release = Index(D), threading.Event(), threading.Event()
    index.add(unit(4, 5), "image")

    def hold() -> None:
        with index._lock:
            held.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(5)
    try:
        pid = os.fork()
        if pid == 0:  # the child: no pytest here, only an exit status
            os._exit(0 if index.ids() == [0, 1, 2, 3] else 1)
        for _ in range(200):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.025)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = -1
    finally:
        release.set()
        holder.join()
    assert status == 0


class _EqIndex(Index):
    def __eq__(self, other: object) -> bool:  # makes its objects unhashable: a WeakSet of indexes refused them
        return isinstance(other, _EqIndex) and self.dim == other.dim


class _Slotted(Index):
    __slots__ = ("extra",)


@pytest.mark.parametrize("how", ["copy", "pickle"])
def test_subclasses_with_eq_or_slots_are_built_copied_and_pickled(how):
    """The lock's bookkeeping refused an Index subclass defining __eq__ (unhashable), and a copy or
    pickle dropped a __slots__ subclass's slot values."""
    import copy

    twin = (lambda x: copy.deepcopy(x)) if how == "copy" else (lambda x: pickle.loads(pickle.dumps(x)))
    eq = _EqIndex(D)
    eq.add(unit(3, 0), "image")
    assert twin(eq).ids() == [0, 1, 2]
    slotted = _Slotted(D)
    slotted.extra = 42
    slotted.add(unit(3, 0), "image")
    again = twin(slotted)
    assert again.extra == 42 and again.ids() == [0, 1, 2] and again._lock is not slotted._lock


def test_a_bad_k_or_target_is_refused_before_the_query_is_read_or_embedded():
    """Since the lock, a bad query's error came first, and a Query was embedded (a model run) before
    `k=0` or an unknown target was refused."""
    from mmembed.retrieval import Query

    index = Index(D)
    index.add(unit(3, 0), "image")

    class Refuses:  # any embedding is a failure of this test
        def embed(self, *a: Any, **k: Any) -> None:
            pytest.fail("the query was embedded before its arguments were checked")

    for kwargs, error in (({"k": 0}, "k must be a positive int"), ({"target": "bogus"}, "bogus")):
        with pytest.raises(ValueError, match=error):
            index.search(torch.randn(D + 1), **kwargs)
        with pytest.raises(ValueError, match=error):
            index.search(Query(text="hi"), model=Refuses(), **kwargs)


def test_a_copy_of_an_index_holds_items_of_its_own():
    """`copy.copy` shared the original's store and backend under a lock of its own: an `add` to the
    copy changed the original, and threads on the two raced (1,350 broadcast and size errors in 15 s)."""
    import copy

    index = Index(D)
    index.add(unit(3, 0), "image", [{"g": 1}] * 3)
    twin = copy.copy(index)
    twin.add(unit(2, 1), "text")
    twin.remove([0])
    assert len(index) == 3 and index.ids() == [0, 1, 2] and len(twin) == 4
    assert twin._lock is not index._lock
    ids, _ = index.search_ids(unit(1, 0), k=3, filter={"g": 1})
    assert sorted(ids[0].tolist()) == [0, 1, 2]
