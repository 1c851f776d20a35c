"""The server's index: which media files it serves (inside the data folder, linked subfolders included)
and the one warning when the data it names has moved."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

pytest.importorskip("fastapi")

from PIL import Image  # noqa: E402

from mmembed.retrieval import Index  # noqa: E402
from mmembed.serve.indexing import IndexBuild  # noqa: E402
from mmembed.serve.safety import Refusal  # noqa: E402
from tests.retrieval.fakes import FakeModel  # noqa: E402


def data_folder(root, images="images"):
    """Two captioned pictures in root/`images`, and root/test.jsonl naming them."""
    (root / images).mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (4, 4), (60 * i, 0, 0)).save(root / images / f"c{i}.png")
    rows = [{"image": f"images/c{i}.png", "text": f"a c{i}"} for i in range(2)]
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "test.jsonl"


def image_ids(build):
    return [i for i, m in build._modality.items() if str(m) == "image"]


def test_media_in_a_linked_subfolder_of_the_data_are_served(tmp_path):
    """With images/ a link to a shared image store, every image was "not inside the index's data folder"."""
    data_folder(tmp_path / "store", images="shared")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "images").symlink_to(tmp_path / "store" / "shared", target_is_directory=True)
    shutil.copy(tmp_path / "store" / "test.jsonl", tmp_path / "data" / "test.jsonl")
    Index.build(FakeModel(), tmp_path / "data" / "test.jsonl", progress=False).save(tmp_path / "index")
    build = IndexBuild.load(tmp_path / "index", FakeModel())
    assert len(image_ids(build)) == 2 and build.playable(image_ids(build)) == set(image_ids(build))
    # a file linked out of its folder is still refused, and so is a path that leaves the data folder
    first = tmp_path / "store" / "shared" / "c0.png"
    first.unlink()
    first.symlink_to(tmp_path / "store" / "shared" / "c1.png")  # inside the store: served
    build.media_path(image_ids(build)[0])
    first.unlink()
    shutil.copy(tmp_path / "store" / "shared" / "c1.png", tmp_path / "outside.png")
    first.symlink_to(tmp_path / "outside.png")
    with pytest.raises(Refusal, match="is not inside the index's data folder"):
        build.media_path(image_ids(build)[0])
    second = image_ids(build)[1]
    store = build._index._store
    meta = store.metadata[store.row_of(second)]
    meta["item"] = str(tmp_path / "data/../outside.png")
    store.metadata._lines[store.row_of(second)] = json.dumps(meta)  # as a hand-edited index would read
    with pytest.raises(Refusal, match="is not inside the index's data folder"):
        build.media_path(second)


def test_an_index_whose_data_moved_says_so_once_at_start(tmp_path, caplog):
    """Every hit's media was null, without a word, once the data folder had moved."""
    data_folder(tmp_path / "small")
    Index.build(FakeModel(), tmp_path / "small" / "test.jsonl", progress=False).save(tmp_path / "index")
    with caplog.at_level(logging.WARNING, logger="mmembed"):
        IndexBuild.load(tmp_path / "index", FakeModel())
    assert not caplog.records
    (tmp_path / "small").rename(tmp_path / "moved")
    with caplog.at_level(logging.WARNING, logger="mmembed"):
        build = IndexBuild.load(tmp_path / "index", FakeModel())
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'index'}: its data folder {tmp_path / 'small'} is gone, so its hits name files that are not "
        "there; if the data moved, re-run `mmembed index` on the manifest at its new place"]
    assert build.playable(image_ids(build)) == set()
