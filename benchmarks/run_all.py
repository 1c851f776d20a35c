"""Run every benchmark and write one JSON report.

    python -m benchmarks.run_all                       # full sizes (tens of minutes on 2 cores)
    python -m benchmarks.run_all --quick               # small sizes, a few minutes
    python -m benchmarks.run_all --only train,embed    # some of them (ids: the `bench_<id>.py` names)
    python -m benchmarks.run_all --out benchmarks/results/report.json
    python -m benchmarks.run_all --only loss,train,embed,search,ann,decode,cache,sample --markdown   # README's table

Each `benchmarks/bench_<id>.py` module is imported and its `run(quick=...)` called (a module
without `run` has its `main()` run with `--quick` on the command line, and the JSON it prints is
read back). A benchmark that fails is recorded with its error and traceback; the others still
run. One that needs an optional extra which is not installed (faiss, transformers, ...) is
recorded as skipped, with the reason, and does not make the exit status 1. The report holds the
machine (torch version, threads, CPU count, load average, date) and, per benchmark, its status,
wall time and result. A summary table (id, ratio, goal) is printed at the end; `ratio` > 1 always
means ours is better. `--markdown` also prints the README's
Performance table (benchmark, ours, anchor, ratio, % of the hardware bound); `--table REPORT`
prints it from a saved report without running anything.

A row that checks its result against the anchor's carries `correct` and the rule it was judged by,
`correct_if` (a tolerance such as "max_abs_diff <= 1e-06"). A row with `correct` False is WRONG:
both tables print "WRONG" beside its ratio, the report lists it under the benchmark's `wrong`,
and the exit status is 1, as for a benchmark that failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import io
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from mmembed.checkpoint import atomic_write_json

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "report.json"


# packages of the optional extras: a benchmark that cannot import one is skipped, not failed (as
# B-token skips its tiktoken side); any other import error is a failure
OPTIONAL = {"faiss", "transformers", "tiktoken", "fastapi", "httpx", "uvicorn"}

# run on their own, with arguments the runner cannot give: B-small-real needs the words set
# (`python -m benchmarks.words_set DIR`) and trains for 5 minutes a side
STANDALONE = {"small_real"}


def available() -> list[str]:
    """Benchmark ids: the `<id>` of every `benchmarks/bench_<id>.py` but the standalone ones, sorted."""
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py")
                  if p.stem.removeprefix("bench_") not in STANDALONE)


def parse_only(only: str | None, valid: list[str]) -> list[str]:
    """`"train,B-embed"` -> ["train", "embed"]; an unknown id is an error listing the valid ones."""
    if only is None:
        return valid
    wanted = [w.strip().lower().removeprefix("b-") for w in only.split(",") if w.strip()]
    if not wanted:  # "--only ," or "--only ''" ran nothing (or all) and wrote an empty report
        raise SystemExit(f"--only names no benchmark; valid: {', '.join(valid)}")
    unknown = [w for w in wanted if w not in valid]
    if unknown:
        raise SystemExit(f"unknown benchmark id(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return wanted


def machine() -> dict[str, Any]:
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads_default": torch.get_num_threads(),
        "threads_used": 2,  # every benchmark calls common.setup(threads=2) (B-token: 1)
        "load_average": _load(),
    }


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not on every platform
        return None


def run_one(bench_id: str, quick: bool) -> dict[str, Any]:
    """Import and run one benchmark; failures (and skips for a missing optional extra) are caught and
    returned, never raised."""
    entry: dict[str, Any] = {"load_average_before": _load()}
    t0 = time.perf_counter()
    try:
        module = importlib.import_module(f"benchmarks.bench_{bench_id}")
        if hasattr(module, "run"):
            result = module.run(quick=quick)
        else:
            result = _run_main(module, quick)
            entry["note"] = "module has no run(quick); its main() was run and its printed JSON read"
        entry.update(status="ok", result=result)
        wrong = wrong_rows(result)
        if wrong:
            entry["wrong"] = wrong
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # a benchmark calling sys.exit must not end the whole run either
        missing = (e.name or "").split(".")[0] if isinstance(e, ModuleNotFoundError) else None
        if missing in OPTIONAL:
            entry.update(status="skipped", reason=f"{missing} is not installed (an optional extra)")
        else:
            entry.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=8))
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    return entry


def wrong_rows(result: Any) -> list[str]:
    """Ids of the rows whose own check (`correct`) failed; a row without one is not counted."""
    return [str(r["id"]) for r in _find_rows(result) if r.get("correct") is False]


def _run_main(module, quick: bool) -> Any:
    if not hasattr(module, "main"):
        raise AttributeError(f"{module.__name__} has neither run(quick) nor main()")
    out = io.StringIO()
    argv = sys.argv
    sys.argv = [module.__name__] + (["--quick"] if quick else [])
    try:
        with contextlib.redirect_stdout(out):
            module.main()
    finally:
        sys.argv = argv
    return json.loads(out.getvalue())


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(id, ratio, paired ratio, goal) for every result row of every benchmark; a failure gets one
    row. The paired ratio (median over rounds of back-to-back calls) is shown where a benchmark
    reports it: on a busy machine it is the steadier of the two."""
    rows = []
    for bench_id, entry in report["benchmarks"].items():
        if entry["status"] == "skipped":
            rows.append((bench_id, "skipped", "", entry["reason"]))
            continue
        if entry["status"] != "ok":
            rows.append((bench_id, "FAILED", "", entry["error"].splitlines()[0][:100]))
            continue
        result = entry["result"]
        goal = result.get("goal", "") if isinstance(result, dict) else ""
        found = list(_find_rows(result))
        if not found:
            rows.append((bench_id, "-", "", str(goal)))
        for r in found:
            rows.append((str(r["id"]), _num(r.get("ratio")) + _mark(r), _num(r.get("ratio_paired", "")),
                         _goal(r, goal)))
    return rows


