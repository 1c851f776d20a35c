"""Index: ids, removal, validation, target and metadata filters, zero queries, k edge cases."""

import math

import numpy as np
import pytest
import torch

from mmembed.errors import BadInput, ConfigError, UserError
from mmembed.modality import Modality
from mmembed.retrieval import Index, Query, format_hits
from tests.retrieval.fakes import FakeModel

D = 16


def unit(n: int, seed: int, d: int = D) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


@pytest.fixture
def index() -> Index:
    """60 image rows, 40 audio rows, 50 text rows; metadata: n (running number), group (n % 3)."""
    idx = Index(D, block_rows=8)  # tiny blocks: every search exercises the block merge
    for seed, (modality, n) in enumerate([("image", 60), ("audio", 40), ("text", 50)]):
        start = len(idx)
        idx.add(unit(n, seed), modality, [{"n": start + i, "group": (start + i) % 3} for i in range(n)])
    return idx


def brute_force(idx: Index, q: torch.Tensor, k: int, keep=lambda item_id: True) -> list[int]:
    ids = [i for i in idx.ids() if keep(i)]
    scores = torch.stack([idx.vector(i) for i in ids]) @ q
    return [ids[j] for j in torch.argsort(scores, descending=True)[:k].tolist()]


def test_ids_are_stable_and_never_reused(index):
    assert index.ids() == list(range(150)) and len(index) == 150
    v42 = index.vector(42)
    index.remove(range(0, 40))  # > 25% dead: the store compacts, rows move
    index.remove([100])
    assert len(index) == 109 and 5 not in index and 42 in index
    assert torch.equal(index.vector(42), v42) and index.metadata(42)["n"] == 42
    new = index.add(unit(3, 99), "image")
    assert new == [150, 151, 152]
    q = index.vector(41)
    hits = index.search(q, k=200)
    assert len(hits) == 112 and hits[0].id == 41 and math.isclose(hits[0].score, 1.0, abs_tol=1e-5)
    assert not {h.id for h in hits} & (set(range(40)) | {100})


def test_remove_unknown_id_changes_nothing(index):
    with pytest.raises(UserError, match="no item with id 999"):
        index.remove([3, 999])
    assert 3 in index and len(index) == 150
    import numpy as np

    index.remove(3)  # one id, as Memory.delete takes it (a TypeError: not iterable)
    index.remove(np.int64(4))  # of the integer type search_ids returns
    assert 3 not in index and 4 not in index and len(index) == 148


def test_search_equals_brute_force(index):
    q = unit(1, 50)[0]
    assert [h.id for h in index.search(q, k=7)] == brute_force(index, q, 7)


@pytest.mark.parametrize("bad, row", [(float("nan"), 3), (float("inf"), 5), (-float("inf"), 0)])
def test_nan_inf_vectors_refused_naming_the_row(index, bad, row):
    v = unit(6, 1)
    v[row, 2] = bad
    with pytest.raises(ValueError, match=f"row {row} contains NaN or Inf"):
        index.add(v, "image")
    assert len(index) == 150


def test_wrong_dim_and_zero_vectors_refused(index):
    with pytest.raises(ValueError, match="dimension 16"):
        index.add(torch.randn(2, 8), "image")
    with pytest.raises(ValueError, match="row 1 is the zero vector"):
        index.add(torch.stack([unit(1, 2)[0], torch.zeros(D)]), "image")
    with pytest.raises(ValueError, match="dimension 16"):
        index.search(torch.randn(8))
    with pytest.raises(ValueError, match="NaN"):
        index.search(torch.full((D,), float("nan")))


def test_query_checks_name_the_bad_query_and_accept_any_finite_scale(index):
    q = unit(3, 5)
    for queries in (q.clone(), list(q.clone()), q.numpy().copy()):
        queries[2][4] = float("nan")
        with pytest.raises(ValueError, match="query 2 contains NaN or Inf"):
            index.search_batch(queries, k=3)
    # squares of 1e30 overflow float32: a finite query that large is still a direction, not an error
    huge = index.search_ids(q * 1e30, k=3)
    plain = index.search_ids(q.double(), k=3)  # float64 and bf16 queries are converted
    assert torch.equal(huge[0], plain[0]) and torch.allclose(huge[1], plain[1])
    assert index.search_ids(q.bfloat16(), k=3)[0].shape == (3, 3)


