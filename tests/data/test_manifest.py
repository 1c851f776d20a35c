"""Manifest reading: formats, path safety, bad lines, missing columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmembed.data import Manifest, read_manifest
from mmembed.errors import UserError
from mmembed.modality import Modality


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_rows_resolve_paths_and_keep_metadata(tmp_path):
    m = read_manifest(_jsonl(tmp_path / "train.jsonl", [
        {"image": "img/a.png", "text": "a red circle", "label": "s1", "split": "train"},
        {"audio": "wav/b.wav", "label": 7},
        "",  # blank lines are not rows
        {"text": "only text"},
    ]))
    assert isinstance(m, Manifest) and len(m) == 3 and m.skipped == []
    first, second, third = m.rows
    assert first.line == 1 and third.line == 4
    assert first.items == {Modality.IMAGE: tmp_path / "img/a.png", Modality.TEXT: "a red circle"}
    assert first.items[Modality.IMAGE].is_absolute()
    assert first.label == "s1" and first.meta == {"split": "train"}
    assert second.label == "7" and third.label is None
    assert m.modalities == (Modality.TEXT, Modality.IMAGE, Modality.AUDIO)


def test_root_overrides_the_manifest_folder(tmp_path):
    (tmp_path / "lists").mkdir()
    m = read_manifest(_jsonl(tmp_path / "lists/m.jsonl", [{"image": "a.png"}]), root=tmp_path / "data")
    assert m.rows[0].items[Modality.IMAGE] == tmp_path / "data/a.png"
    assert m.root == tmp_path / "data"


def test_csv_with_header_quotes_and_empty_cells(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('image,text,label,source\nimg/a.png,"a circle, red",s1,cam\n,only text,,\nimg/c.png,,s3,x\n')
    m = read_manifest(path)
    assert [r.line for r in m.rows] == [2, 3, 4]
    assert m.rows[0].items == {Modality.IMAGE: tmp_path / "img/a.png", Modality.TEXT: "a circle, red"}
    assert m.rows[0].meta == {"source": "cam"}
    assert m.rows[1].items == {Modality.TEXT: "only text"} and m.rows[1].label is None
    assert m.rows[2].items == {Modality.IMAGE: tmp_path / "img/c.png"}
    tsv = tmp_path / "m.tsv"
    tsv.write_text("text\tlabel\nhello\tx\n")
    assert read_manifest(tsv).rows[0].items == {Modality.TEXT: "hello"}
    # a quoted caption over lines 2-4: its row is line 2 (it was 4, where the record ends), the next 5
    path.write_text('image,text\nimg/a.png,"a circle\nover\nlines"\nimg/b.png,x\n\nimg/c.png,\n')
    assert [r.line for r in read_manifest(path).rows] == [2, 5, 7]


def test_csv_mistakes_name_their_line_and_never_swallow_rows(tmp_path):
    """An unclosed quote read every later row into one cell (strict mode too); one non-UTF-8 byte
    refused the whole file at a chunk's offset; a 200 kB caption was "field larger than field limit"."""
    path = tmp_path / "m.csv"
    path.write_text('image,text\na.png,first\na.png,"he said hi\na.png,third\na.png,fourth\n')
    with pytest.raises(UserError, match=r"m.csv:\d+: malformed CSV"):
        read_manifest(path)
    path.write_bytes("image,text\n".encode() + b"a.png,caf\xe9\n" + "a.png,fine\n".encode())
    m = read_manifest(path)
    assert [r.line for r in m.rows] == [3] and [line for line, _ in m.skipped] == [2]
    assert "invalid UTF-8" in m.skipped[0][1]
    path.write_text("image,text\na.png," + "word " * 40_000 + "\na.png,short\n")
    assert [len(r.items[Modality.TEXT]) for r in read_manifest(path).rows] == [200_000, 5]


def test_an_alternative_caption_that_is_no_text_refuses_its_row(tmp_path):
    """A lone surrogate among the captions was refused only by the epochs that drew it, and crashed
    a cached (multi-worker) run outright."""
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"image": "a.png", "text": "ok", "captions": ["fine \udfff"]}) + "\n"
                    + json.dumps({"image": "b.png", "text": "ok", "captions": ["fine too"]}) + "\n")
    m = read_manifest(path)
    assert [r.line for r in m.rows] == [2] and "lone surrogate" in m.skipped[0][1]


