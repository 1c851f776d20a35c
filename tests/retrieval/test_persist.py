"""save → load gives the same hits; model mismatches and damaged files are clear errors."""

import datetime
import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mmembed.errors import CheckpointError, UserError
from mmembed.retrieval import Index
from tests.retrieval.fakes import FakeModel

D = 16


def build(storage: str = "fp32", backend: str = "exact") -> Index:
    idx = Index(D, fingerprint="fake-a", storage=storage, backend=backend)
    g = torch.Generator().manual_seed(0)
    for modality, n in [("image", 30), ("text", 20), ("image", 10)]:  # interleaved modality runs
        idx.add(torch.randn(n, D, generator=g), modality, [{"k": len(idx) + i, "path": Path(f"/x/{i}.png")}
                                                          for i in range(n)])
    idx.remove([0, 7])
    return idx


def searches(idx: Index) -> list:
    """Hits of a few searches as plain tuples (a Path in metadata comes back as its string)."""
    qs = torch.randn(4, D, generator=torch.Generator().manual_seed(1))
    results = [*idx.search_batch(qs, k=6), *idx.search_batch(qs, k=3, target="text"),
               idx.search(qs[0], k=5, filter={"k": [3, 4, 55, 58]})]
    return [[(h.id, h.score, h.modality, {k: str(v) if isinstance(v, Path) else v for k, v in h.metadata.items()})
             for h in hits] for hits in results]


@pytest.mark.parametrize("storage", ["fp32", "fp16"])
def test_save_load_same_hits(tmp_path, storage):
    idx = build(storage)
    # save compacts the store first; compacting moves rows, which may change a score's last bit
    # (BLAS sums a row's products in an order that depends on its position in the block)
    idx.compact()
    before = searches(idx)
    idx.save(tmp_path / "ix")
    loaded = Index.load(tmp_path / "ix")
    assert searches(loaded) == before  # ids, scores (bit-equal), modality, metadata
    assert len(loaded) == 58 and loaded.counts() == idx.counts() == {"text": 20, "image": 38}
    assert loaded.metadata(3)["path"] == "/x/3.png"  # Paths are saved as strings
    assert loaded.add(torch.randn(1, D), "audio") == [60]  # removed ids are not reused after load
    header = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert header["dim"] == D and header["count"] == 58 and header["storage"] == storage
    assert header["fingerprint"] == "fake-a" and header["backend"] == "exact"


def test_load_checks_model_fingerprint_and_dim(tmp_path):
    build().save(tmp_path / "ix")
    assert Index.load(tmp_path / "ix", model=FakeModel(dim=D)).model is not None
    mismatch = r"index was built with model fake-a \(dim 16\), this model is fake-b \(dim 16\)"
    with pytest.raises(UserError, match=mismatch):
        Index.load(tmp_path / "ix", model=FakeModel(dim=D, fingerprint="fake-b"))
    with pytest.raises(UserError, match=r"model fake-a \(dim 16\), this model is fake-a \(dim 32\)"):
        Index.load(tmp_path / "ix", model=FakeModel(dim=32))


