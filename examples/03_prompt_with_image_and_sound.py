"""Prompt a trained run with pictures, sounds and text: describe, ask, compare, sample, stream,
and pick the best of several answers with the shared space.

    python examples/03_prompt_with_image_and_sound.py [RUN_DIR]

RUN_DIR defaults to runs/demo (what `mmembed demo` writes). Without RUN_DIR and without runs/demo,
a small run is trained first on a 2,000-scene world (a few minutes on 2 cores; its answers are
rougher than the demo's). Run it from the folder the run was trained in: the run's world
(data.root) is found from there, and it must be the built-in world (the script reads its scenes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mmembed as mm

run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")
if len(sys.argv) > 1 and not (run / "decoder.safetensors").is_file():  # a typo must not start training
    sys.exit(f"{run} holds no run with a decoder: pass a run folder `mmembed demo` or `mmembed train` wrote")
if not (run / "decoder.safetensors").is_file():
    print(f"{run} has no decoder: training a small run first")
    run = Path("runs/example-03")
    mm.train(mm.load_config("demo", [
        "data.root=runs/example-03-world", "data.synth.n=2000", "data.synth.n_heldout=200",
        f"train.out_dir={run}", "train.epochs=6", "train.eval_every=1000", "decoder.train.max_steps=300",
    ]), overwrite=True)

model = mm.load(run)
world = Path(model.config.data.root)  # relative to where the run was trained
if not (world / "test.jsonl").is_file():
    sys.exit(f"the run's world {world} (data.root) is not here: run this from the folder the run was trained in")
scenes = [json.loads(line) for line in (world / "test.jsonl").read_text().splitlines()]
a = scenes[0] if scenes and "objects" in scenes[0] else None
b = a and next((s for s in scenes if s["objects"][0]["colour"] != a["objects"][0]["colour"]), None)
if b is None:
    sys.exit(f"{world / 'test.jsonl'} is not the built-in world's test split (two scenes of other colours): this "
             "example needs a run trained on it (mmembed demo)")
image_a, audio_a, audio_b = mm.Image(world / a["image"]), mm.Audio(world / a["audio"]), mm.Audio(world / b["audio"])
print(f"scene A: {a['text']}\nscene B: {b['text']}\n")

prompts = [
    ["Describe", image_a],                                          # a picture
    ["What do you hear in", audio_b, "?"],                          # a sound
    ["How many objects are in", image_a, "?"],                      # a question
    ["Do", image_a, "and", audio_b, "have the same colours?"],      # an image and a sound, compared
    [image_a, audio_a, "What scene do these two share?"],           # both views of one scene
    ["Describe", model.embed("text", [a["text"]])[0]],              # any shared-space vector
]
for prompt, out in zip(prompts, model.generate(prompts, max_new_tokens=40)):  # one left-padded batch
    shown = " ".join(p if isinstance(p, str) else type(p).__name__ for p in prompt)
    print(f"{shown!r:60} → {out.text}")

print("\nSampling: the same prompt at two temperatures (entropy in nats, per token, averaged)")
for t in (0.2, 1.5):
    out = model.generate(["Describe", image_a], temperature=t, top_p=0.95, seed=0, max_new_tokens=40)
    print(f"  T={t}: {out.text!r}  mean entropy {out.mean_entropy:.2f}")

print("\nStreaming:", end=" ", flush=True)
for piece in model.stream(["Describe the sound", audio_a], temperature=0.7, seed=1):
    print(piece, end="", flush=True)
print()

print("\nBest of 16 on a scene holding a (shape, colour) pair no training row has: the greedy answer and 15")
print("samples, ranked by mean log-probability + the space's logit scale x cosine(answer, picture)")
held = json.loads((world / "heldout.jsonl").read_text().splitlines()[0]) if (world / "heldout.jsonl").is_file() else a
best = model.generate(["Describe", mm.Image(world / held["image"])], temperature=1.0, best_of=16, seed=0,
                      max_new_tokens=40)
print(f"  truth:  {held['text']}")
scale = float(model.space.logit_scale.detach())
for c in best.candidates[:4]:
    print(f"  {c.score:6.2f} = {c.logprob:6.3f} + {scale:.1f} x {c.similarity:.3f}  {c.text}")
