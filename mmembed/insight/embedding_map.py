"""Embedding map: a 2-D picture of any index, coloured by a metadata column, marked by modality.

    index = mm.Index.load("runs/demo/index")
    result = embedding_map(index, color_by="label", out="map.png")             # PCA
    result = embedding_map(index, color_by="objects.0.colour", method="tsne", out="map.png")

Projections: "pca" (exact, from an SVD of the centred vectors; always available), "tsne"
(scikit-learn) and "umap" (umap-learn), the last two only when installed. Colour: a numeric
column gets a colourbar over its finite values (missing, infinite and NaN ones are grey; one
with values beyond ±1e300, where a colour scale overflows, is categorical); any other column is categorical, with a
legend of its 19 most frequent values plus "other" (values that are all colour names, like
"red", are drawn in that colour). A column is a metadata key, or a dotted path into nested values
(`objects.0.colour`); "modality" is always one. Marker shape = modality.
"""

from __future__ import annotations

import logging
import numbers
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from mmembed.config_train import MAX_SEED
from mmembed.errors import UserError
from mmembed.insight.plotting import pyplot, save_png

if TYPE_CHECKING:
    from mmembed.retrieval import Index

log = logging.getLogger(__name__)

Method = Literal["pca", "tsne", "umap"]
METHODS: dict[str, str] = {"pca": "", "tsne": "scikit-learn", "umap": "umap-learn"}  # method -> pip package
MODALITY_COLUMN = "modality"
MAX_CATEGORIES = 20  # legend entries, "other" included
_MISSING = "(missing)"
_MARKERS = ["o", "s", "^", "D", "v", "P", "X"]
_MAX_LISTED = 30  # columns named in an unknown-column error
_MAX_COLOUR_VALUE = 1e300  # a colour scale's arithmetic (range, colourbar steps) overflows near float's 1.8e308


@dataclass
class EmbeddingMap:
    """What was drawn.

    Fields:
        rows: (N,) positions of the drawn points among the vectors given (sorted).
        xy: (N, 2) float coordinates.
        modalities: (N,) modality name of each point.
        values: (N,) the colour column's value of each point (None where missing).
        numeric: whether the column was drawn with a colourbar.
        path: the PNG written.
        method: the projection drawn: PCA where t-SNE or UMAP was asked of fewer than 4 points, or of
            points all at one place (`method_used`).
    """

    rows: np.ndarray
    xy: np.ndarray
    modalities: list[str]
    values: list[Any]
    numeric: bool
    path: Path
    method: str


def pca_2d(x: Tensor) -> Tensor:
    """Project rows onto their first two principal components (exact SVD of the centred rows).

    Each axis's sign is fixed so that its largest-magnitude loading is positive (deterministic).

    Shapes:
        x: (N, D) → (N, 2); fewer than 2 components (N < 2 or D < 2) are padded with zeros.
    """
    x = x.double()
    centred = x - x.mean(dim=0, keepdim=True)  # (N, D)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)  # vh: (K, D), K = min(N, D)
    v = vh[:2].T  # (D, k<=2)
    flip = torch.sign(v.gather(0, v.abs().argmax(dim=0, keepdim=True)))  # (1, k)
    xy = centred @ (v * flip)  # (N, k)
    if xy.shape[1] < 2:
        xy = torch.cat([xy, xy.new_zeros(xy.shape[0], 2 - xy.shape[1])], dim=1)
    return xy.float()


def method_used(x: Tensor, method: Method) -> Method:
    """The projection `project_2d` draws (N, D) points with: PCA where t-SNE and UMAP cannot work,
    below 4 points (they need neighbours) or with every point in one place (scikit-learn's t-SNE
    divides by their zero spread and crashes the process). An unknown method is a UserError."""
    if method not in METHODS:
        raise UserError(f"unknown projection method {method!r}; valid: {', '.join(METHODS)}")
    if x.shape[0] < 4 or bool((x == x[:1]).all()):
        return "pca"
    return method