def test_damaged_files_are_checkpoint_errors(tmp_path):
    build().save(tmp_path / "a")
    Index(D, fingerprint="fake-a").save(tmp_path / "b")  # another save: another generation
    meta = tmp_path / "a" / "metadata.jsonl"
    good = meta.read_text()
    meta.write_text(good.replace('"k": 3', '"k": 4'))
    with pytest.raises(CheckpointError, match="checksum"):
        Index.load(tmp_path / "a")
    meta.write_text(good)
    shutil.copy(tmp_path / "b" / "vectors.safetensors", tmp_path / "a" / "vectors.safetensors")
    with pytest.raises(CheckpointError, match="does not belong"):
        Index.load(tmp_path / "a")
    (tmp_path / "a" / "vectors.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        Index.load(tmp_path / "a")
    (tmp_path / "a" / "index.json").write_text("{")
    with pytest.raises(CheckpointError, match="corrupted JSON"):
        Index.load(tmp_path / "a")
    with pytest.raises(UserError, match="index folder not found"):
        Index.load(tmp_path / "nope")


def test_a_vectors_file_changed_on_disk_is_refused(tmp_path):
    """One flipped exponent byte loaded and gave a hit with score 2.3e37."""
    build().save(tmp_path / "a")
    path = tmp_path / "a" / "vectors.safetensors"
    data = bytearray(path.read_bytes())
    data[-40] ^= 0x40  # a byte of the last tensor's data: the header still parses
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum does not match"):
        Index.load(tmp_path / "a")


def test_a_header_read_that_fails_mid_swap_is_retried(tmp_path, monkeypatch):
    """A save's swap between the tensors' read and the generation's read raised FileNotFoundError
    instead of reading again; the retry waited on the folder's inode changing, which a file system
    may reuse for the new folder (a spurious "interrupted save?" error)."""
    import mmembed.retrieval.index_format as index_format

    build().save(tmp_path / "a")
    real, calls = index_format.safe_open, []

    def vanished_once(path, **kwargs):
        calls.append(path)
        if len(calls) == 1:
            build().save(tmp_path / "a")  # a save swapped the folder in meanwhile (a new generation)
            raise FileNotFoundError(2, "No such file or directory", path)  # renamed away by it
        return real(path, **kwargs)

    monkeypatch.setattr(index_format, "safe_open", vanished_once)
    assert len(Index.load(tmp_path / "a")) == len(build()) and len(calls) == 2


def test_saving_under_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        build().save(tmp_path / "afile" / "sub")


def test_unserialisable_metadata_names_the_item(tmp_path):
    """Refused when added (it was accepted, and the index then could not be saved until the item
    was removed); the caller's value changed in place since does not reach the index (it made the
    save fail), and a save still refuses what the store holds that it cannot write."""
    idx = Index(4)
    for bad in ({"bad": object()}, {"raw": b"bytes"}, {"note": "\ud800 bad"}):
        with pytest.raises(UserError, match=r"metadata\[2\] (cannot be saved as JSON|holds a lone surrogate)"):
            idx.add(torch.eye(4), "image", [{}, {}, bad, {}])
    assert len(idx) == 0
    inner = ["fine"]
    idx.add(torch.eye(4), "image", [{}, {}, {"notes": inner}, {}])
    inner.append(object())
    assert Index.load(idx.save(tmp_path / "ix")).metadata(2) == {"notes": ["fine"]}
    idx.metadata(2)["notes"].append(object())  # a copy: the index keeps the text a save writes
    assert idx._store.metadata[2] == {"notes": ["fine"]}
    assert Index.load(idx.save(tmp_path / "ix")).metadata(2) == {"notes": ["fine"]}


def test_backend_and_args_survive_save(tmp_path):
    pytest.importorskip("faiss")
    idx = build(backend="faiss_hnsw")
    before = searches(idx)
    idx.save(tmp_path / "ix")
    loaded = Index.load(tmp_path / "ix")
    after = searches(loaded)
    assert loaded.backend_name == "faiss_hnsw" and loaded._backend.config() == idx._backend.config()
    # before the save, tombstones sent the search through the exact subset scan; FAISS sums in
    # another order, so scores agree to float32 rounding
    assert [[h[0] for h in hits] for hits in after] == [[h[0] for h in hits] for hits in before]
    for a, b in zip(after, before):
        assert [h[1] for h in a] == pytest.approx([h[1] for h in b], abs=1e-5)


# Every character str.splitlines breaks on, plus lone surrogates (not valid UTF-8).
LINE_BREAKS = ["\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
ANY_CHAR = st.one_of(st.characters(codec=None, exclude_categories=()),  # surrogates included
                     st.sampled_from([*LINE_BREAKS, "\ud800", "\udfff"]))
ANY_TEXT = st.text(ANY_CHAR, max_size=12)
JSON_VALUE = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | ANY_TEXT,
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY_TEXT, inner, max_size=3),
                          max_leaves=6)


