"""Embedding map: PCA equals an SVD reference, seeded sampling, column lookup and errors, the PNG, the CLI."""

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from mmembed.cli import main
from mmembed.errors import UserError
from mmembed.insight.embedding_map import (MAX_CATEGORIES, _categories, column_values, embedding_map, is_numeric,
                                           map_columns, map_vectors, numeric_colours, pca_2d, project_2d,
                                           sample_rows)
from mmembed.retrieval import Index

D = 12
PNG = b"\x89PNG\r\n\x1a\n"
COLOURS = ["red", "green", "blue"]


def build_index() -> Index:
    """30 images and 20 texts; metadata with a numeric, a categorical and a nested column."""
    index = Index(D)
    g = torch.Generator().manual_seed(0)
    for modality, n in [("image", 30), ("text", 20)]:
        meta = [{"label": f"c{i % 4}", "score": float(i), "objects": [{"colour": COLOURS[i % 3]}]} for i in range(n)]
        index.add(torch.randn(n, D, generator=g), modality, meta)
    return index


def _reference_pca(x: np.ndarray) -> np.ndarray:
    centred = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    return u[:, :2] * s[:2]


def _equal_up_to_sign(a: np.ndarray, b: np.ndarray) -> None:
    for k in range(2):
        sign = np.sign(a[:, k] @ b[:, k])
        np.testing.assert_allclose(a[:, k], sign * b[:, k], atol=1e-4)


def test_pca_equals_numpy_svd_up_to_sign():
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(1)) * torch.linspace(3, 0.1, D)
    xy = pca_2d(x).numpy()
    _equal_up_to_sign(xy, _reference_pca(x.double().numpy()))
    assert xy[:, 0].var() > xy[:, 1].var()  # the first axis carries the most variance
    # the documented sign convention: each axis's largest-magnitude loading is positive
    centred = x.double().numpy() - x.double().numpy().mean(axis=0)
    loadings = np.linalg.lstsq(centred, xy.astype(np.float64), rcond=None)[0]  # (D, 2)
    assert all(loadings[np.abs(loadings[:, k]).argmax(), k] > 0 for k in range(2))


def test_pca_of_one_point_is_the_origin():
    assert pca_2d(torch.ones(1, D)).tolist() == [[0.0, 0.0]]


def test_map_of_an_index_writes_a_png_of_its_pca(tmp_path):
    index = build_index()
    result = embedding_map(index, "label", tmp_path / "map.png")
    assert result.path.read_bytes()[:8] == PNG
    vectors = np.stack([index.vector(i).numpy() for i in index.ids()])  # the stored unit rows
    _equal_up_to_sign(result.xy, _reference_pca(vectors.astype(np.float64)))
    assert result.modalities == ["image"] * 30 + ["text"] * 20
    assert result.values[:5] == ["c0", "c1", "c2", "c3", "c0"] and not result.numeric


def test_a_saved_index_maps_like_the_live_one(tmp_path):
    index = build_index()
    index.remove([3, 4])
    index.save(tmp_path / "idx")
    live = embedding_map(index, "score", tmp_path / "a.png")
    saved = embedding_map(tmp_path / "idx", "score", tmp_path / "b.png")
    assert len(live.rows) == 48 and live.numeric
    np.testing.assert_allclose(live.xy, saved.xy, atol=1e-6)
    assert live.values == saved.values and 3.0 not in live.values[:30]


def test_sampling_is_seeded_and_maps_the_subset(tmp_path):
    index = build_index()
    a = embedding_map(index, "modality", tmp_path / "a.png", max_points=10, seed=5)
    b = embedding_map(index, "modality", tmp_path / "b.png", max_points=10, seed=5)
    c = embedding_map(index, "modality", tmp_path / "c.png", max_points=10, seed=6)
    assert len(a.rows) == 10 and list(a.rows) == sorted(a.rows) and len(set(a.rows)) == 10
    assert list(a.rows) == list(b.rows) and list(a.rows) != list(c.rows)
    vectors = np.stack([index.vector(i).numpy() for i in index.ids()])[a.rows]
    _equal_up_to_sign(a.xy, _reference_pca(vectors.astype(np.float64)))
    assert a.values == a.modalities
    assert list(sample_rows(7, 10, 0)) == list(range(7))