def _mark(row: dict[str, Any]) -> str:
    """The mark after the ratio of a row whose result failed its own check ("WRONG"), else nothing."""
    return " WRONG" if row.get("correct") is False else ""


def _goal(row: dict[str, Any], goal: Any) -> str:
    text = str(row.get("goal", goal))
    if row.get("correct") is False:
        return f"WRONG (correct if {row.get('correct_if') or 'its check holds'}); {text}"
    return text


def _num(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, (int, float)) else str(x)


def _find_rows(obj: Any):
    """Every dict with an `id` and a `ratio` (a `common.ratio_report` row), depth first."""
    if isinstance(obj, dict):
        if "id" in obj and "ratio" in obj:
            yield obj
            return
        for v in obj.values():
            yield from _find_rows(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _find_rows(v)


def format_table(rows: list[tuple[str, ...]]) -> str:
    header = ("id", "ratio", "paired", "goal")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}  {d}" for a, b, c, d in [header, *rows])


def hardware_bound(row: dict[str, Any]) -> str:
    """Ours as a % of the hardware bound, where the benchmark measures one: the fp32 matmul peak
    for compute-bound work, the memory bandwidth for work that streams its data once."""
    if "ours_matmul_peak_pct" in row:  # B-search: one query streams the rows, many are a matmul
        if row.get("q", 1) == 1:
            return f"{row['ours_bandwidth_bound_pct']:.0f}% of bandwidth"
        return f"{row['ours_matmul_peak_pct']:.0f}% of matmul peak"
    if "peak_fraction" in row:
        return f"{100 * row['peak_fraction']:.0f}% of matmul peak"
    if isinstance(row.get("mfu"), dict):
        return f"{100 * row['mfu']['ours']:.0f}% of matmul peak (MFU)"
    if "fraction_of_bound" in row:
        return f"{100 * row['fraction_of_bound']:.0f}% of bandwidth"
    return "–"