def has_surrogate(value) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, dict):
        return any(has_surrogate(k) or has_surrogate(v) for k, v in value.items())
    return isinstance(value, list) and any(map(has_surrogate, value))


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.lists(st.dictionaries(ANY_TEXT, JSON_VALUE, max_size=4), min_size=1, max_size=4))
@example([{"caption": "one\u2028two\u2029three\x85four\x1cfive\r\nsix", "\u2028key": "\U0001f600"}])
@example([{"k": "\ud800\udfff"}])  # JSON would read this back as U+103FF
def test_metadata_round_trips_any_unicode(metadata):
    # Every str survives save -> load, except strings holding lone surrogates: not Unicode text,
    # so adding them is refused, naming the item, and adds nothing.
    idx = Index(4)
    if has_surrogate(metadata):
        with pytest.raises(UserError, match=r"metadata\[\d+\] holds a lone surrogate U\+D[89A-F]"):
            idx.add(torch.eye(4)[: len(metadata)], "text", metadata)
        assert len(idx) == 0
        return
    idx.add(torch.eye(4)[: len(metadata)], "text", metadata)
    with tempfile.TemporaryDirectory() as tmp:
        idx.save(Path(tmp) / "ix")
        assert (Path(tmp) / "ix" / "metadata.jsonl").read_bytes().isascii()
        loaded = Index.load(Path(tmp) / "ix")
    assert [loaded.metadata(i) for i in loaded.ids()] == metadata


def test_lone_surrogate_never_reaches_a_save(tmp_path):
    """The index keeps metadata as the text a save writes: a lone surrogate is refused where it comes
    in, so no save fails late (one used to, on metadata changed in place), and the saved index stays."""
    build().save(tmp_path / "ix")
    before = searches(Index.load(tmp_path / "ix"))
    idx = Index(4)
    with pytest.raises(UserError, match=r"metadata\[2\] holds a lone surrogate U\+DC80"):
        idx.add(torch.eye(4), "text", [{}, {"caption": "ok \U0001f600"}, {"captions": ["cut \udc80 here"]}, {}])
    idx.add(torch.eye(4), "text", [{}, {"caption": "ok \U0001f600"}, {"captions": ["ok"]}, {}])
    assert idx.metadata(2) == {"captions": ["ok"]} and idx.metadata(1) == {"caption": "ok \U0001f600"}
    assert searches(Index.load(tmp_path / "ix")) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ix"]


def test_metadata_written_before_the_ascii_format_loads(tmp_path):
    # Older saves wrote raw UTF-8, U+2028 and U+0085 included, inside strings.
    idx = Index(4)
    idx.add(torch.eye(4)[:2], "text", [{"c": "a\u2028b\x85c"}, {"c": "\u00e9\u2029"}])
    idx.save(tmp_path / "ix")
    meta, header = tmp_path / "ix" / "metadata.jsonl", tmp_path / "ix" / "index.json"
    raw = "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in [{"c": "a\u2028b\x85c"}, {"c": "\u00e9\u2029"}])
    meta.write_bytes(raw.encode("utf-8"))
    h = json.loads(header.read_text())
    h["metadata_sha256"] = hashlib.sha256(raw.encode("utf-8")).hexdigest()
    header.write_text(json.dumps(h))
    loaded = Index.load(tmp_path / "ix")
    assert [loaded.metadata(i) for i in loaded.ids()] == [{"c": "a\u2028b\x85c"}, {"c": "\u00e9\u2029"}]


@pytest.mark.parametrize("field, value", [("next_id", "x"), ("next_id", 1), ("dim", True), ("count", -1),
                                          ("backend_args", 5), ("info", "x"), ("modalities", "image")])
def test_a_header_with_a_wrong_field_type_is_one_clear_error(tmp_path, capsys, field, value):
    from mmembed.cli import main

    ix = Index(4)
    ix.add(torch.nn.functional.normalize(torch.randn(3, 4), dim=-1), "image", [{"n": i} for i in range(3)])
    ix.save(tmp_path / "ix")
    header = json.loads((tmp_path / "ix" / "index.json").read_text())
    header[field] = value
    (tmp_path / "ix" / "index.json").write_text(json.dumps(header))
    with pytest.raises(CheckpointError):
        Index.load(tmp_path / "ix")
    assert main(["search", str(tmp_path / "ix"), "--text", "a red star"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmembed: error:") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("make", [lambda p: p.write_text("x"),
                                  lambda p: (p.mkdir(), (p / "keep.txt").write_text("mine"))])
