"""Dict filters by code columns: exactly the rows the per-row loop matched, columns read once per key."""

import json
import math
import pickle

import numpy as np
import pytest
import torch

from mmembed.errors import UserError
from mmembed.modality import Modality
from mmembed.retrieval import Index
from mmembed.retrieval.index_format import metadata_text
from mmembed.retrieval.masks import dict_filter
from mmembed.retrieval.metadata_rows import MetadataRows
from mmembed.retrieval.store import VectorStore

D = 4
NAN = float("nan")  # one object: a set finds it by identity, so the loop matched it to itself (a
# stored NaN reads back as json's own NaN object, which no filter value but that one is)


class Str(str):
    pass


class OnlyInt:
    """Equal to the int 1 alone (not 1.0, not True), with 1's hash: a set's grouping is not its own."""

    def __hash__(self):
        return hash(1)

    def __eq__(self, other):
        return type(other) is int and other == 1


def unit(n: int, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, D, generator=torch.Generator().manual_seed(seed)), dim=1)


# every kind of value a filter meets, Python's equality quirks included
VALUES = [1, 1.0, True, 0, 0.0, -0.0, False, None, "1", "a", Str("a"), 2**53 + 1, float(2**53), NAN,
          float("nan"), math.inf, np.int64(1), np.float64(1.0), np.float32(0.1), 0.1, [1, 2], (1, 2), [1, [2]],
          {"a": 1}, {"a": [1]}, [], {}, b"a", OnlyInt()]
FILTERS = [{"x": v} for v in VALUES if not isinstance(v, list)] + [
    {"x": [v]} for v in VALUES] + [
    {"x": [1, "a"]}, {"x": (None, 0.1)}, {"x": {2, "1"}}, {"x": [[1, 2], {"a": 1}, 7]}, {"x": []},
    {"x": 1, "y": "b"}, {"y": ["b", "c"], "x": [0, None]}, {"missing": 1}, {1: "k"}, {True: "k"}, {}]


def rows() -> list[str]:
    """Rows holding every value a save can write (as `Index.add` keeps them: JSON texts)."""
    out = [{"x": v, "y": "bcd"[i % 3]} for i, v in enumerate(VALUES) if not isinstance(v, (bytes, OnlyInt))]
    out += [{"y": "b"}, {}, {"x": 1, "1": "k"}, {"x": NAN, "y": "c"}, {"x": json.decoder.NaN}]
    return [metadata_text(m, "row") for m in out]


def loop_predicate(required):
    """The predicate dict filters ran on every row before (the reference)."""
    wanted = dict_filter(required)
    return lambda m: all(k in m and w.matches(m[k]) for k, w in wanted.items())


def loop_mask(store: VectorStore, required) -> list[bool]:
    keep = loop_predicate(required)
    return [a and keep(m) for a, m in zip(store.alive.tolist(), store.metadata)]


class Counted(MetadataRows):
    """Metadata rows that count how many of them a filter decodes."""

    read = 0

    def __init__(self, rows: MetadataRows):
        super().__init__(rows.text().splitlines())

    def __iter__(self):
        self.read += len(self)
        return super().__iter__()

    def __getitem__(self, row):
        self.read += 1
        return super().__getitem__(row)

    def dicts(self, start=0):
        for meta in super().dicts(start):
            self.read += 1
            yield meta


def test_dict_filters_match_exactly_the_rows_the_loop_matched():
    """Guard for the columns: missing keys, None, lists, numpy scalars, NaN, 1 == 1.0 == True, dead rows."""
    store = VectorStore(D)
    meta = rows()
    store.append(unit(len(meta)), Modality.IMAGE, meta)
    for step in ("fresh", "cached", "removed", "appended", "compacted", "unpickled"):
        if step == "removed":
            store.remove([0, 5, 13])
        elif step == "appended":
            store.append(unit(len(meta), 1), Modality.TEXT, rows()[::-1])
        elif step == "compacted":
            store.compact()
        elif step == "unpickled":
            store = pickle.loads(pickle.dumps(store))
        for required in FILTERS:
            got = store.metadata_mask(required)
            assert got.dtype == torch.bool and got.tolist() == loop_mask(store, required), (step, required)
    assert sum(store.metadata_mask({"x": 1}).tolist()) > 3  # the filters do match rows


