"""A benchmark whose result is wrong must fail the run, and its checks must be able to tell.

Never asserts a time: only the verdicts (`correct`, the WRONG mark, the exit status), the recall
figures and the argument handling.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("open_clip")

from benchmarks import run_all  # noqa: E402


@pytest.fixture
def quick_loss(monkeypatch):
    """B-loss at --quick sizes, without its 2048² peak measurement (a constant stands in)."""
    import benchmarks.bench_loss as bench_loss

    monkeypatch.setattr(bench_loss, "matmul_peak_flops", lambda: 1e11)
    return bench_loss


def test_a_wrong_loss_is_marked_wrong_and_fails_the_run(quick_loss, monkeypatch, tmp_path, capsys):
    """A loss with twice the logit scale printed its ratio, status ok and exit 0."""
    right = quick_loss.ContrastiveLoss

    class Wrong(right):
        def __call__(self, z, present, scale):
            return super().__call__(z, present, scale * 2)

    monkeypatch.setattr(quick_loss, "ContrastiveLoss", Wrong)
    out = tmp_path / "report.json"
    assert run_all.main(["--only", "loss", "--quick", "--out", str(out), "--markdown"]) == 1
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["benchmarks"]["loss"]
    ids = [r["id"] for r in rows["result"]["results"]]
    assert ids == ["B-loss B=256", "B-loss B=256 missing=10%"]
    assert all(r["correct"] is False and r["correct_if"] == "max_abs_diff <= 1e-06" for r in rows["result"]["results"])
    assert rows["wrong"] == ids
    table = [line for line in printed.splitlines() if line.startswith("| B-loss")]
    assert len(table) == 2 and all(" WRONG |" in line for line in table)
    summary = [line for line in printed.splitlines() if line.startswith("B-loss")]
    assert len(summary) == 2 and all("WRONG" in line for line in summary)


def test_a_right_loss_passes_and_is_not_marked(quick_loss, tmp_path, capsys):
    """A correct run keeps exit 0 and no mark: the real loss was never checked against a tolerance."""
    out = tmp_path / "report.json"
    assert run_all.main(["--only", "loss", "--quick", "--out", str(out), "--markdown"]) == 0
    assert "WRONG" not in capsys.readouterr().out
    entry = json.loads(out.read_text())["benchmarks"]["loss"]
    assert "wrong" not in entry and all(r["correct"] is True for r in entry["result"]["results"])
    assert run_all.main(["--table", str(out)]) == 0 and "WRONG" not in capsys.readouterr().out


def test_every_checked_benchmark_states_its_verdict_and_rule():
    """Rows of loss, embed, search, cache, sample, token, decode, ann and serve carried no verdict."""
    from benchmarks.common import ratio_report

    row = ratio_report("B-x", 1.0, 2.0, "s", higher_is_better=False, correct=False, correct_if="x <= 1")
    assert row["correct"] is False and row["correct_if"] == "x <= 1" and row["ratio"] == 2.0
    assert "correct" not in ratio_report("B-info", 1.0, 2.0, "s", higher_is_better=False)  # an info row
    report = {"benchmarks": {"x": {"status": "ok", "result": {"results": [row]}}}}
    assert run_all.summary_rows(report)[0][1] == "2.000 WRONG"
    assert "| 2.00 WRONG |" in run_all.markdown_table(report)


def _search_case(monkeypatch, n_q: int, every: int = 0) -> dict:
    """One B-search case on 2,000 rows; the sq8 path drops its last id on every `every`-th single query."""
    pytest.importorskip("faiss")
    import faiss

    from benchmarks import bench_search as bs
    from mmembed.retrieval import Index
    from mmembed.retrieval.quantized import Int8Codes

    monkeypatch.setattr(bs, "PEAK_N", 64)
    monkeypatch.setattr(bs, "RECALL_QUERIES", 200, raising=False)
    if every:
        scan, calls = bs.scan_or_exact, [0]

        def lossy(codes, x, q, k, *rest):
            scores, ids = scan(codes, x, q, k, *rest)
            if q.shape[0] == 1:
                calls[0] += 1
                if calls[0] % every == 0:
                    ids = ids.clone()
                    ids[0, -1] = -1  # a neighbour missed
            return scores, ids

        monkeypatch.setattr(bs, "scan_or_exact", lossy)
    faiss.omp_set_num_threads(1)
    x = bs.unit_rows(2000, seed=3)
    flat = faiss.IndexFlatIP(bs.D)
    flat.add(x.numpy())
    index = Index(bs.D)
    index.add(x, "image")
    codes = Int8Codes()
    codes.sync(x, version=0)
    return bs.bench_case(x, x.half(), codes, flat, index, n_q, 1)


def test_single_query_recall_is_measured_over_many_queries(monkeypatch):
    """The Q=1 recalls came from the one timed query: 10 ids, 0.0, 0.1, ... 1.0, blind to 0.99."""
    torch.manual_seed(0)
    row = _search_case(monkeypatch, n_q=1, every=4)
    # one single query in four loses one of its ten ids: 1 - 1/40, over 200 queries one per call
    assert row["sq8_recall_vs_fp32"] == pytest.approx(0.975)
    assert row["recall_vs_faiss"] == 1.0 and row["fp16_recall_vs_fp32"] >= 0.99
    assert row["correct"] is False and "sq8_recall_vs_fp32 >= 0.99" in row["correct_if"]


def test_batched_sq8_reports_no_recall_of_the_exact_path(monkeypatch):
    """At Q=256 sq8 runs exact_topk, so its recall was 1.0 by construction yet reported as sq8's."""
    row = _search_case(monkeypatch, n_q=256)
    assert "sq8_recall_vs_fp32" not in row and row["sq8_path"].startswith("exact")
    assert row["recall_vs_faiss"] == 1.0 and row["correct"] is True


def test_bench_serve_counts_default_clients_before_refusing_too_few_searches(tmp_path):
    """`--searches 1` was refused although the default 20 clients make 20 searches."""
    from benchmarks import bench_serve

    nowhere = str(tmp_path / "nowhere")
    for argv in (["--searches", "1"], ["--quick", "--searches", "1"], ["--clients", "1"]):
        # past the count check: the missing run folder is what stops it, before any server starts
        with pytest.raises(SystemExit, match="no such folder"):
            bench_serve.main([*argv, "--run", nowhere])
    with pytest.raises(SystemExit) as refused:
        bench_serve.main(["--clients", "1", "--searches", "1", "--run", nowhere])
    assert refused.value.code == 2  # argparse's error: one search gives no percentiles


def test_b_sample_flags_a_slightly_wrong_temperature_and_passes_the_real_one(monkeypatch):
    """A distribution off by 1% in temperature still printed its steps/s ratio unmarked."""
    pytest.importorskip("transformers")
    from benchmarks import bench_sample

    rows = bench_sample.run(rounds=1, calls=1)["results"]
    assert all(r["correct"] is True for r in rows)
    real = bench_sample.distribution
    monkeypatch.setattr(bench_sample, "distribution", lambda logits, s: real(logits / 1.01, s))
    rows = bench_sample.run(rounds=1, calls=1)["results"]
    assert all(r["correct"] is False for r in rows)
    assert rows[0]["correct_if"] == "same_support and max_abs_prob_diff <= 1e-06"
