"""Index.build from a manifest: every modality embedded, bad items skipped and counted."""

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmembed.errors import BadInput, UserError
from mmembed.modality import Modality
from mmembed.retrieval import Index, Query
from mmembed.retrieval.embed import embed_manifest
from tests.retrieval.fakes import FakeModel


def write_manifest(folder, rows) -> str:
    path = folder / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    return str(path)


@pytest.fixture
def manifest(tmp_path) -> str:
    rows = []
    for i in range(12):
        row = {"text": f"a picture of c{i}", "image": f"img/c{i}.png", "label": f"s{i % 4}", "split": "test"}
        if i % 3 == 0:
            row["audio"] = f"wav/c{i}.wav"
        rows.append(row)
    rows[5]["image"] = "img/broken5.png"  # unreadable: skipped, its caption still indexed
    rows[6]["audio"] = "wav/broken6.wav"
    return write_manifest(tmp_path, rows)


def test_build_embeds_every_modality_and_skips_bad_items(manifest):
    model = FakeModel()
    idx = Index.build(model, manifest, batch_size=4, progress=False)
    assert idx.counts() == {"text": 12, "image": 11, "audio": 3}  # audio rows 0, 3, 9 (6 is broken)
    assert idx.fingerprint == "fake-a" and idx.model is model
    skipped = {(line, what) for line, what, _ in idx.skipped}
    assert skipped == {(6, "image"), (7, "audio"), (13, "row")}  # 1-based manifest lines
    hit = idx.search(Query(text="c7"), target="image", k=1)[0]
    assert hit.metadata == {"split": "test", "line": 8, "label": "s3", "item": hit.metadata["item"]}
    assert hit.metadata["item"].endswith("img/c7.png") and hit.modality is Modality.IMAGE
    # text -> image: the caption of each row finds that row's image first
    for h in idx.search_batch([Query(text=f"c{i}") for i in (0, 3, 9)], target="image", k=1):
        assert h[0].metadata["line"] in (1, 4, 10)


def test_one_bad_item_costs_log_batch_calls(manifest):
    model = FakeModel()
    emb = embed_manifest(model, manifest, modalities=["image"], batch_size=8, progress=False)
    assert emb.by_modality[Modality.IMAGE].vectors.shape == (11, 16)
    assert [r.line for r in emb.by_modality[Modality.IMAGE].rows] == [1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12]
    # batch [0..7] fails, halves [0..3] ok, [4..7] fails, [4,5] fails, 4 ok, 5 bad, [6,7] ok; batch [8..11] ok
    assert model.calls == 8


def test_the_row_rule_leaves_a_row_with_a_bad_item_out_of_every_modality(manifest):
    """`mmembed eval` dropped only the bad item where training's validation drops its whole row; the
    index (the default rule) keeps the row's other items."""
    by_item = embed_manifest(FakeModel(), manifest, batch_size=4, progress=False)
    by_row = embed_manifest(FakeModel(), manifest, batch_size=4, progress=False, skip="row")
    assert {str(m): len(p.rows) for m, p in by_row.by_modality.items()} == {"text": 10, "image": 10, "audio": 3}
    assert [(line, what) for line, what, _ in by_row.skipped] == [(6, "row"), (7, "row"), (13, "row")]
    assert by_row.skipped[0][2].startswith("image: cannot read") and by_row.skipped[1][2].startswith("audio: ")
    for modality, part in by_row.by_modality.items():  # the rows kept have the vectors the item rule gives them
        whole = by_item.by_modality[modality]
        keep = [i for i, row in enumerate(whole.rows) if row.line not in (6, 7)]
        assert [r.line for r in part.rows] == [whole.rows[i].line for i in keep]
        assert torch.equal(part.vectors, whole.vectors[keep])
    with pytest.raises(ValueError, match="skip must be 'item' or 'row'"):
        embed_manifest(FakeModel(), manifest, progress=False, skip="rows")


def test_build_checks_requested_modalities(tmp_path, manifest):
    with pytest.raises(UserError, match="no row has a audio column|has no audio tower"):
        Index.build(FakeModel(modalities=(Modality.TEXT, Modality.IMAGE)), manifest, modalities=["audio"],
                    progress=False)
    text_only = Index.build(FakeModel(modalities=(Modality.TEXT,)), manifest, progress=False)
    assert text_only.counts() == {"text": 12}
    with pytest.raises(UserError, match="batch_size"):
        Index.build(FakeModel(), manifest, batch_size=0)


