"""B-synth: how fast the built-in synthetic world is generated.

Goal: 10,000 scenes (PNG + WAV + captions/QA) in under a minute with 2 workers on the 2-core
machine. Reports scenes/s with 2 workers and, as the side-by-side anchor, with 1 worker (the
ratio is the parallel speed-up), plus a per-stage cost breakdown measured in this process.

    python -m benchmarks.bench_synth [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks.common import ratio_report, setup
from mmembed.data.synth import generate_world
from mmembed.data.synth.generate import manifest_row
from mmembed.data.synth.render_audio import render_audio, save_wav
from mmembed.data.synth.render_image import render_image, save_png
from mmembed.data.synth.world import STREAM_AUDIO, STREAM_IMAGE, choose_heldout_combos, rng_for, sample_world

GOAL_SCENES, GOAL_SECONDS = 10_000, 60.0


def _generation_rate(n: int, workers: int) -> tuple[float, float]:
    """(scenes/s, seconds) for one fresh world of n in-distribution scenes (+ n // 10 held out)."""
    folder = Path(tempfile.mkdtemp(prefix="bench_synth_"))
    try:
        t0 = time.perf_counter()
        summary = generate_world(folder / "world", n=n, seed=0, workers=workers)
        seconds = time.perf_counter() - t0
        return summary.total / seconds, seconds
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _stage_costs(n: int = 200) -> dict[str, float]:
    """Milliseconds per scene of each stage, single process (where the time goes)."""
    scenes = sample_world(0, n, 0, (0.8, 0.1, 0.1), choose_heldout_combos(0, 0.1))
    folder = Path(tempfile.mkdtemp(prefix="bench_synth_stages_"))
    costs: dict[str, float] = {}
    try:
        stages = {
            "render_image": lambda s: render_image(s.objects, rng_for(0, s.kind, s.index, STREAM_IMAGE)),
            "render_audio": lambda s: render_audio(s.objects, rng_for(0, s.kind, s.index, STREAM_AUDIO)),
            "text_qa_row": lambda s: manifest_row(s, 0, []),
        }
        outputs = {}
        for name, fn in stages.items():
            t0 = time.perf_counter()
            outputs[name] = [fn(s) for s in scenes]
            costs[name] = (time.perf_counter() - t0) / n * 1e3
        t0 = time.perf_counter()
        for s, px in zip(scenes, outputs["render_image"]):
            save_png(px, str(folder / f"{s.id}.png"))
        costs["write_png"] = (time.perf_counter() - t0) / n * 1e3
        t0 = time.perf_counter()
        for s, wave in zip(scenes, outputs["render_audio"]):
            save_wav(wave, str(folder / f"{s.id}.wav"), 16000)
        costs["write_wav"] = (time.perf_counter() - t0) / n * 1e3
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {k: round(v, 3) for k, v in costs.items()}


def run(quick: bool = False) -> dict:
    """Generation throughput; `quick` uses 2,000 scenes instead of 10,000."""
    setup(threads=2)
    n = 2_000 if quick else GOAL_SCENES
    _generation_rate(100, workers=2)  # warm-up: imports, page cache, pool start-up path
    ours, seconds = _generation_rate(n, workers=2)
    anchor, anchor_seconds = _generation_rate(n, workers=1)
    report = ratio_report("B-synth", ours, anchor, unit="scenes/s", higher_is_better=True)
    report.update(
        n_scenes=round(ours * seconds),
        seconds_2_workers=round(seconds, 2),
        seconds_1_worker=round(anchor_seconds, 2),
        anchor_desc="same generator, 1 worker (ratio = parallel speed-up)",
        projected_seconds_for_10k=round(GOAL_SCENES * 1.1 / ours, 1),
        goal=f"{GOAL_SCENES} scenes (+10% held out) in < {GOAL_SECONDS:.0f} s with 2 workers",
        meets_goal=GOAL_SCENES * 1.1 / ours < GOAL_SECONDS,
        ms_per_scene_by_stage=_stage_costs(),
    )
    # Loading throughput (samples/s through ManifestDataset + preprocessors over this world)
    # belongs here as report["loading"]; it is added with mmembed/data's loader.
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,000 scenes instead of 10,000")
    print(json.dumps(run(quick=parser.parse_args().quick), indent=2))