def project_2d(x: Tensor, method: Method = "pca", seed: int = 0) -> Tensor:
    """(N, D) → (N, 2) with PCA, t-SNE or UMAP (or PCA where those cannot work: `method_used`).
    An unknown or uninstalled method is a one-line UserError."""
    method = method_used(x, method)
    if method == "pca":
        return pca_2d(x)
    data = x.double().numpy()
    if method == "tsne":
        manifold = _optional("sklearn.manifold", method)
        perplexity = min(30.0, (x.shape[0] - 1) / 3)  # scikit-learn requires perplexity < n_samples
        xy = manifold.TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(data)
    else:
        umap = _optional("umap", method)
        xy = umap.UMAP(n_components=2, n_neighbors=min(15, x.shape[0] - 1), random_state=seed).fit_transform(data)
    return torch.as_tensor(np.asarray(xy), dtype=torch.float32)


def _optional(module: str, method: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"--method {method} needs the {METHODS[method]} package, which is not installed "
                        f"(pip install {METHODS[method]}); --method pca always works") from None


def map_columns(metadata: Sequence[dict[str, Any]], sample: int = 200) -> list[str]:
    """Columns that `color_by` accepts, as found in the first `sample` rows: scalar keys, and dotted
    paths into nested dicts and lists (lists through their first element only), plus "modality"."""
    found: dict[str, None] = {MODALITY_COLUMN: None}
    for meta in metadata[:sample]:
        _flatten(meta, "", found)
    return list(found)


