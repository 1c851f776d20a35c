"""Scene sampling, held-out attribute combinations and splits.

A scene is one or two objects in distinct position slots. Randomness is drawn from a
`numpy.random.Generator` seeded by `(seed, kind, index, stream)`, so scene `i` is the same
whatever `n` is and whichever worker renders it: generation parallelises and stays
byte-for-byte deterministic.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmembed.data.synth.rules import COLOURS, MAX_OBJECTS, P_SINGLE, POSITIONS, SHAPES, SIZES
from mmembed.errors import UserError

SPLITS = ("train", "val", "test", "heldout")

# RNG stream ids: one independent generator per (scene, purpose).
KIND_REGULAR, KIND_HELDOUT, KIND_WORLD = 0, 1, 2
STREAM_SAMPLE, STREAM_IMAGE, STREAM_AUDIO, STREAM_TEXT = 0, 1, 2, 3

Combo = tuple[str, str]  # (shape, colour)


@dataclass(frozen=True, order=True)
class SceneObject:
    """One object; `key` is its canonical phrase, e.g. 'large red circle left'."""

    shape: str
    colour: str
    size: str
    position: str

    @property
    def key(self) -> str:
        return f"{self.size} {self.colour} {self.shape} {self.position}"

    @property
    def combo(self) -> Combo:
        return (self.shape, self.colour)

    def as_dict(self) -> dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "position": self.position}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SceneObject:
        return cls(shape=d["shape"], colour=d["colour"], size=d["size"], position=d["position"])


@dataclass(frozen=True)
class Scene:
    """A sampled scene: objects sorted left to right, and where it came from."""

    id: str
    kind: int  # KIND_REGULAR or KIND_HELDOUT
    index: int  # index within its kind: the RNG key, independent of n
    objects: tuple[SceneObject, ...]
    split: str

    @property
    def label(self) -> str:
        """Scene identity for 'same attributes' evaluation: object keys joined by '|'."""
        return scene_label(self.objects)


def scene_label(objects: tuple[SceneObject, ...] | list[SceneObject]) -> str:
    order = {p: i for i, p in enumerate(POSITIONS)}
    return "|".join(o.key for o in sorted(objects, key=lambda o: order[o.position]))


def rng_for(seed: int, kind: int, index: int, stream: int) -> np.random.Generator:
    """The generator for one (scene, purpose); independent of every other such pair."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, kind, index, stream])))


def choose_heldout_combos(seed: int, fraction: float) -> list[Combo]:
    """Pick round(fraction * 36) (shape, colour) pairs that never appear in train/val/test.

    Picks first spread over distinct shapes and colours (so every shape and colour keeps most
    of its combinations in training), and always leaves every shape and colour at least one
    training combination: the held-out split then tests recombination of known attributes.
    """
    all_combos = list(itertools.product(SHAPES, COLOURS))
    # Up to half: then at least 18 pairs stay in training, which always leaves a removable pair
    # (at most 12 can be the last of their shape or colour), so the greedy pass below reaches k.
    if not 0.0 <= fraction <= 0.5:
        raise UserError(f"heldout_fraction={fraction} must be in [0, 0.5]")
    k = round(fraction * len(all_combos))
    rng = rng_for(seed, KIND_WORLD, 0, STREAM_SAMPLE)
    order = [all_combos[i] for i in rng.permutation(len(all_combos))]
    chosen: list[Combo] = []
    for distinct in (True, False):
        for combo in order:
            if len(chosen) == k:
                break
            if combo in chosen or not _keeps_coverage(chosen + [combo]):
                continue
            if distinct and any(c[0] == combo[0] or c[1] == combo[1] for c in chosen):
                continue
            chosen.append(combo)
    return sorted(chosen)


def _keeps_coverage(heldout: list[Combo]) -> bool:
    kept = set(itertools.product(SHAPES, COLOURS)) - set(heldout)
    return {s for s, _ in kept} == set(SHAPES) and {c for _, c in kept} == set(COLOURS)


def sample_objects(
    rng: np.random.Generator, allowed: list[Combo], forced: list[Combo] | None = None
) -> tuple[SceneObject, ...]:
    """One or two objects in distinct positions, sorted left to right.

    Args:
        allowed: (shape, colour) pairs any object may take.
        forced: if given, the first object's pair is drawn from it (held-out scenes).
    """
    count = 1 if rng.random() < P_SINGLE else MAX_OBJECTS
    slots = sorted(rng.choice(len(POSITIONS), size=count, replace=False).tolist())
    forced_slot = int(rng.integers(count))
    objects = []
    for j, slot in enumerate(slots):
        pool = forced if forced is not None and j == forced_slot else allowed
        shape, colour = pool[int(rng.integers(len(pool)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        objects.append(SceneObject(shape, colour, size, POSITIONS[slot]))
    return tuple(objects)


def split_counts(n: int, split: tuple[float, float, float]) -> dict[str, int]:
    """Scenes per regular split; the test split takes the rounding remainder."""
    if len(split) != 3 or any(not 0.0 <= f <= 1.0 for f in split) or abs(sum(split) - 1.0) > 1e-6:
        raise UserError(f"split={tuple(split)} must be three fractions (train, val, test) summing to 1")
    n_train, n_val = round(split[0] * n), round(split[1] * n)
    n_val = min(n_val, n - n_train)
    return {"train": n_train, "val": n_val, "test": n - n_train - n_val}


def scene_id(number: int, total: int) -> str:
    return f"s{number:0{max(6, len(str(max(total - 1, 0))))}d}"


def sample_world(
    seed: int, n: int, n_heldout: int, split: tuple[float, float, float], heldout: list[Combo]
) -> list[Scene]:
    """All scenes of a world, in id order: regular scenes first (split in contiguous blocks,
    which is a random split because scenes are i.i.d.), then the held-out scenes.

    Returns:
        n + n_heldout scenes; held-out scenes each contain at least one held-out combination,
        regular scenes none.
    """
    if n_heldout > 0 and not heldout:
        raise UserError("n_heldout > 0 needs held-out combinations: set heldout_fraction > 0")
    allowed = [c for c in itertools.product(SHAPES, COLOURS) if c not in set(heldout)]
    everything = list(itertools.product(SHAPES, COLOURS))
    counts = split_counts(n, split)
    names = [name for name in ("train", "val", "test") for _ in range(counts[name])]
    total = n + n_heldout
    scenes = []
    for i in range(n):
        objects = sample_objects(rng_for(seed, KIND_REGULAR, i, STREAM_SAMPLE), allowed)
        scenes.append(Scene(scene_id(i, total), KIND_REGULAR, i, objects, names[i]))
    for j in range(n_heldout):
        objects = sample_objects(rng_for(seed, KIND_HELDOUT, j, STREAM_SAMPLE), everything, forced=heldout)
        scenes.append(Scene(scene_id(n + j, total), KIND_HELDOUT, j, objects, "heldout"))
    return scenes
