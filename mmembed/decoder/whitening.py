"""Whitening: every direction of the shared space on an even footing before the projector.

    vector z ─► (z − mean) · W ─► Projector
    W = U (Λ + ε)^(-1/2), from the eigendecomposition U Λ Uᵀ of the covariance of sample
    vectors (every modality's, pooled), fitted once and saved with the decoder

A contrastively trained space spends most of its variance on a few directions: the demo's
128-dimensional space has an effective rank near 8 (7 eigenvalues hold 90% of the variance).
The projector's LayerNorm keeps that imbalance, so the decoder learns the big directions first
and the small ones, where finer distinctions live, slowly. Whitening gives every direction unit
variance; ε keeps directions with next to no variance from being blown up into noise.

Measured on the demo's space (docs/decoder.md): descriptions from
sounds and from an image with its sound read markedly better, cross-modal transfer worse — the
small directions are also where one modality's vectors differ from another's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Whitening(nn.Module):
    """z ↦ (z − mean) · W with statistics fitted once (`fit`), then fixed (buffers).

    Args:
        dim: D, the vectors' dimension.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("matrix", torch.eye(dim))

    @torch.no_grad()
    def fit(self, samples: Tensor, eps: float) -> None:
        """Statistics of `samples` (N, D), N ≥ 2; `eps` > 0 is added to every eigenvalue."""
        if samples.ndim != 2 or samples.shape[1] != self.mean.shape[0] or samples.shape[0] < 2:
            raise ValueError(f"whitening needs (N >= 2, {self.mean.shape[0]}) samples, got {tuple(samples.shape)}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        x = samples.to(self.mean.device, torch.float64)
        mean = x.mean(0)
        centred = x - mean
        eigenvalues, vectors = torch.linalg.eigh(centred.T @ centred / (len(x) - 1))
        self.mean.copy_(mean)
        self.matrix.copy_(vectors / (eigenvalues.clamp_min(0) + eps).sqrt())

    def forward(self, z: Tensor) -> Tensor:
        """(M, D) → (M, D)."""
        return (z - self.mean.to(z.dtype)) @ self.matrix.to(z.dtype)