def markdown_table(report: dict[str, Any]) -> str:
    """The README's Performance table: one line per result row of every benchmark that ran."""
    lines = ["| benchmark | ours | anchor | ratio (> 1: ours better) | ours vs hardware bound |",
             "|---|---:|---:|---:|---|"]
    for entry in report["benchmarks"].values():
        if entry["status"] != "ok":
            continue
        for r in _find_rows(entry["result"]):
            unit = r.get("unit", "")
            ratio = r.get("ratio_paired", r["ratio"])
            lines.append(f"| {r['id']} | {_fig(r['ours'])} {unit} | {_fig(r['anchor'])} {unit} "
                         f"| {ratio:.2f}{_mark(r)} | {hardware_bound(r)} |")
    return "\n".join(lines)


def _fig(x: Any) -> str:
    if not isinstance(x, (int, float)):
        return str(x)
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def run_all(ids: list[str], quick: bool, out: Path | None) -> dict[str, Any]:
    """Run the benchmarks `ids` in order; write the report to `out` (atomically) when given.

    Until the last one has run, the report so far goes to `<out>.partial` (a long run interrupted
    late keeps what it measured); `out` itself is replaced only by a finished run, so an
    interrupted one never takes the place of the last full report."""
    report: dict[str, Any] = {"quick": quick, "machine": machine(), "benchmarks": {}}
    partial = None if out is None else out.with_name(out.name + ".partial")
    t0 = time.perf_counter()
    for bench_id in ids:
        print(f"[run_all] {bench_id} ...", file=sys.stderr, flush=True)
        entry = run_one(bench_id, quick)
        report["benchmarks"][bench_id] = entry
        wrong = f", WRONG: {', '.join(entry['wrong'])}" if entry.get("wrong") else ""
        print(f"[run_all] {bench_id}: {entry['status']} in {entry['seconds']} s{wrong}", file=sys.stderr, flush=True)
        if partial is not None:
            _write(partial, report)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["load_average_after"] = _load()
    if out is not None:
        _write(out, report)
        partial.unlink(missing_ok=True)
    return report


def _read_report(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SystemExit(f"--table {path}: cannot read a report ({type(e).__name__}: {e})") from None
    if not isinstance(report, dict) or not isinstance(report.get("benchmarks"), dict):
        raise SystemExit(f"--table {path}: not a report of this runner (no 'benchmarks')")
    return report


def _check_out(out: Path) -> None:
    """SystemExit (one line) unless the report's folder exists or can be made, and takes a file: a
    bad --out was a traceback after the first benchmark, whose result it lost."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as e:
        raise SystemExit(f"--out {out}: cannot write a report there ({type(e).__name__}: {e})") from None


def _write(out: Path, report: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, json.loads(json.dumps(report, default=str)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a few minutes in all)")
    parser.add_argument("--only", help=f"comma-separated ids among: {', '.join(available())}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report path (default {DEFAULT_OUT})")
    parser.add_argument("--markdown", action="store_true", help="also print the README's Performance table")
    parser.add_argument("--table", type=Path, metavar="REPORT", help="print the Performance table of a saved report")
    args = parser.parse_args(argv)
    if args.table is not None:
        print(markdown_table(_read_report(args.table)))
        return 0
    if args.out.is_dir():  # found after the first benchmark had run
        raise SystemExit(f"--out {args.out} is a folder: give the report's file name")
    _check_out(args.out)
    report = run_all(parse_only(args.only, available()), args.quick, args.out)
    print(format_table(summary_rows(report)))
    if args.markdown:
        print("\n" + markdown_table(report))
    print(f"\nreport: {args.out} ({report['seconds']} s)")
    failed = [k for k, v in report["benchmarks"].items() if v["status"] == "failed"]  # skipped ones are not
    wrong = [row for v in report["benchmarks"].values() for row in v.get("wrong", [])]
    if wrong:
        print(f"WRONG results (their ratios mean nothing): {', '.join(wrong)}", file=sys.stderr)
    return 1 if failed or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
