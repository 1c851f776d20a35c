"""Seeded, stratified splits: indices dealt into parts by fractions so that every part holds its
share of the whole exactly (largest remainders) and of each key (label) about its share: within a
row or so, and a key among many single-row ones by up to about half their number (see `deal`).
`mmembed data manifest --split` deals rows this way, the linear probe its training items into a
fit and a validation part."""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence


def shares(n: int, fractions: Sequence[float]) -> list[int]:
    """n members dealt by `fractions` (normalised to sum 1), by largest remainders (ties to the
    earlier part): the counts sum to n."""
    total = sum(fractions)
    exact = [n * f / total for f in fractions]
    counts = [int(e) for e in exact]
    order = sorted(range(len(fractions)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:n - sum(counts)]:
        counts[i] += 1
    return counts


def deal(keys: Sequence[Hashable], fractions: Sequence[float], seed: int) -> list[list[int]]:
    """The indices of `keys` dealt into len(fractions) parts, each part sorted.

    Each key's indices are shuffled (by `seed`) and spread evenly over [0, 1) at a random offset
    ((j + u) / n for the j-th of n, one u per key); every index takes its place in one list by
    that position, and the list is cut by `shares` of the whole. So the parts' sizes are exact,
    and a key's members in any stretch of [0, 1) number its share of them, rounded up or down. The
    cuts fall by count, at positions the other keys' members move: single-member keys, each at a
    random place, can move them by up to about half their number (10 of them beside two keys of 50,
    split in halves: 27 / 23 of one). Rounding each key alone instead sent 100 keys of 5 members to 400 / 100 / 0 when asked for
    0.8 / 0.1 / 0.1."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    rng = random.Random(seed)
    placed = []
    for key in sorted(groups, key=str):
        members = groups[key]
        rng.shuffle(members)
        offset = rng.random()
        placed += [((j + offset) / len(members), i) for j, i in enumerate(members)]
    order = [i for *_, i in sorted(placed)]
    parts, start = [], 0
    for count in shares(len(order), fractions):
        parts.append(sorted(order[start:start + count]))
        start += count
    return parts
