"""How long `mmembed demo` takes, stage by stage (goal: under 8 minutes on 2 CPU cores).

Runs the real demo into a temporary folder (synthesis included) and reports its own timings
with the recall and prompting accuracy it reached, so a speed-up that costs accuracy shows in the
same JSON.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from benchmarks.common import setup


def run(quick: bool = False) -> dict:
    from mmembed.demo import run_demo

    setup()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        overrides = [f"data.root={tmp / 'world'}"]
        if quick:  # a smoke run of the same pipeline, not the figure the issue asks for
            overrides += ["data.synth.n=600", "data.synth.n_heldout=60", "train.epochs=1",
                          "decoder.train.max_steps=20"]
        run_demo("demo", overrides, out_dir=str(tmp / "run"), bind=not quick)
        result = json.loads((tmp / "run" / "demo.json").read_text())
    timings = result["timings_s"]
    test = result["test"]
    prompting = result.get("prompting") or {}
    accuracy = {split: {group: round(v["accuracy"], 3) for group, v in table.items()}
                for split, table in prompting.get("accuracy", {}).items()}
    return {"id": "B-demo", "unit": "s", "total_s": timings["total"], "goal_s": 480, "within_goal": timings["total"] < 480,
            "stages_s": timings, "test_recall@1": {pair: r["recall@1"] for pair, r in test.items()},
            "composed": result["composed"], "prompting_accuracy": accuracy, "quick": quick}


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    print(json.dumps(run(quick=p.parse_args().quick), indent=2))