def test_a_row_whose_columns_no_save_can_write_is_skipped_and_the_index_saves(tmp_path):
    """A lone surrogate in an extra column: every row was embedded, then the save failed, naming an
    index id instead of the manifest line, and nothing was written."""
    rows = [{"text": f"a picture of c{i}", "image": f"img/c{i}.png", "label": f"s{i}"} for i in range(5)]
    path = tmp_path / "m.jsonl"
    lines = [json.dumps(r) for r in rows]
    lines[2] = lines[2][:-1] + ', "note": "\\ud800 bad"}'
    path.write_text("\n".join(lines) + "\n")
    idx = Index.build(FakeModel(), path, batch_size=4, progress=False)
    assert idx.counts() == {"text": 4, "image": 4}
    assert {(line, str(what)) for line, what, _ in idx.skipped} == {(3, "text"), (3, "image")}
    assert all("lone surrogate" in reason for *_, reason in idx.skipped)
    idx.save(tmp_path / "ix")
    assert len(Index.load(tmp_path / "ix")) == 8


def test_rows_no_save_can_write_are_warned_about_and_none_at_all_is_an_error(tmp_path, caplog):
    """A manifest in a folder of undecodable bytes: every image and sound was dropped from the index
    after the embedder's warnings, so nothing said so; and a manifest of which nothing could be read
    gave an empty index, a success (exit 0)."""
    import logging

    rows = [{"text": f"a picture of c{i}", "label": f"s{i}", "note": "\ud800" if i == 2 else "fine"} for i in range(3)]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        idx = Index.build(FakeModel(), path, progress=False)
    assert len(idx) == 2 and "m.jsonl:3: skipped text" in caplog.text and idx.info["skipped"] == 1
    path.write_text("".join(json.dumps({"image": f"img/broken{i}.png"}) + "\n" for i in range(2)))
    with pytest.raises(UserError, match=r"m.jsonl: no item could be read \(2 items skipped; the first, line 1, image: "):
        Index.build(FakeModel(), path, progress=False)
    from mmembed.evaluate import manifest_report

    with pytest.raises(UserError, match="no item could be read"):  # `mmembed eval`: an empty table, exit 0
        manifest_report(FakeModel(), path)
    path.write_text("".join(json.dumps({"text": "x", "note": "\ud800"}) + "\n" for _ in range(2)))
    with pytest.raises(UserError, match=r"no item could be read \(2 items skipped; the first, line 1, text: .*surrogate"):
        Index.build(FakeModel(), path, progress=False)


def test_a_skipped_items_reason_drops_the_item_number_its_retry_gave_it(tmp_path):
    """Each bad item is retried alone, so every reason said "image item 0: ...", whatever its row."""
    rows = [{"image": f"img/c{i}.png"} for i in range(6)]
    rows[3]["image"], rows[5]["image"] = "img/broken3.png", "img/broken5.png"
    idx = Index.build(FakeModel(), write_manifest(tmp_path, rows), batch_size=4, progress=False)
    reasons = {line: reason for line, what, reason in idx.skipped if what == "image"}
    assert set(reasons) == {4, 6}
    assert reasons[4].startswith("cannot read ") and reasons[4].endswith("img/broken3.png")
    assert reasons[6].startswith("cannot read ") and reasons[6].endswith("img/broken5.png")


def test_a_file_name_that_is_not_utf8_is_named_as_the_reason_its_image_is_left_out(tmp_path):
    """A Latin-1 file name (a lone surrogate in the manifest) was skipped as "its columns holds a
    lone surrogate", blaming the columns and ungrammatical."""
    path = tmp_path / "m.jsonl"
    path.write_text('{"text": "a picture of c1", "image": "img/caf\\udce9 c1.png"}\n'
                    '{"text": "a picture of c2", "image": "img/c2.png"}\n')
    idx = Index.build(FakeModel(), path, progress=False)
    assert idx.counts() == {"text": 2, "image": 1}
    ((line, what, reason),) = idx.skipped
    assert (line, what) == (1, "image")
    name = ascii(str(tmp_path / "img" / "caf\udce9 c1.png"))
    assert reason == f"its file name {name} is not UTF-8, which an index cannot save: rename the file (and its " \
                     "manifest entry) to a UTF-8 name"
    path.write_text('{"text": "a picture of c1", "label": "caf\\udce9"}\n{"text": "a picture of c2"}\n')
    ((_, _, reason),) = Index.build(FakeModel(), path, progress=False).skipped
    assert reason.startswith("one of its columns holds a lone surrogate U+DCE9")


@pytest.mark.parametrize("columns, said", [({"line": "my-line-col"}, "'line' column$"),
                                           ({"item": "x", "line": 3}, "'item' and 'line' columns$")])