def test_an_index_target_that_cannot_be_replaced_is_refused_before_any_work(tmp_path, make):
    """`check_target` ran before `mmembed index` embeds: it checked only the folders above the
    target, so a file, or a folder of other files, was refused after the whole manifest was embedded."""
    from mmembed.retrieval.persist import check_target

    make(tmp_path / "out")
    with pytest.raises(UserError, match="cannot save an index (as|into) .*out"):
        check_target(tmp_path / "out")
    ix = Index(4)
    ix.add(torch.nn.functional.normalize(torch.randn(2, 4), dim=-1), "image")
    check_target(tmp_path / "fresh")  # absent, an empty folder, an index: fine
    (tmp_path / "empty").mkdir()
    check_target(tmp_path / "empty")
    ix.save(tmp_path / "ix")
    check_target(tmp_path / "ix")


def test_a_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch):
    """On a read-only file system `mmembed index` embedded every item, then failed naming its
    temporary folder (as root, permissions never refuse: the check asks the system, os.access)."""
    import os

    import mmembed.checkpoint as checkpoint
    from mmembed.retrieval.persist import check_target

    locked = tmp_path / "ro"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(checkpoint.os, "access", lambda path, mode: Path(path) != locked and real(path, mode))
    with pytest.raises(UserError, match=r"ro cannot be written \(read-only, or no permission\)"):
        check_target(locked / "ix")
    check_target(tmp_path / "ix")  # a folder it can write is fine


def test_a_corrupt_index_no_save_touches_is_refused_at_once(tmp_path, monkeypatch):
    """Every failure was read again three times (a 208 MB index: 0.12 s to refuse became 0.64 s)."""
    import mmembed.retrieval.persist as persist

    build().save(tmp_path / "a")
    reads = []
    real = persist._read_folder
    monkeypatch.setattr(persist, "_read_folder", lambda d: reads.append(d) or real(d))
    vectors = tmp_path / "a" / "vectors.safetensors"
    data = bytearray(vectors.read_bytes())
    data[-8:] = bytes(8)
    vectors.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        Index.load(tmp_path / "a")
    assert len(reads) == 1


