"""Composed queries: the arithmetic is the normalised weighted sum of unit embeddings."""

import numpy as np
import pytest
import torch

from mmembed.errors import UserError
from mmembed.retrieval import Index, Query
from tests.retrieval.fakes import FakeModel

normalize = torch.nn.functional.normalize


@pytest.fixture
def model() -> FakeModel:
    return FakeModel(dim=12, noise=0.3)


def test_single_item_equals_model_embedding(model):
    z = Query(image="img/c4.png").embed(model)
    torch.testing.assert_close(z, model.embed("image", ["img/c4.png"])[0], atol=1e-6, rtol=0)


def test_weighted_list_arithmetic(model):
    q = Query(audio=["blue_square.wav", "red_circle.wav"], weights={"audio": [1, -1]})
    e = model.embed("audio", ["blue_square.wav", "red_circle.wav"])
    torch.testing.assert_close(q.embed(model), normalize(e[0] - e[1], dim=0), atol=1e-6, rtol=0)


def test_mixed_modalities_and_vector(model):
    v = torch.randn(12, generator=torch.Generator().manual_seed(0)) * 5  # not unit: normalised first
    q = Query(v, text="a red circle", image="cat.png", weights={"image": 2.0, "vector": 0.5})
    t, i = model.embed("text", ["a red circle"])[0], model.embed("image", ["cat.png"])[0]
    expected = normalize(t + 2.0 * i + 0.5 * normalize(v, dim=0), dim=0)
    torch.testing.assert_close(q.embed(model), expected, atol=1e-6, rtol=0)
    assert abs(float(q.embed(model).norm()) - 1) < 1e-6


def test_huge_finite_weights_give_the_same_direction(model):
    """3e38 is a finite float32, but a sum of such terms is not: the weights are scaled first."""
    small = Query(text=["a red circle", "a blue square"], weights={"text": [1.0, 2.0]}).embed(model)
    huge = Query(text=["a red circle", "a blue square"], weights={"text": [1.5e38, 3e38]}).embed(model)
    torch.testing.assert_close(huge, small, atol=1e-6, rtol=0)
    # finite in float64 though past float32: refused as "not finite" when checked in float32
    larger = Query(text=["a red circle", "a blue square"], weights={"text": [1.75e38, 3.5e38]}).embed(model)
    torch.testing.assert_close(larger, small, atol=1e-6, rtol=0)


def test_weights_that_are_not_numbers_are_one_line():
    """"abc" was numpy's ValueError, None a TypeError, and "2" passed as 2.0."""
    for w in ("abc", None, "2", [True], [1.0, "x"]):
        with pytest.raises(UserError, match="weights for text must be numbers"):
            Query(text="a", weights={"text": w})


def test_cancelling_query_is_a_clear_error_not_nan(model):
    with pytest.raises(UserError, match="zero vector"):
        Query(text=["c1", "c1"], weights={"text": [1.0, -1.0]}).embed(model)
    with pytest.raises(UserError, match="every weight is 0"):
        Query(text=["c1", "c2"], weights={"text": [0.0, 0.0]}).embed(model)
    with pytest.raises(UserError, match="zero vector"):
        Query(torch.zeros(12))


def test_bad_queries_name_the_problem(model):
    with pytest.raises(UserError, match="valid: text, image, audio"):
        Query(imgae="x.png")
    with pytest.raises(UserError, match="at least one item"):
        Query()
    with pytest.raises(UserError, match="3 weights for 2 audio"):
        Query(audio=["a.wav", "b.wav"], weights={"audio": [1, 1, 1]})
    with pytest.raises(UserError, match="weights for image, which the query does not have"):
        Query(text="x", weights={"image": 1.0})
    with pytest.raises(UserError, match="NaN or Inf"):
        Query(torch.tensor([1.0, float("nan")]))
    with pytest.raises(UserError, match="finite"):
        Query(text="x", weights={"text": float("inf")})
    with pytest.raises(UserError, match="pass a model"):
        Query(text="x").embed(None)
    with pytest.raises(UserError, match="different dimensions"):
        Query(torch.ones(5), text="x").embed(model)


def test_tuple_is_one_item_list_is_many(model):
    wave = (np.zeros(100, dtype=np.float32), 16000)
    assert len(Query(audio=wave).items["audio"]) == 1
    assert len(Query(audio=[wave, wave]).items["audio"]) == 2


def test_index_search_with_query_equals_vector_search(model):
    idx = Index(12, fingerprint=model.fingerprint)
    idx.add(model.embed("image", [f"c{i}.png" for i in range(20)]), "image")
    query = Query(text="c3", audio="c7.wav", weights={"audio": 0.5})
    by_query = idx.search(query, model=model, k=5)
    by_vector = idx.search(query.embed(model), k=5)
    assert [h.id for h in by_query] == [h.id for h in by_vector]
    assert by_query[0].id == 3  # the heavier part wins


@pytest.mark.parametrize("vector, said", [(torch.ones(0), r"is empty \(shape \(0,\)\)"),
                                          (torch.ones(2, 0), r"is empty \(shape \(2, 0\)\)"),
                                          ("abc", "array of numbers, got str"), (["a", "b"], "array of numbers, got list"),
                                          ([1.0, None], "array of numbers, got list"),
                                          (np.array(["x", "y"]), "array of numbers, got ndarray"),
                                          (torch.tensor([1 + 0j, 5j]), "must be real, got torch.complex64")])
def test_a_vector_that_is_empty_not_numbers_or_complex_is_one_line(vector, said):
    """An empty vector was "the zero vector", a str a raw TypeError from torch, a complex one cut to its real part."""
    with pytest.raises(UserError, match=f"^Query: vector .*{said}"):
        Query(vector=vector)


def test_a_query_vector_of_any_finite_norm_keeps_its_direction():
    """A vector past float32's squares (norm > ~1.8e19) became zeros: alone it was called "the zero
    vector", in a sum it was dropped without a word; a tiny one (1e-23) was refused. The index scaled
    such rows in float64 already: a query is scaled alike."""
    want = torch.tensor([[0.6, 0.8, 0.0]])
    for scale in (1e19, 1e30, 1e-23, 1e-40):
        torch.testing.assert_close(Query(vector=torch.tensor([3.0, 4.0, 0.0]) * scale).vectors, want)
    both = Query(vector=torch.tensor([[3e19, 4e19, 0.0], [0.0, 0.0, 1.0]])).embed()
    torch.testing.assert_close(both, normalize(torch.tensor([0.6, 0.8, 1.0]), dim=0))
    with pytest.raises(UserError, match="the zero vector"):
        Query(vector=torch.zeros(3)).vectors