def test_a_sampled_map_of_an_index_reads_only_the_sampled_items(tmp_path, monkeypatch):
    """A map of 5,000 points copied every item's metadata out of the index first (4.9 s at 100k)."""
    index = build_index()
    index.remove([7])
    vectors, modalities, metadata = index.items()
    whole = map_vectors(vectors, [m.value for m in modalities], metadata, "score", tmp_path / "a.png",
                        max_points=10, seed=3)
    asked, items = [], Index.items
    monkeypatch.setattr(Index, "items", lambda self, ids=None: asked.append(ids) or items(self, ids))
    sampled = embedding_map(index, "score", tmp_path / "b.png", max_points=10, seed=3)
    assert [len(ids) for ids in asked] == [10]
    assert list(sampled.rows) == list(whole.rows) and sampled.values == whole.values
    np.testing.assert_allclose(sampled.xy, whole.xy, atol=1e-6)
    assert sampled.modalities == whole.modalities


def test_a_map_reads_the_ids_it_sampled_while_another_thread_removes(tmp_path, monkeypatch):
    """The map read ids(), then items(ids) under a second hold of the lock: an item removed between
    the two by another thread ended the map with "no item with id 49"."""
    import threading
    import time

    index, real_ids, done = build_index(), Index.ids, []

    def ids_then_a_removal(self):
        found = real_ids(self)
        if not done:  # once: the remover waits for the lock if the map holds it
            remover = threading.Thread(target=lambda: done.append(index.remove(found[-1])))
            remover.start()
            time.sleep(0.2)
            done.append(remover)
        return found

    monkeypatch.setattr(Index, "ids", ids_then_a_removal)
    drawn = embedding_map(index, "label", tmp_path / "map.png")
    done[0].join()
    assert len(drawn.rows) == 50 and len(index) == 49


def test_columns_nested_paths_and_kinds():
    meta = [{"label": "a", "n": 1, "objects": [{"colour": "red"}, {"colour": "blue"}], "tags": []}, {"label": "b"}]
    assert map_columns(meta) == ["modality", "label", "n", "objects.0.colour"]
    assert column_values(meta, "objects.1.colour") == ["blue", None]
    assert column_values(meta, "n") == [1, None]
    assert is_numeric([1, 2.5, None]) and not is_numeric([True, False]) and not is_numeric(["a", 2])


def test_a_key_holding_a_dot_is_a_column():
    """Listed as valid, then refused: the lookup split "file.name" into "file" and "name"."""
    meta = [{"file.name": "a.png", "a": {"b.c": 2, "b": {"c": 3}}}]
    assert map_columns(meta) == ["modality", "file.name", "a.b.c"]
    assert column_values(meta, "file.name") == ["a.png"]
    assert column_values(meta, "a.b.c") == [2]  # the longest key first, as the listing found it


