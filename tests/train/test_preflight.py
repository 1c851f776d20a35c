"""Preflight: the ids a text tower reads are the ones it was built for; the towers, loss, metric and
decoder tasks a config names can work."""

from __future__ import annotations

import pytest

import mmembed as mm
from mmembed.config import ModelConfig, from_dict
from mmembed.data.synth.instructions import TASKS
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


def _demo(tmp_path, *overrides, towers=("text", "image", "audio")):
    """The demo config with TINY_MODEL's `towers`, its world and run under tmp_path."""
    config = mm.load_config("demo", [f"data.root={tmp_path / 'world'}", f"train.out_dir={tmp_path / 'run'}",
                                     *overrides])
    config.model.towers = {name: tower for name, tower in from_dict(ModelConfig, TINY_MODEL, "model", "test")
                           .towers.items() if name in towers}
    return config


@pytest.mark.parametrize("overrides, message", [
    (["decoder.data.tasks=[]"], r"^decoder\.data\.tasks: \[\] keeps no row: name the tasks to keep, or null for all$"),
    (["decoder.data.tasks=[colour]", "decoder.data.task_weights={exists: 3}"],
     r"^decoder\.data\.task_weights: 'exists' is not one of decoder\.data\.tasks \(colour\), whose rows"),
    (["decoder.data.tasks=[colour, shape]", "decoder.data.task_weights={colour: 0, shape: 0}"],
     r"^decoder\.data\.task_weights \{'colour': 0\.0, 'shape': 0\.0\} drops every task of decoder\.data\.tasks"),
    (["decoder.data.task_weights={" + ", ".join(f"{t}: 0" for t in TASKS) + "}"],
     r"^decoder\.data\.task_weights \{.*\} drops every task of the instruction rows: give one a weight > 0$"),
])
def test_a_task_selection_that_keeps_no_row_is_refused(tmp_path, overrides, message):
    """Each passed preflight and failed ("no row left", "task weights name task(s) none of the rows has") after the
    align stage had trained."""
    with pytest.raises(ConfigError, match=message):
        check_config(_demo(tmp_path, *overrides))
    check_config(_demo(tmp_path, "decoder.data.tasks=[colour, exists]", "decoder.data.task_weights={exists: 3}"))
    check_config(_demo(tmp_path, "decoder.data.tasks=[colour, exists]", "decoder.data.task_weights={colour: 0}"))


def test_a_decoder_config_copying_a_space_checks_the_rows_against_that_space(tmp_path):
    """model.init_from's model section replaces the config's: rows showing a modality its source
    lacks failed after the copy ("this model has no audio tower"), and init_towers was ignored.
    The config's own towers are not read, so one the source lacks is fine when no row shows it."""
    from mmembed.model import build_model

    source = _demo(tmp_path, f"train.out_dir={tmp_path / 'source'}", towers=("text", "image"))
    tok = mm.Tokenizer.train(["a large red circle on the left", "a small blue star"] * 20, vocab_size=300)
    build_model(source, tok).save(tmp_path / "source")
    copy = f"model.init_from={tmp_path / 'source'}"
    with pytest.raises(ConfigError, match=r"^decoder\.data: the instruction rows show audio, and the space of "
                                          r"model\.init_from .*source has no such tower: set "
                                          r"decoder\.data\.prompt_modalities to the ones it has \(text, image\)$"):
        check_config(_demo(tmp_path, copy))
    with pytest.raises(ConfigError, match=r"^model\.init_towers: a decoder config copies model\.init_from's whole "
                                          r"space, so init_towers=\['text'\] picks nothing: remove it"):
        check_config(_demo(tmp_path, copy, "model.init_towers=[text]", towers=("text", "image")))
    rows = ["decoder.data.prompt_modalities=[image,text]", "decoder.data.task_weights={}"]
    check_config(_demo(tmp_path, copy, *rows))  # an audio tower in the config, none in the rows: it passed before
    check_config(_demo(tmp_path, copy, *rows, towers=("text", "image")))
    check_config(_demo(tmp_path, copy, "decoder=null", "model.init_towers=[image]"))  # binds: the audio tower trains


def test_a_weight_for_a_task_the_modality_selection_leaves_out_is_refused(tmp_path):
    """{larger: 3} (the demo's) names rows that show a picture and a sound: prompt_modalities=[image]
    passed preflight and failed ("task weights name task(s) none of the rows has") after the align stage."""
    with pytest.raises(ConfigError, match=r"^decoder\.data\.task_weights: 'larger' names rows decoder\.data\.tasks "
                                          r"/ prompt_modalities leave out \(the tasks kept: .*colour.*\): drop the "
                                          r"weight"):
        check_config(_demo(tmp_path, "decoder.data.prompt_modalities=[image]"))
    check_config(_demo(tmp_path, "decoder.data.prompt_modalities=[image]", "decoder.data.task_weights={}"))


def test_the_worlds_task_media_table_is_what_a_written_world_holds(tiny_world):
    """Preflight checks a selection by modality against TASK_MEDIA before the world exists."""
    from mmembed.data.instructions import manifest_kinds
    from mmembed.data.synth.instructions import TASK_MEDIA

    assert manifest_kinds(tiny_world / "instruct-train.jsonl") == TASK_MEDIA


@pytest.mark.parametrize("overrides, towers, message", [
    (["loss.pair_weights={image-text: 0}"], ("text", "image"),
     r"^loss\.pair_weights \{'image-text': 0\.0\} switch off every pair of model\.towers \(text, image\), so the "
     r"loss trains none: give one a weight > 0$"),
    ([], ("text",), r"^model\.towers: a contrastive space needs at least two towers, got 1 \(text\)"),
    (["loss.mode=anchor", "loss.anchor=audio"], ("text", "image"),
     r"^loss\.anchor 'audio' is not one of model\.towers \(text, image\), so the loss trains no modality pair"),
])
def test_a_loss_that_trains_no_pair_is_refused(tmp_path, overrides, towers, message):
    """"The loss trains no modality pair" came after the world was generated and the tokenizer trained."""
    with pytest.raises(ConfigError, match=message):
        check_config(_demo(tmp_path, "decoder=null", *overrides, towers=towers))
    check_config(_demo(tmp_path, "decoder=null", *overrides))  # with an audio tower, some pair trains


@pytest.mark.parametrize("metric", ["imag→text/recall@1", "audio→text/recall@1", "text→text/recall@1"])
def test_a_pair_metric_names_two_of_the_towers(tmp_path, metric):
    """A misspelt or missing modality passed, and validation then warned "no best checkpoint is kept"."""
    with pytest.raises(ConfigError, match=rf"^train\.early_stop_metric '{metric}' is not a validation metric .*a "
                                          r"pair's of model\.towers \(text, image\), e\.g\. text→image/recall@1\)$"):
        check_config(_demo(tmp_path, f"train.early_stop_metric={metric}", "decoder=null", towers=("text", "image")))
    for good in ("text→image/recall@1", "val/image→text/recall@1"):
        check_config(_demo(tmp_path, f"train.early_stop_metric={good}", "decoder=null", towers=("text", "image")))
