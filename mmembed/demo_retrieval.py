"""The demo's retrieval section: top-5 picture grids, the composed-query check, and recall with
every caption of a scene as a query (`every_caption_recall`).

Composed query (embedding arithmetic across modalities): for scenes A and B holding one object
each, with different shapes and colours,

    q = image(A) + audio(B) − audio(A)      →  should retrieve images of B's shape and colour

("like this picture, but with the meaning of that sound instead of this one"). A trial is
correct when the top-1 image has B's shape and colour; chance is the fraction of gallery images
that happen to share B's shape and colour, reported alongside, and so is B's sound asked alone
(plain cross-modal retrieval, which the gallery's B-like pictures answer too): the arithmetic
earns its keep only where it beats that.
"""

from __future__ import annotations

import random
from pathlib import Path


import torch

from mmembed.data import read_manifest
from mmembed.evaluate import alternative_captions
from mmembed.evaluate_recall import pairwise_report
from mmembed.model import Model
from mmembed.modality import Modality
from mmembed.retrieval import Index, Query


def image_gallery(model: Model, manifest: Path) -> Index:
    """An index of every image in `manifest`, with the row's metadata."""
    rows = [r for r in read_manifest(manifest).rows if Modality.IMAGE in r.items]
    index = Index(model.embed_dim, fingerprint=model.fingerprint)
    vectors = model.embed(Modality.IMAGE, [r.items[Modality.IMAGE] for r in rows])
    index.add(vectors, Modality.IMAGE, [{"label": r.label, "path": str(r.items[Modality.IMAGE]), **r.meta} for r in rows])
    index.model = model
    return index


def every_caption_recall(model: Model, manifest: Path, vectors: dict, keys: dict, batch_size: int = 256
                         ) -> dict | None:
    """`pairwise_report` with each row's alternative captions (`captions`) as more text items, keyed
    by the row's label (its scene), beside the embedded `vectors` and `keys` of the same manifest:
    the figures `mmembed eval --all-captions` gives. None when the manifest has none. The demo trains
    on each scene's primary caption; its paraphrases are what a user's own words look like."""
    rows = read_manifest(manifest).rows
    if Modality.TEXT not in vectors or any(r.label is None for r in rows):
        return None  # keys are labels (scenes) only when every row has one, as in the built-in world
    extra = alternative_captions(model, rows, [r.label for r in rows], batch_size)
    if extra is None:
        return None
    return pairwise_report({**vectors, Modality.TEXT: torch.cat([vectors[Modality.TEXT].float(), extra[0]])},
                           {**keys, Modality.TEXT: [*keys[Modality.TEXT], *extra[1]]})


def composed_query_trials(manifest: Path, gallery: Index, n_trials: int = 100,
                          seed: int = 0) -> dict[str, float]:
    """Run the composed-query check on the single-object scenes of `manifest` against `gallery`
    (its `image_gallery`)."""
    rows = [r for r in read_manifest(manifest).rows
            if len(r.meta.get("objects", [])) == 1 and {Modality.IMAGE, Modality.AUDIO} <= set(r.items)]
    if len(rows) < 2:
        return {"trials": 0}
    kinds = [_shape_colours(gallery.metadata(i)) for i in gallery.ids()]
    rng = random.Random(seed)
    hits, alone, chance = 0, 0, 0.0
    trials = 0
    for _ in range(n_trials * 20):
        if trials == n_trials:
            break
        a, b = rng.sample(rows, 2)
        oa, ob = a.meta["objects"][0], b.meta["objects"][0]
        if oa["shape"] == ob["shape"] or oa["colour"] == ob["colour"]:
            continue
        query = Query(image=a.items[Modality.IMAGE], audio=[b.items[Modality.AUDIO], a.items[Modality.AUDIO]],
                      weights={"audio": [1.0, -1.0]})
        top = gallery.search(query, target=Modality.IMAGE, k=1)[0]
        plain = gallery.search(Query(audio=b.items[Modality.AUDIO]), target=Modality.IMAGE, k=1)[0]
        wanted = (ob["shape"], ob["colour"])
        hits += int(wanted in _shape_colours(top.metadata))
        alone += int(wanted in _shape_colours(plain.metadata))
        chance += sum(wanted in k for k in kinds) / len(kinds)
        trials += 1
    if not trials:  # no pair of rows differing in shape and colour: nothing measured, not 0.000
        return {"trials": 0}
    return {"trials": trials, "accuracy": hits / trials, "sound alone": alone / trials, "chance": chance / trials}


def _shape_colours(meta: dict) -> set[tuple[str, str]]:
    return {(o["shape"], o["colour"]) for o in meta.get("objects", [])}


def retrieval_grid(manifest: Path, gallery: Index, out: Path, n_queries: int = 2, k: int = 5, seed: int = 0) -> Path:
    """For a few text, image and audio queries from `manifest`, draw the query and its top-k images
    from `gallery` (its `image_gallery`, with the model attached)."""
    from mmembed.insight.plotting import pyplot, save_png

    plt = pyplot()
    from PIL import Image

    rows = read_manifest(manifest).rows
    picks = random.Random(seed).sample(rows, min(len(rows), n_queries * 3))
    queries = []
    for i, modality in enumerate([Modality.TEXT, Modality.IMAGE, Modality.AUDIO]):
        for row in picks[i * n_queries:(i + 1) * n_queries]:
            if modality in row.items:
                queries.append((modality, row))
    fig, axes = plt.subplots(len(queries), k + 1, figsize=(1.9 * (k + 1), 2.0 * len(queries)), squeeze=False)
    for r, (modality, row) in enumerate(queries):
        item = row.items[modality]
        hits = gallery.search(Query(**{str(modality): item}), target=Modality.IMAGE, k=k + 1)
        hits = [h for h in hits if not (modality == Modality.IMAGE and h.metadata["path"] == str(item))][:k]
        ax = axes[r][0]
        if modality == Modality.IMAGE:
            ax.imshow(Image.open(item))
        ax.text(0.5, -0.05 if modality == Modality.IMAGE else 0.5, _wrap(f"{modality} query: " + (
            item if modality == Modality.TEXT else row.label)), ha="center", va="top" if modality == Modality.IMAGE else "center",
            fontsize=6.5, transform=ax.transAxes, wrap=True)
        for c, hit in enumerate(hits, start=1):
            axes[r][c].imshow(Image.open(hit.metadata["path"]))
            mark = "✓" if hit.metadata["label"] == row.label else "✗"
            axes[r][c].set_title(f"{mark} {hit.score:.2f}", fontsize=7, color="green" if mark == "✓" else "red")
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("top-5 images per query (✓ = same scene attributes as the query)", fontsize=9)
    return save_png(fig, out)


def _wrap(text: str, width: int = 28) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if len(line) + len(w) + 1 > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return "\n".join([*lines, line])
