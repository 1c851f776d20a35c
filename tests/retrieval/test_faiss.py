"""FAISS backends: flat equals exact, HNSW recall, tombstones, filters, lazy sync, missing FAISS."""

import sys

import numpy as np
import pytest
import torch

from mmembed.errors import UserError
from mmembed.modality import Modality
from mmembed.retrieval import BACKENDS, Index, faiss_backend
from mmembed.retrieval.backends import ExactBackend
from mmembed.retrieval.store import VectorStore

pytest.importorskip("faiss")


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def filled(backend: str, n: int = 2000, d: int = 32, **args) -> Index:
    idx = Index(d, backend=backend, **args)
    x = unit(n, d, 0)
    half = n // 2
    idx.add(x[:half], "image", [{"g": i % 4} for i in range(half)])
    idx.add(x[half:], "text", [{"g": i % 4} for i in range(half, n)])
    return idx


def ids(results) -> list[list[int]]:
    return [[h.id for h in hits] for hits in results]


def recall(found: list[list[int]], truth: list[list[int]]) -> float:
    return sum(len(set(f) & set(t)) for f, t in zip(found, truth)) / sum(len(t) for t in truth)


@pytest.fixture
def no_brute_force(monkeypatch):
    """Send every filtered search through FAISS's IDSelectorBitmap instead of the exact subset scan."""
    monkeypatch.setattr(faiss_backend, "_BRUTE_FORCE_ROWS", 0)
    monkeypatch.setattr(faiss_backend, "_BRUTE_FORCE_FRACTION", 0.0)


def test_flat_equals_exact_with_target_filter_and_removal(no_brute_force):
    exact, flat = filled("exact"), filled("faiss_flat")
    for idx in (exact, flat):
        idx.remove(range(0, 2000, 9))  # ~11% tombstones: no compaction, the selector skips them
    q = unit(6, 32, 1)
    for kwargs in ({}, {"target": "text"}, {"filter": {"g": 2}}, {"target": "image", "filter": {"g": [0, 3]}}):
        a, b = exact.search_batch(q, k=10, **kwargs), flat.search_batch(q, k=10, **kwargs)
        assert ids(a) == ids(b), kwargs
        for ha, hb in zip(a, b):
            assert [h.score for h in ha] == pytest.approx([h.score for h in hb], abs=1e-5)


def test_hnsw_recall_20k():
    x, q = unit(20_000, 64, 2), unit(200, 64, 3)
    exact, hnsw = Index(64), Index(64, backend="faiss_hnsw", m=32, ef_search=128)
    exact.add(x, "image")
    hnsw.add(x, "image")
    r = recall(ids(hnsw.search_batch(q, k=10)), ids(exact.search_batch(q, k=10)))
    assert r >= 0.95, r  # measured 0.9675 on this data


def test_hnsw_tombstones_and_rebuild_after_compaction(no_brute_force):
    exact, hnsw = filled("exact"), filled("faiss_hnsw")
    q = unit(20, 32, 4)
    assert recall(ids(hnsw.search_batch(q, k=10)), ids(exact.search_batch(q, k=10))) >= 0.95
    removed = set(range(0, 2000, 7))
    for idx in (exact, hnsw):
        idx.remove(removed)  # 14%: tombstones stay in the graph
    found = ids(hnsw.search_batch(q, k=10))
    assert not removed & {i for row in found for i in row}
    assert recall(found, ids(exact.search_batch(q, k=10))) >= 0.95
    more = set(range(1, 2000, 3)) - removed
    for idx in (exact, hnsw):
        idx.remove(more)  # now > 25% dead: compaction moves rows, the graph is rebuilt
    found = ids(hnsw.search_batch(q, k=10))
    assert not (removed | more) & {i for row in found for i in row}
    assert recall(found, ids(exact.search_batch(q, k=10))) >= 0.95


def test_selective_filter_is_answered_exactly():
    exact, hnsw = filled("exact"), filled("faiss_hnsw", ef_search=1)  # a useless graph walk
    q = unit(3, 32, 5)
    keep = {"g": 1}
    assert ids(hnsw.search_batch(q, k=5, target="text", filter=keep)) == \
        ids(exact.search_batch(q, k=5, target="text", filter=keep))


