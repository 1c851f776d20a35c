"""The demo's composed-query check: each trial asks B's sound alone too, on the same pair."""

from __future__ import annotations

import json
from pathlib import Path

from mmembed.demo_retrieval import composed_query_trials, image_gallery
from mmembed.modality import Modality
from tests.conftest import tiny_model


def test_composed_queries_report_the_plain_sound_query_of_each_trial(tiny_world):
    """The composed figure (0.94) was shown against chance (0.05) only, while B's sound asked alone
    found B's shape and colour every time (1.00): the arithmetic added nothing it could claim."""
    manifest = tiny_world / "train.jsonl"
    gallery = image_gallery(tiny_model(0), manifest)
    asked, real = [], gallery.search
    gallery.search = lambda query, **kw: asked.append(query) or real(query, **kw)
    out = composed_query_trials(manifest, gallery, n_trials=6)
    assert out["trials"] == 6 and len(asked) == 12
    rows = {(tiny_world / r["audio"]).resolve(): r for r in map(json.loads, manifest.read_text().splitlines())
            if "audio" in r}
    found = 0
    for composed, alone in zip(asked[::2], asked[1::2]):
        b = composed.items[Modality.AUDIO][0]
        assert alone.items == {Modality.AUDIO: [b]} and composed.weights[Modality.AUDIO] == [1.0, -1.0]
        wanted = {(o["shape"], o["colour"]) for o in rows[Path(b).resolve()]["objects"]}
        top = real(alone, target=Modality.IMAGE, k=1)[0]
        found += bool(wanted & {(o["shape"], o["colour"]) for o in top.metadata["objects"]})
    assert out["sound alone"] == found / 6 and 0 <= out["accuracy"] <= 1 and 0 < out["chance"] < 1