def test_unknown_column_lists_the_valid_ones(tmp_path):
    with pytest.raises(UserError, match=r"unknown --color-by column 'colour'; valid: modality, label, score, "
                                        r"objects\.0\.colour$"):
        embedding_map(build_index(), "colour", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_many_categories_are_capped_with_other():
    values = [f"v{i}" for i in range(30) for _ in range(30 - i)]  # v0 most frequent
    labels, colours = _categories(values)
    assert len(colours) == MAX_CATEGORIES and list(colours)[-1] == "other"
    assert labels.count("other") == sum(range(1, 12))  # v19..v29 occur 11..1 times
    assert len(set(map(str, colours.values()))) == MAX_CATEGORIES - 1 + 1  # 19 distinct + grey
    _, named = _categories(["red", "blue", None])
    assert named == {"red": "red", "blue": "blue", "(missing)": "lightgrey"}  # colour names draw in their colour


@pytest.mark.parametrize("method,module", [("tsne", "sklearn.manifold"), ("umap", "umap")])
def test_missing_method_is_one_line(monkeypatch, method, module):
    monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    with pytest.raises(UserError) as e:
        project_2d(torch.randn(20, D), method)
    assert "\n" not in str(e.value) and "not installed" in str(e.value) and "--method pca" in str(e.value)
    with pytest.raises(UserError, match="unknown projection method 'mds'; valid: pca, tsne, umap"):
        project_2d(torch.randn(20, D), "mds")


@pytest.mark.parametrize("x", [torch.randn(3, D), torch.ones(6, D)], ids=["three points", "one place"])
def test_pca_is_drawn_and_named_where_tsne_and_umap_cannot_work(monkeypatch, tmp_path, x):
    """Three points, or six identical ones (scikit-learn's t-SNE crashed the process on them with
    a segfault): PCA, and the title and the result say so; they said "umap map" before, with PCA's
    coordinates, even with umap not installed."""
    monkeypatch.setitem(sys.modules, "umap", None)
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    for method in ("tsne", "umap"):
        drawn = map_vectors(x, ["image"] * len(x), [{}] * len(x), "modality", tmp_path / f"{method}.png",
                            method=method, title=None)
        assert drawn.method == "pca" and np.allclose(drawn.xy, pca_2d(x).numpy())


def test_a_seed_out_of_range_is_one_line(tmp_path):
    """--seed 99999999999999999999 was an OverflowError traceback; -1 was taken."""
    x = torch.randn(6, D)
    for seed in (-1, 2**70):
        with pytest.raises(UserError, match=r"seed must be an integer in \[0, 4294967295\]"):
            map_vectors(x, ["image"] * 6, [{}] * 6, "modality", tmp_path / "s.png", seed=seed)


def test_tsne_is_called_seeded_when_installed(monkeypatch, tmp_path):
    calls = {}

    class FakeTSNE:
        def __init__(self, **kwargs):
            calls.update(kwargs)

        def fit_transform(self, x):
            calls["shape"] = x.shape
            return x[:, :2] * 2

    monkeypatch.setitem(sys.modules, "sklearn.manifold", types.SimpleNamespace(TSNE=FakeTSNE))
    x = torch.randn(20, D)
    xy = map_vectors(x, ["image"] * 20, [{}] * 20, "modality", tmp_path / "t.png", method="tsne", seed=3).xy
    np.testing.assert_allclose(xy, x[:, :2].numpy() * 2, rtol=1e-6)
    assert calls["random_state"] == 3 and calls["n_components"] == 2 and calls["shape"] == (20, D)
    assert calls["perplexity"] < 20  # scikit-learn requires perplexity < n_samples


def test_demo_map_colours_by_the_first_objects_colour(tmp_path):
    from mmembed.demo import _embedding_map

    rows = [{"text": f"scene {i}", "label": f"s{i}", "objects": [{"colour": COLOURS[i % 3]}]} for i in range(6)]
    manifest = tmp_path / "test.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    emb = {"text": torch.randn(6, D), "image": torch.randn(6, D)}
    keys = {m: [f"s{i}" for i in range(6)] for m in emb}
    out = _embedding_map(emb, keys, manifest, tmp_path / "embedding_map.png")
    assert out == tmp_path / "embedding_map.png" and out.read_bytes()[:8] == PNG


def test_cli_help():
    with pytest.raises(SystemExit) as e:
        main(["map", "--help"])
    assert e.value.code == 0


def _one_line(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("mmembed: error:") and match in err, err


def test_cli(capsys, tmp_path, monkeypatch):
    build_index().save(tmp_path / "idx")
    assert main(["map", str(tmp_path / "idx"), "--color-by", "score", "--out", str(tmp_path / "m.png")]) == 0
    assert "50 points by pca, colour = score (colourbar)" in capsys.readouterr().out
    assert (tmp_path / "m.png").read_bytes()[:8] == PNG
    _one_line(capsys, ["map", str(tmp_path / "idx"), "--color-by", "nope", "--out", "x.png"],
              "valid: modality, label, score")
    _one_line(capsys, ["map", str(tmp_path / "none"), "--color-by", "label", "--out", "x.png"], "not found")
    _one_line(capsys, ["map", str(tmp_path / "idx"), "--color-by", "label", "--out", "x.png", "--method", "mds"],
              "invalid choice")
    _one_line(capsys, ["map", str(tmp_path / "idx"), "--color-by", "label", "--out", "x.png", "--max-points", "0"],
              "--max-points must be positive")
    monkeypatch.setitem(sys.modules, "umap", None)
    _one_line(capsys, ["map", str(tmp_path / "idx"), "--color-by", "label", "--out", "x.png", "--method", "umap"],
              "needs the umap-learn package")


def test_a_plot_that_fails_half_way_leaves_the_earlier_png(tmp_path, monkeypatch):
    """Every PNG (insight plots, the embedding map, training curves) is written beside its name and
    renamed: a failure mid-write used to leave a truncated file in place of a good one."""
    from mmembed.insight.plotting import pyplot, save_png

    out = tmp_path / "plot.png"
    fig, ax = pyplot().subplots()
    ax.plot([0, 1], [1, 0])
    good = save_png(fig, out).read_bytes()
    assert good.startswith(b"\x89PNG")

    def half_then_fail(self, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG\r\n\x1a\n")
        raise OSError(28, "No space left on device")

    fig, ax = pyplot().subplots()
    monkeypatch.setattr(type(fig), "savefig", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        save_png(fig, out)
    assert out.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_non_finite_numbers_are_grey_and_the_colour_scale_spans_the_finite_ones(tmp_path, monkeypatch):
    """±1e308, a JSON 10**400 or inf in a numeric column were a traceback (NaN axis limits, an int
    too large for a float) or a colourbar of -0.1..0.1 with every finite point one colour."""
    from mmembed.insight import embedding_map as em

    c = numeric_colours([0.0, 4, float("inf"), None, 10**400, float("nan"), -float("inf")])
    np.testing.assert_array_equal(c, [0.0, 4.0, np.nan, np.nan, np.nan, np.nan, np.nan])
    assert numeric_colours([1e308, -1e308, 0.0]) is None  # the range overflows: drawn as categories
    assert numeric_colours([1e308, 0.0]) is None  # the colourbar's steps would
    assert numeric_colours([float("inf"), None]) is None
    limits = []
    real_save = em.save_png

    def save_png(fig, out, **kwargs):
        limits.append(fig.axes[1].get_ylim() if len(fig.axes) > 1 else None)  # the colourbar's range
        return real_save(fig, out, **kwargs)

    monkeypatch.setattr(em, "save_png", save_png)
    vectors = torch.randn(8, D, generator=torch.Generator().manual_seed(0))
    cases = {"inf": ([float(i) for i in range(7)] + [float("inf")], (0.0, 6.0)),
             "big_int": ([10**400] + list(range(1, 8)), (1.0, 7.0)),
             "huge_range": ([1e308, -1e308] + [float(i) for i in range(6)], None)}
    for name, (scores, colourbar) in cases.items():
        out = tmp_path / f"{name}.png"
        drawn = map_vectors(vectors, ["text"] * 8, [{"score": v} for v in scores], "score", out)
        assert drawn.numeric == (colourbar is not None) and out.read_bytes()[:8] == PNG, name
        assert limits.pop() == colourbar, name


def test_the_map_never_replaces_an_item_of_the_index(tmp_path, capsys, monkeypatch):
    """`--out images/a.png` over an item of the index wrote the map into the item's own image."""
    image = tmp_path / "images" / "a.png"
    image.parent.mkdir()
    image.write_bytes(PNG + b"an item")
    index = build_index()
    index.add(torch.randn(1, D, generator=torch.Generator().manual_seed(1)), "image", [{"item": str(image)}])
    index.save(tmp_path / "idx")
    monkeypatch.chdir(tmp_path)
    for out in (str(image), "images/a.png", "images/../images/a.png"):
        _one_line(capsys, ["map", "idx", "--color-by", "modality", "--out", out], "is the file of an item of the index")
    assert image.read_bytes() == PNG + b"an item"
    assert main(["map", "idx", "--color-by", "modality", "--out", "images/b.png"]) == 0  # beside it is fine


def test_an_out_that_cannot_be_written_is_one_line_before_the_work(tmp_path, capsys, monkeypatch):
    """A folder named dir.png failed with "Is a directory" (exit 1) only after the projection."""
    import mmembed.insight.embedding_map as em

    build_index().save(tmp_path / "idx")
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(em, "project_2d", lambda *a, **k: pytest.fail("projected before refusing --out"))
    for out, match in ((tmp_path / "dir.png", "is a folder; name the file to write"), (tmp_path / "file" / "m.png",
                                                                             "is a file, not a folder")):
        _one_line(capsys, ["map", str(tmp_path / "idx"), "--color-by", "label", "--out", str(out)], match)


@pytest.mark.parametrize("inside", ["map.png", "sub/map.png"])
def test_map_refuses_an_out_inside_the_index_folder(capsys, tmp_path, inside):
    """`map --out IDX/map.png` wrote into the index folder, and every later save to IDX was refused."""
    build_index().save(tmp_path / "idx")
    out = tmp_path / "idx" / inside
    assert main(["map", str(tmp_path / "idx"), "--color-by", "score", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"inside the index folder {tmp_path / 'idx'}" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["index.json", "metadata.jsonl",
                                                                    "vectors.safetensors"]
    Index.load(tmp_path / "idx").save(tmp_path / "idx")  # the index can still be saved in place


def test_a_csv_manifests_numbers_draw_with_a_colourbar(tmp_path):
    """A CSV's cells are all text: a `year` column of "1999", "2004.5" drew as categories (a legend
    of every value, the rest "other"), where JSONL's numbers drew a colourbar."""
    from mmembed.insight.embedding_map import is_numeric

    assert is_numeric(["1999", " 2004.5", "-3e2", ".5", "", None])
    assert not is_numeric(["1999", "n/a"]) and not is_numeric(["nan", "1"]) and not is_numeric(["1_000"])
    assert not is_numeric(["", None])
    np.testing.assert_array_equal(numeric_colours(["1999", "", "2004.5", None]), [1999.0, np.nan, 2004.5, np.nan])
    vectors = torch.randn(6, D, generator=torch.Generator().manual_seed(0))
    drawn = map_vectors(vectors, ["image"] * 6, [{"year": str(1990 + i)} for i in range(6)], "year",
                        tmp_path / "m.png")
    assert drawn.numeric and (tmp_path / "m.png").read_bytes()[:8] == PNG
