"""`mmembed train-queries` (and `mmembed chat`'s plumbing): refusals come before the work."""

from __future__ import annotations

import os
from pathlib import Path

import mmembed as mm
import mmembed.train.queries as queries
from mmembed.cli import main
from mmembed.train.queries import QUERY_WEIGHTS
from tests.conftest import tiny_model


def test_train_queries_on_a_run_it_cannot_write_is_refused_before_training(tiny_world, tmp_path, monkeypatch, capsys):
    """It trained fully (75 s at the default steps), then failed on "query_tower.json: Read-only file system"."""
    run = tmp_path.resolve() / "run"
    model = tiny_model(0)
    model.config.data.root = str(tiny_world)
    model.save(run)
    real_access = os.access  # root passes every os.access: the read-only run is simulated

    def trained(*args, **kwargs):
        raise AssertionError("the query tower was trained")

    monkeypatch.setattr(queries, "train_query_tower", trained)
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != run and real_access(path, mode))
    assert main(["train-queries", str(run), "--steps", "3", "--episode-size", "8"]) == 2
    err = capsys.readouterr().err
    assert err == f"mmembed: error: {run / QUERY_WEIGHTS}: {run} cannot be written (read-only, or no permission)\n"
    assert not (run / QUERY_WEIGHTS).exists()


def _in_thread(work):
    """What `work()` returned or raised, run in another thread: the run folder's lock is refused to
    another thread as to another process."""
    import threading

    result = {}

    def target():
        try:
            result["value"] = work()
        except Exception as e:  # the test asserts what it was
            result["error"] = e
    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    return result


def _run_of_world(tiny_world, run):
    model = tiny_model(0)
    model.config.data.root = str(tiny_world)
    model.save(run)
    return (run / "model.safetensors").read_bytes()


def _while_training(monkeypatch, meanwhile):
    """train_query_tower that calls `meanwhile()` (once) before it trains: what another process did then."""
    real, seen, started = queries.train_query_tower, [], []

    def train(*args, **kwargs):
        if not started:  # once: on the old code, a second train-queries in `meanwhile` trained too
            started.append(True)
            seen.append(meanwhile())
        return real(*args, **kwargs)
    monkeypatch.setattr(queries, "train_query_tower", train)
    return seen


COMMAND = ["--steps", "2", "--episode-size", "8"]


def test_a_trainer_cannot_clear_the_run_while_its_query_tower_trains(tiny_world, tmp_path, monkeypatch):
    """`mmembed train RUN --overwrite` ran beside train-queries: the fresh run was then paired with a
    tower of the old space, and mm.load refused it ("trained for another space")."""
    from mmembed.errors import UserError
    from mmembed.train.run_dir import prepare_run_dir

    run = tmp_path / "run"
    weights = _run_of_world(tiny_world, run)
    seen = _while_training(monkeypatch, lambda: _in_thread(
        lambda: prepare_run_dir(run, resume=False, overwrite=True)))
    assert main(["train-queries", str(run), *COMMAND]) == 0
    assert isinstance(seen[0].get("error"), UserError) and "is in use" in str(seen[0]["error"])
    assert (run / "model.safetensors").read_bytes() == weights
    assert mm.load(run).query_tower is not None


def test_a_second_train_queries_is_refused_while_the_first_trains(tiny_world, tmp_path, monkeypatch, capsys):
    """Two train-queries at once, without --overwrite, both said "saved": the second tower replaced the first."""
    run = tmp_path / "run"
    _run_of_world(tiny_world, run)
    seen = _while_training(monkeypatch, lambda: _in_thread(lambda: main(["train-queries", str(run), *COMMAND])))
    assert main(["train-queries", str(run), *COMMAND]) == 0
    assert seen[0] == {"value": 2}
    err = capsys.readouterr().err
    assert f"mmembed: error: {run} is in use (pid {os.getpid()}: a trainer, or another train-queries)" in err


def test_a_space_replaced_while_the_tower_trained_gets_no_tower(tiny_world, tmp_path, monkeypatch, capsys):
    """Weights written over the run meanwhile (without the lock: `Model.save`) were paired with a tower of
    the old space, and the run no longer loaded."""
    run = tmp_path / "run"
    _run_of_world(tiny_world, run)
    _while_training(monkeypatch, lambda: tiny_model(1).save(run))
    assert main(["train-queries", str(run), *COMMAND]) == 2
    assert "model.safetensors was replaced since train-queries read it" in capsys.readouterr().err
    assert not (run / QUERY_WEIGHTS).exists()
    assert mm.load(run).query_tower is None

