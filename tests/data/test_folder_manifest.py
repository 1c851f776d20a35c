"""Manifests written from a folder of files (mmembed/data/folder.py, `mmembed data manifest`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mmembed.cli import main
from mmembed.data import ManifestDataset, read_manifest, write_folder_manifests
from mmembed.data.folder import split_rows
from mmembed.errors import UserError
from mmembed.modality import Modality
from tests.conftest import tiny_model


def picture(path: Path, shade: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (shade, 100, 200)).save(path)
    return path


def sound(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.sin(np.linspace(0, 300, 8000)).astype(np.float32) * 0.1, 16000)
    return path


def caption(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def classes(root: Path, per_class: int, names=("cat", "dog", "owl")) -> Path:
    """`per_class` examples (picture, sound, caption) in each class folder."""
    for name in names:
        for i in range(per_class):
            picture(root / name / f"{i:03d}.png", i)
            sound(root / name / f"{i:03d}.wav")
            caption(root / name / f"{i:03d}.txt", f"a {name}, number {i}\n")
    return root


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_files_of_one_name_are_one_row_that_the_manifest_reader_and_dataset_read_back(tmp_path):
    root = classes(tmp_path / "set", 2)
    picture(root / "birds" / "owls" / "x.JPG")  # a nested class; an upper-case extension
    done = write_folder_manifests(root, labels="folder")
    assert done.files == {"manifest": root / "manifest.jsonl"} and done.rows == {"manifest": 7}
    assert done.items == {Modality.TEXT: 6, Modality.IMAGE: 7, Modality.AUDIO: 6} and done.labels == 4
    assert not done.absolute and not done.skipped
    rows = lines(root / "manifest.jsonl")
    assert rows[0] == {"image": "birds/owls/x.JPG", "label": "birds/owls"}
    assert rows[1] == {"image": "cat/000.png", "audio": "cat/000.wav", "text": "a cat, number 0", "label": "cat"}
    manifest = read_manifest(root / "manifest.jsonl")
    assert not manifest.skipped and len(manifest) == 7
    assert manifest[1].items[Modality.AUDIO] == (root / "cat" / "000.wav").resolve()
    assert [r.label for r in manifest] == ["birds/owls", "cat", "cat", "dog", "dog", "owl", "owl"]
    dataset = ManifestDataset(manifest, tiny_model().preprocessors)  # and its files load as a training set's do
    assert set(dataset[1].inputs) == set(Modality) and set(dataset[0].inputs) == {Modality.IMAGE}


def test_what_is_not_an_example_is_skipped_and_counted_and_the_rest_kept(tmp_path):
    root = classes(tmp_path / "set", 1, names=("cat",))
    caption(root / "README.txt", "how this set was made")  # a caption with no picture or sound of its name
    caption(root / "notes.json", "{}")  # another type
    caption(root / "sub" / "train.jsonl", "")  # a manifest: passed over, not counted
    picture(root / ".git" / "a.png")  # hidden folders and files are passed over
    picture(root / "__MACOSX" / "b.png")
    picture(root / ".thumb.png")
    picture(root / "cat" / "twin.png")
    picture(root / "cat" / "twin.jpg")  # two pictures of one name: which is the example?
    picture(root / "cat" / "blank.png")
    caption(root / "cat" / "blank.txt", "  \n")  # empty caption: the picture stays, uncaptioned
    picture(root / "cat" / "latin1.png")
    caption(root / "cat" / "latin1.txt", "caf\xe9".encode("latin-1"))
    os.symlink(root / "gone.png", root / "cat" / "dangling.png")
    os.symlink(root / "cat", root / "linked")  # a linked folder is not entered
    os.mkfifo(root / "cat" / "pipe.txt")  # reading it would wait forever
    picture(Path(os.fsdecode(os.fsencode(root / "cat") + b"/caf\xe9.png")))  # a Latin-1 name: no UTF-8 file holds it
    done = write_folder_manifests(root)
    assert done.skipped == {"captions without a picture or sound of their name": 1,
                            "files of another type (.json)": 1,
                            "examples with two files of one kind (image)": 1,
                            "empty caption files": 1, "caption files not in UTF-8": 1,
                            "broken links": 1, "linked folders not entered": 1,
                            "files whose path is not UTF-8": 1, "entries that are not regular files": 1}
    assert done.examples["examples with two files of one kind (image)"] == "cat/twin.jpg, cat/twin.png"
    assert done.examples["caption files not in UTF-8"] == "cat/latin1.txt"
    rows = lines(root / "manifest.jsonl")
    assert rows == [{"image": "cat/000.png", "audio": "cat/000.wav", "text": "a cat, number 0"},
                    {"image": "cat/blank.png"}, {"image": "cat/latin1.png"}]
    assert "captions without a picture or sound of their name: 1 (e.g. README.txt)" in done.skipped_line()


def test_files_outside_every_class_folder_are_counted_and_an_unreadable_caption_skipped(tmp_path, monkeypatch):
    root = classes(tmp_path / "set", 2, names=("cat",))
    picture(root / "cover.png")  # directly in the folder: no class
    read_bytes = Path.read_bytes

    def refuse(path: Path) -> bytes:  # (as root, chmod 000 does not stop a read)
        if path.name == "001.txt":
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    done = write_folder_manifests(root, labels="folder")
    assert done.unlabelled == 1 and done.labels == 1
    assert done.skipped == {"unreadable caption files": 1} and done.examples["unreadable caption files"] == "cat/001.txt"
    assert lines(root / "manifest.jsonl")[2] == {"image": "cat/001.png", "audio": "cat/001.wav", "label": "cat"}


def test_a_folder_whose_path_is_not_utf8_keeps_its_manifest_inside(tmp_path):
    root = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9"))
    picture(root / "cat" / "000.png")
    with pytest.raises(UserError, match="the folder's path is not UTF-8"):
        write_folder_manifests(root, out_dir=tmp_path / "out")
    assert write_folder_manifests(root).rows == {"manifest": 1}  # relative paths: nothing to encode
    inner = root / "photos"  # the manifests above it: their paths start "caf\xe9/photos/", a traceback before
    picture(inner / "cat" / "000.png")
    with pytest.raises(UserError, match="the folder's path is not UTF-8"):
        write_folder_manifests(inner, out_dir=tmp_path)


def test_a_folder_whose_every_file_is_skipped_says_why(tmp_path):
    """It said "no picture or sound in ..." of a folder of four pictures, each one of two of its name."""
    for name in ("x.jpg", "x.png", "y.jpg", "y.png"):
        picture(tmp_path / "set" / name)
    with pytest.raises(UserError, match=r"no example in .*set: every picture or sound was skipped; skipped: "
                                        r"examples with two files of one kind \(image\): 2 \(e\.g\. x\.jpg, x\.png\)$"):
        write_folder_manifests(tmp_path / "set")


def test_caption_lines_give_text_and_alternative_captions(tmp_path):
    root = tmp_path / "set"
    picture(root / "a.png")
    caption(root / "a.txt", "\ufeffa red circle\n\na circle in red\na red circle\nred round shape\n")
    write_folder_manifests(root, caption_lines=True)
    row = read_manifest(root / "manifest.jsonl")[0]
    assert row.items[Modality.TEXT] == "a red circle"  # the byte-order mark dropped, the repeat too
    assert row.captions == ("a circle in red", "red round shape")
    write_folder_manifests(root, overwrite=True)  # without: the whole file is one caption
    assert read_manifest(root / "manifest.jsonl")[0].items[Modality.TEXT].startswith("a red circle\n\na circle")


def test_a_split_is_exact_in_all_near_per_label_seeded_disjoint_and_complete(tmp_path):
    root = classes(tmp_path / "set", 12)
    done = write_folder_manifests(root, split=[0.7, 0.15, 0.15], labels="folder", seed=3)
    assert done.rows == {"train": 25, "val": 6, "test": 5}  # 36 × (0.7, 0.15, 0.15) = 25.2, 5.4, 5.4
    parts = {name: lines(path) for name, path in done.files.items()}
    for name, share in (("train", 8.4), ("val", 1.8), ("test", 1.8)):  # each class: within one of its share
        assert all(abs([r["label"] for r in parts[name]].count(c) - share) < 1 for c in ("cat", "dog", "owl"))
    images = [r["image"] for part in parts.values() for r in part]
    assert len(images) == len(set(images)) == 36
    again = write_folder_manifests(root, split=[0.7, 0.15, 0.15], labels="folder", seed=3, overwrite=True)
    assert {n: lines(p) for n, p in again.files.items()} == parts
    write_folder_manifests(root, split=[0.7, 0.15, 0.15], labels="folder", seed=4, overwrite=True)
    assert lines(root / "val.jsonl") != parts["val"]
    # a split into two beside an earlier split's test.jsonl: refused, as it would share rows with train.jsonl
    with pytest.raises(UserError, match="test.jsonl is there, from another split"):
        write_folder_manifests(root, split=[0.75, 0.25], overwrite=True)
    (root / "test.jsonl").unlink()
    two = write_folder_manifests(root, split=[0.75, 0.25], overwrite=True)  # without labels: the rows are one group
    assert two.rows == {"train": 27, "val": 9}


@pytest.mark.parametrize("labels, per_label", [(100, 5), (300, 3), (100, 15)])
def test_many_small_labels_still_give_every_part_its_share(labels, per_label):
    """Each label rounded alone sent 100 labels of 5 rows to 400 / 100 / 0 (asked 0.8 / 0.1 / 0.1)."""
    rows = [{"image": f"{k}-{i}.png", "label": str(k)} for k in range(labels) for i in range(per_label)]
    parts = split_rows(rows, [0.8, 0.1, 0.1], seed=0)
    n = len(rows)
    assert [len(p) for p in parts] == [round(0.8 * n), round(0.1 * n), n - round(0.8 * n) - round(0.1 * n)]
    assert sorted(r["image"] for p in parts for r in p) == sorted(r["image"] for r in rows)
    for k in range(labels):  # and each label near its share in every part
        for part, share in zip(parts, (0.8, 0.1, 0.1)):
            assert abs(sum(r["label"] == str(k) for r in part) - share * per_label) < 1


def test_paths_are_absolute_when_the_folder_is_not_inside_the_manifests_folder(tmp_path):
    root = classes(tmp_path / "set", 1, names=("cat",))
    out = tmp_path / "manifests"
    done = write_folder_manifests(root, out_dir=out)
    assert done.absolute and lines(out / "manifest.jsonl")[0]["image"] == (root / "cat" / "000.png").as_posix()
    with pytest.raises(UserError, match="absolute"):
        read_manifest(out / "manifest.jsonl", strict=True)
    assert len(read_manifest(out / "manifest.jsonl", allow_outside_root=True)) == 1
    up = write_folder_manifests(root, out_dir=tmp_path)  # a folder above it: relative paths from there
    assert not up.absolute and lines(tmp_path / "manifest.jsonl")[0]["image"] == "set/cat/000.png"


@pytest.mark.parametrize("kwargs, match", [
    ({"split": [0.5, 0.6]}, "sum to 1"),
    ({"split": [0.25, 0.25, 0.25, 0.25]}, "2 or 3 fractions"),
    ({"split": [0.0, 1.0]}, "train's be above 0"),
    ({"split": [0.9, 0.05, 0.05]}, "leaves val.jsonl empty"),
    ({"labels": "class"}, "'none' or 'folder'"),
])
def test_mistakes_are_refused_before_any_file_is_written(tmp_path, kwargs, match):
    root = classes(tmp_path / "set", 2, names=("cat",))
    with pytest.raises(UserError, match=match):
        write_folder_manifests(root, **kwargs)
    assert not list(root.glob("*.jsonl"))


def test_a_manifest_already_there_is_kept_without_overwrite(tmp_path):
    root = classes(tmp_path / "set", 1, names=("cat",))
    (root / "manifest.jsonl").write_text("mine\n")
    with pytest.raises(UserError, match="exists: pass --overwrite"):
        write_folder_manifests(root)
    assert (root / "manifest.jsonl").read_text() == "mine\n"
    with pytest.raises(UserError, match="folder not found"):
        write_folder_manifests(tmp_path / "nope")
    with pytest.raises(UserError, match="is not a folder"):
        write_folder_manifests(root / "manifest.jsonl")
    with pytest.raises(UserError, match="no picture or sound"):
        write_folder_manifests(caption(tmp_path / "texts" / "a.txt", "words").parent)


def test_the_command_prints_what_it_wrote_and_mistakes_are_one_line(tmp_path, capsys):
    root = classes(tmp_path / "set", 4, names=("cat", "dog"))
    caption(root / "README.txt", "about")
    assert main(["data", "manifest", str(root), "--split", "0.5,0.25,0.25", "--labels", "folder"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"wrote {root / 'train.jsonl'} (4 rows), {root / 'val.jsonl'} (2 rows), {root / 'test.jsonl'} "
                      "(2 rows); items: text 8, image 8, audio 8; 2 labels")
    assert out[1] == "skipped: captions without a picture or sound of their name: 1 (e.g. README.txt)"
    for options, match in ((["--split", "0.8,x"], "comma-separated fractions"),
                           (["--split", "0.5,0.5"], "train.jsonl exists: pass --overwrite")):
        assert main(["data", "manifest", str(root), *options]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("mmembed: error:") and match in err, err
