"""Timing helpers shared by the benchmarks: warm-up, median of repeats, hardware peaks.

Every benchmark runs ours and the anchor in the same process, on 2 threads, and reports ratios;
absolute times on a shared machine are noise, ratios measured side by side are not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from encoders.linear import linear

if TYPE_CHECKING:
    from mmembed.model import Model


def require_world(folder: Path, names: Sequence[str], flag: str, any_of: bool = False) -> None:
    """SystemExit (one line) unless `folder` holds the built-in world's `names` (or one of them,
    `any_of`): a missing world was a KeyError, a FileNotFoundError or an empty table."""
    found = [n for n in names if (Path(folder) / n).is_file()]
    if (found if any_of else len(found) == len(names)):
        return
    wanted = " or ".join(names) if any_of else ", ".join(n for n in names if n not in found)
    raise SystemExit(f"{folder}: no {wanted} there; pass the built-in world's folder with {flag} "
                     "(`mmembed demo` writes data/shapes; run from the folder it ran in)")


def require_run(run: str | Path, flag: str = "") -> Path:
    """SystemExit (one line) unless `run` is a run folder (config.yaml and model.safetensors there;
    `flag` names the option that gave it): a wrong or missing one was a traceback from the loader,
    after the imports and any work before it (bench_serve: a config error about "shipped configs")."""
    path = Path(run)
    if not path.is_dir():
        why = "is a file, not a run folder" if path.exists() else "no such folder"
    else:
        missing = [n for n in ("config.yaml", "model.safetensors") if not (path / n).is_file()]
        if not missing:
            return path
        why = f"no {' or '.join(missing)} there, not a run folder"
    given = f"{flag} {path}" if flag else str(path)
    raise SystemExit(f"{given}: {why}; pass a trained run's folder (`mmembed train` or `mmembed demo` writes one, "
                     "e.g. runs/demo)")


def load_run(run: str | Path) -> Model:
    """`mm.load(run)`, its user errors (a truncated or corrupt checkpoint, a bad config) as one line."""
    import mmembed as mm
    from mmembed.errors import UserError

    try:
        return mm.load(run)
    except UserError as e:
        raise SystemExit(f"{run}: {e}") from None


def modality_name(text: str) -> str:
    """argparse type of a modality name (`--modalities image audio`): an unknown one is refused
    before the model loads (it was a ValueError traceback after the loading)."""
    from mmembed.modality import Modality

    try:
        return Modality.parse(text).value
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def setup(threads: int = 2, seed: int = 0) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak_flops(n: int = 2048, dtype: torch.dtype = torch.float32, repeats: int = 3) -> float:
    """Measured dense matmul throughput (FLOP/s) on this machine, now: the MFU denominator. The
    faster of torch's `@` (MKL on the CPU) and oneDNN's product (`encoders.linear`): on AMD CPUs
    MKL takes a generic path at about half of oneDNN's rate."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    with torch.no_grad():
        best = min(median_time(lambda: a @ b, repeats=repeats), median_time(lambda: linear(a, b), repeats=repeats))
    return 2 * n**3 / best


def memory_bandwidth(n_bytes: int = 1 << 30, repeats: int = 3, device: torch.device | str = "cpu") -> float:
    """Measured read bandwidth (bytes/s): a sum over a large fp32 buffer on `device`."""
    x = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)
    if x.device.type == "cuda":
        return n_bytes / median_time(lambda: x.sum().item(), repeats=max(repeats, 10))
    return n_bytes / median_time(lambda: x.sum(), repeats=repeats)


def ratio_report(name: str, ours: float, anchor: float, unit: str, higher_is_better: bool,
                 correct: bool | None = None, correct_if: str = "", **extra) -> dict:
    """One benchmark row. `ratio` > 1 always means ours is better.

    `correct`: whether ours computed what the anchor did, by the rule `correct_if` (the check and
    its tolerance, in words, e.g. "max_abs_diff <= 1e-06"). A row with `correct` False is marked
    WRONG by the runner, which then exits 1: a ratio of a wrong result means nothing. A row that
    checks nothing (an informational one) leaves both out."""
    ratio = ours / anchor if higher_is_better else anchor / ours
    row = {"id": name, "unit": unit, "ours": ours, "anchor": anchor, "ratio": ratio}
    if correct is not None:
        row.update(correct=bool(correct), correct_if=correct_if)
    return {**row, **extra}


def count(text: str) -> int:
    """argparse type of a count of rounds, repeats or clients: an integer >= 1 (0 or -1 ended the
    run in a median of no timings, or was read as the default)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def rounds_main(run: Callable[..., dict], doc: str, quick_help: str) -> None:
    """A benchmark module's command line: `--quick` and `--rounds N`, then `run`'s JSON on stdout."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--rounds", type=count, default=None, help="timed rounds (default: the benchmark's own)")
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick, rounds=args.rounds), indent=2))


def quick_main(run: Callable[..., dict], doc: str, quick_help: str) -> None:
    """A benchmark module's command line with `--quick` alone, then `run`'s JSON on stdout."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    print(json.dumps(run(quick=parser.parse_args().quick), indent=2))