def test_manifest_columns_named_line_or_item_are_refused_before_any_embedding(tmp_path, columns, said):
    """A manifest's own `line` and `item` columns were overwritten by the index's, without a word."""
    rows = [{"text": f"a picture of c{i}", "score": i} for i in range(3)]
    rows[1].update(columns)
    model = FakeModel()
    with pytest.raises(UserError, match=f"an index writes its own 'line'.*rename the manifest's {said}"):
        Index.build(model, write_manifest(tmp_path, rows), progress=False)
    assert model.calls == 0
    idx = Index.build(model, write_manifest(tmp_path, [{k: v for k, v in r.items() if k not in columns} for r in rows]),
                      progress=False)
    assert idx.metadata(1) == {"score": 1, "line": 2, "label": None, "item": "a picture of c1"}


def test_a_refused_path_or_a_value_not_a_string_skips_that_item_not_its_row(tmp_path, caplog):
    """One absolute path or one non-string value threw the whole row away, its good items with it, and
    the row was counted among the "items" skipped."""
    rows = [{"text": f"a c{i}", "image": f"img/c{i}.png", "audio": f"wav/c{i}.wav"} for i in range(6)]
    rows[1]["image"] = "/etc/hostname"  # refused: outside the root
    rows[2]["text"] = 5  # refused: not a string
    rows[3] = {"image": "../c3.png", "label": "s3"}  # its only item refused: no row left, a row skip
    rows[4]["captions"] = "not a list"  # bad as a whole: still a row skip
    rows[5] = {"text": 7, "captions": ["a c5"], "image": "img/c5.png"}  # the alternatives go with their caption
    with caplog.at_level(logging.WARNING):
        idx = Index.build(FakeModel(), write_manifest(tmp_path, rows), progress=False)  # + a line of bad JSON
    assert {(line, what) for line, what, _ in idx.skipped} == {
        (2, "image"), (3, "text"), (4, "row"), (5, "row"), (6, "text"), (7, "row")}
    assert idx.counts() == {"text": 2, "image": 3, "audio": 3}
    _, modalities, metadata = idx.items()
    lines = {str(m): [meta["line"] for m2, meta in zip(modalities, metadata) if m2 == m] for m in Modality}
    assert lines == {"text": [1, 2], "image": [1, 3, 6], "audio": [1, 2, 3]}
    assert "test.jsonl:2: skipped image (absolute path '/etc/hostname' refused" in caplog.text
    from mmembed.retrieval.embed import skip_summary

    assert skip_summary(idx.skipped) == "3 items and 3 rows"


def test_a_csv_row_with_a_refused_path_keeps_its_caption(tmp_path):
    """The CSV reader's refused rows were lost whole too."""
    path = tmp_path / "m.csv"
    path.write_text("text,image,label\na c0,img/c0.png,s0\na c1,/abs/c1.png,s1\n")
    emb = embed_manifest(FakeModel(), path, progress=False)
    assert [(r.line, r.label) for r in emb.by_modality[Modality.TEXT].rows] == [(2, "s0"), (3, "s1")]
    assert [r.line for r in emb.by_modality[Modality.IMAGE].rows] == [2]
    assert [(line, what) for line, what, _ in emb.skipped] == [(3, "image")] and emb.n_rows == 2


def test_the_summary_of_many_skips_counts_items_and_rows_apart(tmp_path, caplog):
    """"8 items skipped in all" counted 8 rows."""
    rows = [{"text": f"a c{i}", "image": f"img/broken{i}.png"} for i in range(7)]
    rows[0]["image"] = "img/c0.png"
    with caplog.at_level(logging.WARNING):
        embed_manifest(FakeModel(), write_manifest(tmp_path, rows), progress=False)
    assert "test.jsonl: 6 items and 1 row skipped in all" in caplog.text
    with caplog.at_level(logging.WARNING):
        embed_manifest(FakeModel(), write_manifest(tmp_path, rows), progress=False, skip="row")
    assert "test.jsonl: 7 rows skipped in all" in caplog.text


class _FileModel(FakeModel):
    """Reads media files that exist only, as the real preprocessing does; trained on `root`."""

    def __init__(self, root: Path):
        super().__init__()
        self.config = SimpleNamespace(data=SimpleNamespace(root=str(root), allow_outside_root=False))

    def embed(self, modality, items):
        for i, item in enumerate(items):
            if isinstance(item, Path) and not item.exists():
                raise BadInput(f"{modality} item {i}: missing file {item}")
        return super().embed(modality, items)


