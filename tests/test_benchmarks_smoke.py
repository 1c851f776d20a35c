"""Benchmarks run end to end at tiny sizes and report what they promise; the runner isolates failures.

Never asserts a time: only that the JSON has its keys, that the two sides computed the same
thing (same vectors, same model size and FLOPs), and that the runner's bookkeeping is right.
"""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch

pytest.importorskip("open_clip")

from benchmarks import run_all  # noqa: E402

ROW_KEYS = {"id", "unit", "ours", "anchor", "ratio"}
TIMING_KEYS = {"seconds", "best_seconds", "ratio_best", "ratio_paired"}


@pytest.mark.slow
def test_bench_train_tiny_reports_matching_models():
    from benchmarks.bench_train import Towers, run

    towers = Towers(width=32, layers=1, heads=2, vocab=500, context=16, embed_dim=32)
    report = run(quick=True, towers=towers, batches=(8,), rounds=1)
    assert report["benchmark"] == "B-train" and report["towers"]["width"] == 32
    (row,) = report["results"]
    assert ROW_KEYS | TIMING_KEYS | {"params", "flops_per_sample", "mfu", "mfu_best", "matmul_peak_gflops"} <= set(row)
    assert row["id"] == "B-train B=8" and row["unit"] == "samples/s"
    assert math.isclose(row["ratio"], row["ours"] / row["anchor"])
    # same tower configuration on both sides: parameter counts and FLOPs agree within 1%
    params, flops = row["params"], row["flops_per_sample"]
    assert abs(params["ours"] - params["anchor"]) / params["anchor"] < 0.01
    assert abs(flops["ours"] - flops["anchor"]) / flops["anchor"] < 0.01
    assert all(0 < v < 1 for v in row["mfu"].values())
    assert row["seconds"].keys() == {"ours", "anchor"} and row["ratio_best"] > 0 and row["ratio_paired"] > 0
    json.dumps(report)  # JSON-able as is


@pytest.mark.slow
def test_bench_embed_tiny_same_vectors_as_open_clip():
    from benchmarks.bench_embed import run

    tiny = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    report = run(quick=True, archs={"mmembed-smoke-tiny": tiny}, repeats=1)
    rows = {r["id"].removeprefix("B-embed mmembed-smoke-tiny "): r for r in report["results"]}
    assert set(rows) == {"tower image", "tower text", "embed image (from PIL)", "embed text (from str)",
                         "text at full context (info)", "own vit", "own text_transformer"}
    for r in rows.values():
        assert ROW_KEYS | TIMING_KEYS <= set(r) and r["batch"] == 32 and r["ours"] > 0 and r["anchor"] > 0
    # our open_clip towers return open_clip's vectors: same modules and weights, only positions the
    # pooled vector cannot depend on are skipped (float rounding apart); nothing is skipped at full context
    assert rows["tower image"]["max_abs_diff"] < 1e-6
    assert rows["tower text"]["max_abs_diff"] < 1e-6
    assert rows["embed text (from str)"]["max_abs_diff"] < 1e-6  # same CLIP tokenization
    assert rows["text at full context (info)"]["max_abs_diff"] == 0.0
    assert rows["embed image (from PIL)"]["max_abs_diff"] < 1e-2  # resize filters differ slightly
    assert rows["tower text"]["tokens"]["ours"] < 77  # ours is handed the batch's longest caption only
    assert rows["text at full context (info)"]["tokens"] == {"ours": 77, "anchor": 77}
    json.dumps(report)


