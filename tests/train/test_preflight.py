"""Preflight: the ids a text tower reads are the ones it was built for."""

from __future__ import annotations

import pytest

import mmembed as mm
from mmembed.config import ModelConfig, from_dict
from mmembed.errors import ConfigError
from mmembed.train.preflight import check_config
from tests.conftest import TINY_MODEL


def test_an_open_clip_text_tower_needs_the_clip_tokenizer(tmp_path):
    """With tokenizer.kind: bpe every caption embedded to one vector (it pools at the largest id), and preflight passed."""
    overrides = ["tokenizer.kind=bpe", f"train.out_dir={tmp_path / 'run'}", "model.towers.text.encoder_args.pretrained=null",
                 "model.towers.image.encoder_args.pretrained=null", "data.root=" + str(tmp_path)]
    config = mm.load_config("openclip-b32", overrides)
    with pytest.raises(ConfigError, match=r"model\.towers\.text\.encoder: open_clip_text pools at CLIP's end-of-text "
                                          r"id, so it needs tokenizer.kind: clip \(got tokenizer.kind: bpe\)"):
        check_config(config)
    config.tokenizer.kind = "clip"
    check_config(config)


@pytest.fixture
def source_run(tmp_path):
    """A saved run with a text tower and a tokenizer of its own (the bind recipe's model.init_from)."""
    from mmembed.model import build_model

    config = mm.load_config("demo", [f"train.out_dir={tmp_path / 'source'}"])
    config.model = from_dict(ModelConfig, TINY_MODEL, "model", "test")
    tok = mm.Tokenizer.train(["a large red circle on the left", "a small blue star"] * 20, vocab_size=300)
    return build_model(config, tok).save(tmp_path / "source")


def _bind(tmp_path, source, *overrides):
    config = mm.load_config("demo", [f"model.init_from={source}", f"train.out_dir={tmp_path / 'bind'}", "decoder=null",
                                     *overrides])
    config.model.towers = from_dict(ModelConfig, TINY_MODEL, "model", "test").towers
    return config


def test_init_from_refuses_a_text_tower_fed_another_tokenizers_ids(tmp_path, source_run):
    """A copied (frozen) text tower read the ids of a tokenizer trained anew: cosine 0.13 with the source's vectors."""
    wanted = f"set tokenizer.path: {source_run / 'tokenizer.json'}"
    with pytest.raises(ConfigError, match=r"model\.init_from: .* a new tokenizer trained on the captions: " + wanted):
        check_config(_bind(tmp_path, source_run))
    other = mm.Tokenizer.train(["something else entirely"] * 20, vocab_size=300).save(tmp_path / "other.json")
    with pytest.raises(ConfigError, match=f"those of {other}: {wanted}"):
        check_config(_bind(tmp_path, source_run, f"tokenizer.path={other}"))
    check_config(_bind(tmp_path, source_run, f"tokenizer.path={source_run / 'tokenizer.json'}"))
    check_config(_bind(tmp_path, source_run, "model.init_towers=[image]"))  # the text tower starts fresh: any ids
