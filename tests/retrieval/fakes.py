"""A deterministic stand-in for `mmembed.Model` in retrieval and evaluation tests.

Every item maps to a "concept": the last word of its file stem or caption ("img/c3.png",
"wav/c3.wav" and "a photo of a c3" all mean c3). An item's embedding is the concept's seeded
random direction plus a small modality-specific perturbation, so the same concept seen
through two modalities is close but not identical, and different concepts are far apart.
Items whose concept starts with "broken" raise BadInput, like an unreadable file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

from mmembed.errors import BadInput
from mmembed.modality import Modality


def _seeded(text: str, dim: int) -> Tensor:
    seed = int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)
    return torch.randn(dim, generator=torch.Generator().manual_seed(seed))


def concept(item: object) -> str:
    if isinstance(item, tuple):  # a (waveform, sample_rate) pair: its "concept" is its length
        return f"wave{len(item[0])}"
    return Path(str(item)).stem.split()[-1]


class FakeModel:
    def __init__(self, dim: int = 16, fingerprint: str = "fake-a", noise: float = 0.1,
                 modalities: tuple[Modality, ...] = tuple(Modality)):
        self.embed_dim = dim
        self.fingerprint = fingerprint
        self.noise = noise
        self.modalities = list(modalities)
        self.calls = 0

    def embed(self, modality: Modality | str, items: list) -> Tensor:
        modality = Modality.parse(modality)
        self.calls += 1
        rows = []
        for i, item in enumerate(items):
            c = concept(item)
            if c.startswith("broken"):
                raise BadInput(f"{modality} item {i}: cannot read {item}")
            rows.append(_seeded(c, self.embed_dim) + self.noise * _seeded(f"{modality}/{c}", self.embed_dim))
        if not rows:
            return torch.zeros(0, self.embed_dim)
        return torch.nn.functional.normalize(torch.stack(rows), dim=1)  # (N, D)