def test_add_normalises_non_unit_rows():
    idx = Index(4)
    [i] = idx.add(torch.tensor([[3.0, 4.0, 0.0, 0.0]]), "image")
    assert idx.vector(i).tolist() == pytest.approx([0.6, 0.8, 0.0, 0.0])


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_bad_k_is_value_error(index, k):
    with pytest.raises(ValueError, match="k must be a positive int"):
        index.search(unit(1, 3)[0], k=k)


def test_k_larger_than_n_returns_n(index):
    assert len(index.search(unit(1, 3)[0], k=10_000)) == 150
    assert len(index.search(unit(1, 3)[0], k=10_000, target="audio")) == 40
    assert Index(D).search(unit(1, 3)[0], k=5) == []


def test_zero_query_gives_zero_scores_not_nan(index):
    hits = index.search(torch.zeros(D), k=4)
    assert len(hits) == 4 and all(h.score == 0.0 for h in hits)
    batch = index.search_batch(torch.stack([torch.zeros(D), unit(1, 4)[0]]), k=3)
    assert [h.score for h in batch[0]] == [0.0] * 3 and batch[1][0].score > 0


def test_queries_reach_the_backend_unit_length_float32_on_64_byte_boundaries(index):
    """FAISS's IVF search ran 11% slower from numpy's 16-byte-aligned arrays (`_aligned`)."""
    import numpy as np

    for q in (unit(1, 5), unit(7, 6), torch.zeros(1, D), 3.0 * unit(1, 8).double(), [unit(1, 9)[0], unit(1, 10)[0]]):
        a = index._query_matrix(q, None)
        assert a.dtype == np.float32 and a.ctypes.data % 64 == 0
        norms = np.linalg.norm(a, axis=1)
        assert np.allclose(norms[norms > 0], 1.0, atol=1e-6)


def test_target_modality(index):
    q = unit(1, 7)[0]
    hits = index.search(q, target="audio", k=5)
    assert all(h.modality is Modality.AUDIO for h in hits)
    assert [h.id for h in hits] == brute_force(index, q, 5, lambda i: 60 <= i < 100)
    with pytest.raises(ValueError, match="valid: text, image, audio"):
        index.search(q, target="imgae")


def test_metadata_filters(index):
    q = unit(1, 8)[0]
    by_dict = index.search(q, k=6, filter={"group": 1})
    by_fn = index.search(q, k=6, filter=lambda m: m["group"] == 1)
    assert [h.id for h in by_dict] == [h.id for h in by_fn] == brute_force(index, q, 6, lambda i: i % 3 == 1)
    any_of = index.search(q, k=200, filter={"n": [1, 2, 70]}, target="image")
    assert sorted(h.id for h in any_of) == [1, 2]
    assert index.search(q, filter={"missing_key": 1}) == []
    with pytest.raises(UserError, match="callable or a dict"):
        index.search(q, filter=["group"])


def test_filters_match_list_and_dict_values_by_equality():
    """A list-valued field was matched by its repr (`"['red', 'star']"` matched), and a list or dict
    among the wanted values was an unhashable-type crash."""
    idx = Index(D)
    idx.add(unit(3, 2), "image", [{"tags": ["red", "star"]}, {"tags": "red"}, {"tags": {"a": 1}}])
    q = unit(1, 3)[0]

    def ids(filter):
        return sorted(h.id for h in idx.search(q, k=5, filter=filter))

    assert ids({"tags": "['red', 'star']"}) == []
    assert ids({"tags": [["red", "star"]]}) == [0] and ids({"tags": [("red", "star")]}) == [0]
    assert ids({"tags": ["red", "star"]}) == [1]  # a list of wanted values: any of these scalars
    assert ids({"tags": {"a": 1}}) == [2] and ids({"tags": [["red", "star"], "red"]}) == [0, 1]
    with pytest.raises(UserError, match="key that is not a str: 3"):  # a save would make it "3"
        idx.add(unit(1, 4), "image", [{3: "x"}])


def test_a_query_vector_of_the_wrong_size_is_one_clear_error(index):
    """A Query(vector=...) skipped the size check: FAISS read past the buffer, exact raised RuntimeError."""
    for bad in (torch.randn(D - 3), torch.randn(D + 4)):
        with pytest.raises(UserError, match="query 1"):
            index.search_batch([Query(vector=unit(1, 5)[0]), Query(vector=bad)], k=3)


