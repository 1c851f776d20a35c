"""What a `Memory` (`memory.py`) asks of its model: items embedded into the `NewItem` rows the
`Store` inserts, a conversation's prepared parts checked to hold the file's model's vectors, and
the model of the run a file names when it was opened without one.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from mmembed.errors import BadInput, UserError
from mmembed.memory.items import Entry, ItemError, Pending
from mmembed.memory.records import NewItem
from mmembed.memory.store import Store
from mmembed.modality import Modality
from mmembed.retrieval.store import check_vectors

log = logging.getLogger("mmembed.memory.memory")  # its line keeps its logger name (the CLI prints it)


def _embed(model: Any, entries: list[Entry], dim: int | None) -> Tensor:
    """Embed entries, batched per modality → (N, D) float32 unit rows in entry order."""
    out = torch.empty(len(entries), dim or int(model.embed_dim))
    for modality in dict.fromkeys(e.modality for e in entries):
        pick = [i for i, e in enumerate(entries) if e.modality == modality]
        try:
            vectors = model.embed(modality, [entries[i].source for i in pick])  # (n, D)
        except BadInput:
            raise _named_error(model, modality, entries, pick) from None
        out[pick] = check_vectors(vectors, out.shape[1], what=f"{modality} embeddings")
    return out


def _named_error(model: Any, modality: Modality, entries: list[Entry], pick: list[int]) -> BadInput:
    """The error of the first entry (of those at `pick`) that does not embed, naming what the user
    passed (the model reads the stored bytes, whose own name says nothing) and, as an `ItemError`,
    its position among `entries`."""
    for i in pick:
        try:
            model.embed(modality, [entries[i].source])
        except BadInput as err:
            reason = re.sub(r"^\w+ item \d+: ", "", str(err)).replace("<bytes>", "the item")
            return ItemError(f"{modality} {entries[i].origin}: {reason}", i, str(modality),
                             f"{entries[i].origin}: {reason}")
    return BadInput(f"{modality} items could not be embedded")


def _checked_parts(store: Store, parts: Sequence[Pending]) -> list[Pending]:
    """The parts, once their vectors are known to be this file's model's unit rows: a part prepared
    through another run's Memory (or edited) would mix spaces, or lock the user out of search."""
    if store.fingerprint is None:
        store.refresh_meta()
    if foreign := [p.fingerprint for p in parts if p.fingerprint != store.fingerprint]:
        raise UserError(f"a part was prepared by model {foreign[0]}, but {store.path.name} holds the vectors of "
                        f"model {store.fingerprint}: prepare it with this Memory")
    if any(len(p.vectors) != len(p.entries) for p in parts):
        raise UserError("a part holds more or fewer vectors than items: use Memory.prepare's result as it is")
    return [replace(p, vectors=check_vectors(p.vectors, store.dim, what="prepared vectors")) for p in parts]


def _new_items(pending: Pending, user: str, session: str | None, turns: Sequence[int | None], when: float,
               metas: Sequence[str]) -> list[NewItem]:
    blobs = pending.vectors.numpy().astype("<f4")  # (N, D)
    return [NewItem(user=user, session=session, turn=turn, role=pending.role, time=when, modality=str(e.modality),
                    embedding=blobs[i].tobytes(), text=e.text, meta=meta, media_path=e.media_path, media=e.media)
            for i, (e, turn, meta) in enumerate(zip(pending.entries, turns, metas))]


def _recorded_model(store: Store, what: str) -> Any:
    """The model of the run the file names, checked to be the one that wrote it."""
    from mmembed.model import Model  # here: memory is imported by the model's own package

    store.refresh_meta()  # a writer may have claimed the file since it was opened
    run, wrote = store.run, store.fingerprint
    fix = f"pass model=mm.load(run) to {what}"
    if run is None:
        raise UserError(f"this Memory was opened without a model and {store.path.name} names no run: {fix}")
    try:
        model = Model.load(run)
    except UserError as err:
        raise UserError(f"this Memory was opened without a model, and the run that wrote {store.path.name} "
                        f"does not load ({err}): {fix}") from None
    if str(model.fingerprint) != wrote:
        raise UserError(f"{store.path.name} was written by model {wrote}, but {run} now holds {model.fingerprint} "
                        f"(trained again?): {fix}")
    log.info("memory %s: embedding with the model of %s, which wrote it", store.path, run)
    return model
