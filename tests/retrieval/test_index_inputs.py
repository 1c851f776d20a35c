"""What `Index.add` and the searches take: containers, numpy queries, near-unit rows; build's skip counts."""

import json

import pytest
import torch

from mmembed.errors import BadInput
from mmembed.retrieval import Index
from tests.retrieval.fakes import FakeModel

D = 8


def unit(n: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, D, generator=torch.Generator().manual_seed(seed)), dim=1)


@pytest.mark.parametrize("vectors", [[torch.randn(D), torch.randn(D)], "abcdefgh", None, {"a": 1}])
def test_add_of_the_wrong_container_is_bad_input_naming_the_shape(vectors):
    """A list of vectors, a str or None raised torch's own ValueError, TypeError or RuntimeError."""
    idx = Index(D)
    with pytest.raises(BadInput, match=rf"^vectors must be an \(N, {D}\) tensor or array, got \w+ .*torch\.stack"):
        idx.add(vectors, "text")
    assert len(idx) == 0


def test_a_numpy_vector_is_one_query_in_search_ids_and_search_batch():
    """A numpy (D,) vector was read as D queries of one number each ("query 0 has shape (1, 1)")."""
    idx = Index(D)
    x = unit(20, 0)
    idx.add(x, "text")
    q = unit(3, 1)
    ids, scores = idx.search_ids(q[0], k=4)
    for query in (q[0].numpy(), q[0].double().numpy()):
        np_ids, np_scores = idx.search_ids(query, k=4)
        assert torch.equal(np_ids, ids) and torch.allclose(np_scores, scores)
        assert [h.id for h in idx.search_batch(query, k=4)[0]] == ids[0].tolist()
    assert torch.equal(idx.search_ids(q.numpy(), k=4)[0], idx.search_ids(q, k=4)[0])  # (Q, D) arrays too


@pytest.mark.parametrize("scale", [1 + 9e-5, 1 - 9e-5, 1 + 3e-6])
def test_rows_near_unit_norm_are_renormalised_so_no_score_passes_one(scale):
    """Rows within 1e-4 of unit norm were stored as given: a row scaled by 1 + 9e-5 scored 1.00009."""
    x = unit(50, 2)
    idx = Index(D)
    idx.add(x * scale, "text")
    _, scores = idx.search_ids(x, k=1)
    assert float(scores.max()) <= 1 + 5e-7 and float(scores.min()) >= 1 - 5e-7
    stored = torch.stack([idx.vector(i) for i in idx.ids()])
    assert float((stored.norm(dim=1) - 1).abs().max()) <= 5e-7


def test_rows_normalised_in_float32_are_still_stored_bit_exact():
    """Rows unit-norm to float32 rounding keep their bits: the renormalisation leaves them alone."""
    x = unit(50, 3)
    idx = Index(D)
    idx.add(x, "text")
    assert torch.equal(torch.stack([idx.vector(i) for i in idx.ids()]), x)


def test_build_info_counts_skipped_items_and_rows_apart(tmp_path):
    """info["skipped"] added items and rows into one number; the log counted them apart."""
    rows = [{"text": f"a picture of c{i}", "image": f"img/c{i}.png"} for i in range(6)]
    rows[1]["image"] = "img/broken1.png"
    rows[4]["image"] = "img/broken4.png"
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    idx = Index.build(FakeModel(dim=D), path, progress=False)
    assert (idx.info["skipped_items"], idx.info["skipped_rows"], idx.info["skipped"]) == (2, 1, 3)
    assert Index.load(idx.save(tmp_path / "ix")).info["skipped_items"] == 2


def test_a_reversed_numpy_array_is_added_as_its_rows():
    """A negative-stride array (a[::-1]) was refused as "must be an (N, D) tensor or array, got ndarray"."""
    import numpy as np

    v = np.random.default_rng(0).standard_normal((4, D)).astype(np.float32)
    idx = Index(D)
    idx.add(v[::-1], "image")
    idx.add(v[:, ::-1], "text")
    expected = torch.nn.functional.normalize(torch.from_numpy(v.copy()), dim=1)
    assert torch.allclose(idx.items()[0][:4], expected.flip(0), atol=1e-6)
    assert torch.allclose(idx.items()[0][4:], expected.flip(1), atol=1e-6)
    assert [h.id for h in idx.search(v[0], target="image", k=1)] == [3]


def test_one_query_given_where_a_list_goes_is_one_line_and_a_listed_vector_is_one_query():
    """search_batch(mm.Query(...)) and search_ids(mm.Text(...)) were "TypeError: 'Query' object is not
    iterable" with a traceback; search_ids(z.tolist()) read each number as a query ("query 0 has shape
    (1, 1)") where search(z.tolist()) took the vector."""
    import mmembed as mm
    from mmembed.errors import UserError

    index = Index(D)
    index.add(unit(4, 0), "image")
    for one in (mm.Query(text="a star"), mm.Text("a star")):
        for search in (index.search_batch, index.search_ids):
            with pytest.raises(UserError, match=r"^queries must be a list of them \(or a \(Q, D\) tensor\), got "
                                                r"one \w+: wrap it in \[ \], or use search for one query$"):
                search(one, k=2, model=FakeModel(D))
    z = unit(1, 1)[0]
    ids, scores = index.search_ids(z.tolist(), k=3)
    expected_ids, expected_scores = index.search_ids(z, k=3)
    assert torch.equal(ids, expected_ids) and torch.allclose(scores, expected_scores)


def test_numpy_sizes_and_a_bad_k_are_taken_as_the_rest_of_the_api_takes_them():
    """Index(np.int64(8)) was refused while k=np.int64(3) was taken; k=0 was a bare ValueError, which
    `except UserError` (Memory.search's k=0) did not catch."""
    import numpy as np

    from mmembed.errors import UserError

    index = Index(np.int64(D))
    assert index.dim == D and type(index.dim) is int
    index.add(unit(2, 0), "image")
    with pytest.raises(UserError, match="k must be a positive int, got 0"):
        index.search(unit(1, 0)[0], k=0)
    with pytest.raises(ValueError, match="k must be a positive int"):  # still a ValueError too
        index.search_ids(unit(1, 0), k=-1)
    with pytest.raises(UserError, match="Index dim must be a positive int"):
        Index(True)
