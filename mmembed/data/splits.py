"""Seeded, stratified splits: indices dealt into parts by fractions, each key's (label's) members
apart, so every part holds each label in proportion. `mmembed data manifest --split` deals rows
this way, the linear probe its training items into a fit and a validation part."""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence


def shares(n: int, fractions: Sequence[float]) -> list[int]:
    """n members dealt by `fractions` (summing to 1), by largest remainders (ties to the earlier
    part): the counts sum to n."""
    exact = [n * f for f in fractions]
    counts = [int(e) for e in exact]
    order = sorted(range(len(fractions)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:n - sum(counts)]:
        counts[i] += 1
    return counts


def deal(keys: Sequence[Hashable], fractions: Sequence[float], seed: int) -> list[list[int]]:
    """The indices of `keys` dealt into len(fractions) parts: each key's indices shuffled by `seed`
    (keys taken in sorted order of their text), then shared out by `shares`. Each part sorted."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    rng = random.Random(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    for key in sorted(groups, key=str):
        members = groups[key]
        rng.shuffle(members)
        start = 0
        for part, count in zip(parts, shares(len(members), fractions)):
            part += members[start:start + count]
            start += count
    return [sorted(part) for part in parts]
