"""What `mmembed search` runs: load an index and its model, compose the query, render the hits."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from mmembed.data.manifest import INLINE_MODALITIES
from mmembed.errors import UserError
from mmembed.modality import Modality
from mmembed.retrieval.hits import Hit, format_hits
from mmembed.retrieval.index import Index
from mmembed.retrieval.query import Query

log = logging.getLogger(__name__)
MEDIA_SAMPLE = 3  # files checked per modality: data that moved takes every file with it


def run_search(index_dir: str | Path, *, run: str | Path | None = None, weights: Sequence[float] = (),
               target: str | None = None, k: int = 5, as_json: bool = False, **items: Sequence[Any]) -> str:
    """Search a saved index with a (composed) query given as lists of raw items per modality.

    Args:
        index_dir: a folder written by `Index.save`.
        run: the model's run folder (default: the `run_dir` the index was saved with).
        weights: one weight per item, in the order the items are given (modality by modality,
            in keyword order); empty = 1.0 each. Negative weights mean "not like this".
        target: restrict hits to one modality.
        **items: modality name -> list of items (paths or captions), e.g. text=["a red circle"].
    Returns:
        A markdown table of hits, or a JSON list with `as_json`.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserError(f"-k must be a positive number of hits, got {k!r}")
    items = {name: list(values) for name, values in items.items() if values}
    if not items:
        raise UserError("nothing to search for: give at least one query item (e.g. --text, --image, --audio)")
    index = Index.load(index_dir)
    warn_if_media_moved(index, index_dir)
    if run is None:
        run = _saved_run(index, index_dir)
    from mmembed.model import load  # the model stack is only needed here, not by `Index`

    index.model = load(run)
    query = Query(weights=_split_weights(list(weights), items), **items)
    hits = index.search(query, target=target, k=k)
    if not as_json:
        return format_hits(hits)
    # NaN/Infinity (a manifest may hold them) are not JSON: null, as /api/search answers
    return json.dumps([finite_json(_as_dict(h)) for h in hits], indent=2, default=str, allow_nan=False)


def _saved_run(index: Index, index_dir: str | Path) -> str:
    """The run folder the index was saved with; UserError when it names none or that folder is gone
    (its path was not typed by the user: "run directory not found" did not say where it came from)."""
    run = index.info.get("run_dir")
    if run is None:
        raise UserError(f"{index_dir}: the index does not name the run that built it; pass the run directory")
    if not Path(run).exists():
        raise UserError(f"{index_dir} was built with the run {run}, which is gone (moved or deleted?); give the "
                        "model's run folder with --run (in Python: run=..., or Index.load(..., model=...))")
    return run


def warn_if_media_moved(index: Index, where: str | Path) -> None:
    """Log one warning when the media files a built index names are gone (its data moved, or was
    deleted): the hits name them all the same, and the server shows none of them."""
    manifest = index.info.get("manifest")
    if not isinstance(manifest, str):  # filled by `Index.add`: its metadata need not name files
        return
    folder = Path(manifest).parent
    paths = _sampled_media(index, str(folder))
    missing = [p for p in paths if not os.path.exists(p)]
    if not missing:
        return
    gone = (f"its data folder {folder} is gone" if not folder.is_dir()
            else f"{len(missing)} of the {len(paths)} media files checked are missing (e.g. {missing[0]})")
    log.warning("%s: %s, so its hits name files that are not there; if the data moved, re-run `mmembed index` "
                "on the manifest at its new place", where, gone)


def _sampled_media(index: Index, folder: str) -> list[str]:
    """The files of the first `MEDIA_SAMPLE` items of each modality that the manifest in `folder`
    gave (absolute paths under it, as the build writes them; rows added later may name anything)."""
    store = index._store  # its rows as they are: `Index.items` would copy every vector
    inside = folder.rstrip(os.sep) + os.sep
    paths = []
    with index._lock:  # a server may be adding to it already
        for modality in Modality:
            if modality not in INLINE_MODALITIES:
                rows = (store.modality_mask(modality) & store.alive).nonzero().squeeze(1).tolist()
                items = (store.metadata[r].get("item") for r in rows)  # each row decoded as it is reached
                paths += islice((p for p in items if isinstance(p, str) and p.startswith(inside)), MEDIA_SAMPLE)
    return paths


def _split_weights(weights: list[float], items: dict[str, list[Any]]) -> dict[str, list[float]] | None:
    """A flat list of weights, in item order -> per modality lists."""
    if not weights:
        return None
    n = sum(len(v) for v in items.values())
    if len(weights) != n:
        raise UserError(f"{len(weights)} weights for {n} query items (give one weight per item, or none)")
    out, start = {}, 0
    for name, values in items.items():
        out[name] = weights[start:start + len(values)]
        start += len(values)
    return out


def finite_json(value: Any) -> Any:
    """`value` with every non-finite float (NaN, Infinity) inside dicts, lists and tuples as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def _as_dict(hit: Hit) -> dict[str, Any]:
    return {"id": hit.id, "score": hit.score, "modality": str(hit.modality), "metadata": hit.metadata}
