"""The functions behind `mmembed search` and `mmembed eval` (the CLI only parses and prints)."""

import json
import sys
import types

import pytest
import torch

from mmembed.errors import UserError
from mmembed.evaluate import run_eval
from mmembed.retrieval import Index, run_search
from tests.retrieval.fakes import FakeModel


@pytest.fixture
def manifest(tmp_path):
    rows = [{"text": f"a c{i}", "image": f"img/c{i}.png", "label": f"c{i}"} for i in range(6)]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def fake_load(monkeypatch):
    """`mmembed.model.load(run)` -> a FakeModel, without importing the real model stack."""
    loaded = []

    def load(run):
        loaded.append(str(run))
        return FakeModel()

    monkeypatch.setitem(sys.modules, "mmembed.model", types.SimpleNamespace(load=load))
    return loaded


def test_run_search_uses_the_saved_run_and_weights(tmp_path, manifest, fake_load):
    (tmp_path / "run").mkdir()
    Index.build(FakeModel(), manifest, progress=False).save(tmp_path / "ix", run_dir=tmp_path / "run")
    table = run_search(tmp_path / "ix", text=["c2"], image=[], target="image", k=2)
    assert fake_load == [str((tmp_path / "run").resolve())]
    assert table.splitlines()[2].startswith("| 1 |") and "c2.png" in table.splitlines()[2]
    # c1 + c4 - c1 = c4: the flat weights follow the keyword order of the items
    hits = json.loads(run_search(tmp_path / "ix", run="other", text=["c1", "c4"], image=["img/c1.png"],
                                 weights=[1.0, 1.0, -1.0], target="image", k=1, as_json=True))
    assert hits[0]["metadata"]["label"] == "c4" and hits[0]["modality"] == "image"
    assert fake_load[-1] == "other"
    fake = FakeModel()
    q = fake.embed("text", ["c1"])[0] + fake.embed("text", ["c4"])[0] - fake.embed("image", ["img/c1.png"])[0]
    expected = float(torch.nn.functional.normalize(q, dim=0) @ fake.embed("image", ["img/c4.png"])[0])
    assert abs(hits[0]["score"] - expected) < 1e-5
    # the same items with every weight +1: c1 counts twice and wins
    hits = json.loads(run_search(tmp_path / "ix", run="other", text=["c1", "c4"], image=["img/c1.png"],
                                 weights=[1.0, 1.0, 1.0], target="image", k=1, as_json=True))
    assert hits[0]["metadata"]["label"] == "c1"


def test_run_search_errors(tmp_path, manifest, fake_load):
    Index.build(FakeModel(), manifest, progress=False).save(tmp_path / "ix")
    with pytest.raises(UserError, match="nothing to search for"):
        run_search(tmp_path / "ix", text=[], image=[])
    with pytest.raises(UserError, match="does not name the run"):
        run_search(tmp_path / "ix", text=["c1"])
    with pytest.raises(UserError, match="3 weights for 1 query items"):
        run_search(tmp_path / "ix", run="r", text=["c1"], weights=[1, 2, 3])
    for k in (0, -1):  # the CLI's -k: one line, not the library's ValueError
        with pytest.raises(UserError, match="-k must be a positive number of hits"):
            run_search(tmp_path / "ix", run="r", text=["c1"], k=k)


def test_run_eval_with_zero_shot(tmp_path, manifest):
    table, report = run_eval(FakeModel(), manifest, labels=["c0", "c1", "c2", "c3", "c4", "c5"], template="{label}",
                             out=tmp_path / "eval.json", progress=False)
    assert report["key"] == "label" and report["pairs"]["text→image"]["recall@1"] == 1.0
    assert report["zero_shot"] == {"image": {"accuracy": 1.0, "n": 6}}
    assert "| image | 100.0 | 6 |" in table and "| text→image | 100.0 |" in table
    assert json.loads((tmp_path / "eval.json").read_text())["zero_shot"]["image"]["n"] == 6
    _, partial = run_eval(FakeModel(), manifest, labels=["c0", "c9"], template="{label}", progress=False)
    assert partial["zero_shot"]["image"] == {"accuracy": 1.0, "n": 1}  # rows labelled c1..c5 are left out


def test_cli_search_weights_follow_the_command_line_order(tmp_path, manifest, fake_load, capsys):
    """`--weight` paired with the items regrouped by modality (all --text, then --image): a query
    given as text c1, image c1, text c4 with weights 1, -1, 1 searched c1 - c4 + c1."""
    from mmembed.cli import main

    (tmp_path / "run").mkdir()
    Index.build(FakeModel(), manifest, progress=False).save(tmp_path / "ix", run_dir=tmp_path / "run")
    items = ["search", str(tmp_path / "ix"), "--text", "c1", "--image", "img/c1.png", "--text", "c4"]
    rest = ["--target", "image", "-k", "1", "--json"]
    assert main(items + ["--weight", "1", "--weight=-1", "--weight", "1"] + rest) == 0
    assert json.loads(capsys.readouterr().out)[0]["metadata"]["label"] == "c4"  # c1 - c1 + c4
    assert main(items + rest) == 0  # no weights: 1 each, c1 twice
    assert json.loads(capsys.readouterr().out)[0]["metadata"]["label"] == "c1"
    assert main(items + ["--weight", "1", "--weight", "1"] + rest) == 2  # 2 weights for 3 items: one line
    assert "2 weights for 3 query items" in capsys.readouterr().err