def test_bench_sample_tiny_same_distribution_as_transformers():
    pytest.importorskip("transformers")
    from benchmarks.bench_sample import SETTINGS, run

    report = run(rounds=1, calls=1)
    rows = {r["id"]: r for r in report["results"]}
    assert set(rows) == {f"B-sample B={b} {name}" for b in (1, 8) for name in SETTINGS}
    for r in rows.values():
        assert ROW_KEYS | TIMING_KEYS | {"max_abs_prob_diff", "same_support", "kept_tokens"} <= set(r)
        assert r["same_support"] and r["max_abs_prob_diff"] < 1e-6  # both sides sample one distribution
        assert len(r["kept_tokens"]) == r["batch"]
    assert rows["B-sample B=8 T+k+p"]["kept_tokens"] <= [50] * 8 and rows["B-sample B=1 T"]["kept_tokens"] == [50257]
    json.dumps(report)


def test_bench_cache_tiny_writes_the_same_tokens_with_and_without_the_cache():
    from benchmarks.bench_cache import run

    report = run(quick=True, rounds=1)
    assert [r["id"] for r in report["results"]] == ["B-cache T=64", "B-cache T=256"]
    assert report["all_tokens_equal"] and all(r["tokens_equal"] and r["agreeing_prefix"] == 32
                                              for r in report["results"])
    for r in report["results"]:
        assert ROW_KEYS | TIMING_KEYS | {"kv_cache_bytes", "prompt_tokens"} <= set(r)
        assert r["prompt_tokens"] + r["new_tokens"] == r["sequence"]
    assert isinstance(report["speedup_grows_with_T"], bool)  # a timing: reported, never asserted
    json.dumps(report)


@pytest.mark.slow
def test_bench_ann_tiny_reports_both_sides_at_the_recall_target():
    pytest.importorskip("faiss")
    from benchmarks.bench_ann import TARGET_RECALL, run

    report = run(quick=True, n=3000, rounds=1)
    rows = {r["id"]: r for r in report["results"]}
    assert set(rows) == {f"B-ann {b} N=3000 Q={q}" for b in ("faiss_hnsw", "faiss_ivf") for q in (256, 1)}
    for r in rows.values():
        assert ROW_KEYS | TIMING_KEYS | {"param", "recall_at_10", "hits_qps", "hits_ratio", "recall_curve",
                                         "anchor_built_alike_qps", "ratio_built_alike"} <= set(r)
        assert r["unit"] == "queries/s" and math.isclose(r["ratio"], r["ours"] / r["anchor"])
        # timed at the first grid value where both sides reach the target, and not before it
        assert min(r["recall_at_10"].values()) >= TARGET_RECALL
        assert all(min(c["recall_ours"], c["recall_anchor"]) < TARGET_RECALL for c in r["recall_curve"][:-1])
        assert r["recall_curve"][-1]["param"] == next(iter(r["param"].values()))
    json.dumps(report)


@pytest.mark.slow
def test_bench_index_open_tiny_reads_the_saved_structure_and_answers_alike():
    pytest.importorskip("faiss")
    from benchmarks.bench_index_open import run

    report = run(n=3000, rounds=1)
    assert [r["backend"] for r in report["results"]] == ["faiss_hnsw", "faiss_ivf"]
    for r in report["results"]:
        assert r["same_hits"] and r["faiss_same_hits"] and r["structure_mb"] > 0
        assert math.isclose(r["ratio"], r["faiss_s"] / r["ours_s"], rel_tol=0.05)
    json.dumps(report)


def _fake_module(monkeypatch, bench_id: str, run=None, main=None) -> None:
    module = types.ModuleType(f"benchmarks.bench_{bench_id}")
    if run is not None:
        module.run = run
    if main is not None:
        module.main = main
    monkeypatch.setitem(sys.modules, module.__name__, module)


