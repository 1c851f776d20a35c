"""B-open: a saved approximate index's first search in a fresh process (what `mmembed search` does).

    python -m benchmarks.bench_index_open            # N = 100k, D = 512
    python -m benchmarks.bench_index_open --quick    # N = 20k

Prints one JSON object. Rows of B-ann's embedding-like mixture; per backend (faiss_hnsw,
faiss_ivf with our defaults) the index is built once and saved, then each contestant runs in a
fresh Python process that imports what it needs, opens the folder and answers one query:

- `ours`: `Index.load(folder)` + `search_ids(q, k=10)`: the saved `structure.faiss` is read;
- `rebuilt`: the same, with the structure left out of the folder (every search process before the
  structure was saved built it again: the graph or the k-means cells);
- anchor `faiss`: `faiss.read_index` of that very structure file + `index.search`, no vectors or
  metadata read (`ratio` = faiss seconds / our seconds: what our load adds around it).

Seconds are the process's own, from just before the load to the answer (the interpreter's start
and the imports are not counted); medians of interleaved rounds. `same_hits`: ours answers the
query with the ids the index answered before it was saved.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_ann import K, embedding_like
from benchmarks.common import setup

THREADS = 2
_CHILD = {
    "ours": ("from mmembed.retrieval import Index", "index = Index.load(folder)",
             "ids = index.search_ids(q, k={k})[0][0].tolist()"),
    # the search parameters ours uses (our defaults: efSearch 128, nprobe 16), set on FAISS's index
    "faiss": ("import faiss", "index = faiss.read_index(str(folder / 'structure.faiss'))\n"
              "if hasattr(index, 'hnsw'): index.hnsw.efSearch = 128\n"
              "if hasattr(index, 'nprobe'): index.nprobe = min(16, index.nlist)",
              "ids = index.search(q.numpy(), {k})[1][0].tolist()"),
}


def _child(kind: str, folder: Path, query: Path) -> tuple[float, list[int]]:
    imports, load, search = _CHILD[kind]
    code = "\n".join([
        "import json, sys, time, torch, faiss", imports, "from pathlib import Path",
        f"torch.set_num_threads({THREADS}); faiss.omp_set_num_threads({THREADS})",
        f"folder, q = Path({str(folder)!r}), torch.load({str(query)!r})",
        "t0 = time.perf_counter()", load, search.format(k=K),
        "print(json.dumps([time.perf_counter() - t0, ids]))"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
    seconds, ids = json.loads(out.stdout.strip().splitlines()[-1])
    return seconds, ids


def bench_backend(backend: str, x, q, work: Path, rounds: int) -> dict:
    import torch

    from mmembed.retrieval import Index

    index = Index(x.shape[1], backend=backend)
    index.add(x, "image")
    t0 = time.perf_counter()
    index.save(work / "saved")
    save_s = time.perf_counter() - t0
    before = index.search_ids(q, k=K)[0][0].tolist()
    torch.save(q, work / "q.pt")
    shutil.copytree(work / "saved", work / "bare")  # the same index without its structure, as saved before
    header = json.loads((work / "bare" / "index.json").read_text())
    del header["structure"]
    (work / "bare" / "index.json").write_text(json.dumps(header))
    (work / "bare" / "structure.faiss").unlink()
    folders = {"ours": work / "saved", "rebuilt": work / "bare", "faiss": work / "saved"}
    times, hits = {k: [] for k in folders}, {}
    for _ in range(rounds):
        for kind, folder in folders.items():
            seconds, hits[kind] = _child("faiss" if kind == "faiss" else "ours", folder, work / "q.pt")
            times[kind].append(seconds)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"backend": backend, "save_s": round(save_s, 3),
            "structure_mb": round((work / "saved" / "structure.faiss").stat().st_size / 2**20, 1),
            "ours_s": round(med["ours"], 4), "rebuilt_s": round(med["rebuilt"], 4), "faiss_s": round(med["faiss"], 4),
            "speedup_over_rebuilt": round(med["rebuilt"] / med["ours"], 1),
            "ratio": round(med["faiss"] / med["ours"], 2), "same_hits": hits["ours"] == before,
            "faiss_same_hits": hits["faiss"] == before}


def run(quick: bool = False, rounds: int = 3, n: int | None = None) -> dict:
    """Run B-open. `quick`: N = 20k; `n` overrides N."""
    setup(THREADS)
    n = n or (20_000 if quick else 100_000)
    x, q = embedding_like(n, seed=1), embedding_like(1, seed=2)
    rows = []
    for backend in ("faiss_hnsw", "faiss_ivf"):
        with tempfile.TemporaryDirectory() as work:
            rows.append(bench_backend(backend, x, q, Path(work), rounds))
    return {"benchmark": "B-open", "goal": "the saved structure answers as before the save (same_hits), far "
            "faster than building it again (speedup_over_rebuilt); ratio: faiss.read_index alone against ours, "
            "which also reads, checksums and checks the vectors and every metadata row", "threads": THREADS, "n": n, "d": x.shape[1], "rounds": rounds,
            "timing": "median over rounds of a fresh process's load + one search (interpreter and imports not counted)",
            "results": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 20k")
    print(json.dumps(run(quick=parser.parse_args().quick), indent=2))


if __name__ == "__main__":
    main()
