"""The instruction manifest reader: the encodings it refuses, and the tasks and media of the rows
it keeps (what preflight checks a config's selection against)."""

from __future__ import annotations

import json

import pytest

from mmembed.data.instructions import manifest_kinds, read_instructions
from mmembed.errors import UserError

ROWS = [{"prompt": ["What colour is", {"image": "images/s1.png"}], "answer": "red", "task": "colour"},
        {"prompt": ["Describe", {"text": "a red star"}, "and", {"image": "images/s2.png"}], "answer": "a red star"}]


@pytest.mark.parametrize("encoding, name", [("utf-16", "UTF-16"), ("utf-32", "UTF-32")])
def test_a_utf16_or_utf32_instruction_manifest_is_refused_asking_for_utf8(tmp_path, encoding, name):
    """Read as UTF-8 its every line was a bad row: "no usable instruction row (2 skipped; ... invalid UTF-8)"."""
    path = tmp_path / "instruct.jsonl"
    path.write_bytes("".join(json.dumps(r) + "\n" for r in ROWS).encode(encoding))
    with pytest.raises(UserError, match=rf"^{path}: manifest is {name}: save it as UTF-8$"):
        read_instructions(path)
    with pytest.raises(UserError, match="save it as UTF-8"):
        manifest_kinds(path)


def test_manifest_kinds_reads_only_the_rows_the_reader_keeps(tmp_path):
    """A misspelt media key (`imgae`) or a row with an empty answer counted as a task and a modality
    the rows had, though training skipped those rows."""
    path = tmp_path / "instruct.jsonl"
    bad = [{"prompt": ["Describe", {"imgae": "images/s1.png"}], "answer": "x", "task": "colour"},
           {"prompt": ["What", {"audio": "audio/s1.wav"}], "answer": "", "task": "typo"},
           {"prompt": ["What", {"image": "../outside.png"}], "answer": "x", "task": "escape"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in [*ROWS, *bad]) + "[1, 2]\n")
    assert manifest_kinds(path) == {"colour": {frozenset({"image"})}, None: {frozenset({"text", "image"})}}
    assert set(manifest_kinds(path, allow_outside_root=True)) == {"colour", None, "escape"}
    with pytest.raises(UserError, match=r"instruct\.jsonl:3: unknown media key 'imgae'"):
        manifest_kinds(path, strict=True)
    (tmp_path / "array.jsonl").write_text(json.dumps(ROWS) + "\n")
    with pytest.raises(UserError, match=r"no usable instruction row \(1 skipped; first, line 1: a row must be a "
                                        r"JSON object, got list\)$"):
        manifest_kinds(tmp_path / "array.jsonl")
