"""B-serve: the web app under load on loopback — 20 concurrent clients × 50 searches each.

    python -m benchmarks.bench_serve                      # runs/demo if trained, else a tiny random run
    python -m benchmarks.bench_serve --run runs/demo --clients 20 --searches 50
    python -m benchmarks.bench_serve --quick              # 4 clients × 10 searches

The server is `mmembed serve RUN --port 0` in its own process (as a user runs it; it indexes the
run's test manifest on start). Each client is a thread with its own keep-alive connection sending
`POST /api/search` one after another: four in five a caption of the test manifest (target
image), one in five an uploaded picture of it (target sound), k = 10. Reported: errors (any
status but 200), latency percentiles (p50, p95, p99, max, ms) and searches/s. The row is `correct`
when there are no errors.

Anchor: the same server and searches with ONE client (200 searches back to back, after the load).
`ratio` = searches/s with all the clients over searches/s with one: above 1, concurrent clients
are served faster than one after another (HTTP, multipart parsing and upload checks of one
request overlap the model call of another; the model runs one call at a time); below 1, they
get in each other's way. (An in-process anchor through the Python API is not comparable here:
torch runs a request's ops in the server's worker threads, and on a busy 2-core machine the main
thread's 2-thread ops were measured several times slower than the same ops there.)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import count, ratio_report, require_run, setup

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "runs" / "demo"
K = 10


def tiny_run(folder: Path) -> Path:
    """A random tiny model over a 200-scene world (when no trained run is at hand)."""
    import torch

    import mmembed as mm
    from mmembed.config import ModelConfig, from_dict
    from mmembed.data.synth import generate_world
    from mmembed.model import build_model
    from tests.conftest import TINY_MODEL

    world = generate_world(folder / "world", n=200, seed=0, image_size=32).root
    torch.manual_seed(0)
    cfg = mm.load_config("demo")
    cfg.model = from_dict(ModelConfig, TINY_MODEL, "model", "bench")
    cfg.data.root = str(world)
    tok = mm.Tokenizer.train([json.loads(line)["text"] for line in (world / "train.jsonl").open()], vocab_size=300)
    return build_model(cfg, tok).save(folder / "tiny-run")


def manifest_of(run_dir: Path) -> Path:
    from mmembed.config import load_config
    from mmembed.serve.indexing import runs_test_manifest

    cwd = os.getcwd()
    os.chdir(REPO)  # a run's data.root is relative to where it was trained: the repository
    try:
        return runs_test_manifest(load_config(run_dir / "config.yaml")).resolve()
    finally:
        os.chdir(cwd)


def queries(manifest: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in manifest.open()]
    out = []
    for i, row in enumerate(rows):
        if i % 5 == 4:
            out.append({"file": (manifest.parent / row["image"]).read_bytes(), "target": "audio"})
        else:
            out.append({"text": row["text"], "target": "image"})
    return out


class Server:
    """`mmembed serve RUN --port 0` in a child process, until `stop()`."""

    def __init__(self, run_dir: Path, log: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self._log = log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "mmembed.cli", "serve", str(run_dir), "--port", "0"],
                                     cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=self._log, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("mmembed serve: http"):
            self.stop()
            # the log lies in a temporary folder gone by the time the message is read: its last line
            # (`mmembed: error: ...`, or a traceback's last) goes into the message instead
            said = [x.strip() for x in log.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
            raise SystemExit(f"the server did not start (`mmembed serve {run_dir}`, exit status "
                             f"{self.proc.returncode}): {said[-1] if said else line.strip() or 'no message'}")
        self.url = line.split()[2]

    def wait_ready(self, client) -> dict:
        for _ in range(3000):
            status = client.get(self.url + "api/status").json()
            if status["index"]["state"] != "building":
                return status
            time.sleep(0.1)
        raise RuntimeError("the index was not built in 5 minutes")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


def search(client, url: str, q: dict[str, Any]) -> int:
    data = {"target": q["target"], "k": str(K)}
    if "text" in q:
        return client.post(url + "api/search", data={**data, "text": q["text"]}).status_code
    return client.post(url + "api/search", data=data, files=[("file", ("query.png", q["file"]))]).status_code


def load(url: str, qs: list[dict[str, Any]], clients: int, searches: int) -> tuple[list[float], list[int], float]:
    """Every client sends `searches` searches back to back; → latencies (s), error statuses, wall time."""
    import httpx

    latencies: list[float] = []
    errors: list[int] = []
    start = threading.Barrier(clients + 1)

    def client_loop(c: int) -> None:
        with httpx.Client(timeout=120) as client:
            start.wait()
            for i in range(searches):
                t0 = time.perf_counter()
                try:
                    code = search(client, url, qs[(c * searches + i) % len(qs)])
                except httpx.HTTPError:
                    code = -1
                latencies.append(time.perf_counter() - t0)
                if code != 200:
                    errors.append(code)

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return latencies, errors, time.perf_counter() - t0


def percentile(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def load_size(quick: bool, clients: int | None, searches: int | None) -> tuple[int, int]:
    """Clients and searches per client: those given, else the defaults (20 x 50; quick: 4 x 10)."""
    return clients or (4 if quick else 20), searches or (10 if quick else 50)


def run(quick: bool = False, run_dir: str | Path | None = None, clients: int | None = None,
        searches: int | None = None) -> dict:
    import httpx

    setup()
    clients, searches = load_size(quick, clients, searches)
    with tempfile.TemporaryDirectory() as tmp:
        if run_dir is None:
            run_dir = DEMO if (DEMO / "model.safetensors").is_file() else tiny_run(Path(tmp))
        run_dir = Path(run_dir).resolve()
        manifest = manifest_of(run_dir)
        qs = queries(manifest)
        server = Server(run_dir, Path(tmp) / "server.log")
        try:
            with httpx.Client(timeout=120) as client:
                status = server.wait_ready(client)
                for q in qs[:10]:  # warm-up
                    search(client, server.url, q)
            latencies, errors, wall = load(server.url, qs, clients, searches)
            alone, alone_errors, alone_wall = load(server.url, qs, 1, min(200, clients * searches))
        finally:
            server.stop()
    ms, alone_ms = [1000 * x for x in latencies], [1000 * x for x in alone]
    row = ratio_report(f"B-serve {clients}x{searches}", len(latencies) / wall, len(alone) / alone_wall, "searches/s",
                       higher_is_better=True, correct=not errors and not alone_errors,
                       correct_if="errors == 0 (every search answered 200)", p50_ms=round(percentile(ms, 50), 1),
                       p95_ms=round(percentile(ms, 95), 1), p99_ms=round(percentile(ms, 99), 1),
                       max_ms=round(max(ms), 1), errors=len(errors) + len(alone_errors),
                       error_statuses=sorted(set(errors + alone_errors)), searches=len(latencies),
                       wall_s=round(wall, 2), one_client_p50_ms=round(percentile(alone_ms, 50), 1),
                       one_client_p95_ms=round(percentile(alone_ms, 95), 1))
    return {"benchmark": "B-serve", "run": str(run_dir), "index": status["index"]["counts"], "clients": clients,
            "searches_per_client": searches, "k": K, "load_average": os.getloadavg(), "results": [row],
            "goal": "no errors; p95 reported"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="run directory (default: runs/demo if trained, else a tiny random run)")
    parser.add_argument("--clients", type=count, default=None, help="concurrent clients (default 20; --quick 4)")
    parser.add_argument("--searches", type=count, default=None, help="searches per client (default 50; --quick 10)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    clients, searches = load_size(args.quick, args.clients, args.searches)
    if clients * searches < 2:  # latency percentiles need two timings
        parser.error("--clients x --searches must give at least 2 searches")
    if args.run is not None:
        require_run(args.run, "--run")
    print(json.dumps(run(args.quick, args.run, args.clients, args.searches), indent=2))


if __name__ == "__main__":
    main()