def _flatten(value: Any, prefix: str, found: dict[str, None]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(v, f"{prefix}{k}.", found)
    elif isinstance(value, (list, tuple)):
        if value:
            _flatten(value[0], f"{prefix}0.", found)
    elif prefix:
        found[prefix[:-1]] = None


def column_values(metadata: Sequence[dict[str, Any]], column: str) -> list[Any]:
    """The value of a dotted-path column in each row (None where a row lacks it or it is not a scalar).

    Raises:
        UserError: when no row has the column; the message lists the valid columns.
    """
    values = [_lookup(meta, column) for meta in metadata]
    if all(v is None for v in values):
        valid = map_columns(metadata)
        listed = ", ".join(valid[:_MAX_LISTED]) + (f", ... ({len(valid)} in all)" if len(valid) > _MAX_LISTED else "")
        raise UserError(f"unknown --color-by column {column!r}; valid: {listed}")
    return values


def _lookup(meta: dict[str, Any], column: str) -> Any:
    return _follow(meta, column.split("."))


def _follow(value: Any, parts: list[str]) -> Any:
    """The scalar at the path `parts`; a key may itself hold dots ("file.name"), so a dict tries its
    longest matching key first."""
    if not parts:
        return None if isinstance(value, (dict, list, tuple)) else value
    if isinstance(value, dict):
        for cut in range(len(parts), 0, -1):
            key = ".".join(parts[:cut])
            if key in value and (found := _follow(value[key], parts[cut:])) is not None:
                return found
        return None
    if isinstance(value, (list, tuple)) and parts[0].isdigit() and int(parts[0]) < len(value):
        return _follow(value[int(parts[0])], parts[1:])
    return None


_DECIMAL = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")  # a number as a CSV cell spells it


def is_numeric(values: Sequence[Any]) -> bool:
    """True when every present value is a real number (bools are categories) or a decimal number's
    text (a CSV manifest's cells are all text: its numbers drew as hundreds of categories); an empty
    cell is missing."""
    present = [v for v in values if v is not None and v != ""]
    return bool(present) and all((isinstance(v, numbers.Real) and not isinstance(v, bool))
                                 or (isinstance(v, str) and _DECIMAL.fullmatch(v)) for v in present)


def numeric_colours(values: Sequence[Any]) -> np.ndarray | None:
    """Each value of a numeric column as a float, NaN (drawn grey, as missing) where it is missing,
    infinite, NaN or beyond float range (a JSON 10**400); None where no finite value is left or
    one is beyond ±1e300, where the range or the colourbar's steps overflow (±1e308): such a
    column is drawn as categories.

    Shapes:
        values: N values → (N,) float64, every entry finite or NaN.
    """
    c = np.array([_as_float(v) for v in values], dtype=np.float64)
    c[~np.isfinite(c)] = np.nan
    finite = np.abs(c[~np.isnan(c)])
    if finite.size == 0 or finite.max() > _MAX_COLOUR_VALUE:
        return None
    return c


def _as_float(value: Any) -> float:
    try:
        return np.nan if value is None or value == "" else float(value)
    except OverflowError:  # an int past float range
        return np.nan


def sample_rows(n: int, max_points: int, seed: int) -> np.ndarray:
    """Sorted positions of at most `max_points` of `n` rows: all of them, or a seeded random subset."""
    if max_points < 1:
        raise UserError(f"--max-points must be positive, got {max_points}")
    if n <= max_points:
        return np.arange(n)
    generator = torch.Generator().manual_seed(seed)
    return np.sort(torch.randperm(n, generator=generator)[:max_points].numpy())


def map_vectors(vectors: Tensor, modalities: Sequence[str], metadata: Sequence[dict[str, Any]], color_by: str,
                out: str | Path, *, method: Method = "pca", max_points: int = 5000, seed: int = 0,
                title: str | None = None) -> EmbeddingMap:
    """Project vectors to 2-D and draw them: colour = `color_by`, marker = modality.

    Args:
        vectors: (N, D) embeddings.
        modalities: N modality names.
        metadata: N dicts; `color_by` is a key or dotted path into them, or "modality".
        color_by: the column that colours the points.
        out: the PNG to write.
        method: "pca", "tsne" or "umap".
        max_points: above this many rows a seeded random subset is drawn.
        seed: for the subset and for t-SNE/UMAP.
        title: the figure title (default: says the method, column and point count).

    Returns:
        The coordinates and values drawn, and the PNG path.
    """
    n = vectors.shape[0]
    if len(modalities) != n or len(metadata) != n:
        raise ValueError(f"{n} vectors, {len(modalities)} modalities, {len(metadata)} metadata rows")
    rows = _sample(n, max_points, seed)
    return _draw(vectors[torch.as_tensor(rows)], [modalities[i] for i in rows], [metadata[i] for i in rows], rows, n,
                 color_by, out, method, seed, title)


def _sample(n: int, max_points: int, seed: int) -> np.ndarray:
    if n == 0:
        raise UserError("nothing to map: the index is empty")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:  # t-SNE's own range
        raise UserError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    return sample_rows(n, max_points, seed)


def _draw(points: Tensor, modalities: Sequence[str], metadata: Sequence[dict[str, Any]], rows: np.ndarray, n: int,
          color_by: str, out: str | Path, method: Method, seed: int, title: str | None) -> EmbeddingMap:
    """`map_vectors` once `rows` of the `n` are drawn: `points`, `modalities` and `metadata` are theirs."""
    meta = [{**m, MODALITY_COLUMN: str(mod)} for m, mod in zip(metadata, modalities)]
    values = column_values(meta, color_by)  # checked before the (possibly slow) projection
    points = points.float()
    used = method_used(points, method)
    xy = project_2d(points, method, seed).numpy()  # (N', 2)
    mods = [str(m) for m in modalities]
    colours = numeric_colours(values) if is_numeric(values) else None  # None: drawn as categories
    if title is None:
        shown = f"{len(rows)} of {n} points" if len(rows) < n else f"{n} points"
        title = f"{used.upper() if used == 'pca' else used} map, colour = {color_by} ({shown})"
    path = _plot(xy, mods, values, colours, color_by, Path(out), title)
    log.info("embedding map of %d points (%s, colour=%s) -> %s", len(rows), used, color_by, path)
    return EmbeddingMap(rows, xy, mods, values, colours is not None, path, used)


def embedding_map(index: Index | str | Path, color_by: str, out: str | Path, *, method: Method = "pca",
                  max_points: int = 5000, seed: int = 0) -> EmbeddingMap:
    """`map_vectors` over every live item of an index.

    Args:
        index: an `mmembed.Index`, or the folder of a saved one.
        color_by, out, method, max_points, seed: as in `map_vectors`.

    Returns:
        What was drawn; its `rows` index the live items in storage order (`index.ids()`).
    """
    from mmembed.retrieval import Index

    if not isinstance(index, Index):
        index = Index.load(index)
    with index.locked():  # the ids sampled are the ids read, whatever another thread adds or removes
        ids = index.ids()
        rows = _sample(len(ids), max_points, seed)  # before reading items: their metadata is copied out
        vectors, modalities, metadata = index.items([ids[r] for r in rows])  # (N', D), N', N'
    return _draw(vectors, [m.value for m in modalities], metadata, rows, len(ids), color_by, out, method, seed, None)


def _plot(xy: np.ndarray, modalities: list[str], values: list[Any], colours: np.ndarray | None, column: str,
          out: Path, title: str) -> Path:
    """`colours`: a numeric column's `numeric_colours` (a colourbar), or None (categories)."""
    from matplotlib.lines import Line2D

    fig, ax = pyplot().subplots(figsize=(7, 5.5))
    kinds = list(dict.fromkeys(modalities))
    marker_of = {m: _MARKERS[i % len(_MARKERS)] for i, m in enumerate(kinds)}
    mods = np.array(modalities)
    if colours is not None:
        from matplotlib import colormaps

        c = colours  # limits from finite values: one inf made every finite point one colour
        lo, hi = np.nanmin(c), np.nanmax(c)
        cmap = colormaps["viridis"].with_extremes(bad="lightgrey")  # rows lacking the column, or not finite
        for m in kinds:
            sel = mods == m
            scatter = ax.scatter(xy[sel, 0], xy[sel, 1], c=c[sel], cmap=cmap, vmin=lo, vmax=hi,
                                 marker=marker_of[m], s=16, alpha=0.75, edgecolors="none", plotnonfinite=True)
        fig.colorbar(scatter, ax=ax, label=column)
    else:
        labels, colour_of = _categories(values)
        for m in kinds:
            sel = mods == m
            ax.scatter(xy[sel, 0], xy[sel, 1], c=[colour_of[lab] for lab, s in zip(labels, sel) if s],
                       marker=marker_of[m], s=16, alpha=0.75, edgecolors="none")
        handles = [Line2D([], [], marker="o", linestyle="", color=col, label=lab) for lab, col in colour_of.items()]
        legend = ax.legend(handles=handles, title=column, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.add_artist(legend).set_clip_on(False)  # add_artist clips to the axes; this legend sits outside
    shapes = [Line2D([], [], marker=marker_of[m], linestyle="", color="black", label=m) for m in kinds]
    if colours is not None:  # the colourbar holds the right margin
        ax.legend(handles=shapes, title="modality", fontsize=7, loc="best")
    else:
        ax.legend(handles=shapes, title="modality", fontsize=7, loc="lower left", bbox_to_anchor=(1.01, 0.0))
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    return save_png(fig, out, layout=False, bbox_inches="tight")  # tight_layout leaves no room for both outside legends


def _categories(values: list[Any]) -> tuple[list[str], dict[str, Any]]:
    """Each value's legend label (the 19 most frequent kept, the rest "other") and label → colour."""
    import matplotlib.colors as mc
    from matplotlib import colormaps

    labels = [_MISSING if v is None else str(v) for v in values]
    ranked = [lab for lab, _ in Counter(labels).most_common()]
    if len(ranked) > MAX_CATEGORIES:
        kept = set(ranked[:MAX_CATEGORIES - 1])
        labels = [lab if lab in kept else "other" for lab in labels]
        ranked = ranked[:MAX_CATEGORIES - 1] + ["other"]
    named = [lab for lab in ranked if lab not in (_MISSING, "other")]
    if named and all(lab in mc.CSS4_COLORS or lab in mc.BASE_COLORS for lab in named):
        colour_of = {lab: lab for lab in named}  # the column names colours: draw each in its own
    else:
        palette = colormaps["tab20"].colors
        colour_of = {lab: palette[i % len(palette)] for i, lab in enumerate(named)}
    colour_of.update({lab: "lightgrey" for lab in ranked if lab in (_MISSING, "other")})
    return labels, {lab: colour_of[lab] for lab in ranked}


__all__ = ["EmbeddingMap", "METHODS", "column_values", "embedding_map", "is_numeric", "map_columns", "map_vectors",
           "numeric_colours", "pca_2d", "project_2d", "sample_rows"]