def test_run_all_records_a_failure_and_runs_the_rest(monkeypatch, tmp_path, capsys):
    def broken(quick: bool = False):
        raise RuntimeError("boom in the benchmark")

    def works(quick: bool = False):
        return {"goal": "ratio >= 1", "results": [{"id": "B-ok x", "unit": "s", "ours": 1.0, "anchor": 2.0,
                                                    "ratio": 2.0, "quick_seen": quick}]}

    def main_only():  # a benchmark without run(): its printed JSON is read back
        print(json.dumps({"id": "B-main", "ratio": 0.5, "argv": sys.argv[1:]}))

    _fake_module(monkeypatch, "zbroken", run=broken)
    _fake_module(monkeypatch, "zok", run=works)
    _fake_module(monkeypatch, "zmain", main=main_only)
    out = tmp_path / "report.json"
    report = run_all.run_all(["zbroken", "zok", "zmain"], quick=True, out=out)

    saved = json.loads(out.read_text())
    assert saved["benchmarks"].keys() == {"zbroken", "zok", "zmain"}
    failed = saved["benchmarks"]["zbroken"]
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: boom in the benchmark"
    assert "boom in the benchmark" in failed["traceback"]
    assert saved["benchmarks"]["zok"]["status"] == "ok"
    assert saved["benchmarks"]["zok"]["result"]["results"][0]["quick_seen"] is True
    assert saved["benchmarks"]["zmain"]["result"]["argv"] == ["--quick"]
    assert {"torch", "cpu_count", "date", "threads_used", "load_average"} <= set(saved["machine"])
    assert saved["quick"] is True

    table = run_all.summary_rows(report)
    assert table == [("zbroken", "FAILED", "", "RuntimeError: boom in the benchmark"),
                     ("B-ok x", "2.000", "", "ratio >= 1"), ("B-main", "0.500", "", "")]
    lines = run_all.format_table(table).splitlines()
    assert lines[0].split() == ["id", "ratio", "paired", "goal"] and len(lines) == 4
    assert lines[1].startswith("zbroken") and "FAILED" in lines[1]


def test_only_accepts_ids_and_b_prefix_and_rejects_unknown():
    valid = run_all.available()
    assert {"train", "embed", "loss"} <= set(valid)
    assert "small_real" not in valid  # needs a data folder: run on its own, or every full run failed a row
    assert run_all.parse_only("B-train, embed", valid) == ["train", "embed"]
    assert run_all.parse_only(None, valid) == valid
    with pytest.raises(SystemExit, match="unknown benchmark id.*nope.*valid: .*train"):
        run_all.parse_only("train,nope", valid)
    for nothing in (",", ""):  # ran nothing (or, "", all fifteen) and wrote an empty report over the last one
        with pytest.raises(SystemExit, match="names no benchmark"):
            run_all.parse_only(nothing, valid)


def test_an_interrupted_run_leaves_the_last_full_report_in_place(monkeypatch, tmp_path):
    def works(quick: bool = False):
        return {"results": [{"id": "B-ok", "ours": 1.0, "anchor": 2.0, "ratio": 2.0}]}

    def interrupted(quick: bool = False):
        raise KeyboardInterrupt

    _fake_module(monkeypatch, "zok", run=works)
    _fake_module(monkeypatch, "zstop", run=interrupted)
    out = tmp_path / "report.json"
    run_all.run_all(["zok"], quick=True, out=out)
    before = out.read_text()
    with pytest.raises(KeyboardInterrupt):
        run_all.run_all(["zok", "zstop"], quick=True, out=out)
    assert out.read_text() == before  # the full report stays; what the new run measured is beside it
    assert json.loads((tmp_path / "report.json.partial").read_text())["benchmarks"].keys() == {"zok"}
    for bad, message in ((tmp_path / "none.json", "cannot read a report"), (tmp_path, "cannot read a report")):
        with pytest.raises(SystemExit, match=message):
            run_all.main(["--table", str(bad)])
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(SystemExit, match="not a report of this runner"):
        run_all.main(["--table", str(tmp_path / "other.json")])
    with pytest.raises(SystemExit, match="is a folder"):
        run_all.main(["--only", "zok", "--out", str(tmp_path)])