def test_search_json_writes_non_finite_metadata_as_null(tmp_path, fake_load):
    """`mmembed search --json` printed NaN and Infinity from a manifest's columns: not JSON (/api/search gives null)."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"text": "a c1", "label": "c1", "w": NaN, "big": [Infinity, 2.5]}\n'
                        '{"text": "a c2", "label": "c2", "w": -Infinity, "big": []}\n')
    (tmp_path / "run").mkdir()
    Index.build(FakeModel(), manifest, progress=False).save(tmp_path / "ix", run_dir=tmp_path / "run")
    text = run_search(tmp_path / "ix", text=["c1"], k=2, as_json=True)

    def refuse(constant):
        raise AssertionError(f"{constant} in the JSON")

    hits = json.loads(text, parse_constant=refuse)
    assert [h["metadata"]["label"] for h in hits] == ["c1", "c2"]
    assert hits[0]["metadata"]["w"] is None and hits[0]["metadata"]["big"] == [None, 2.5]
    assert hits[1]["metadata"]["w"] is None


def test_search_says_the_index_s_run_is_gone(tmp_path, manifest, fake_load):
    """An index whose run was moved said "run directory not found: <a path the user never typed>"."""
    (tmp_path / "run").mkdir()
    Index.build(FakeModel(), manifest, progress=False).save(tmp_path / "ix", run_dir=tmp_path / "run")
    (tmp_path / "run").rename(tmp_path / "moved")
    with pytest.raises(UserError, match=r"was built with the run .*run, which is gone .*--run .*model=") as e:
        run_search(tmp_path / "ix", text=["c1"])
    assert str(tmp_path / "ix") in str(e.value) and fake_load == []
    assert run_search(tmp_path / "ix", run=tmp_path / "moved", text=["c1"], k=1)  # --run still works
    assert fake_load == [str(tmp_path / "moved")]


def test_index_refuses_an_interrupted_synthetic_world(tmp_path, manifest, capsys):
    """`mmembed index` on a world whose `data synth` was interrupted exited 0, with most items skipped."""
    from mmembed.cli import main
    from mmembed.data.synth.world_folder import INCOMPLETE

    (tmp_path / INCOMPLETE).write_text("")
    with pytest.raises(UserError, match=r"generation was interrupted \(\.synth-incomplete\).*--overwrite"):
        Index.build(FakeModel(), manifest, progress=False)
    # the CLI: before the model loads (this run does not exist), nothing written
    assert main(["index", str(tmp_path / "norun"), "--manifest", str(manifest), "--out", str(tmp_path / "ix")]) == 2
    assert "generation was interrupted" in capsys.readouterr().err and not (tmp_path / "ix").exists()
    (tmp_path / INCOMPLETE).unlink()
    assert len(Index.build(FakeModel(), manifest, progress=False)) == 12


def test_run_search_warns_once_when_the_indexed_media_are_gone(tmp_path, fake_load, caplog):
    """Moved data: the hits named files that no longer exist, without a word."""
    import logging

    (tmp_path / "small" / "img").mkdir(parents=True)
    rows = [{"text": f"a c{i}", "image": f"img/c{i}.png"} for i in range(5)]
    (tmp_path / "small" / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for i in range(5):
        (tmp_path / "small" / "img" / f"c{i}.png").write_bytes(b"x")
    Index.build(FakeModel(), tmp_path / "small" / "m.jsonl", progress=False).save(tmp_path / "ix")
    search = dict(run="run", text=["c2"], target="image", k=1)
    added = Index.load(tmp_path / "ix")  # rows added later name what they like: no files to check
    added.add(torch.randn(2, added.dim), "audio", metadata=[{"item": "product-17"}, {"item": "product-18"}])
    added.save(tmp_path / "ix-added")
    with caplog.at_level(logging.WARNING, logger="mmembed"):
        run_search(tmp_path / "ix-added", **search)
    assert caplog.records == []
    warned = []
    for change in (lambda: None, (tmp_path / "small" / "img" / "c1.png").unlink,
                   lambda: (tmp_path / "small").rename(tmp_path / "small2")):
        change()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mmembed"):
            run_search(tmp_path / "ix", **search)
        warned.append([r.getMessage() for r in caplog.records])
    advice = "so its hits name files that are not there; if the data moved, re-run `mmembed index` on the manifest"
    assert warned[0] == []
    assert len(warned[1]) == 1 and warned[1][0].startswith(
        f"{tmp_path / 'ix'}: 1 of the 3 media files checked are missing (e.g. {tmp_path / 'small/img/c1.png'}), {advice}")
    assert len(warned[2]) == 1 and f"its data folder {tmp_path / 'small'} is gone, {advice}" in warned[2][0]


def test_an_empty_out_is_refused_before_any_embedding(tmp_path, monkeypatch, capsys):
    """`mmembed index RUN --manifest M --out ""` wrote index.json and its files into the working directory."""
    from mmembed.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["index", str(tmp_path / "run"), "--manifest", str(tmp_path / "m.jsonl"), "--out", ""]) == 2
    assert capsys.readouterr().err.strip() == ("mmembed: error: the index folder's name is empty (--out \"\"): name the "
                                               "folder to write")
    assert list(tmp_path.iterdir()) == []
