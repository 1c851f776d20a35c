"""Does a space bind each object's attributes together? A lookup probe on frozen vectors.

A question about one of two objects names it by one attribute and asks another ("what colour is
the star?"). A vector that holds the scene's attributes as a bag (a star, a circle, red, blue)
answers it no better than a coin between the two objects; one that binds them (a red star and a
blue circle) can answer it. The probe asks every such question of every two-object scene of the
built-in world: for each object, each attribute that tells it from the other one as the key, each
other attribute as the question. An MLP reads [the item's vector, the key (attribute = value)
one-hot, the asked attribute one-hot] and answers with a value; it is trained on the train
split's questions and scored on the test split's, after each budget of examples seen, so the
table shows how many examples a reader of these vectors needs to look objects up (the decoder
learns the same from the world's instruction rows: about 7,000 two-object lookups, to which
`mmembed data lookups` adds more).

    python -m benchmarks.probe_lookup runs/demo                      # image and audio
    python -m benchmarks.probe_lookup runs/demo --distinct 7000      # only 7,000 distinct questions
    python -m benchmarks.probe_lookup runs/demo --gated              # a multiplicative reader

Reported per modality and budget: accuracy on the training questions seen and on the test
split's, beside the coin (answering about either object at random: 0.5, or 1 where both objects
share the asked value). Vectors are standardised as in `probe_slots`. Seeded; CPU.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from benchmarks.common import load_run, modality_name, require_run, require_world
from benchmarks.probe_slots import read_splits, standardised_vectors
from mmembed.data.synth.rules import COLOURS, POSITIONS, SHAPES, SIZES

VALUES = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS}
ATTRS = tuple(VALUES)
KEYS = [(a, v) for a in ATTRS for v in VALUES[a]]  # one-hot index of "attribute = value"
KEY_INDEX = {k: i for i, k in enumerate(KEYS)}  # answers use the same index: an answer is a value
SEEN = (8_000, 32_000, 128_000, 512_000)


@dataclass
class Questions:
    """Lookup questions about scenes: item (row of the vectors), key, asked attribute, answer, coin."""

    item: Tensor  # (Q,) long
    key: Tensor  # (Q,) long, into KEYS
    asked: Tensor  # (Q,) long, into ATTRS
    answer: Tensor  # (Q,) long, into KEYS
    coin: Tensor  # (Q,) float: what answering about either object at random scores

    def __len__(self) -> int:
        return len(self.item)

    def subset(self, idx: Tensor) -> Questions:
        return Questions(self.item[idx], self.key[idx], self.asked[idx], self.answer[idx], self.coin[idx])


def lookup_questions(scenes: Sequence[Sequence[dict]]) -> Questions:
    """Every question of every two-object scene: per object, a key attribute whose value the other
    object does not share, and each other attribute asked. `scenes`: per item, its objects (dicts
    with shape, colour, size, position)."""
    cols: list[list] = [[], [], [], [], []]
    for i, objects in enumerate(scenes):
        if len(objects) != 2:
            continue
        for me, other in (objects, objects[::-1]):
            for key in ATTRS:
                if me[key] == other[key]:
                    continue  # this attribute does not name one object
                for asked in ATTRS:
                    if asked != key:
                        row = (i, KEY_INDEX[key, me[key]], ATTRS.index(asked), KEY_INDEX[asked, me[asked]],
                               1.0 if me[asked] == other[asked] else 0.5)
                        for col, x in zip(cols, row):
                            col.append(x)
    item, key, asked, answer, coin = cols
    return Questions(torch.tensor(item, dtype=torch.long), torch.tensor(key, dtype=torch.long),
                     torch.tensor(asked, dtype=torch.long), torch.tensor(answer, dtype=torch.long),
                     torch.tensor(coin))


class LookupProbe(nn.Module):
    """[vector, key one-hot, asked one-hot] → 512 → 512 → a value. `gated`: the vector's 512
    features times the question's instead of one layer over both (a multiplicative reader, as
    attention is; it leaves the coin sooner)."""

    def __init__(self, dim: int, gated: bool = False) -> None:
        super().__init__()
        question = len(KEYS) + len(ATTRS)
        self.gate = nn.Linear(question, 512) if gated else None
        self.first = nn.Linear(dim if gated else dim + question, 512)
        self.rest = nn.Sequential(nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.Linear(512, len(KEYS)))

    def forward(self, z: Tensor, q: Questions) -> Tensor:
        question = torch.cat([nn.functional.one_hot(q.key, len(KEYS)), nn.functional.one_hot(q.asked, len(ATTRS))],
                             dim=1).float()
        if self.gate is None:
            return self.rest(self.first(torch.cat([z[q.item], question], dim=1)))
        return self.rest(self.first(z[q.item]) * self.gate(question))


@torch.no_grad()
def accuracy(probe: LookupProbe, z: Tensor, q: Questions) -> float:
    return float((probe(z, q).argmax(1) == q.answer).float().mean())


def probe_lookups(z_train: Tensor, q_train: Questions, z_test: Tensor, q_test: Questions,
                  seen: Sequence[int] = SEEN, distinct: int | None = None, seed: int = 0,
                  batch_size: int = 64, gated: bool = False) -> list[dict[str, float]]:
    """Train on `q_train` (its first `distinct` questions in a seeded order, or all) and score after
    each budget in `seen` (examples, in batches of `batch_size`, epoch after epoch).

    Returns one dict per budget: seen, distinct, train (on at most 5,000 training questions), test, coin."""
    torch.manual_seed(seed)
    q_train = q_train.subset(torch.randperm(len(q_train))[:distinct])
    if len(q_train) == 0:  # `while done < budget` would never end
        raise ValueError("no training question: the train split has no two-object scene, or distinct is 0")
    probe = LookupProbe(z_train.shape[1], gated)
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-3, weight_decay=0.05)
    out, done = [], 0
    for budget in sorted(seen):
        while done < budget:
            for idx in torch.randperm(len(q_train)).split(batch_size):
                loss = nn.functional.cross_entropy(probe(z_train, q_train.subset(idx)), q_train.answer[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                done += len(idx)
                if done >= budget:
                    break
        first = q_train.subset(torch.arange(min(5000, len(q_train))))
        out.append({"seen": done, "distinct": len(q_train), "train": accuracy(probe, z_train, first),
                    "test": accuracy(probe, z_test, q_test), "coin": float(q_test.coin.mean())})
    return out


def probe_modality(model, modality: str, root: Path, seen: Sequence[int], distinct: int | None,
                   seed: int, gated: bool = False) -> list[dict[str, float]]:
    rows = {s: rs for s, rs in read_splits(root).items() if s in ("train", "test")}
    z = standardised_vectors(model, modality, rows)
    q = {s: lookup_questions([r.meta["objects"] for r in rs]) for s, rs in rows.items()}
    return probe_lookups(z["train"], q["train"], z["test"], q["test"], seen, distinct, seed, gated=gated)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a trained run directory")
    parser.add_argument("--root", default="data/shapes", help="the built-in world's folder (default: data/shapes)")
    parser.add_argument("--modalities", nargs="+", type=modality_name, default=["image", "audio"])
    parser.add_argument("--seen", nargs="+", type=int, default=list(SEEN), help="examples seen at each report")
    parser.add_argument("--distinct", type=int, default=None,
                        help="train on this many distinct questions (default: all)")
    parser.add_argument("--gated", action="store_true", help="a multiplicative reader (see LookupProbe)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.distinct is not None and args.distinct < 1:  # no question to train on: the loop never ended
        raise SystemExit(f"--distinct must be >= 1, got {args.distinct}")
    if min(args.seen) < 1:
        raise SystemExit(f"--seen budgets must be >= 1, got {min(args.seen)}")
    require_world(Path(args.root), ["train.jsonl", "test.jsonl"], "--root")
    require_run(args.run)
    model = load_run(args.run)
    print("| run | modality | distinct questions | examples seen | train | test | coin |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for modality in args.modalities:
        for r in probe_modality(model, modality, Path(args.root), args.seen, args.distinct, args.seed, args.gated):
            print(f"| {args.run} | {modality} | {r['distinct']:,} | {r['seen']:,} | {r['train']:.3f} | {r['test']:.3f} "
                  f"| {r['coin']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