def test_numpy_ids_are_found_in_the_index(index):
    import numpy as np

    ids, _ = index.search_ids(unit(2, 6), k=3)  # int64 tensors, as search_ids returns them
    assert ids[0, 0] in index and np.int64(2) in index and 2 in index
    assert 10**6 not in index and "2" not in index and True not in index


def test_search_batch_equals_single_searches(index):
    qs = unit(5, 11)
    batch = index.search_batch(qs, k=4, target="text")
    single = [index.search(q, k=4, target="text") for q in qs]  # matrix-vector vs matrix product
    assert [[h.id for h in hits] for hits in batch] == [[h.id for h in hits] for hits in single]
    for b_hits, s_hits in zip(batch, single):
        assert [h.score for h in b_hits] == pytest.approx([h.score for h in s_hits], abs=1e-5)
    with pytest.raises(UserError, match="use search_batch"):
        index.search(qs, k=4)


def test_query_search_uses_the_model_and_checks_it():
    model = FakeModel(dim=D)
    idx = Index(D, fingerprint=model.fingerprint)
    idx.add(model.embed("image", ["c1.png", "c2.png", "c3.png"]), "image", [{"item": f"c{i}"} for i in (1, 2, 3)])
    with pytest.raises(UserError, match="pass model="):
        idx.search(Query(text="c2"))
    hits = idx.search(Query(text="c2"), model=model, k=1)
    assert hits[0].metadata["item"] == "c2"
    idx.model = model
    assert idx.search(Query(text="c3"), k=1)[0].metadata["item"] == "c3"
    assert idx.search(Query(vector=model.embed("text", ["c1"])[0]), k=1)[0].id == 0  # no model needed
    # the prompt's own items, as generate and Memory.search take them (a TypeError from numpy here)
    import mmembed as mm
    from mmembed.decoder import Embedded

    assert idx.search(mm.Text("c3"), k=1)[0].metadata["item"] == "c3"
    assert idx.search(mm.Image("c2.png"), k=1)[0].metadata["item"] == "c2"
    assert idx.search_ids([Embedded(model.embed("text", ["c1"])[0], "text")], k=1)[0].tolist() == [[0]]
    for odd in (None, {"text": "c1"}):  # "query 0 has shape (1, 1)" for None, a TypeError for the dict
        with pytest.raises(UserError, match="query 0 is a .*: pass a \\(D,\\) vector, an mm.Query"):
            idx.search(odd)
    with pytest.raises(UserError, match=r"built with model fake-a \(dim 16\), this model is other \(dim 16\)"):
        idx.search(Query(text="c2"), model=FakeModel(dim=D, fingerprint="other"))
    with pytest.raises(UserError, match=r"this model is fake-a \(dim 8\)"):
        idx.model = FakeModel(dim=8)


def test_hits_are_copies_and_format(index):
    hit = index.search(unit(1, 12)[0], k=1)[0]
    hit.metadata["n"] = -1
    assert index.metadata(hit.id)["n"] == hit.id
    table = format_hits(index.search(unit(1, 12)[0], k=2), columns=("n", "group"))
    lines = table.splitlines()
    assert lines[0] == "| rank | score | id | modality | n | group |" and len(lines) == 4
    assert f"| 1 | {hit.score:.4f} | {hit.id} |" in lines[2]
    assert "(no hits)" in format_hits([])


def test_backend_and_storage_names_are_checked():
    with pytest.raises(UserError, match="valid: exact, sq8, faiss_flat, faiss_ivf, faiss_hnsw"):
        Index(D, backend="annoy")
    with pytest.raises(UserError, match="valid: fp32, fp16"):
        Index(D, storage="int8")
    with pytest.raises(ConfigError, match="unknown key 'blocks'"):
        Index(D, blocks=3)


