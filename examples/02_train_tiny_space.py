"""Train a small tri-modal shared space on the synthetic world in about a minute, print recall.

    python examples/02_train_tiny_space.py [OUT_DIR]

Same pipeline as `mmembed demo`, at a fraction of the data and steps: expect recall well above
chance (1/100 on its 100 test scenes) but below the demo, which takes 7x the steps (588 against 84)
on 3x the scenes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mmembed as mm
from mmembed.evaluate import run_eval

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/example-02")
config = mm.load_config("demo", [
    f"data.root={out / 'world'}",
    "data.synth.n=2000",
    "data.synth.n_heldout=200",
    f"train.out_dir={out / 'run'}",
    "train.epochs=6",
    "train.eval_every=1000",  # validate only at the end: this example is about speed
    "decoder=null",  # the shared space alone: example 03 prompts a run with a decoder
])
run_dir = mm.train(config, overwrite=True)  # a rerun of the example replaces its run
table, _ = run_eval(run_dir, out / "world" / "test.jsonl", progress=False)
print(table)
