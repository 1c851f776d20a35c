"""`mmembed train-queries` (and `mmembed chat`'s plumbing): refusals come before the work."""

from __future__ import annotations

import os
from pathlib import Path

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