def test_search_ids_equals_search_batch_without_hits():
    x = torch.nn.functional.normalize(torch.randn(300, D, generator=torch.Generator().manual_seed(3)), dim=1)
    idx = Index(D)
    idx.add(x[:200], "image")
    idx.add(x[200:], "audio")
    idx.remove([5, 7])
    q = x[:4] + 0.1
    ids, scores = idx.search_ids(q, k=6, target="image")
    hits = idx.search_batch(q, k=6, target="image")
    assert ids.tolist() == [[h.id for h in row] for row in hits]
    torch.testing.assert_close(scores, torch.tensor([[h.score for h in row] for row in hits]))
    assert all(h.modality == "image" for row in hits for h in row) and 5 not in ids
    empty_ids, empty_scores = Index(D).search_ids(q, k=3)
    assert empty_ids.shape == (4, 0) and empty_scores.shape == (4, 0)


def test_ids_of_rows_reads_rows_as_ids_only_while_every_id_is_its_row():
    """The lookup-free path of `ids_of_rows` (B-ann, one query) against the plain lookup, through
    appends, removal, compaction and a reload with ids out of order; -1 padding stays -1."""
    import numpy as np

    from mmembed.retrieval.store import VectorStore

    def looked_up(store: VectorStore, rows: np.ndarray) -> np.ndarray:
        return np.where(rows < 0, -1, store.ids.numpy()[np.maximum(rows, 0)])

    def check(store: VectorStore, identity: bool) -> None:
        rows = np.random.default_rng(store.n_rows).integers(0, store.n_rows, (3, 4))
        rows[1, 2:] = -1  # a short answer's padding
        assert store._ids_are_rows is identity
        out = store.ids_of_rows(rows)
        assert np.array_equal(out, looked_up(store, rows)) and not np.shares_memory(out, rows)

    store = VectorStore(D, capacity=4)
    store.append(unit(10, 0), Modality.IMAGE, ["{}"] * 10)
    store.append(unit(10, 1), Modality.AUDIO, ["{}"] * 10)  # grows the buffers
    check(store, True)
    store.remove([3])
    check(store, True)  # a tombstone keeps its row
    store.compact()
    check(store, False)
    trailing = VectorStore(D)
    trailing.append(unit(10, 2), Modality.TEXT, ["{}"] * 10)
    trailing.remove([9])
    trailing.compact()
    check(trailing, True)  # only the last row went: every id is still its row
    trailing.append(unit(2, 3), Modality.TEXT, ["{}"] * 2)  # ids 10, 11 at rows 9, 10
    check(trailing, False)
    reloaded = VectorStore(D)
    reloaded.append(unit(4, 4), Modality.IMAGE, ["{}"] * 4, ids=[0, 1, 3, 2])
    check(reloaded, False)
    in_order = VectorStore(D)
    in_order.append(unit(4, 5), Modality.IMAGE, ["{}"] * 4, ids=[0, 1, 2, 3])
    check(in_order, True)


def test_single_queries_from_several_threads_get_their_own_answers(index):
    """One query is normalised into a per-thread buffer (`_one_query`): threads never share it."""
    from concurrent.futures import ThreadPoolExecutor

    queries = list(unit(64, 11).split(1))
    expected = [index.search_ids(q, k=5) for q in queries]

    def run(offset: int) -> bool:
        order = queries[offset:] + queries[:offset]
        got = [index.search_ids(q, k=5) for _ in range(5) for q in order]
        want = [expected[(i + offset) % 64] for _ in range(5) for i in range(64)]
        return all(torch.equal(g[0], w[0]) and torch.equal(g[1], w[1]) for g, w in zip(got, want))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(run, [0, 16, 32, 48]))


def test_remove_takes_ids_not_strings():
    """remove("12") removed ids 1 and 2 (the characters); 3.5 was a TypeError traceback."""
    idx = Index(D)
    idx.add(torch.randn(13, D, generator=torch.Generator().manual_seed(0)), "text")
    for bad in ("12", b"12", 3.5, [1.5], ["3"]):
        with pytest.raises(UserError, match="item id"):
            idx.remove(bad)
    assert len(idx) == 13
    idx.remove([1, 2])
    assert len(idx) == 11


@pytest.mark.parametrize("scale", [1e20, 1e-22, 1e-30])
def test_finite_rows_of_any_scale_become_unit_rows(scale):
    """Norms in float32 overflowed (x * 1e20 was stored as zeros, every score 0) or underflowed
    into subnormals (1e-22: norms 1.004; 1e-30: 'the zero vector')."""
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(1))
    idx = Index(D)
    idx.add(x * scale, "image")
    hits = idx.search(x[0], k=1)
    assert hits[0].id == 0 and hits[0].score == pytest.approx(1.0, abs=1e-5)