def test_ivf_with_every_cell_probed_is_exact():
    exact, ivf = filled("exact"), filled("faiss_ivf", nlist=8, nprobe=8)
    q = unit(5, 32, 6)
    assert ids(ivf.search_batch(q, k=10)) == ids(exact.search_batch(q, k=10))


def test_short_answers_are_rescanned_exactly():
    """IVF probing one of five cells cannot fill k = 100 from 200 rows: those answers (padded with -1
    before) are the exact scan's."""
    store = VectorStore(32)
    store.append(unit(200, 32, 11), Modality.IMAGE, ["{}"] * 200)
    q = unit(4, 32, 12).numpy()
    scores, rows = BACKENDS["faiss_ivf"](nprobe=1).search(store, q, 100, None)  # (4, 100)
    truth_scores, truth_rows = ExactBackend().search(store, q, 100, None)
    assert np.array_equal(rows, truth_rows) and np.allclose(scores, truth_scores, atol=1e-6)
    assert rows.dtype == np.int64 and scores.dtype == np.float32


@pytest.mark.parametrize("n_queries", [1, 4])
def test_search_ids_fills_short_answers_with_stored_ids(n_queries):
    """Through `Index.search_ids`: every answer is full, and every id is the stored item's id, not
    its row position."""
    idx = Index(32, backend="faiss_ivf", nprobe=1)
    idx.add(unit(200, 32, 11), "image")
    idx.remove(list(range(0, 200, 7)))  # ids and row positions differ once the store compacts
    idx.compact()
    q = unit(n_queries, 32, 12)
    found, scores = idx.search_ids(q, k=100)
    assert found.shape == (n_queries, 100) and bool((found >= 0).all()) and torch.isfinite(scores).all()
    assert found.tolist() == ids(idx.search_batch(q, k=100))
    assert all(i % 7 for i in found.flatten().tolist())  # removed ids never come back
    stored = torch.stack([idx.vector(i) for i in idx.ids()])  # (N, D)
    truth = torch.tensor(idx.ids())[torch.topk(q @ stored.T, 100).indices]
    assert found.tolist() == truth.tolist()


def test_search_options_changed_between_searches_take_effect():
    """Unfiltered searches reuse their FAISS parameter object: a new option value must rebuild it."""
    store = VectorStore(32)
    store.append(unit(2000, 32, 13), Modality.IMAGE, ["{}"] * 2000)
    q = unit(20, 32, 14).numpy()
    truth = ExactBackend().search(store, q, 10, None)[1]
    ivf = BACKENDS["faiss_ivf"](nlist=32, nprobe=1)
    one_cell = ivf.search(store, q, 10, None)[1]
    ivf.nprobe = 32  # every cell: exact
    assert not np.array_equal(one_cell, truth) and np.array_equal(ivf.search(store, q, 10, None)[1], truth)


def test_ivf_retrained_after_growth_probes_its_new_cells():
    """nprobe is capped at the cell count, which grows when the quantizer is retrained: the cached
    parameters of the first structure (5 cells) must not outlive it (51 cells)."""
    exact, ivf = Index(32), Index(32, backend="faiss_ivf", nprobe=10_000)  # every cell, always: exact
    x, q = unit(2000, 32, 15), unit(10, 32, 16)
    for idx in (exact, ivf):
        idx.add(x[:200], "image")
    assert ids(ivf.search_batch(q, k=10)) == ids(exact.search_batch(q, k=10))
    assert ivf._backend._index.nlist == 5
    for idx in (exact, ivf):
        idx.add(x[200:], "image")  # 10× the rows: retrained
    assert ids(ivf.search_batch(q, k=10)) == ids(exact.search_batch(q, k=10))
    assert ivf._backend._index.nlist == 51


def test_rows_added_after_a_search_are_found():
    idx = filled("faiss_hnsw", n=500)
    idx.search(unit(1, 32, 7)[0])  # builds the graph
    new = unit(3, 32, 8)
    new_ids = idx.add(new, "audio")
    assert [idx.search(v, k=1)[0].id for v in new] == new_ids
    assert len(idx.search(new[0], k=50, target="audio")) == 3


