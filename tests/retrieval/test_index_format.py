"""index_format.py: a hand-edited metadata.jsonl and metadata or info that holds itself are one clear error."""

import hashlib
import json

import pytest
import torch

from mmembed.errors import CheckpointError, UserError
from mmembed.retrieval import Index


def saved(tmp_path):
    idx = Index(4)
    idx.add(torch.eye(4)[:3], "text", [{"n": 0}, {"n": 1}, {"n": 2}])
    return idx.save(tmp_path / "ix")


@pytest.mark.parametrize("edit, message", [
    (lambda raw: raw.replace(b'{"n": 1}', b'{"n" 1}'), r"line 2 is not JSON \(Expecting ':' delimiter at column 6\)"),
    (lambda raw: raw.replace(b'{"n": 0}', b"[1, 2]"), r"line 1 is a list, not a JSON object"),
    (lambda raw: raw.replace(b'{"n": 2}', b'{"\xff": 2}'), r"line 3 is not UTF-8 \(byte 20: invalid start byte\)"),
])
def test_a_hand_edited_metadata_file_is_a_checkpoint_error_naming_file_and_line(tmp_path, edit, message):
    """A bad JSON line, a non-object row or a non-UTF-8 byte raised JSONDecodeError, UserError or
    UnicodeDecodeError (with the checksum updated to match the edit)."""
    folder = saved(tmp_path)
    raw = edit((folder / "metadata.jsonl").read_bytes())
    (folder / "metadata.jsonl").write_bytes(raw)
    header = json.loads((folder / "index.json").read_text())
    header["metadata_sha256"] = hashlib.sha256(raw).hexdigest()
    (folder / "index.json").write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match=r"metadata\.jsonl: " + message):
        Index.load(folder)


def test_metadata_or_info_that_holds_itself_is_a_user_error(tmp_path):
    """A dict or list holding itself raised RecursionError (1,000 frames) at add and at save."""
    idx = Index(4)
    idx.add(torch.eye(4)[:2], "text")
    loop: dict = {}
    loop["me"] = loop
    looped_list: list = []
    looped_list.append({"in": looped_list})
    for meta in (loop, {"a": looped_list}):
        with pytest.raises(UserError, match=r"^metadata\[0\] holds itself \(or nests too deep\), which JSON cannot"):
            idx.add(torch.eye(4)[2:3], "text", [meta])
    assert len(idx) == 2
    idx.info["me"] = idx.info
    with pytest.raises(UserError, match=r"^cannot save the index: its info holds itself"):
        idx.save(tmp_path / "ix")
    assert not (tmp_path / "ix").exists()
    shared = {"x": 1}  # the same dict twice is no loop: it saves
    idx.info = {"a": shared, "b": [shared, shared]}
    assert Index.load(idx.save(tmp_path / "ix")).info == {"a": {"x": 1}, "b": [{"x": 1}, {"x": 1}]}