def test_metadata_is_copied_in_and_out_down_to_its_nested_values(tmp_path):
    """Hits, metadata() and items() shared nested values with the index (an edit changed later filters
    and the next save), and the caller's list, appended to after add(), made the save fail late."""
    idx = Index(D)
    objects = [{"colour": "red"}]
    idx.add(unit(2, 0), "image", [{"objects": objects, "tags": ["a"]}, {"objects": [{"colour": "blue"}]}])
    objects.append({"colour": b"bytes"})  # after add: no save can write bytes
    idx.search(idx.vector(0), k=1)[0].metadata["objects"][0]["colour"] = "green"
    idx.metadata(0)["objects"][0]["colour"] = "green"
    idx.items()[2][0]["tags"].append("b")
    original = {"objects": [{"colour": "red"}], "tags": ["a"]}
    assert idx.metadata(0) == original
    red = idx.search(idx.vector(1), k=5, filter=lambda m: m["objects"][0]["colour"] == "red")
    assert [h.id for h in red] == [0]
    assert Index.load(idx.save(tmp_path / "ix")).metadata(0) == original


def test_a_lone_metadata_dict_goes_with_one_vector_and_is_named_for_several():
    """A dict for one (D,) vector said "metadata[0] must be a dict, got str" (its keys were taken as the rows)."""
    idx = Index(D)
    assert idx.add(unit(1, 0)[0], "image", {"label": "s1", "n": 2}) == [0]
    assert idx.metadata(0) == {"label": "s1", "n": 2}
    with pytest.raises(UserError, match="one dict for 2 vectors; give a list of dicts, one per vector"):
        idx.add(unit(2, 1), "image", {"label": "s1"})
    assert len(idx) == 1


def test_a_filter_that_searches_the_index_leaves_the_outer_query_alone():
    """One query's rows live in a per-thread buffer, filled before the filter ran: a filter that
    searched the same index overwrote it, and the outer search answered the inner query."""
    torch.manual_seed(0)
    idx = Index(8)
    x = torch.randn(100, 8)
    idx.add(x, "image", [{"i": i} for i in range(100)])
    inner = []

    def keep(meta):
        if not inner:
            inner.append(idx.search(x[0], k=1))
        return True

    assert [h.id for h in idx.search(x[7], k=3, filter=keep)] == [h.id for h in idx.search(x[7], k=3)]
    assert inner


def test_k_may_be_a_numpy_integer():
    """k=np.int64(3) was "k must be a positive int, got np.int64(3)"."""
    idx = Index(8)
    idx.add(torch.randn(20, 8), "image")
    q = torch.randn(8)
    assert [h.id for h in idx.search(q, k=np.int64(3))] == [h.id for h in idx.search(q, k=3)]
    with pytest.raises(ValueError, match="k must be a positive int"):
        idx.search(q, k=np.bool_(True))


@pytest.mark.parametrize("bad", [1.9, "1", 1.0, True, None])
def test_vector_and_metadata_refuse_ids_that_remove_refuses(index, bad):
    """metadata(1.9) and vector("1") gave item 1 (int() read them) while `remove` and `in` refused them."""
    assert bad not in index
    for read in (index.vector, index.metadata, index.remove):
        with pytest.raises(UserError, match="item ids are integers|remove takes an item id"):
            read(bad)
    assert torch.equal(index.vector(np.int64(1)), index.vector(1)) and index.metadata(torch.tensor(1)) == {"n": 1, "group": 1}


@pytest.mark.parametrize("query", [torch.tensor([1 + 0j] + [5j] * (D - 1)), np.full(D, 1 + 1j),
                                   torch.ones(2, D, dtype=torch.complex128)])
def test_a_complex_query_is_refused_not_cut_to_its_real_part(index, query):
    """A complex query lost its imaginary part with a ComplexWarning and searched on; `add` refuses complex."""
    search = index.search if query.ndim == 1 else index.search_ids
    with pytest.raises(BadInput, match="query 0 must be real, got .*complex"):
        search(query, k=2)
    with pytest.raises(BadInput, match="query 1 must be real"):
        index.search_batch([torch.ones(D), query.reshape(-1, D)[0]], k=2)
