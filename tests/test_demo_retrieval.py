"""The demo's composed-query check: each trial asks B's sound alone too, on the same pair."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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


def test_every_caption_recall_is_what_eval_all_captions_reports(tmp_path):
    """The demo's paraphrase table and `mmembed eval --all-captions` score the same queries alike."""
    from mmembed.evaluate import manifest_report
    from mmembed.demo_retrieval import every_caption_recall
    from tests.retrieval.fakes import FakeModel

    rows = [{"image": f"img/c{i}.png", "text": f"a c{i}", "captions": [f"the c{i}", f"one c{9 - i}"],
             "label": f"scene{i}"} for i in range(4)]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = FakeModel()
    vectors = {Modality.TEXT: model.embed("text", [r["text"] for r in rows]),
               Modality.IMAGE: model.embed("image", [r["image"] for r in rows])}
    keys = {m: [r["label"] for r in rows] for m in vectors}
    got = every_caption_recall(model, manifest, vectors, keys)
    assert got == manifest_report(model, manifest, all_captions=True)["pairs"]
    assert got["text→image"]["n_queries"] == 12 and got["text→image"]["recall@1"] == 8 / 12
    manifest.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "captions"}) + "\n" for r in rows))
    assert every_caption_recall(model, manifest, vectors, keys) is None  # no paraphrases: no table
    rows[0].pop("label")  # keys are labels only when every row has one
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert every_caption_recall(model, manifest, vectors, keys) is None


def test_the_report_puts_each_retrieval_goal_beside_its_lowest_pair():
    """report.md showed the retrieval tables without #14's goals (0.95 on the test split, 0.85 held out)."""
    from mmembed.demo import _goal_line

    report = {"text→image": {"recall@1": 1.0}, "audio→image": {"recall@1": 0.84}, "image→text": {"recall@1": 0.9}}
    assert _goal_line("held-out attribute combinations", report) == [
        "", "Goal (#14): recall@1 ≥ 0.85 on every pair; the lowest is audio→image, 0.840: not met."]
    assert _goal_line("test", {"text→image": {"recall@1": 0.96}})[1].endswith("text→image, 0.960: met.")
    assert _goal_line("validation", report) == []


def test_a_memory_phase_that_fails_is_one_line_in_the_child_and_in_the_demo(tmp_path, capsys, monkeypatch):
    """A phase whose run had lost its decoder (a second demo into the same folder replaced it) printed two
    full tracebacks: the child's UserError and the parent's CalledProcessError."""
    import json
    import subprocess

    from mmembed import demo_memory
    from mmembed.errors import UserError

    spec = tmp_path / "probes.json"
    spec.write_text(json.dumps([]))
    argv = ["show", str(tmp_path / "no-run"), str(tmp_path / "m.db"), str(spec), str(tmp_path / "o.json")]
    assert demo_memory._main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmembed: error: ") and err.count("\n") == 1 and "Traceback" not in err
    monkeypatch.setattr(demo_memory, "probes", lambda world, split, n: [{"answer": "red"}])
    monkeypatch.setattr(demo_memory.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 2))
    with pytest.raises(UserError, match=r"^the memory section's 'show' process ended with exit status 2 \(its error "
                                        r"is above\)$"):
        demo_memory.cross_process_recall(tmp_path / "no-run", tmp_path)