def test_a_dict_filter_reads_each_rows_metadata_once_per_key():
    """A dict filter ran a Python predicate over every row's metadata at every search (0.15 s at 100k rows)."""
    store = VectorStore(D)
    store.append(unit(50), Modality.IMAGE, [json.dumps({"label": f"c{i % 5}", "n": i}) for i in range(50)])
    store.metadata = Counted(store.metadata)
    first = store.metadata_mask({"label": "c3"})
    assert store.metadata.read == 50 and first.tolist() == [i % 5 == 3 for i in range(50)]
    for _ in range(3):
        assert store.metadata_mask({"label": ["c3", "c1"]}).sum() == 20
    assert store.metadata.read == 50  # the column is kept
    store.append(unit(3, 1), Modality.IMAGE, [json.dumps({"label": "c3", "n": -1})] * 3)
    assert store.metadata_mask({"label": "c3"}).sum() == 13 and store.metadata.read == 53  # the new rows only
    store.remove([3, 8])
    assert store.metadata_mask({"label": "c3"}).sum() == 11 and store.metadata.read == 53
    assert store.metadata_mask({"label": "c3", "n": 13}).sum() == 1 and store.metadata.read == 53 + 53  # a new key, a new column
    store.compact()  # rows move: the columns are rebuilt from the new rows
    truth = [m["label"] == "c3" for m in store.metadata]
    store.metadata = Counted(store.metadata)
    assert store.metadata_mask({"label": "c3"}).tolist() == truth and store.metadata.read == 51


def test_only_rows_with_other_values_are_compared_one_by_one():
    """A list value (a manifest's `objects`) is compared row by row; plain values by their codes."""
    store = VectorStore(D)
    store.append(unit(40), Modality.IMAGE, [json.dumps({"o": [i % 2]} if i < 4 else {"o": i % 3}) for i in range(40)])
    store.metadata_mask({"o": 1})
    store.metadata = Counted(store.metadata)
    assert store.metadata_mask({"o": [1, [1]]}).tolist() == [i % 2 == 1 if i < 4 else i % 3 == 1 for i in range(40)]
    assert store.metadata.read == 4


def test_index_dict_filters_agree_with_the_same_predicate():
    idx = Index(D)
    idx.add(unit(30), "image", [{"g": i % 3, "s": str(i % 2)} for i in range(30)])
    idx.remove([0, 4])
    q = unit(1, 2)[0]
    for required in ({"g": 1}, {"g": [True, 2.0]}, {"s": "1", "g": 0}):
        by_fn = idx.search(q, k=30, filter=loop_predicate(required))
        assert [h.id for h in idx.search(q, k=30, filter=required)] == [h.id for h in by_fn] and by_fn


def test_a_filter_neither_dict_nor_callable_is_refused():
    store = VectorStore(D)
    store.append(unit(2), Modality.IMAGE, ["{}", "{}"])
    with pytest.raises(UserError, match="callable or a dict"):
        store.metadata_mask(["x"])
    with pytest.raises(UserError, match="scalars, lists or dicts"):
        store.metadata_mask({"x": [{1, 2}]})


def test_a_column_of_id_like_values_is_not_kept():
    """Every filtered key kept a column and a dict of its values: 155 bytes a row for a key unique per row."""
    store = VectorStore(D)
    n = 3000
    store.append(unit(n), Modality.IMAGE, [json.dumps({"item": f"{i}.png", "label": f"c{i % 7}"}) for i in range(n)])
    for key, value in (("item", "17.png"), ("label", "c3")):
        bits = store.metadata_mask({key: value})
        assert bits.tolist() == [m[key] == value for m in store.metadata]
    assert set(store._columns._columns) == {"label"}


def _counting_decodes(mp) -> list:
    decodes, real = [], json.loads
    mp.setattr("mmembed.retrieval.metadata_rows.json.loads", lambda text: decodes.append(1) or real(text))
    return decodes


def test_filters_that_read_every_row_decode_the_rows_once():
    """Metadata is kept as JSON text; a predicate, or a key too distinct to keep a column of, would
    decode every row at every search: they read one decoding, kept until rows move."""
    store = VectorStore(D)
    n = 2000
    store.append(unit(n), Modality.IMAGE, [json.dumps({"item": f"{i}.png", "o": [i % 3]}) for i in range(n)])
    with pytest.MonkeyPatch.context() as mp:
        decodes = _counting_decodes(mp)
        for _ in range(3):
            assert store.metadata_mask(lambda m: m["item"] == "7.png").sum() == 1
            assert store.metadata_mask({"item": "8.png"}).sum() == 1
            assert store.metadata_mask({"o": [[1]]}).sum() == (n + 1) // 3  # lists: compared row by row
        assert len(decodes) <= 2 * n  # the first column's pass, then the kept decoding
        store.append(unit(1, 1), Modality.IMAGE, [json.dumps({"item": "7.png", "o": [1]})])
        assert store.metadata_mask(lambda m: m["item"] == "7.png").sum() == 2
        assert len(decodes) <= 2 * n + 1  # only the new row
        store.remove([0])
        store.compact()  # rows moved: decoded afresh
        assert store.metadata_mask({"item": "7.png"}).sum() == 2 and len(decodes) <= 4 * n


