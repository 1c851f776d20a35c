"""The load-test benchmark end to end at a tiny size: it starts `mmembed serve`, every search
succeeds, and it reports the latency percentiles it promises (never asserting a time)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")

from tests.serve.conftest import untrained_model  # noqa: E402


@pytest.mark.slow  # like the other benchmark smoke tests: run with -m slow
def test_bench_serve_tiny(tiny_world, tmp_path):
    from benchmarks.bench_serve import run

    run_dir = untrained_model(tiny_world).save(tmp_path / "run")
    report = run(quick=True, run_dir=run_dir, clients=3, searches=4)
    (row,) = report["results"]
    assert report["benchmark"] == "B-serve" and report["clients"] == 3 and report["searches_per_client"] == 4
    assert row["errors"] == 0 and row["searches"] == 12 and row["id"] == "B-serve 3x4"
    assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"] <= row["max_ms"]
    assert row["ours"] > 0 and row["anchor"] > 0 and row["ratio"] == pytest.approx(row["ours"] / row["anchor"])
    json.dumps(report)
