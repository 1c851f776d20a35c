"""Caption pools: a row's `captions` list is validated at read time, training draws one caption
per (seed, epoch, row), evaluation reads the primary `text`; cache and resume change nothing."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch

from mmembed.config import load_config
from mmembed.data import Batch, ManifestDataset, SkipCounter, build_loader, read_manifest
from mmembed.data.dataset import Sample
from mmembed.errors import UserError
from mmembed.modality import Modality
from mmembed.preprocess import TextPreprocessor
from mmembed.tokenizer import Tokenizer
from mmembed.train.align_data import _eval_loader, train_loader_factory
from tests.conftest import tiny_config

T = Modality.TEXT
POOLS = [
    ["a red circle", "a circle in red", "red round shape"],
    ["a blue square", "a square, blue"],
    ["a green star"],  # no alternatives
    ["a small cross", "a tiny cross", "a little cross", "a cross, small"],
    ["a yellow diamond", "a diamond in yellow"],
    ["a large purple circle", "a big purple circle", "a purple circle, large"],
]


def _rows() -> list[dict]:
    rows = [{"text": pool[0], "captions": pool, "label": f"s{i}"} for i, pool in enumerate(POOLS)]
    rows[2].pop("captions")
    rows[4]["captions"] = [POOLS[4][1], POOLS[4][1], " a yellow diamond "]  # duplicates dropped
    return rows


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([c for pool in POOLS for c in pool], vocab_size=300)


@pytest.fixture
def manifest(tmp_path) -> Path:
    return _write(tmp_path / "train.jsonl", _rows())


def _dataset(manifest: Path, tok: Tokenizer, **kw) -> ManifestDataset:
    return ManifestDataset(read_manifest(manifest), {T: TextPreprocessor(tok, max_length=24)}, **kw)


def _texts(batch: Batch, tok: Tokenizer) -> list[str]:
    ids, mask = batch.inputs[T], batch.masks[T]
    return [tok.decode(row[m][1:-1].tolist()).strip() for row, m in zip(ids, mask)]


def _draws(loader, epochs: range, tok: Tokenizer) -> dict[int, list[tuple[int, str]]]:
    """epoch → [(manifest line, caption)] in batch order."""
    out = {}
    for epoch in epochs:
        loader.batch_sampler.set_epoch(epoch)
        out[epoch] = [(int(line), text) for b in loader for line, text in zip(b.rows, _texts(b, tok))]
    return out


# ---------------------------------------------------------------------------- manifest


def test_the_pool_is_the_primary_then_the_distinct_alternatives_and_meta_keeps_the_raw_list(manifest):
    rows = read_manifest(manifest).rows
    assert [r.caption_pool for r in rows] == [tuple(POOLS[0]), tuple(POOLS[1]), (POOLS[2][0],),
                                              tuple(POOLS[3]), tuple(POOLS[4]), tuple(POOLS[5])]
    assert rows[0].captions == tuple(POOLS[0][1:]) and rows[2].captions == ()
    assert rows[4].meta["captions"] == [POOLS[4][1], POOLS[4][1], " a yellow diamond "]
    assert rows[0].items == {T: POOLS[0][0]}


@pytest.mark.parametrize("captions, reason", [
    ("a circle in red", "captions must be a list of strings, got str "
                        "(CSV cannot hold a list: repeat the row once per caption)"),
    ({"0": "x"}, "captions must be a list of strings, got dict"),
    (["fine", 3], "captions[1] must be a string, got int"),
    (["fine", None], "captions[1] must be a string, got NoneType"),
    (["  "], "captions[0] is an empty caption"),
])
def test_a_malformed_captions_field_skips_the_row_and_counts_it(tmp_path, captions, reason):
    path = _write(tmp_path / "m.jsonl", [{"text": "a red circle"}, {"text": "a blue square", "captions": captions}])
    m = read_manifest(path)
    assert [r.line for r in m.rows] == [1] and m.skipped == [(2, reason)]
    with pytest.raises(UserError) as e:
        read_manifest(path, strict=True)
    assert str(e.value) == f"{path}:2: {reason}"


def test_captions_need_a_primary_text_and_an_empty_one_skips_the_row_in_every_epoch(tmp_path, tok):
    m = read_manifest(_write(tmp_path / "m.jsonl", [
        {"image": "a.png", "captions": ["a red circle"]},
        {"text": " ", "captions": ["a red circle", "a circle in red"]},
        {"image": "a.png", "text": "a blue square", "captions": None},
        {"text": "a blue square", "captions": []},
    ]))
    assert m.skipped == [(1, "captions given without text (the primary caption evaluation uses)")]
    assert [(r.line, r.captions) for r in m.rows] == [(2, ()), (3, ()), (4, ())]
    ds = ManifestDataset(m, {T: TextPreprocessor(tok, max_length=24)}, caption_sampling="random")
    loader = build_loader(ds, 3, shuffle=True, seed=0)
    for epoch in range(8):  # the empty primary is a bad item whatever an epoch could have drawn
        loader.batch_sampler.set_epoch(epoch)
        assert [b.skipped for b in loader] == [[(2, "text: empty caption")]]


def test_csv_cannot_hold_a_list_and_says_to_repeat_the_row(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("image,text,captions\na.png,a red circle,a circle in red\nb.png,a blue square,\n")
    m = read_manifest(path)
    assert len(m.rows) == 1 and m.rows[0].captions == ()
    assert m.skipped == [(2, "captions must be a list of strings, got str "
                             "(CSV cannot hold a list: repeat the row once per caption)")]


# ---------------------------------------------------------------------------- draws


def test_random_draws_cover_each_pool_follow_the_seed_and_change_with_the_epoch(manifest, tok):
    loader = build_loader(_dataset(manifest, tok, caption_sampling="random"), 4, shuffle=True, seed=3)
    draws = _draws(loader, range(40), tok)
    seen: dict[int, Counter] = {}
    for epoch in draws.values():
        for line, text in epoch:
            seen.setdefault(line, Counter())[text] += 1
    assert {line: set(c) for line, c in seen.items()} == {i + 1: set(p) for i, p in enumerate(POOLS)}
    assert all(min(c.values()) >= 4 for c in seen.values())  # 40 draws of ≤ 4 captions: none starved
    per_row = {e: dict(epoch) for e, epoch in draws.items()}  # line → caption, order aside
    assert sum(per_row[0] != per_row[e] for e in range(1, 40)) >= 35  # epochs draw afresh
    again = build_loader(_dataset(manifest, tok, caption_sampling="random"), 4, shuffle=True, seed=3)
    assert _draws(again, range(40), tok) == draws  # same seed, same draws
    other = build_loader(_dataset(manifest, tok, caption_sampling="random"), 4, shuffle=True, seed=4)
    assert _draws(other, range(40), tok) != draws


def test_primary_sampling_and_plain_index_keys_always_give_the_text(manifest, tok):
    loader = build_loader(_dataset(manifest, tok), 4, shuffle=True, seed=3)
    for epoch in _draws(loader, range(5), tok).values():
        assert all(text == POOLS[line - 1][0] for line, text in epoch)
    sampling = _dataset(manifest, tok, caption_sampling="random")
    plain = _dataset(manifest, tok)
    assert all(torch.equal(sampling[i].inputs[T], plain[i].inputs[T]) for i in range(len(POOLS)))


def test_resuming_mid_epoch_draws_the_captions_of_the_uninterrupted_run(manifest, tok):
    def epoch(start_batch: int) -> list[tuple[int, str]]:
        ds = _dataset(manifest, tok, caption_sampling="random")
        loader = build_loader(ds, 2, shuffle=True, seed=7, epoch=5, start_batch=start_batch)
        return [(int(line), text) for b in loader for line, text in zip(b.rows, _texts(b, tok))]

    full = epoch(0)
    assert len(full) == 6 and any(text != POOLS[line - 1][0] for line, text in full)
    assert epoch(1) == full[2:] and epoch(2) == full[4:]


def test_cache_on_and_off_and_workers_give_identical_batches_and_keep_the_primary_cached(manifest, tok):
    def run(cache: bool, workers: int = 0) -> tuple[ManifestDataset, list[Batch]]:
        ds = _dataset(manifest, tok, caption_sampling="random", cache=cache)
        loader = build_loader(ds, 3, shuffle=True, seed=1, num_workers=workers)
        batches = []
        for e in range(6):
            loader.batch_sampler.set_epoch(e)
            batches += list(loader)
        return ds, batches

    plain, expected = run(False)
    cached, got = run(True)
    threaded, from_workers = run(True, workers=2)
    for batches in (got, from_workers):
        assert len(batches) == len(expected) == 12
        for x, y in zip(batches, expected):
            assert torch.equal(x.rows, y.rows) and torch.equal(x.inputs[T], y.inputs[T])
            assert torch.equal(x.masks[T], y.masks[T])
    for ds in (cached, threaded):
        assert sorted(ds.cache) == list(range(6)) and sorted(ds.caption_cache) == [0, 1, 3, 4, 5]
        assert all(isinstance(s, Sample) and torch.equal(s.inputs[T], plain.load(i).inputs[T])
                   for i, s in ds.cache.items())
        assert [len(ds.caption_cache[i]) for i in (0, 1, 3, 4, 5)] == [2, 1, 3, 1, 2]
        assert torch.equal(ds.caption_cache[3][2], plain.load(3, caption=3).inputs[T])


def test_unknown_sampling_is_refused_and_a_pointless_random_warns(manifest, tok, tmp_path, caplog):
    with pytest.raises(UserError, match=r"unknown caption_sampling 'shuffle' \(valid: primary, random\)"):
        _dataset(manifest, tok, caption_sampling="shuffle")
    plain = _write(tmp_path / "plain.jsonl", [{"text": p[0]} for p in POOLS])
    with caplog.at_level(logging.WARNING, logger="mmembed.data.dataset"):
        _dataset(plain, tok, caption_sampling="random")
    assert "no row has alternative captions" in caplog.text


# ---------------------------------------------------------------------------- training config


def test_train_loader_samples_captions_and_validation_reads_the_primary(manifest, tok, tmp_path):
    _write(tmp_path / "val.jsonl", _rows())
    cfg = load_config(tiny_config(tmp_path, tmp_path / "run"),
                      ["data.caption_sampling=random", "train.batch_size=3", "data.cache=false"])
    assert load_config(tiny_config(tmp_path, tmp_path / "run")).data.caption_sampling == "primary"
    make, steps, _ = train_loader_factory(cfg, tmp_path, tok, [T], SkipCounter())
    loader = make(0, 0)
    drawn = set()
    for epoch in range(30):
        loader.batch_sampler.set_epoch(epoch)
        drawn |= {(int(line), text) for b in loader for line, text in zip(b.rows, _texts(b, tok))}
    assert steps == 2 and drawn == {(i + 1, c) for i, pool in enumerate(POOLS) for c in pool}
    val = _eval_loader(cfg, tmp_path, "val.jsonl", tok)
    assert [text for b in val for text in _texts(b, tok)] == [p[0] for p in POOLS]


def test_a_row_the_cache_fill_refuses_is_counted_by_the_training_loader(tmp_path):
    """With workers and a cache, the align stage's loader logged the rows its cache fill refused and
    counted none of them: the run ended without a skipped-rows warning."""
    from mmembed.tokenizer import load_tokenizer

    _write(tmp_path / "train.jsonl", [{"text": p[0]} for p in POOLS] + [{"text": "&nbsp;"}])
    cfg = load_config(tiny_config(tmp_path, tmp_path / "run"),
                      ["train.batch_size=3", "data.cache=true", "data.num_workers=1"])
    skips = SkipCounter()
    make, steps, _ = train_loader_factory(cfg, tmp_path, load_tokenizer("clip"), [T], skips)
    make(0, 0)  # fills the cache in the main process: every row, the one drop_last drops included
    assert steps == 2 and skips.total == 1 and list(skips.by_kind.values()) == [1]


@pytest.mark.parametrize("cache", [False, True])
def test_an_alternative_the_preprocessor_refuses_skips_its_row_whichever_caption_is_drawn(tmp_path, cache):
    """'&nbsp;' passes the manifest and is nothing to the CLIP tokenizer (its cleaning unescapes it to
    a space): the row was kept when an epoch drew the primary, skipped when it drew the
    alternative, and stopped a cached run (materialize raised)."""
    from mmembed.tokenizer import load_tokenizer

    path = _write(tmp_path / "m.jsonl", [{"text": "a red circle", "captions": ["&nbsp;"]}, {"text": "a blue square"}])
    data = _dataset(path, load_tokenizer("clip"), cache=cache, caption_sampling="random")
    if cache:
        assert [line for line, _ in data.materialize()] == [1]
    outcomes = {type(data[(0, seed)]).__name__ for seed in range(8)}
    assert outcomes == {"Skipped"}
    assert "alternative caption" in data[(0, 3)].reason
    assert isinstance(data[(1, 3)], Sample)
