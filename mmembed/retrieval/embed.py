"""Embed every modality of a manifest once: shared by `Index.build` and `evaluate_manifest`.

Items are embedded in batches. A batch that raises `BadInput` (one unreadable file) is split
in halves until the bad items are isolated, so one broken file costs O(log batch) extra
forward passes instead of the whole batch; bad items are skipped and counted with a reason.
An item the manifest reader refuses (a path outside the root, a value that is not a string) is
skipped alone too (`read_manifest(bad_items="item")`); "row" skips are the rows unusable as a
whole (not JSON, no good item at all, malformed `captions`).
With `skip="row"` (what `mmembed eval` uses) a row with a bad item is left out whole, in every
modality, as training's validation reads it: then eval reproduces a logged validation figure.

Under torchrun (`torchrun ... -m mmembed index`), rank r embeds batches r, r + W, r + 2W, ...
and rank 0 gathers them back in batch order: the same batches as one process, so the same
vectors, skips and order; the other ranks get an empty result.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mmembed.data.manifest import INLINE_MODALITIES, Manifest, Row, read_manifest
from mmembed.errors import BadInput, UserError
from mmembed.modality import Modality
from mmembed.train.collectives import broadcast_object, gather_to_main
from mmembed.train.distributed import current_world

log = logging.getLogger(__name__)
_WARN_FIRST = 5  # skipped items logged one by one before only the count is reported
SkipRule = Literal["item", "row"]  # what one unreadable item leaves out: itself, or its whole row


@dataclass
class EmbeddedModality:
    """The rows of one modality that embedded, aligned with their vectors."""

    vectors: Tensor  # (n, D) float32 unit rows
    rows: list[Row]


@dataclass
class ManifestEmbeddings:
    path: Path
    by_modality: dict[Modality, EmbeddedModality]
    skipped: list[tuple[int, str, str]] = field(default_factory=list)  # (line, modality or "row", reason)
    n_rows: int = 0  # usable manifest rows


def embed_manifest(
    model: Any,
    manifest_path: str | Path,
    *,
    modalities: Modality | str | Iterable[Modality | str] | None = None,
    batch_size: int = 64,
    progress: bool = True,
    skip: SkipRule = "item",
    reserved: Mapping[str, str] | None = None,
) -> ManifestEmbeddings:
    """Read a manifest and embed each requested modality of every row.

    Args:
        model: anything with `embed(modality, items) -> (N, D)` and `embed_dim`.
        manifest_path: JSONL/CSV manifest (see `mmembed.data.manifest`).
        modalities: which modalities to embed (default: every one present in the manifest
            that the model can embed).
        batch_size: items per `model.embed` call.
        progress: show a tqdm bar per modality.
        skip: "item" leaves out an unreadable or refused item alone (an index keeps the row's other
            items; a refused path is an item skip, as a missing file is); "row" leaves out its whole
            row and counts it once, as "row" (training's validation rule).
        reserved: metadata columns the caller writes itself (name → what it holds): a manifest with
            such a column is refused (UserError) before anything is embedded.
    Returns:
        `ManifestEmbeddings`; manifest rows that could not be parsed count as skipped too.
    """
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    if skip not in ("item", "row"):
        raise ValueError(f"skip must be 'item' or 'row', got {skip!r}")
    from mmembed.data.synth.world_folder import check_complete  # (the world's renderers: only when asked)

    check_complete(Path(manifest_path).parent)  # a world cut short: its media were never all rendered
    manifest = read_manifest(manifest_path, allow_outside_root=outside_root_allowed(model), bad_items=skip)
    if clash := sorted(manifest.meta_columns & set(reserved or {})):  # they were overwritten without a word
        own = " and ".join(f"{name!r} ({what})" for name, what in reserved.items())
        raise UserError(f"{manifest.path}: an index writes its own {own} into each item's metadata; rename the "
                        f"manifest's {' and '.join(map(repr, clash))} column" + "s" * (len(clash) > 1))
    refused = {m for _, m, _ in manifest.skipped_items}  # a column whose every item was refused is still there
    present = [m for m in Modality if m in manifest.modalities or m in refused]
    wanted = _select_modalities(model, present, modalities, manifest.path)
    out = ManifestEmbeddings(path=manifest.path, by_modality={}, n_rows=len(manifest.rows))
    out.skipped.extend((line, "row", reason) for line, reason in manifest.skipped)
    out.skipped.extend((line, m.value, reason) for line, m, reason in manifest.skipped_items if m in wanted)
    main = current_world().main
    for modality in wanted:
        rows = [r for r in manifest.rows if modality in r.items]
        if not rows:  # every item refused: counted above
            continue
        vectors, ok, reasons = _embed_items(model, modality, [r.items[modality] for r in rows],
                                            batch_size, progress)
        if not main:
            continue
        for i, reason in reasons:
            out.skipped.append((rows[i].line, modality.value, reason))
        out.by_modality[modality] = EmbeddedModality(vectors, [r for r, good in zip(rows, ok) if good])
    refusal = None
    if main:
        out.skipped.sort(key=lambda s: s[0])  # refused items among the embedder's skips, in line order
        hint = "" if _media_read(out) else media_root_hint(model, manifest)
        if skip == "row":
            _drop_bad_rows(out)
        log_skipped(out.skipped, manifest.path)
        if not any(part.rows for part in out.by_modality.values()):
            refusal = str(nothing_read(manifest.path, out.skipped, hint))
        elif hint:  # the captions were read: an index of them alone exits 0, so say why its media are not
            log.warning("%s: no media file could be read: %s", manifest.path, hint)
    # rank 0 decides for every rank: the others, waiting for it, reported a lost peer instead
    if (refusal := broadcast_object(refusal)) is not None:
        raise UserError(refusal)
    return out if main else ManifestEmbeddings(path=manifest.path, by_modality={})


def _drop_bad_rows(out: ManifestEmbeddings) -> None:
    """Leave out every row with a skipped item, in every modality; its skip is counted once, in line
    order, with the reason `ManifestDataset` gives ("image: cannot read ...")."""
    bad: dict[int, str] = {}
    for line, what, reason in out.skipped:
        bad.setdefault(line, reason if what == "row" else f"{what}: {reason}")
    for modality, part in out.by_modality.items():
        keep = [i for i, row in enumerate(part.rows) if row.line not in bad]
        out.by_modality[modality] = EmbeddedModality(part.vectors[torch.tensor(keep, dtype=torch.long)],
                                                     [part.rows[i] for i in keep])
    out.skipped = [(line, "row", reason) for line, reason in sorted(bad.items())]


def nothing_read(path: Path, skipped: list[tuple[int, str, str]], hint: str = "") -> UserError:
    """A manifest of which no item could be read: an empty index or report was a success (exit 0).
    `hint` (from `media_root_hint`) says where its media paths were looked for."""
    if not skipped:
        return UserError(f"{path}: no item to embed")
    line, what, reason = skipped[0]
    return UserError(f"{path}: no item could be read ({skip_summary(skipped)} skipped; the first, line {line}, "
                     f"{what}: {reason})" + (f"; {hint}" if hint else ""))


def skip_summary(skipped: list[tuple[int, str, str]]) -> str:
    """"2 items and 1 row": items and whole rows are counted apart (a row is not an item)."""
    rows = sum(what == "row" for _, what, _ in skipped)
    parts = [f"{n} {name}{'s' * (n != 1)}" for n, name in ((len(skipped) - rows, "item"), (rows, "row")) if n]
    return " and ".join(parts) or "nothing"


def _media_read(out: ManifestEmbeddings) -> bool:
    """Whether an item of a file modality was read, or none was wanted."""
    media = [part for m, part in out.by_modality.items() if m not in INLINE_MODALITIES]
    return not media or any(part.rows for part in media)


def media_root_hint(model: Any, manifest: Manifest) -> str:
    """Where a manifest's missing media paths were looked for, and where training found them if the
    run's `data.root` has them: eval and index resolve against the manifest's folder, training against
    data.root, so a manifest moved into a subfolder found none of its media. "" when no media file is missing."""
    missing = next((p for r in manifest.rows for m, p in r.items.items()
                    if m not in INLINE_MODALITIES and not Path(p).exists()), None)
    if missing is None:
        return ""
    relative = os.path.relpath(missing, manifest.root)
    hint = f"media paths resolve against the manifest's folder {manifest.root} ({relative!r} is not there)"
    data_root = getattr(getattr(getattr(model, "config", None), "data", None), "root", None)
    if data_root and (Path(data_root) / relative).exists() and os.path.abspath(data_root) != str(manifest.root):
        return (f"{hint}; it is under the run's data.root {os.path.abspath(data_root)}, which training resolved "
                f"them against: move the manifest into that folder (next to its media) or write its paths "
                f"relative to {manifest.root}")
    return f"{hint}: move the manifest next to its media or write its paths relative to its folder"


def _select_modalities(model: Any, present: Sequence[Modality], requested: Iterable | None,
                       path: Path) -> list[Modality]:
    supported = getattr(model, "modalities", None)
    supported = list(supported) if supported is not None else list(Modality)
    if requested is None:
        chosen = [m for m in present if m in supported]
        if not chosen:
            raise UserError(f"{path}: none of its modalities ({', '.join(present)}) has a tower in this model "
                            f"(it has: {', '.join(supported)})")
        return chosen
    if isinstance(requested, (str, Modality)):  # "text" alone, not the letters t, e, x, t
        requested = [requested]
    chosen = list(dict.fromkeys(Modality.parse(m) for m in requested))  # each once: twice embedded it twice
    if not chosen:
        raise UserError(f"{path}: no modality asked for (modalities is empty; None embeds every one the model has)")
    for m in chosen:
        if m not in present:
            raise UserError(f"{path}: no row has a {m} column (present: {', '.join(present)})")
        if m not in supported:
            raise UserError(f"this model has no {m} tower (it has: {', '.join(supported)})")
    return chosen


def _embed_items(model: Any, modality: Modality, items: list[Any], batch_size: int,
                 progress: bool) -> tuple[Tensor, list[bool], list[tuple[int, str]]]:
    """-> (n_ok, D) vectors, per-item ok flags, (index, reason) of the skipped items (on rank 0
    of a distributed job, which gathers every rank's batches; the others' results are partial)."""
    world = current_world()
    mine: list[tuple[int, list[tuple[list[int], Tensor | None, str]]]] = []  # (batch number, its spans)
    # disable=None: no terminal (a log file, a pipe), no bar, as in training (its frames filled the log)
    bar = tqdm(total=len(items), desc=f"embed {modality}", unit="item", leave=False,
               disable=None if progress and world.main else True)
    with bar, torch.inference_mode():
        for number, start in enumerate(range(0, len(items), batch_size)):
            idx = list(range(start, min(start + batch_size, len(items))))
            if number % world.size == world.rank:
                spans = [(span, z.float().cpu() if z is not None and world.active else z, reason)
                         for span, z, reason in _embed_robust(model, modality, items, idx)]
                mine.append((number, spans))
            bar.update(len(idx))
    batches = mine
    if world.active:  # rank 0 puts every rank's batches back in order; the others keep nothing
        parts = gather_to_main(mine)
        batches = sorted((b for part in parts for b in part), key=lambda b: b[0]) if parts is not None else []
    chunks: list[Tensor] = []
    ok = [True] * len(items)
    reasons: list[tuple[int, str]] = []
    for _, spans in batches:
        for span, z, reason in spans:
            if z is None:
                ok[span[0]] = False
                reasons.append((span[0], reason))
            else:
                chunks.append(z)
    dim = int(getattr(model, "embed_dim", chunks[0].shape[1] if chunks else 0))
    vectors = torch.cat(chunks).float() if chunks else torch.zeros(0, dim)
    return vectors, ok, reasons  # chunks come back in item order, so vectors align with ok rows


def _embed_robust(model: Any, modality: Modality, items: list[Any], idx: list[int]):
    """Yield (indices, (n, D) vectors or None, reason) for items[idx], bisecting around BadInput."""
    try:
        z = model.embed(modality, [items[i] for i in idx])  # (len(idx), D)
    except BadInput as e:
        if len(idx) == 1:  # alone, the item is "item 0" of its call: the row's line names it instead
            yield idx, None, re.sub(rf"^{modality} item \d+: ", "", str(e))
            return
        half = len(idx) // 2
        yield from _embed_robust(model, modality, items, idx[:half])
        yield from _embed_robust(model, modality, items, idx[half:])
        return
    if z.shape[0] != len(idx):
        raise RuntimeError(f"model.embed returned {z.shape[0]} vectors for {len(idx)} {modality} items")
    yield idx, z, ""


def log_skipped(skipped: list[tuple[int, str, str]], path: Path) -> None:
    for line, what, reason in skipped[:_WARN_FIRST]:
        log.warning("%s:%d: skipped %s (%s)", path, line, what, reason)
    if len(skipped) > _WARN_FIRST:
        log.warning("%s: %s skipped in all", path, skip_summary(skipped))


def outside_root_allowed(model: Any) -> bool:
    """The run's `data.allow_outside_root`: a manifest of absolute paths (or `..`) is read as its
    training data was (False for a model without a config)."""
    data = getattr(getattr(model, "config", None), "data", None)
    return bool(getattr(data, "allow_outside_root", False))


def allowing_outside_root(model: Any, allow: bool) -> Any:
    """`model`, reading manifests' absolute and `..` paths when `allow` (`--allow-outside-root`): its
    `data.allow_outside_root` decides how `index` and `eval` read a manifest, as it did in training."""
    if allow and getattr(model, "config", None) is not None:
        model.config.data.allow_outside_root = True
    return model
