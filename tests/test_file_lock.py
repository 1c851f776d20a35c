"""The advisory lock belongs to the process that took it: a forked child neither holds nor keeps it."""

from __future__ import annotations

import multiprocessing
import threading

import pytest

from mmembed.errors import UserError
from mmembed.file_lock import exclusive

needs_fork = pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")


def _try_the_lock(path, asked, result, done) -> None:
    result.put("started")  # past the fork, and whatever it runs in the child
    asked.wait(60)
    try:
        with exclusive(path, str):
            result.put("took it")
    except UserError:
        result.put("refused")
    done.wait(60)  # stay alive, with whatever descriptors the fork gave this process, until told


@needs_fork
@pytest.mark.parametrize("kind", ["folder", "file"])
def test_a_forked_child_neither_keeps_nor_holds_its_parents_lock(tmp_path, kind):
    """A forked child kept the lock after its parent let go (flock belongs to the open file): a
    killed `data synth` left its render workers keeping the world's folder locked."""
    path = tmp_path / "w"
    if kind == "folder":
        path.mkdir()
    else:
        path = path / ".lock"
    ctx = multiprocessing.get_context("fork")
    asked, result, done = ctx.Event(), ctx.Queue(), ctx.Event()
    child = ctx.Process(target=_try_the_lock, args=(path, asked, result, done))
    try:
        with exclusive(path, str):
            child.start()
            assert result.get(timeout=60) == "started"
        with exclusive(path, lambda holder: f"{path} still held by {holder}"):  # free while the child lives
            assert child.is_alive()
            asked.set()
            assert result.get(timeout=60) == "refused"  # the parent holds it, the child does not
    finally:
        done.set()
        child.join(60)
        if child.is_alive():
            child.kill()
            child.join()


def test_the_lock_is_reentrant_and_exclusive_again_after_release(tmp_path):
    """Guard for the bookkeeping the fork fix changed: nesting, refusal by another taker, release."""
    path = tmp_path / ".lock"
    with exclusive(path, str):
        with exclusive(path, str):  # re-entrant in one thread
            pass
        result: list[str] = []

        def other() -> None:
            try:
                with exclusive(path, lambda holder: "busy"):
                    result.append("took it")
            except UserError as e:
                result.append(str(e))

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(60)
        assert result == ["busy"]  # still held after the inner block left
    with exclusive(path, str):
        pass
