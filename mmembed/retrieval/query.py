"""Queries: one item of any modality, a precomputed vector, or a weighted composition of several.

A composed query is embedding arithmetic in the shared space: every part is embedded to a unit
vector, multiplied by its weight, summed, and the sum is normalised again:

    q = normalise( Σ_i w_i · e_i ),   e_i = model.embed(modality_i, [item_i])[0]   (unit vectors)

    Query(image="red_square.png")                                     # plain image query
    Query(text="a red circle", audio="beep.wav")                      # both, weight 1 each
    Query(audio=["blue_square.wav", "red_circle.wav"], weights={"audio": [1, -1]})
    Query(vector=z, image="cat.png", weights={"vector": 0.5})         # precomputed vector too

A `list` holds several items of one modality; anything else, a tuple included, is one item
(so a `(waveform, sample_rate)` pair is one audio item).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mmembed.errors import UserError
from mmembed.modality import Modality
from mmembed.retrieval.store import unit_rows

VECTOR = "vector"  # the weights key of precomputed vectors
_ZERO_NORM = 1e-6  # below this the composition has no direction (the weights cancelled)


class Query:
    """A query for `Index.search` (or anything comparing in the shared space).

    Args:
        vector: a precomputed (D,) vector, or (n, D) for n vectors; normalised before weighting.
        weights: per modality name (or "vector") a float, or a list with one float per item.
            Unlisted parts weigh 1.0.
        **items: modality name -> one raw item or a list of items (paths, PIL images,
            `(waveform, sample_rate)` pairs, strings, arrays), e.g. `text="a red circle"`.
    """

    def __init__(self, vector: Any = None, *, weights: dict[str, float | Sequence[float]] | None = None,
                 **items: Any):
        self.items: dict[Modality, list[Any]] = {}
        for name, value in items.items():
            try:
                modality = Modality.parse(name)
            except ValueError as e:
                raise UserError(f"Query: {e}") from None
            if value is not None:
                self.items[modality] = list(value) if isinstance(value, list) else [value]
        self.vectors = _as_vectors(vector)
        self.weights = self._resolve_weights(weights or {})
        if not self.items and self.vectors is None:
            raise UserError("Query needs at least one item or a vector")
        for part, values in self.items.items():
            if not values:
                raise UserError(f"Query: {part} is an empty list")

    def _resolve_weights(self, weights: dict[str, Any]) -> dict[str, list[float]]:
        counts = {m.value: len(v) for m, v in self.items.items()}
        if self.vectors is not None:
            counts[VECTOR] = self.vectors.shape[0]
        unknown = set(weights) - set(counts)
        if unknown:
            raise UserError(f"Query: weights for {', '.join(sorted(unknown))}, which the query does not have "
                            f"(it has: {', '.join(counts)})")
        resolved = {}
        for part, n in counts.items():
            w = weights.get(part, 1.0)
            w = list(w) if isinstance(w, (list, tuple)) else [w] * n
            if not all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in w):
                raise UserError(f"Query: weights for {part} must be numbers, got {w!r:.80}")
            w = [float(x) for x in w]
            if len(w) != n:
                raise UserError(f"Query: {len(w)} weights for {n} {part} item(s)")
            if not all(map(math.isfinite, w)):  # as float64: 3.5e38 is finite, and `embed` scales it
                raise UserError(f"Query: weights for {part} must be finite, got {w}")
            resolved[part] = w
        return resolved

    @property
    def modalities(self) -> tuple[Modality, ...]:
        return tuple(self.items)

    @property
    def needs_model(self) -> bool:
        return bool(self.items)

    def embed(self, model: Any | None = None) -> Tensor:
        """The normalised weighted sum of the parts' unit embeddings.

        Args:
            model: anything with `embed(modality, items) -> (N, D)` and `embed_dim`; needed
                unless the query holds only vectors.
        Returns:
            (D,) float32 unit vector.
        Raises:
            UserError when a model is needed but missing, on a dimension mismatch, and when
            the weighted sum is the zero vector (e.g. `x` minus `x`): it has no direction.
        """
        parts = []  # (n, D) unit embeddings, with their (n,) weights
        if self.items:
            if model is None:
                raise UserError("this query holds raw items; pass a model to embed them")
            for modality, values in self.items.items():
                z = model.embed(modality, values).float()  # (n, D)
                parts.append((z, self.weights[modality.value]))
        if self.vectors is not None:
            parts.append((self.vectors, self.weights[VECTOR]))
        dims = {z.shape[1] for z, _ in parts}
        if model is not None:
            dims.add(int(model.embed_dim))
        if len(dims) != 1:
            raise UserError(f"query parts have different dimensions {sorted(dims)}")
        # the weights over the largest one (the direction is the same): large finite weights cannot
        # overflow the float32 sum (1e38 gave an infinite norm, then a zero query)
        top = max(abs(x) for _, w in parts for x in w)
        if top == 0:
            raise UserError("query embeds to the zero vector (every weight is 0); it has no direction")
        total = sum((torch.tensor([x / top for x in w]) @ z.cpu()) for z, w in parts)  # (D,)
        norm = float(total.norm())
        if norm < _ZERO_NORM:
            raise UserError("query embeds to the zero vector (its weighted parts cancel); it has no direction")
        return total / norm

    def __repr__(self) -> str:
        parts = [f"{m}={v[0]!r}" if len(v) == 1 else f"{m}=[{len(v)} items]" for m, v in self.items.items()]
        if self.vectors is not None:
            parts.append(f"vector=({self.vectors.shape[0]}, {self.vectors.shape[1]})")
        return f"Query({', '.join(parts)}, weights={self.weights})"


def _as_vectors(vector: Any) -> Tensor | None:
    """None, (D,) or (n, D) -> (n, D) float32 unit rows; NaN/Inf or zero rows are refused."""
    if vector is None:
        return None
    try:
        v = torch.as_tensor(vector).detach()
    except (TypeError, ValueError, RuntimeError):  # a str, a list of them, None inside: torch's raw TypeError
        raise UserError(f"Query: vector must be a (D,) or (n, D) array of numbers, "
                        f"got {type(vector).__name__}") from None
    if v.is_complex():  # .float() dropped the imaginary part with a warning
        raise UserError(f"Query: vector must be real, got {v.dtype}")
    shape = tuple(v.shape)
    v = v.float().cpu()
    if v.dim() == 1:
        v = v.unsqueeze(0)
    if v.dim() != 2 or v.shape[0] == 0:
        raise UserError(f"Query: vector must have shape (D,) or (n, D), got {shape}")
    if v.shape[1] == 0:  # it was called "the zero vector"
        raise UserError(f"Query: vector is empty (shape {shape}); pass a (D,) or (n, D) vector")
    if not bool(torch.isfinite(v).all()):
        raise UserError("Query: vector contains NaN or Inf")
    # scaled as the index scales its rows: a norm past float32's squares (3e19) made the row zeros
    return unit_rows(v, lambda row: UserError("Query: vector is the zero vector; it has no direction"))
