"""Small real data with held-out styles: mmembed's small-data recipe against open_clip, same time.

    python -m benchmarks.words_set data/words          # build the set once (see that module)
    python -m benchmarks.bench_small_real data/words    # 5 minutes each side, on 2 threads

Both sides train from scratch on the same `train.jsonl` pairs for the same wall time and are
scored by zero-shot classification over the words (`labels.txt`, prompt = the word itself) on
`test.jsonl`, whose typefaces and voices never occur in training.

- ours: `mmembed train configs/small-data.yaml` (image, audio and text towers, all pairs), then
  `manifest_report` with the labels: image and audio zero-shot accuracy.
- anchor: open_clip's CLIP (its ViT and its text transformer with the CLIP tokenizer, sized like
  ours) with open_clip's training recipe as `open_clip_train` runs it (ClipLoss, AdamW with no
  decay on gains, biases and the logit scale, betas (0.9, 0.98), eps 1e-6, weight decay 0.2,
  cosine schedule to 0 after a linear warm-up, ended at the time budget as our
  `schedule_by: time` does, logit scale clamped to ln 100, open_clip's training transform: random
  resized crop of 0.9-1 of the area), in a plain loop over pre-decoded images. Learning rate 1e-3
  and 50 warm-up steps, as the budget allows (open_clip_train's defaults, 5e-4 and 10,000 warm-up
  steps, are for millions of pairs).
  `open_clip_train` itself is not on the package index this machine reaches; the loop is its
  `train_one_epoch` without the distributed and logging parts. open_clip has no audio tower, so
  the anchor has image numbers only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from open_clip.loss import ClipLoss
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transform import image_transform
from PIL import Image

from benchmarks.bench_train import open_clip_param_groups
from benchmarks.common import setup
from mmembed.data.manifest import read_manifest
from mmembed.modality import Modality
from mmembed.train.optim import lr_at, set_lr

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "small-data.yaml"
# open_clip's towers at our towers' size: 64 px images, width 128; text context 16 (words)
ANCHOR = {"embed_dim": 128,
          "vision_cfg": CLIPVisionCfg(image_size=64, patch_size=8, width=128, layers=4, head_width=32),
          "text_cfg": CLIPTextCfg(context_length=16, vocab_size=49408, width=128, heads=4, layers=2)}


def train_ours(root: Path, minutes: float, out_dir: Path, overrides: list[str]) -> dict:
    """Train with the small-data recipe (a subprocess: the CLI as a user runs it); zero-shot on test."""
    t0 = time.perf_counter()
    threads = str(torch.get_num_threads())  # the anchor's, which `setup` set: the same for ours
    # --overwrite: the benchmark's own folder, replaced by each run (a second run was refused)
    done = subprocess.run([sys.executable, "-m", "mmembed", "train", str(CONFIG), f"data.root={root}",
                           f"train.out_dir={out_dir}", f"train.max_minutes={minutes}", "--overwrite", *overrides],
                          env={**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
    if done.returncode:
        raise SystemExit(f"our training run failed (exit {done.returncode}): see its error above")
    wall = time.perf_counter() - t0
    from mmembed.evaluate import manifest_report
    from mmembed.model import load

    labels = (root / "labels.txt").read_text().split()
    report = manifest_report(load(out_dir), root / "test.jsonl", zero_shot_labels=labels, template="{label}")
    zero_shot = {m: z["accuracy"] for m, z in report["zero_shot"].items()}
    recall = {pair: row["recall@1"] for pair, row in report["pairs"].items()}
    return {"zero_shot": zero_shot, "wall_s": wall, "test_recall@1": recall}


def train_anchor(root: Path, minutes: float, *, batch_size: int = 128, lr: float = 1e-3, warmup: int = 50,
                 weight_decay: float = 0.2, epochs: int = 200, seed: int = 0) -> dict:
    """open_clip's model, loss, optimizer, schedule and transforms for `minutes` of wall time."""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = CLIP(**ANCHOR)
    tokenizer = SimpleTokenizer(context_length=ANCHOR["text_cfg"].context_length)
    train_tf = image_transform(64, is_train=True)
    eval_tf = image_transform(64, is_train=False)
    rows = read_manifest(root / "train.jsonl").rows
    images = [Image.open(r.items[Modality.IMAGE]).convert("RGB") for r in rows]
    texts = tokenizer([r.items[Modality.TEXT] for r in rows])  # (N, context)
    opt = torch.optim.AdamW(open_clip_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()
    steps_per_epoch = len(rows) // batch_size
    total = steps_per_epoch * epochs
    deadline, step, losses = t0 + 60 * minutes, 0, []
    model.train()
    while time.perf_counter() < deadline and step < total:
        order = torch.randperm(len(rows))
        for b in range(steps_per_epoch):
            if time.perf_counter() >= deadline:
                break
            idx = order[b * batch_size:(b + 1) * batch_size].tolist()
            x = torch.stack([train_tf(images[i]) for i in idx])
            t = texts[idx]
            # our schedule_by=time rule: the cosine ends at the budget (or the last epoch)
            set_lr(opt, lr_at(step, lr, warmup, total, 0.0, (time.perf_counter() - t0) / (60 * minutes)))
            img, txt, logit_scale = model(x, t)
            loss = loss_fn(img, txt, logit_scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
            step += 1
    wall = time.perf_counter() - t0
    model.eval()
    labels = (root / "labels.txt").read_text().split()
    test = read_manifest(root / "test.jsonl").rows
    with torch.no_grad():
        classes = model.encode_text(tokenizer(labels), normalize=True)  # (L, D)
        vecs = torch.cat([model.encode_image(torch.stack([eval_tf(Image.open(r.items[Modality.IMAGE]).convert("RGB"))
                                                          for r in test[i:i + 256]]), normalize=True)
                          for i in range(0, len(test), 256)])
    predicted = (vecs @ classes.T).argmax(1).tolist()
    accuracy = sum(labels[p] == r.label for p, r in zip(predicted, test)) / len(test)
    return {"zero_shot": {"image": accuracy}, "wall_s": wall, "steps": step,
            "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:]))}


def run(root: Path, minutes: float = 5.0, out_dir: Path = Path("runs/small-real"), overrides: list[str] = (),
        sides: tuple[str, ...] = ("ours", "anchor")) -> dict:
    setup()
    report = {"benchmark": "small-real", "data": str(root), "minutes": minutes}
    if "ours" in sides:
        report["ours"] = train_ours(root, minutes, out_dir, list(overrides))
    if "anchor" in sides:
        report["anchor"] = train_anchor(root, minutes)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path, help="a folder built by `python -m benchmarks.words_set`")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/small-real"))
    parser.add_argument("--only", choices=("ours", "anchor"), help="run one side")
    parser.add_argument("overrides", nargs="*", help="config overrides for our run (key=value)")
    args = parser.parse_intermixed_args()  # overrides may follow the options
    for name in ("train.jsonl", "test.jsonl", "labels.txt"):  # a wrong root was a traceback on either side
        if not (args.root / name).is_file():
            raise SystemExit(f"{args.root}: no {name}; build the set with `python -m benchmarks.words_set {args.root}`")
    sides = (args.only,) if args.only else ("ours", "anchor")
    print(json.dumps(run(args.root, args.minutes, args.out_dir, args.overrides, sides), indent=2))


if __name__ == "__main__":
    main()