def test_media_missing_from_a_manifests_subfolder_name_where_they_were_looked_for(tmp_path, caplog):
    """A manifest moved into splits/ with paths relative to data.root: eval said only "missing file
    .../splits/img/c0.png", and the index kept the captions alone and exited 0 without a word why."""
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"c{i}.png").write_bytes(b"")
    (tmp_path / "splits").mkdir()
    manifest = tmp_path / "splits" / "m.jsonl"
    manifest.write_text("".join(json.dumps({"text": f"a c{i}", "image": f"img/c{i}.png"}) + "\n" for i in range(3)))
    said = (rf"media paths resolve against the manifest's folder {tmp_path / 'splits'} \('img/c0.png' is not there\); "
            rf"it is under the run's data.root {tmp_path}, which training resolved them against: move the manifest "
            rf"into that folder \(next to its media\) or write its paths relative to {tmp_path / 'splits'}$")
    with pytest.raises(UserError, match=r"no item could be read \(3 rows skipped; .*missing file.*; " + said):
        embed_manifest(_FileModel(tmp_path), manifest, progress=False, skip="row")  # what `mmembed eval` reads
    with caplog.at_level(logging.WARNING):
        emb = embed_manifest(_FileModel(tmp_path), manifest, progress=False)
    assert len(emb.by_modality[Modality.TEXT].rows) == 3 and not emb.by_modality[Modality.IMAGE].rows
    assert f"{manifest}: no media file could be read: media paths resolve against" in caplog.text
    with pytest.raises(UserError, match="paths relative to its folder$"):  # the run's root has them not either
        embed_manifest(_FileModel(tmp_path / "elsewhere"), manifest, progress=False, skip="row")
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the manifest beside its media: nothing to say
        embed_manifest(_FileModel(tmp_path), _copy(manifest, tmp_path / "m.jsonl"), progress=False)
    assert not caplog.text


def _copy(src: Path, dst: Path) -> Path:
    dst.write_text(src.read_text())
    return dst


def test_a_column_whose_every_item_is_refused_is_counted_not_dropped(tmp_path):
    """Every image path absolute: the index held the captions alone and said "nothing skipped"; asking
    for images said "no row has a image column"."""
    rows = [{"text": f"a c{i}", "image": f"/abs/c{i}.png"} for i in range(3)]
    path = write_manifest(tmp_path, rows)
    emb = embed_manifest(FakeModel(), path, progress=False)
    assert [(line, what) for line, what, _ in emb.skipped] == [(1, "image"), (2, "image"), (3, "image"), (4, "row")]
    assert list(emb.by_modality) == [Modality.TEXT]
    with pytest.raises(UserError, match=r"no item could be read \(3 items and 1 row skipped; the first, line 1, image: "
                                        r"absolute path '/abs/c0.png' refused"):
        embed_manifest(FakeModel(), path, modalities=["image"], progress=False)


def test_modalities_may_be_one_name_and_are_each_embedded_once(manifest):
    """"text" was read as the modalities t, e, x, t; ["text", "text"] embedded and counted everything
    twice; [] said "no item could be read"."""
    once = embed_manifest(FakeModel(), manifest, modalities=["text"], progress=False)
    for asked in ("text", Modality.TEXT, ["text", "text"]):
        again = embed_manifest(FakeModel(), manifest, modalities=asked, progress=False)
        assert list(again.by_modality) == [Modality.TEXT] and again.skipped == once.skipped
        assert torch.equal(again.by_modality[Modality.TEXT].vectors, once.by_modality[Modality.TEXT].vectors)
    with pytest.raises(UserError, match="no modality asked for"):
        embed_manifest(FakeModel(), manifest, modalities=[], progress=False)


def test_no_progress_bar_is_drawn_into_a_log_file(manifest, capsys):
    """Without a terminal (stderr to a file) the bar's carriage-return frames filled the log."""
    embed_manifest(FakeModel(), manifest, progress=True)
    assert "embed text" not in capsys.readouterr().err


def test_a_run_folder_given_for_the_model_is_one_line(tmp_path, manifest):
    """Index.build("runs/demo", ...) and Index.load(dir, model="runs/demo") were "AttributeError: 'str'
    object has no attribute 'embed_dim'" with a traceback."""
    with pytest.raises(UserError, match=r"^model is the run folder '.*: pass model=mm\.load\(RUN\), not the run "
                                        r"folder$"):
        Index.build(str(tmp_path / "run"), manifest, progress=False)
    index = Index(4)
    with pytest.raises(UserError, match=r"^model is the run folder"):
        index.model = tmp_path / "run"


def test_an_index_built_from_a_loaded_run_names_it_for_the_command_line(tiny_world, tmp_path, capsys):
    """An index built in Python did not record its run: `mmembed search DIR` said "the index does not
    name the run that built it; pass the run directory"."""
    import mmembed as mm
    from mmembed.cli import main
    from tests.conftest import tiny_model

    tiny_model(0).save(tmp_path / "run")
    model = mm.load(tmp_path / "run")
    Index.build(model, tiny_world / "test.jsonl", progress=False).save(tmp_path / "idx")
    assert Index.load(tmp_path / "idx").info["run_dir"] == str((tmp_path / "run").resolve())
    assert main(["search", str(tmp_path / "idx"), "--text", "a red circle", "-k", "2"]) == 0
    assert capsys.readouterr().out.strip()
