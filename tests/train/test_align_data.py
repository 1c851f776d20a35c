"""The align stage's loaders and memory: a training cache too large for the machine is refused before
the first step; validation caches a small set and streams a large one, with the same figures."""

import copy
import json

import pytest
import torch

from mmembed.config import load_config
from mmembed.data.loader import SkipCounter
from mmembed.errors import ConfigError
from mmembed.evaluate_recall import pairwise_report
from mmembed.modality import Modality
from mmembed.tokenizer import Tokenizer
from mmembed.train.align_data import _eval_loader, embed_dataset, train_loader_factory
from tests.conftest import tiny_config, tiny_model

ROWS = 51  # tiny_world's training rows


@pytest.fixture(scope="module")
def model():
    return tiny_model(0)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(["a small red circle on the left", "a large blue square"] * 10, vocab_size=300)


@pytest.fixture
def val_world(tiny_world, tmp_path):
    """tiny_world's training rows as a validation manifest, with one row whose image is missing."""
    for entry in ("images", "audio"):
        (tmp_path / entry).symlink_to(tiny_world / entry)
    rows = [json.loads(line) for line in (tiny_world / "train.jsonl").read_text().splitlines()]
    rows[5]["image"] = "images/missing.png"
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def _memory(monkeypatch, available: int | None) -> None:
    monkeypatch.setattr("mmembed.data.cache_size.available_memory", lambda: available)


def test_a_training_cache_larger_than_half_the_memory_is_refused_before_training(tiny_world, tmp_path, tok,
                                                                                 monkeypatch, caplog):
    """data.cache=true kept every row in memory with no estimate: the run was killed late in epoch 1."""
    _memory(monkeypatch, 1_000_000)  # 51 rows of a 32-px image and a 2 s sound hold about 3 MB
    towers = [Modality.IMAGE, Modality.AUDIO, Modality.TEXT]
    cfg = load_config(tiny_config(tiny_world, tmp_path / "run"))
    assert cfg.data.cache
    with pytest.raises(ConfigError, match=r"^data\.cache=true: caching the training set \(51 rows\) would hold about "
                                          r"[\d.]+ MB \(an estimate.*more than 50% of the 1 MB of memory available; "
                                          r"set data\.cache=false"):
        train_loader_factory(cfg, tiny_world, tok, towers, SkipCounter())
    cfg = load_config(tiny_config(tiny_world, tmp_path / "run"), ["data.cache=false"])
    train_loader_factory(cfg, tiny_world, tok, towers, SkipCounter())  # nothing held: nothing to refuse
    _memory(monkeypatch, 10**12)
    with caplog.at_level("INFO", logger="mmembed.data.cache_size"):
        train_loader_factory(load_config(tiny_config(tiny_world, tmp_path / "run")), tiny_world, tok, towers,
                             SkipCounter())
    assert "the training set's cache of 51 rows will hold about" in caplog.text


def _validate(model, root, cfg):
    loader = _eval_loader(cfg, root, "val.jsonl", model.tokenizer)
    emb, keys = embed_dataset(model.space, loader, torch.device("cpu"))
    return loader, emb, keys


def test_cached_and_streamed_validation_give_the_same_figures(model, val_world, monkeypatch):
    """Validation cached every row even with data.cache=false (a 50k-row set held ~38 GB) and loaded in
    one process whatever data.num_workers said."""
    cfg = copy.deepcopy(model.config)
    cfg.data.cache, cfg.data.num_workers = False, 1
    cached, emb, keys = _validate(model, val_world, cfg)  # 51 small rows: within the budget
    assert cached.num_workers == 0 and len(cached.dataset.cache) == ROWS
    monkeypatch.setattr("mmembed.data.cache_size.VAL_CACHE_BUDGET", 100_000)
    streamed, emb2, keys2 = _validate(model, val_world, cfg)
    assert streamed.dataset.cache is None and streamed.num_workers == 1
    assert keys == keys2 and emb.keys() == emb2.keys() and {m: len(v) for m, v in emb.items()} == {
        Modality.TEXT: ROWS - 1, Modality.IMAGE: ROWS - 1, Modality.AUDIO: ROWS - 1}
    assert all(torch.equal(emb[m], emb2[m]) for m in emb)
    assert pairwise_report(emb, keys) == pairwise_report(emb2, keys2)


def test_validation_streams_when_the_memory_is_short_and_data_cache_refuses_it(model, val_world, monkeypatch):
    """With data.cache=true validation was cached whatever its size; without, it could not be turned off."""
    cfg = copy.deepcopy(model.config)
    cfg.data.cache = False
    _memory(monkeypatch, 1_000_000)  # the set's ~3 MB fits the 512 MB budget, not half of this
    assert _eval_loader(cfg, val_world, "val.jsonl", model.tokenizer).dataset.cache is None
    cfg.data.cache = True
    with pytest.raises(ConfigError, match=r"^data\.cache=true: caching the validation set \(51 rows\) .*"
                                          r"set data\.cache=false"):
        _eval_loader(cfg, val_world, "val.jsonl", model.tokenizer)