def test_missing_modality_column_is_a_user_error_naming_the_file(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("picture,caption\na.png,hello\n")
    with pytest.raises(UserError, match=r"m\.csv: no modality column .*found caption, picture"):
        read_manifest(csv)
    jsonl = _jsonl(tmp_path / "m.jsonl", [{"picture": "a.png", "caption": "x"}])
    with pytest.raises(UserError, match=r"m\.jsonl: no modality column"):
        read_manifest(jsonl)


def test_bad_json_line_is_skipped_and_counted_or_strict_names_the_line(tmp_path):
    path = _jsonl(tmp_path / "m.jsonl", [{"text": "ok"}, '{"text": "broken', '["a list"]', {"text": "fine"}])
    m = read_manifest(path)
    assert [r.line for r in m.rows] == [1, 4]
    assert [line for line, _ in m.skipped] == [2, 3]
    assert "invalid JSON" in m.skipped[0][1] and "JSON object" in m.skipped[1][1]
    with pytest.raises(UserError, match=r"m\.jsonl:2: invalid JSON"):
        read_manifest(path, strict=True)


def test_invalid_utf8_line_is_skipped(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    m = read_manifest(path)
    assert len(m) == 1 and m.skipped == [(2, "invalid UTF-8 at byte 10")]


@pytest.mark.parametrize("value, reason", [("/etc/passwd", "absolute path"), ("../secret.png", "escapes the data root"),
                                           ("img/../../x.png", "escapes the data root")])
def test_paths_outside_the_root_are_refused_unless_allowed(tmp_path, value, reason):
    path = _jsonl(tmp_path / "m.jsonl", [{"image": "img/ok.png"}, {"image": value, "text": "t"}])
    m = read_manifest(path)
    assert len(m) == 1 and m.skipped[0][0] == 2 and reason in m.skipped[0][1]
    with pytest.raises(UserError, match=rf"m\.jsonl:2: .*{reason}"):
        read_manifest(path, strict=True)
    allowed = read_manifest(path, allow_outside_root=True)
    assert len(allowed) == 2 and allowed.rows[1].items[Modality.IMAGE] == (tmp_path / value).resolve()


def test_dotdot_that_stays_inside_the_root_is_fine(tmp_path):
    m = read_manifest(_jsonl(tmp_path / "m.jsonl", [{"image": "img/../other/a.png"}]))
    assert m.rows[0].items[Modality.IMAGE] == tmp_path / "other/a.png"


def test_a_root_given_through_dotdot_holds_its_media_for_both_kinds_of_manifest(tmp_path, monkeypatch):
    """`data.root: ../world` (a relative path through `..`): the instruction manifest's media resolve
    under it as the plain manifest's do (every row was refused as escaping the root)."""
    from mmembed.data.instructions import read_instructions

    (tmp_path / "world").mkdir()
    (tmp_path / "sub").mkdir()
    plain = _jsonl(tmp_path / "world/m.jsonl", [{"image": "images/a.png", "text": "red"}])
    asked = _jsonl(tmp_path / "world/i.jsonl", [{"prompt": ["what is", {"image": "images/a.png"}], "answer": "red"}])
    monkeypatch.chdir(tmp_path / "sub")
    image = read_manifest(plain, root="../world").rows[0].items[Modality.IMAGE]
    assert image == tmp_path / "world/images/a.png"
    assert len(read_instructions(asked, root="../world").rows) == 1


def test_an_instruction_row_that_is_not_valid_unicode_is_skipped_and_counted(tmp_path):
    """A JSON "\\udfff" in a prompt or an answer stopped a whole decoder run from inside the
    tokenizer (naming neither the file nor the line)."""
    from mmembed.data.instructions import read_instructions

    rows = [{"prompt": ["how many objects?"], "answer": "one"},
            {"prompt": ["how many \udfff objects?"], "answer": "one"},
            {"prompt": ["what colour?"], "answer": "\udfff"},
            {"prompt": [{"text": "a red \ud800 star"}], "answer": "red"}]
    data = read_instructions(_jsonl(tmp_path / "i.jsonl", rows))
    assert [r.line for r in data.rows] == [1]
    assert [line for line, _ in data.skipped] == [2, 3, 4]
    assert all("not valid Unicode (lone surrogate U+D" in why for _, why in data.skipped)


def test_an_instruction_row_with_an_empty_prompt_is_skipped(tmp_path):
    """"" and ["", "   "] trained as <bos><answer>, a prompt generation refuses."""
    from mmembed.data.instructions import read_instructions

    rows = [{"prompt": "", "answer": "yes"}, {"prompt": ["", "   "], "answer": "yes"},
            {"prompt": ["is it red?"], "answer": "yes"}]
    data = read_instructions(_jsonl(tmp_path / "i.jsonl", rows))
    assert [r.line for r in data.rows] == [3]
    assert [why for _, why in data.skipped] == ["the prompt holds no text and no media"] * 2


def test_rows_with_wrong_types_or_no_values_are_skipped(tmp_path):
    path = _jsonl(tmp_path / "m.jsonl", [{"image": 3}, {"text": None, "label": "x"}, {"text": "ok"}])
    m = read_manifest(path)
    assert [r.line for r in m.rows] == [3]
    assert "image must be a string" in m.skipped[0][1] and "no value in any modality column" in m.skipped[1][1]


def test_missing_empty_and_unknown_manifests(tmp_path):
    with pytest.raises(UserError, match="manifest not found: .*nope.jsonl"):
        read_manifest(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="empty.jsonl: manifest is empty"):
        read_manifest(tmp_path / "empty.jsonl")
    for name in ("m.parquet", "m.json"):  # a JSON array is not a manifest: one object per line
        (tmp_path / name).write_text("[]")
        with pytest.raises(UserError, match="unknown manifest format"):
            read_manifest(tmp_path / name)
    bad = _jsonl(tmp_path / "bad.jsonl", ["not json", "{"])
    with pytest.raises(UserError, match=r"bad.jsonl: no usable row \(2 skipped; first, line 1"):
        read_manifest(bad)


def test_hostile_manifest_files_are_rows_skipped_or_one_line(tmp_path):
    """A JSON line nested 100,000 deep (RecursionError), '~nosuchuser/x.png' with
    allow_outside_root (RuntimeError from expanduser), a folder given as the manifest."""
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": "a cat"}\n{"a": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    manifest = read_manifest(deep)
    assert len(manifest) == 1 and manifest.skipped == [(2, "invalid JSON (nested too deeply)")]
    tab = tmp_path / "tab.jsonl"
    tab.write_text('{"text": "a cat"}\n{"text": "a\tdog"}\n')  # a raw tab inside a string: "... at at column 12"
    assert read_manifest(tab).skipped == [(2, "invalid JSON (Invalid control character at column 12)")]
    tilde = tmp_path / "tilde.jsonl"
    tilde.write_text('{"text": "a cat"}\n{"image": "~nosuchuser-mmembed/x.png"}\n')
    manifest = read_manifest(tilde, allow_outside_root=True)
    assert len(manifest) == 1 and "no such user" in manifest.skipped[0][1]
    with pytest.raises(UserError, match="is a folder, not a file"):
        read_manifest(tmp_path)


def test_csv_cells_after_a_comma_and_a_space_and_tsv_quotes(tmp_path):
    """'text, image, label' with rows 'a red circle, img.png, a': every path was ' img.png' (missing)
    and every label ' a'. A TSV reads quoted fields as csv.writer and pandas write them; a caption
    that starts with an unescaped quote is one line saying how to write it."""
    (tmp_path / "img.png").write_bytes(b"x")
    spaced = tmp_path / "m.csv"
    spaced.write_text('text, image, label\na red circle, img.png, a\n"a cat, black", img.png , b\n')
    rows = read_manifest(spaced).rows
    assert [r.items[Modality.IMAGE] for r in rows] == [tmp_path / "img.png"] * 2
    assert [r.label for r in rows] == ["a", "b"] and rows[1].items[Modality.TEXT] == "a cat, black"
    import csv

    tsv = tmp_path / "q.tsv"
    with tsv.open("w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([["image", "text"], ["img.png", 'a "big" red ball'],
                                                 ["img.png", "one\ttwo"], ["img.png", 'a "quoted" word']])
    assert [r.items[Modality.TEXT] for r in read_manifest(tsv).rows] == ['a "big" red ball', "one\ttwo",
                                                                         'a "quoted" word']
    tsv.write_text('image\ttext\nimg.png\t"Hello" she said\n')
    with pytest.raises(UserError, match=r"q.tsv:2: malformed CSV .*a cell that starts with a quote is a quoted field"):
        read_manifest(tsv)
    blank = tmp_path / "blank.csv"
    blank.write_text("\ntext,image\na,img.png\n")
    with pytest.raises(UserError, match="header.*is empty"):
        read_manifest(blank)


def test_a_name_in_another_unicode_normalisation_is_named(tmp_path):
    import unicodedata

    from mmembed.errors import BadInput
    from mmembed.preprocess.files import check_file

    (tmp_path / unicodedata.normalize("NFD", "café.png")).write_bytes(b"x")
    with pytest.raises(BadInput, match="another Unicode normalisation"):
        check_file(tmp_path / unicodedata.normalize("NFC", "café.png"))
    with pytest.raises(BadInput, match=r"missing file \S+$"):
        check_file(tmp_path / "other.png")


def test_an_unclosed_quote_is_reported_at_the_line_its_record_starts(tmp_path):
    """The error named the last line of the file, where the csv module ran out of data."""
    path = tmp_path / "m.csv"
    path.write_text('image,text\na.png,ok\na.png,"unclosed\n' + "a.png,later\n" * 50)
    with pytest.raises(UserError, match=r"m.csv:3: malformed CSV \(unexpected end of data at line 53, "
                                         r"in the record starting at line 3\)"):
        read_manifest(path)
    path.write_text('image,text\na.png,"two\nlines"\na.png,"x"y\n')  # a one-line error keeps its own line
    with pytest.raises(UserError, match=r"m.csv:4: malformed CSV \([^)]*\): a cell that starts with a quote"):
        read_manifest(path)


@pytest.mark.parametrize("name, encoding, shown", [
    ("m.csv", "utf-16", "UTF-16"),  # Excel's "Unicode Text": little-endian, with a byte-order mark
    ("m.tsv", "utf-16-be", "UTF-16 or UTF-32 (it holds NUL bytes)"),  # no mark: its NULs give it away
    ("m.jsonl", "utf-16-le", "UTF-16 or UTF-32 (it holds NUL bytes)"),
    ("m.jsonl", "utf-16", "UTF-16"),
    ("m.jsonl", "utf-32", "UTF-32"),
])
def test_a_utf16_or_utf32_manifest_is_one_line_asking_for_utf8(tmp_path, name, encoding, shown):
    """A UTF-16 CSV was "no modality column (... found ^@t^@e^@x^@t^@, ...)" with raw NULs, a UTF-16
    JSONL "invalid UTF-8 at byte 0" on every line."""
    sep = "\t" if name.endswith(".tsv") else ","
    text = (json.dumps({"text": "a red circle", "image": "a.png"}) + "\n" if name.endswith(".jsonl")
            else f"text{sep}image\na red circle{sep}a.png\n")
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    with pytest.raises(UserError) as caught:
        read_manifest(path)
    assert str(caught.value) == f"{path}: manifest is {shown}: save it as UTF-8"


def test_a_column_named_like_a_modality_is_named_with_the_modality_it_looks_like(tmp_path):
    """A manifest whose columns were `caption` and `imgae` was only told it had no modality column;
    header names that are not printable reached the terminal raw."""
    from mmembed.data.columns import likely_modality

    guesses = {c: likely_modality(c) for c in ("caption", "Text", "texts", "imgae", "img", "picture", "wav",
                                               "audio_path", "captions", "label", "id", "test", "qa", "split")}
    assert guesses == {"caption": Modality.TEXT, "Text": Modality.TEXT, "texts": Modality.TEXT,
                       "imgae": Modality.IMAGE, "img": Modality.IMAGE, "picture": Modality.IMAGE,
                       "wav": Modality.AUDIO, "audio_path": Modality.AUDIO, "captions": None, "label": None,
                       "id": None, "test": None, "qa": None, "split": None}
    ids_and_sizes = ("caption_id", "captionid", "caption_en", "caption_1", "sentence_id", "textid", "audio_len",
                     "audio_hash", "image_size", "imageid", "image_w", "image_h", "image_id", "textual",
                     "imagenet_class", "sound_source", "text_lang", "audit")
    assert {c: likely_modality(c) for c in ids_and_sizes} == dict.fromkeys(ids_and_sizes)  # were taken for modalities
    csv = tmp_path / "m.csv"
    csv.write_text("imgae,caption,x\x07y\na.png,hello,1\n")
    with pytest.raises(UserError) as caught:
        read_manifest(csv)
    assert str(caught.value).endswith(r"found caption, imgae, 'x\x07y'); column 'caption' is metadata (did you "
                                      "mean 'text'?); column 'imgae' is metadata (did you mean 'image'?)")


def test_a_stray_nul_in_a_utf8_manifest_is_one_bad_line_not_a_utf16_file(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"text": "a\x00b"}\n' + json.dumps({"text": "fine"}).encode() + b"\n")
    m = read_manifest(path)
    assert [r.line for r in m.rows] == [2] and [line for line, _ in m.skipped] == [1]


def test_paths_under_a_relative_data_root(tmp_path, monkeypatch):
    """Under data.root "." every path was refused as escaping it ("a.png" does not start with "./"),
    and "../x" was let through."""
    from mmembed.data.manifest import BadRow, resolve_path

    monkeypatch.chdir(tmp_path)
    assert resolve_path("images/a.png", Path("."), False) == Path("images/a.png")
    assert resolve_path("x/../a.png", Path("sub"), False) == Path("sub/a.png")
    for escaping in ("../a.png", "x/../../a.png"):
        with pytest.raises(BadRow, match="escapes the data root"):
            resolve_path(escaping, Path("."), False)