@pytest.mark.slow
def test_bench_ddp_tiny_times_both_sides():
    from benchmarks.bench_ddp import run

    report = run(quick=True, batch=16, steps=1, scenes=80)
    (row,) = report["results"]
    assert ROW_KEYS <= set(row) and row["id"] == "B-ddp B=16" and row["unit"] == "samples/s"
    assert math.isclose(row["ratio"], row["ours"] / row["anchor"])
    assert set(row["seconds"]) == {"two_processes", "one_process_2_threads", "one_process_1_thread"}
    assert all(t > 0 for t in row["seconds"].values()) and row["scaling_efficiency"] > 0


def test_markdown_table_has_one_line_per_row_with_its_hardware_bound():
    search = {"id": "B-search N=10 Q=256", "unit": "s", "ours": 0.5, "anchor": 0.6, "ratio": 1.2, "q": 256,
              "ours_matmul_peak_pct": 88.4, "ours_bandwidth_bound_pct": 9.0}
    single = {**search, "id": "B-search N=10 Q=1", "q": 1, "ours_bandwidth_bound_pct": 71.2}
    train = {"id": "B-train", "unit": "samples/s", "ours": 1234.5, "anchor": 1200.0, "ratio": 1.03,
             "ratio_paired": 1.05, "mfu": {"ours": 0.31, "anchor": 0.30}}
    embed = {"id": "B-embed tower image", "unit": "items/s", "ours": 10.0, "anchor": 9.0, "ratio": 1.11}
    report = {"benchmarks": {"search": {"status": "ok", "result": {"results": [search, single]}},
                             "train": {"status": "ok", "result": train},
                             "embed": {"status": "ok", "result": {"rows": [embed]}},
                             "broken": {"status": "failed", "error": "x"}}}
    lines = run_all.markdown_table(report).splitlines()
    assert len(lines) == 2 + 4
    assert lines[2] == "| B-search N=10 Q=256 | 0.5 s | 0.6 s | 1.20 | 88% of matmul peak |"
    assert lines[3].endswith("| 71% of bandwidth |")
    assert lines[4] == "| B-train | 1,234 samples/s | 1,200 samples/s | 1.05 | 31% of matmul peak (MFU) |"
    assert lines[5].endswith("| 1.11 | – |")


def test_b_decode_times_bf16_on_a_copy_and_leaves_our_fp32_weights_as_they_were():
    """The same decoder serves the next batch size and the agreement check against transformers."""
    from benchmarks.bench_decode import ours_bf16
    from mmembed.decoder import Decoder

    torch.manual_seed(0)
    decoder = Decoder(64, width=32, layers=1, heads=2, max_len=256).eval()
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    row = ours_bf16(decoder, torch.randint(0, 64, (1, 8)), rounds=2, device=torch.device("cpu"))
    assert row["tokens_per_s"] > 0 and 0 <= row["tokens_same_as_fp32"] <= 1
    after = decoder.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], v) for k, v in before.items())


def test_benchmark_command_lines_refuse_what_would_hang_or_crash(tmp_path, capsys):
    """Each was a traceback after minutes of work, an empty table with exit 0, or a hang."""
    import argparse

    from benchmarks import best_of, memory_horizon, probe_lookup, probe_slots
    from benchmarks.common import count

    for main, flag in ((probe_slots.main, "--root"), (probe_lookup.main, "--root"), (best_of.main, "--world"),
                       (memory_horizon.main, "--world")):
        with pytest.raises(SystemExit, match=f"no .*jsonl.* there; pass the built-in world's folder with {flag}"):
            main([str(tmp_path), flag, str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="--distinct must be >= 1"):  # the probe's loop never ended
        probe_lookup.main([str(tmp_path), "--distinct", "0"])
    with pytest.raises(SystemExit, match=r"--history-turns \(6\) must be below --items \(6\)"):
        memory_horizon.main([str(tmp_path), "--items", "6", "--history-turns", "6"])
    for bad in ("0", "-1", "x"):  # --rounds 0 was the default, -1 a median of no timings
        with pytest.raises(argparse.ArgumentTypeError):
            count(bad)
    assert count("3") == 3
