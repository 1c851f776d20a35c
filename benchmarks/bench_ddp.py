"""B-ddp: the align stage's training step on 2 processes (DDP, gloo) against 1 process, at the
same global batch, on this machine.

    python -m benchmarks.bench_ddp            # global batch 128, the demo's towers
    python -m benchmarks.bench_ddp --quick    # global batch 64, fewer steps

Both sides run the step `mmembed train` runs (`make_step_fn`: the towers of configs/demo.yaml,
the all-pairs InfoNCE loss, then backward and AdamW) on the same batch of the built-in world:

- anchor: 1 process, 2 threads, the global batch;
- ours: 2 processes (torch.distributed, gloo), 1 thread each, half the batch each, DDP
  averaging the gradients and the loss gathering the embeddings with gradient (local loss);
- also timed: 1 process on 1 thread, for the classic scaling efficiency
  t(1 process, 1 thread) / (2 × t(2 processes)) — the fraction of a perfect 2× speed-up.

The figure is the median step after warm-up (each step ends with both ranks done: the
gradient all-reduce synchronises them). With both cores in use either way, `ratio` (2
processes / 1 process, samples/s) says whether data parallelism costs or gains anything over
intra-op threads on a machine this size; on several GPUs it is what scales.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import ratio_report

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def _setup(world: Path):
    """The demo's space and loss, and `world`'s training rows (cached as they are read)."""
    from mmembed.config import load_config
    from mmembed.data import ManifestDataset, read_manifest
    from mmembed.losses import build_loss
    from mmembed.model import build_model
    from mmembed.modality import Modality
    from mmembed.preprocess import build_preprocessor
    from mmembed.tokenizer import Tokenizer
    from mmembed.train.data_setup import captions

    cfg = load_config(CONFIG, [f"data.root={world}"])
    tokenizer = Tokenizer.train(list(captions(world / "train.jsonl", world)), vocab_size=cfg.tokenizer.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer)
    pre = {Modality.parse(m): build_preprocessor(Modality.parse(m), t.preprocess, tokenizer=tokenizer, train=True)
           for m, t in cfg.model.towers.items()}
    data = ManifestDataset(read_manifest(world / "train.jsonl", root=world), pre, cache=True)
    return model.space, build_loss(cfg.loss), data


def _time_steps(space, loss_fn, batch, steps: int, warmup: int) -> list[float]:
    from mmembed.data import SkipCounter
    from mmembed.train.align_step import make_step_fn, space_forward
    from mmembed.train.collapse import CollapseMonitor
    from mmembed.train.collectives import barrier
    from mmembed.train.distributed import parallelize
    from mmembed.train.optim import build_optimizer

    net = parallelize(space, space_forward, torch.device("cpu"))
    step = make_step_fn(space, loss_fn, torch.device("cpu"), SkipCounter(), CollapseMonitor(), net)
    opt = build_optimizer(space, 1e-3, 0.05, (0.9, 0.98))
    times = []
    for i in range(warmup + steps):
        barrier()
        t0 = time.perf_counter()
        out = step(batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        barrier()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _batch(data, rows: list[int]):
    from mmembed.data.collate import collate

    return collate([data[(i, i)] for i in rows], data.preprocessors)


def _worker(rank: int, world_dir: str, init_file: str, batch: int, steps: int, warmup: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    space, loss_fn, data = _setup(Path(world_dir))
    rows = list(range(rank, batch, 2))  # the sampler's round-robin deal of the global batch
    times = _time_steps(space, loss_fn, _batch(data, rows), steps, warmup)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def _single(world: Path, batch: int, steps: int, warmup: int, threads: int) -> list[float]:
    torch.set_num_threads(threads)
    space, loss_fn, data = _setup(world)
    return _time_steps(space, loss_fn, _batch(data, list(range(batch))), steps, warmup)


def run(quick: bool = False, batch: int | None = None, steps: int | None = None, scenes: int = 400) -> dict:
    """Run B-ddp; returns one JSON-able dict. `batch`/`steps`/`scenes` shrink it for the smoke test."""
    from mmembed.data.synth import generate_world

    batch = batch or (64 if quick else 128)
    steps = steps or (5 if quick else 12)
    warmup = 2
    with tempfile.TemporaryDirectory() as tmp:
        world = Path(tmp) / "world"
        generate_world(world, n=scenes, seed=0, image_size=64)
        one = _single(world, batch, steps, warmup, threads=2)
        one_thread = _single(world, batch, steps, warmup, threads=1)
        out = Path(tmp) / "ddp.json"
        mp.spawn(_worker, args=(str(world), str(Path(tmp) / "init"), batch, steps, warmup, str(out)), nprocs=2)
        two = json.loads(out.read_text())
    t1, t1_thread, t2 = (statistics.median(t) for t in (one, one_thread, two))
    row = ratio_report(f"B-ddp B={batch}", batch / t2, batch / t1, "samples/s", higher_is_better=True,
                       seconds={"two_processes": t2, "one_process_2_threads": t1, "one_process_1_thread": t1_thread},
                       scaling_efficiency=t1_thread / (2 * t2))
    return {
        "benchmark": "B-ddp",
        "goal": "reported: 2-process (DDP, gloo, 1 thread each) vs 1-process (2 threads) samples/s at the same "
                "global batch, and the scaling efficiency t(1 process, 1 thread) / (2 t(2 processes))",
        "towers": "configs/demo.yaml",
        "timing": f"median of {steps} steps after {warmup} warm-up steps",
        "cpus": os.cpu_count(),
        "results": [row],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick), indent=2))


if __name__ == "__main__":
    main()