def test_missing_faiss_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'mmembed\[faiss\]'"):
        Index(8, backend="faiss_hnsw")
    assert len(Index(8).search(torch.ones(8))) == 0  # the exact backend never needs it


def embedding_like(n: int, d: int, rank: int, seed: int) -> torch.Tensor:
    """Unit vectors near a random rank-`rank` subspace (+20% isotropic noise), like trained embeddings.

    Isotropic random 512-d vectors are not a meaningful ANN benchmark: every point is nearly
    equidistant from every other (cosines 0 ± 0.044), and graph search has nothing to exploit.
    Measured on 100k × 512 with HNSW32 (efConstruction 40), recall@10 at efSearch 64/128/256/512:
    isotropic random 0.11 / 0.19 / 0.31 / -, rank 64: 0.75 / 0.91 / 0.975 / 0.996,
    rank 32: 0.94 / 0.986 / 1.0 / 1.0.
    """
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d, generator=torch.Generator().manual_seed(1000 + rank))
    x = torch.randn(n, rank, generator=g) @ basis / rank**0.5 + 0.2 * torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


@pytest.mark.slow
def test_hnsw_recall_100k_512():
    """The issue's check: HNSW32 (default efSearch 128) recall@10 >= 0.95 vs exact on 100k × 512."""
    x = embedding_like(100_100, 512, rank=32, seed=9)
    q, x = x[:100], x[100:]
    exact, hnsw = Index(512), Index(512, backend="faiss_hnsw")
    exact.add(x, "image")
    hnsw.add(x, "image")
    r = recall(ids(hnsw.search_batch(q, k=10)), ids(exact.search_batch(q, k=10)))
    assert r >= 0.95, r  # measured 0.986


@pytest.mark.slow
def test_hnsw_recall_100k_512_isotropic_random():
    """The same check on the worst case, isotropic random vectors: it needs a better-built graph
    and a wider search (efConstruction 200, efSearch 2048). Measured with faiss directly on
    100k × 512: efSearch 256 / 1024 / 2048 → 0.43 / 0.85 / 0.974 (~10 ms per query)."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(100_100, 512, generator=g), dim=1)
    q, x = x[:100], x[100:]
    exact = Index(512)
    hnsw = Index(512, backend="faiss_hnsw", ef_construction=200, ef_search=2048)
    exact.add(x, "image")
    hnsw.add(x, "image")
    r = recall(ids(hnsw.search_batch(q, k=10)), ids(exact.search_batch(q, k=10)))
    assert r >= 0.95, r


@pytest.mark.parametrize("backend", ["faiss_hnsw", "faiss_ivf"])
def test_k_at_least_n_returns_every_eligible_item(backend, no_brute_force):
    """k >= N came back short (HNSW 979 of 1,000 rows, IVF 656): a short answer is rescanned exactly."""
    idx = filled(backend, n=1000)
    q = unit(3, 32, 5)
    for hits in idx.search_batch(q, k=1010):
        assert sorted(h.id for h in hits) == list(range(1000))
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    idx.remove(range(0, 1000, 10))  # tombstones: the selector path
    ids, scores = idx.search_ids(q, k=1000, target="text")
    eligible = [i for i in range(500, 1000) if i % 10]
    assert ids.shape == (3, len(eligible)) and all(sorted(row) == eligible for row in ids.tolist())
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())


@pytest.mark.parametrize("backend", ["faiss_flat", "faiss_ivf", "faiss_hnsw"])
def test_a_removal_or_target_builds_the_selector_once_per_mask(backend, monkeypatch, no_brute_force):
    """After one removal, or with a target, every FAISS query counted, packed and wrapped an (N,) mask
    again (0.14 -> 0.43 ms a query at 100k rows, IVF)."""
    faiss = pytest.importorskip("faiss")
    built, make = [], faiss.IDSelectorBitmap
    monkeypatch.setattr(faiss, "IDSelectorBitmap", lambda bits: built.append(bits) or make(bits))
    exact, idx = filled("exact", n=600), filled(backend, n=600, **({"nprobe": 100} if backend == "faiss_ivf" else {}))
    q = unit(3, 32, 21)

    def search(target=None):  # (every IVF cell probed: exact)
        found = idx.search_batch(q, k=5, target=target)
        assert all(h.id not in (7, 400) and target in (None, h.modality) for hits in found for h in hits)
        assert backend == "faiss_hnsw" or ids(found) == ids(exact.search_batch(q, k=5, target=target))
        return found

    for other in (exact, idx):
        other.remove([7, 400])
    plain = [search() for _ in range(3)]
    assert len(built) == 1 and plain[0] == plain[2]
    for target in ("image", "text", "image", "text"):
        search(target)
    assert len(built) == 3
    idx._backend._options = lambda: "new"  # new option values: new parameters for the kept mask
    search("text")
    assert len(built) == 4
    for other in (exact, idx):
        other.add(unit(2, 32, 22), "text")  # the rows changed: a new mask, a new selector
    search("text")
    assert len(built) == 5 and len(built[-1]) == (602 + 7) // 8


@pytest.mark.parametrize("backend", ["faiss_hnsw", "faiss_ivf", "faiss_flat"])
def test_a_pickled_or_copied_faiss_index_answers_as_the_original(backend, no_brute_force):
    """An Index with a FAISS backend could not be pickled ("cannot pickle 'module' object"), so it
    could not go to a worker process; the copy carries FAISS's structure, not one built again."""
    import copy
    import pickle

    idx = filled(backend)
    q = unit(8, 32, 1)
    before = [idx.search_batch(q, k=10), idx.search_batch(q, k=10, target="text", filter={"g": 1})]
    for twin in (pickle.loads(pickle.dumps(idx)), copy.deepcopy(idx)):
        assert twin._backend._index is not None and twin._backend._index is not idx._backend._index
        for got, want in zip([twin.search_batch(q, k=10), twin.search_batch(q, k=10, target="text", filter={"g": 1})],
                             before):
            assert ids(got) == ids(want) and [[h.score for h in r] for r in got] == [[h.score for h in r] for r in want]
        new = twin.add(unit(5, 32, 2), "image")  # the copy goes on from its own rows
        assert [hits[0].id for hits in twin.search_batch(unit(5, 32, 2), k=1)] == new
        assert len(idx) == 2000
    fresh = Index(32, backend=backend)  # never searched: no structure yet
    assert len(pickle.loads(pickle.dumps(fresh))) == 0


