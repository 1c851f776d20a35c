"""What a trained space's vectors say about each object: an MLP probe on frozen vectors.

The decoder reads one shared-space vector per media item, so it can only describe what that
vector holds. This probe measures it. For each modality, the run embeds the built-in world's
train, test and held-out scenes; an MLP (D → 512 → per position slot: shape or none, colour or
none), trained on the train split's vectors, then reads the other splits. Reported per split:
shape and colour accuracy per occupied slot, and the fraction of scenes with every slot right
(the ceiling of "the description names every object's shape and colour").

    python -m benchmarks.probe_slots runs/demo                 # image, audio and text
    python -m benchmarks.probe_slots runs/demo --modalities image --epochs 60

Inputs are standardised with the train split's per-dimension mean and std (unit vectors have
components near 1/sqrt(D), too small for a default-initialised MLP to fit in a few epochs).
Seeded; CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks.common import load_run, modality_name, require_run, require_world
from mmembed.data.manifest import Row, read_manifest
from mmembed.data.synth.rules import COLOURS, POSITIONS, SHAPES
from mmembed.modality import Modality

ATTRIBUTES = (("shape", SHAPES), ("colour", COLOURS))
CLASSES = 1 + max(len(values) for _, values in ATTRIBUTES)  # 0 = no object in the slot
SPLITS = ("train", "test", "heldout")


def slot_labels(rows: list[dict]) -> Tensor:
    """(N, slots, attributes) class ids: 1 + index of the value, 0 where the slot is empty.
    `rows`: each with the world's `objects` list (a manifest row's `meta`)."""
    y = torch.zeros(len(rows), len(POSITIONS), len(ATTRIBUTES), dtype=torch.long)
    for i, row in enumerate(rows):
        for obj in row["objects"]:
            for a, (name, values) in enumerate(ATTRIBUTES):
                y[i, POSITIONS.index(obj["position"]), a] = 1 + values.index(obj[name])
    return y


def read_splits(root: Path) -> dict[str, list[Row]]:
    """The world's manifests that exist, read as any manifest is (paths resolved against root)."""
    return {s: read_manifest(root / f"{s}.jsonl").rows for s in SPLITS if (root / f"{s}.jsonl").is_file()}


def items_of(rows: list[Row], modality: str) -> list[str]:
    """Each row's item of `modality`: the caption for text, else the media file's path."""
    m = Modality.parse(modality)
    return [str(r.items[m]) for r in rows]


def fit_probe(z: Tensor, y: Tensor, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    slots, attrs = y.shape[1:]
    probe = nn.Sequential(nn.Linear(z.shape[1], 512), nn.GELU(), nn.Linear(512, slots * attrs * CLASSES))
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(epochs):
        for idx in torch.randperm(len(z)).split(128):
            logits = probe(z[idx]).view(-1, CLASSES)
            loss = nn.functional.cross_entropy(logits, y[idx].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return probe.eval()


@torch.no_grad()
def score(probe: nn.Module, z: Tensor, y: Tensor) -> dict[str, float]:
    pred = probe(z).view(*y.shape, CLASSES).argmax(-1)
    occupied = y[..., 0] > 0
    out = {name: float((pred[..., a] == y[..., a])[occupied].float().mean()) for a, (name, _) in enumerate(ATTRIBUTES)}
    out["every slot"] = float((pred == y).flatten(1).all(1).float().mean())
    return out


def standardised_vectors(model, modality: str, rows: dict[str, list[Row]]) -> dict[str, Tensor]:
    """Each split's vectors of `modality`, standardised with the train split's per-dimension mean and std."""
    z = {s: model.embed(modality, items_of(rs, modality), batch_size=256).float() for s, rs in rows.items()}
    mean, std = z["train"].mean(0), z["train"].std(0).clamp_min(1e-6)
    return {s: (v - mean) / std for s, v in z.items()}


def probe_modality(model, modality: str, root: Path, epochs: int, seed: int) -> dict[str, dict[str, float]]:
    rows = read_splits(root)
    z = standardised_vectors(model, modality, rows)
    y = {s: slot_labels([r.meta for r in rs]) for s, rs in rows.items()}
    probe = fit_probe(z["train"], y["train"], epochs, seed)
    return {s: score(probe, z[s], y[s]) for s in rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a trained run directory")
    parser.add_argument("--root", default="data/shapes", help="the built-in world's folder (default: data/shapes)")
    parser.add_argument("--modalities", nargs="+", type=modality_name, default=["image", "audio", "text"])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    require_world(Path(args.root), ["train.jsonl", "test.jsonl"], "--root")
    require_run(args.run)
    model = load_run(args.run)
    print("| run | modality | split | shape per slot | colour per slot | every slot right |")
    print("|---|---|---|---:|---:|---:|")
    for modality in args.modalities:
        for split, s in probe_modality(model, modality, Path(args.root), args.epochs, args.seed).items():
            print(f"| {args.run} | {modality} | {split} | {s['shape']:.3f} | {s['colour']:.3f} | {s['every slot']:.3f} |")


if __name__ == "__main__":
    main()