def test_a_second_save_of_an_index_waits_for_the_first(tmp_path, monkeypatch):
    """Two processes saving one index: each one's recovery deleted the other's staging folder, and
    the swaps could leave no index at all (5 of 40 rounds). A save now waits its turn (and, past
    the wait, says so); saves of other indexes in the same folder, or from two threads, go on."""
    import subprocess
    import sys
    import textwrap
    import threading

    import mmembed.retrieval.persist as persist

    build().save(tmp_path / "ix")
    before = searches(Index.load(tmp_path / "ix"))
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from mmembed.file_lock import exclusive
        with exclusive({str(persist._lock_file(tmp_path / "ix"))!r}, lambda h: h):
            print("locked", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.setattr(persist, "_SAVE_WAIT", 0.3)
        with pytest.raises(UserError, match=r"pid \d+ has been saving \S*ix for 0 s"):
            build().save(tmp_path / "ix")
        build().save(tmp_path / "other")  # another index in the same folder is not held up
    finally:
        holder.kill()
        holder.wait()
    assert searches(Index.load(tmp_path / "ix")) == before
    errors = []

    def save(name):
        try:
            build().save(tmp_path / name)
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(repr(e))

    monkeypatch.setattr(persist, "_SAVE_WAIT", 30.0)
    threads = [threading.Thread(target=save, args=(name,)) for name in ("ix", "ix", "third")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and searches(Index.load(tmp_path / "ix")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix", "other", "third"]  # and no lock files there


def test_a_file_given_as_the_index_folder_says_so(tmp_path):
    (tmp_path / "m.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="is a file, not an index folder"):
        Index.load(tmp_path / "m.jsonl")


def test_an_index_and_a_weights_file_under_a_name_of_undecodable_bytes_load(tmp_path):
    """`mmembed index --out $'ix\\xff'` wrote an index nothing could read back ("not a readable
    safetensors file (Path ... is not valid UTF-8)"), and so for a run folder of such a name."""
    import os

    import torch

    from mmembed.checkpoint import load_tensors, save_tensors

    folder = tmp_path / os.fsdecode(b"ix\xff")
    idx = Index(8)
    idx.add(torch.nn.functional.normalize(torch.randn(3, 8), dim=-1), "text", [{"i": i} for i in range(3)])
    idx.save(folder)
    back = Index.load(folder)
    assert len(back) == 3 and torch.equal(back.items()[0], idx.items()[0]) and back.metadata(2) == {"i": 2}
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    save_tensors(folder / "model.safetensors", weights)
    assert torch.equal(load_tensors(folder / "model.safetensors")["w"], weights["w"])


@pytest.mark.parametrize("field, value, said", [("info", {"run_dir": 5}, "field 'info.run_dir' is 5, not a path"),
                                                ("info", {"manifest": ["m"]}, "field 'info.manifest' is ['m'], not"),
                                                ("format", "1", "index format '1' is not supported")])
def test_a_header_with_a_non_string_path_or_format_says_what_it_holds(tmp_path, capsys, field, value, said):
    """info.run_dir 5 loaded, then `mmembed search` was a TypeError traceback; format "1" was printed as 1."""
    from mmembed.cli import main

    ix = Index(4)
    ix.add(torch.nn.functional.normalize(torch.randn(3, 4), dim=-1), "image")
    ix.save(tmp_path / "ix")
    header = json.loads((tmp_path / "ix" / "index.json").read_text())
    header[field] = value
    (tmp_path / "ix" / "index.json").write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match=re.escape(said)):
        Index.load(tmp_path / "ix")
    assert main(["search", str(tmp_path / "ix"), "--text", "a red star"]) == 2
    err = capsys.readouterr().err
    assert said in err and len(err.strip().splitlines()) == 1


def _small(fingerprint=None) -> Index:
    ix = Index(4, fingerprint=fingerprint)
    ix.add(torch.eye(4)[:2], "text", [{"n": 0}, {"n": 1}])
    return ix


@pytest.mark.parametrize("change, said", [
    (lambda ix: setattr(ix, "info", None), "field 'info' is None, not a valid dict"),
    (lambda ix: setattr(ix, "fingerprint", 7), "field 'fingerprint' is 7, not a valid str"),
    (lambda ix: setattr(ix, "info", {"built": datetime.date(2026, 1, 1)}), "info cannot be written as JSON (date"),
    (lambda ix: setattr(ix, "info", {"manifest": 5}), "field 'info.manifest' is 5, not a path"),
    (lambda ix: setattr(ix, "info", {3: "x"}), "info has a key that is not a str: 3"),
])
def test_a_save_that_no_load_could_read_is_refused_before_the_old_index_is_touched(tmp_path, change, said):
    """A re-save with info=None or fingerprint=7 replaced a good index with one no load read; a date was a TypeError."""
    _small("abc").save(tmp_path / "ix")
    before = sorted((p.name, p.read_bytes()) for p in (tmp_path / "ix").iterdir())
    ix = Index.load(tmp_path / "ix")
    change(ix)
    with pytest.raises(UserError, match=re.escape(f"cannot save the index: its {said}")):
        ix.save(tmp_path / "ix")
    assert sorted((p.name, p.read_bytes()) for p in (tmp_path / "ix").iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ix"]  # no staging folder left either
    assert Index.load(tmp_path / "ix").fingerprint == "abc"


def test_info_paths_are_saved_as_strings_and_load_back(tmp_path):
    """A Path in info was a raw TypeError "Object of type PosixPath is not JSON serializable" from the save."""
    ix = _small()
    ix.info = {"manifest": Path("/data/m.jsonl"), "rows": np.int64(2), "tags": ("a", "b")}
    ix.save(tmp_path / "ix")
    assert Index.load(tmp_path / "ix").info == {"manifest": "/data/m.jsonl", "rows": 2, "tags": ["a", "b"]}


def test_metadata_and_filters_are_the_same_before_and_after_a_save(tmp_path):
    """A 0-d tensor or a tuple in metadata became a number or a list on load: filter {"n": 3} found [1], then [0, 1]."""
    ix = Index(4)
    ix.add(torch.eye(4)[:3], "image", [{"n": torch.tensor(3), "t": (1, 2)}, {"n": 3, "t": [1, 2]},
                                        {"n": np.float32(0.5), "p": Path("/x/a.png"), "t": {"u": (3,)}}])
    ix.save(tmp_path / "ix")
    back = Index.load(tmp_path / "ix")
    for f in [{"n": 3}, {"t": [1, 2]}, {"n": 0.5}, {"p": "/x/a.png"}, {"t": {"u": [3]}}, lambda m: isinstance(m["n"], int)]:
        assert [h.id for h in ix.search(torch.ones(4), k=5, filter=f)] == \
               [h.id for h in back.search(torch.ones(4), k=5, filter=f)], f
    assert [ix.metadata(i) for i in ix.ids()] == [back.metadata(i) for i in back.ids()]
    assert [type(ix.metadata(i)["n"]) for i in ix.ids()] == [int, int, float]
    assert ix.metadata(0) == {"n": 3, "t": [1, 2]}


@pytest.mark.parametrize("value", [torch.arange(3), np.arange(3), torch.tensor([5.0]), np.ones((1, 1))])
def test_an_array_in_metadata_or_info_is_one_line_not_a_number(tmp_path, value):
    """A tensor of 3 elements escaped as torch's raw RuntimeError ("cannot be converted to Scalar"), a numpy
    array gave numpy's message, and a 1-element tensor was stored as its number: only 0-d values are numbers."""
    ix = Index(4)
    with pytest.raises(UserError, match=r"metadata\[0\] cannot be saved as JSON .* of shape .*\.tolist\(\)"):
        ix.add(torch.eye(4)[:1], "image", {"x": value})
    assert len(ix) == 0
    ix.add(torch.eye(4)[:1], "image", {"x": value.tolist()})
    ix.info["t"] = value
    with pytest.raises(UserError, match="cannot save the index: its info cannot be written as JSON"):
        ix.save(tmp_path / "ix")
    assert not (tmp_path / "ix").exists()


@pytest.mark.parametrize("field, value", [("backend_args", {"zzz": 1}), ("backend_args", {"block_rows": -1}),
                                          ("backend", "nope"), ("next_id", 2**64)])
def test_a_hand_edited_backend_or_next_id_is_a_checkpoint_error(tmp_path, field, value):
    """backend_args {"zzz": 1} was a ConfigError, {"block_rows": -1} a UserError; next_id 2**64 loaded, then add
    raised a raw "Overflow when unpacking long long"."""
    _small().save(tmp_path / "ix")
    header = json.loads((tmp_path / "ix" / "index.json").read_text())
    header[field] = value
    (tmp_path / "ix" / "index.json").write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match="index.json: "):
        Index.load(tmp_path / "ix")


def test_the_last_int64_id_is_given_then_adding_is_one_line(tmp_path):
    """next_id near 2**63 is valid up to the last int64 id; past it an add was a raw ValueError."""
    _small().save(tmp_path / "ix")
    header = json.loads((tmp_path / "ix" / "index.json").read_text())
    header["next_id"] = 2**63 - 1
    (tmp_path / "ix" / "index.json").write_text(json.dumps(header))
    ix = Index.load(tmp_path / "ix")
    assert ix.add(torch.ones(4), "text") == [2**63 - 1]
    ix.save(tmp_path / "ix")  # next_id 2**63: still loads
    ix = Index.load(tmp_path / "ix")
    with pytest.raises(UserError, match="no ids left"):
        ix.add(torch.ones(4), "text")
    assert len(ix) == 3