@pytest.mark.parametrize("backend", ["faiss_hnsw", "faiss_ivf"])
def test_a_saved_ann_index_loads_its_structure_instead_of_building_it(backend, tmp_path, monkeypatch,
                                                                       no_brute_force):
    """FAISS structures were rebuilt at the first search of every process: `mmembed search` of a 20k
    HNSW index spent 2.8 s building the graph before its one query (and a graph built again could
    answer otherwise). The save keeps the structure; the load takes it, checked."""
    import json

    idx = filled(backend)
    idx.remove([3, 1500])  # tombstones: the save compacts, and the structure is built for the rows saved
    idx.save(tmp_path / "ix")
    assert (tmp_path / "ix" / "structure.faiss").is_file()
    q = unit(8, 32, 1)
    want = [idx.search_batch(q, k=10), idx.search_batch(q, k=10, target="text", filter={"g": 1})]
    built = []
    real_create = type(idx._backend)._create
    monkeypatch.setattr(type(idx._backend), "_create", lambda self, v: built.append(len(v)) or real_create(self, v))
    loaded = Index.load(tmp_path / "ix")
    got = [loaded.search_batch(q, k=10), loaded.search_batch(q, k=10, target="text", filter={"g": 1})]
    assert built == []  # nothing was built: the saved structure answered
    for g, w in zip(got, want):
        assert ids(g) == ids(w) and [[h.score for h in r] for r in g] == [[h.score for h in r] for r in w]
    new = loaded.add(unit(3, 32, 9), "audio")  # rows added after the load are synced into it
    assert [loaded.search(v, k=1)[0].id for v in unit(3, 32, 9)] == new and built == []
    if backend == "faiss_ivf":
        assert loaded._backend._trained_on == idx._backend._trained_on == 1998
    header = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert set(header["structure"]) == {"sha256", "state"}


def _saved_hnsw(folder):
    idx = filled("faiss_hnsw", n=600)
    idx.save(folder)
    return idx