def test_metadata_is_held_as_text_and_read_as_a_fresh_copy():
    idx = Index(D)
    idx.add(unit(2), "image", [{"objects": [{"shape": "star"}], "n": np.int64(3)}, {}])
    held = idx._store.metadata
    assert all(isinstance(line, str) and line.isascii() for line in held._lines)
    first = idx.metadata(0)
    first["objects"][0]["shape"] = "circle"
    assert idx.metadata(0) == {"objects": [{"shape": "star"}], "n": 3}
    hit = idx.search(unit(1)[0], k=1)[0]
    hit.metadata["n"] = 4
    assert idx.items()[2][0] == {"objects": [{"shape": "star"}], "n": 3}


def test_a_key_that_is_not_a_plain_str_reads_the_kept_decoding():
    """np.str_ keys (a numpy or pandas column's) keep no column: every search decoded every row."""
    idx = Index(D)
    n = 2000
    idx.add(unit(n), "image", [{"label": f"c{i % 7}"} for i in range(n)])
    q = unit(1, 1)[0]
    key = np.str_("label")
    first = idx.search(q, k=5, filter={key: "c3"})
    with pytest.MonkeyPatch.context() as mp:
        decodes = _counting_decodes(mp)
        for _ in range(3):
            assert [h.id for h in idx.search(q, k=5, filter={key: "c3"})] == [h.id for h in first]
    assert len(decodes) == 3 * 5  # the hits' metadata only


def test_the_media_sample_of_a_saved_index_decodes_only_the_rows_it_keeps():
    """`_sampled_media` (every `mmembed search` and serve start) decoded every media row to keep three."""
    from mmembed.retrieval.commands import MEDIA_SAMPLE, _sampled_media

    idx = Index(D)
    idx.add(unit(3000), "image", [{"item": f"/data/w/images/{i}.png"} for i in range(3000)])
    with pytest.MonkeyPatch.context() as mp:
        decodes = _counting_decodes(mp)
        assert _sampled_media(idx, "/data/w") == [f"/data/w/images/{i}.png" for i in range(MEDIA_SAMPLE)]
    assert len(decodes) == MEDIA_SAMPLE


def test_decoding_every_row_leaves_the_garbage_collector_as_it_found_it():
    """The collector is paused while the rows are decoded at once (4.7 s -> 1.0 s at 97,200 world rows)."""
    import gc

    rows = MetadataRows([json.dumps({"i": i, "o": [{"s": "star"}]}) for i in range(100)])
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            rows._decoded = None
            assert [m["i"] for m in rows.decoded()] == list(range(100)) and gc.isenabled() is enabled
        finally:
            gc.enable()
    broken = MetadataRows(["{}", "{not json"])
    with pytest.raises(json.JSONDecodeError):
        broken.decoded()
    assert gc.isenabled()


def test_a_filter_value_matches_as_its_metadata_was_stored(tmp_path):
    """Metadata holds a Path as its str and a 0-d tensor as its number, but a filter compared the raw
    value: filter={"p": Path("a/b")} and {"t": torch.tensor(3)} matched nothing, before and after a save."""
    from pathlib import Path

    idx = Index(D)
    idx.add(unit(2), "image", [{"p": Path("a/b"), "t": torch.tensor(3)}, {"p": "c", "t": 4}])
    for index in (idx, _saved(idx, tmp_path)):
        q = unit(1)[0]
        assert [h.id for h in index.search(q, k=2, filter={"p": Path("a/b")})] == [0]
        assert [h.id for h in index.search(q, k=2, filter={"t": torch.tensor(3)})] == [0]
        assert [h.id for h in index.search(q, k=2, filter={"t": [np.int64(4), torch.tensor(9)]})] == [1]


def _saved(index: Index, folder) -> Index:
    index.save(folder / "idx")
    return Index.load(folder / "idx")