def _edit(folder, *, structure=None, backend_args=None, backend=None):
    """Change structure.faiss (and its checksum, as a hand edit would) or the header's backend."""
    import hashlib
    import json

    header = json.loads((folder / "index.json").read_text())
    if structure is not None:
        (folder / "structure.faiss").write_bytes(structure)
        header["structure"]["sha256"] = hashlib.sha256(structure).hexdigest()
    if backend_args is not None:
        header["backend_args"].update(backend_args)
    if backend is not None:
        header["backend"], header["backend_args"] = backend, {}
    (folder / "index.json").write_text(json.dumps(header))


def test_a_structure_that_cannot_serve_is_built_again_from_the_vectors(tmp_path, caplog, no_brute_force):
    """An unreadable structure.faiss (a damaged file, another FAISS's format) was a traceback that made
    `mmembed search` and `serve` fail on intact vectors, and one of another index type, other
    parameters or other vectors was taken as it was (scores of 1e28, an AttributeError at search). The
    vectors are the index: such a structure is named in a warning and built again from them."""
    import logging

    q = unit(5, 32, 1)
    cases = {
        "checksum does not match": lambda f, data: (f / "structure.faiss").write_bytes(data[:-1] + bytes([data[-1] ^ 1])),
        "cannot read it": lambda f, data: (f / "structure.faiss").unlink(),
        "FAISS cannot read it": lambda f, data: _edit(f, structure=data[: len(data) // 2]),
        # the flat storage's vectors come last: the last rows scaled past any unit vector's
        "its rows are not the index's vectors": lambda f, data: _edit(f, structure=data[:-4000] + bytes(
            [b ^ 0x40 for b in data[-4000:]])),
        "its graph has m=32, ef_construction=40, the index m=16": lambda f, data: _edit(f, backend_args={"m": 16}),
        "it is a IndexHNSWFlat, not the IndexIVFFlat": lambda f, data: _edit(f, backend="faiss_ivf"),
    }
    for i, (warning, damage) in enumerate(cases.items()):
        folder = tmp_path / f"ix{i}"
        idx = _saved_hnsw(folder)
        damage(folder, (folder / "structure.faiss").read_bytes())
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            loaded = Index.load(folder)
        assert warning in caplog.text and "building the structure again from the vectors" in caplog.text, warning
        assert loaded._backend._index is None  # nothing taken: built at the first search, from the vectors
        exact = Index.load(folder)
        exact._backend = ExactBackend()
        got, truth = loaded.search_batch(q, k=5), exact.search_batch(q, k=5)
        assert recall(ids(got), ids(truth)) >= 0.9 and max(h.score for r in got for h in r) <= 1 + 1e-5, warning
        assert len(idx) == len(loaded)


def test_an_ann_index_refused_where_it_is_saved_builds_nothing_first(tmp_path, monkeypatch):
    """A never-searched 100k-row HNSW index saved inside another index (or under a file) was refused
    only after 12.6 s of building its graph, holding the index's lock."""
    idx = filled("faiss_hnsw", n=300)
    idx.save(tmp_path / "outer")
    fresh = filled("faiss_hnsw", n=300)
    monkeypatch.setattr(type(fresh._backend), "_create", lambda self, v: pytest.fail("built before the refusal"))
    with pytest.raises(UserError, match="inside the index folder"):
        fresh.save(tmp_path / "outer" / "inner")


def test_an_index_saved_without_a_structure_builds_it_at_its_first_search(tmp_path):
    """Indexes saved before the structure was kept (and exact or flat ones) load as they did."""
    import json

    idx = filled("faiss_hnsw", n=300)
    idx.save(tmp_path / "ix")
    header_path = tmp_path / "ix" / "index.json"
    header = json.loads(header_path.read_text())
    del header["structure"]
    header_path.write_text(json.dumps(header))
    (tmp_path / "ix" / "structure.faiss").unlink()
    loaded = Index.load(tmp_path / "ix")
    assert loaded._backend._index is None
    assert len(loaded.search(unit(1, 32, 3)[0], k=5)) == 5 and loaded._backend._index is not None
    for backend in ("exact", "faiss_flat"):
        filled(backend, n=100).save(tmp_path / backend)
        assert not (tmp_path / backend / "structure.faiss").exists()
