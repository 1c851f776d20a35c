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


@pytest.mark.parametrize("setting, message", [
    (("encoder_args", "text", "heads", 3), r"^model\.towers\.text: width 32 is not divisible by heads=3$"),
    (("preprocess", "image", "size", -4), r"^model\.towers\.image\.preprocess: size must be positive, got -4$"),
    (("preprocess", "text", "max_length", 1), r"^model\.towers\.text\.preprocess: max_length must exceed the 2 "),
    (("captioner", None, "heads", 3), r"^loss\.captioner: width 128 is not divisible by heads=3$"),
])
def test_tower_and_captioner_values_are_refused_before_the_world(tmp_path, setting, message):
    """Names were checked, values only as the towers were built: heads=3 on a width of 32 was refused after the
    world was generated and the tokenizer trained, leaving .unstarted, config.yaml and tokenizer.json behind."""
    from mmembed.train import train

    section, tower, key, value = setting
    config = _demo(tmp_path, "decoder=null", "data.synth.n=40", "loss.caption_weight=1")
    args = config.loss.captioner if section == "captioner" else getattr(config.model.towers[tower], section)
    args[key] = value
    with pytest.raises(ConfigError, match=message):
        train(config)
    assert not (tmp_path / "world").exists() and not (tmp_path / "run").exists()


def test_a_captioner_without_a_text_tower_is_refused(tmp_path):
    """"loss.caption_weight needs a text tower" came after the world and the tokenizer."""
    with pytest.raises(ConfigError, match=r"^loss\.caption_weight 1\.0: the captioner writes each row's caption, and "
                                          r"model\.towers \(image, audio\) has no text tower"):
        check_config(_demo(tmp_path, "decoder=null", "loss.caption_weight=1", towers=("image", "audio")))
    check_config(_demo(tmp_path, "decoder=null", "loss.caption_weight=0", towers=("image", "audio")))


def test_the_decoder_stages_device_is_checked_naming_its_key(tmp_path):
    """decoder.train.device=gpu was refused after the align stage, as "device 'gpu' is not a device name"."""
    for key in ("train", "decoder.train"):
        with pytest.raises(ConfigError, match=rf"^{key}\.device 'gpu' is not a device name \(auto, cpu, "):
            check_config(_demo(tmp_path, f"{key}.device=gpu"))
    check_config(_demo(tmp_path, "decoder.train.device=cpu"))


def test_a_device_no_model_trains_on_is_refused_before_work(tmp_path):
    """train.device=meta passed the checks, and the run failed at its first step."""
    for key in ("train", "decoder.train"):
        with pytest.raises(ConfigError, match=rf"^{key}\.device 'meta' is not one a model runs on \(auto, cpu, "):
            check_config(_demo(tmp_path, f"{key}.device=meta"))


def test_decoder_manifests_the_synthetic_world_does_not_write_are_refused(tmp_path):
    """With data.synth, a missing decoder.data.train passed preflight and failed after the align stage."""
    with pytest.raises(ConfigError, match=r"^decoder\.data\.train: instruction manifest not found: .*nope\.jsonl; "
                                          r"the world data\.synth makes writes instruct-train\.jsonl, "):
        check_config(_demo(tmp_path, "decoder.data.train=nope.jsonl"))
    with pytest.raises(ConfigError, match=r"^decoder\.data\.val: data\.synth gives the heldout split no scene, so "
                                          r"instruct-heldout\.jsonl holds no row: set data\.synth\.n_heldout"):
        check_config(_demo(tmp_path, "decoder.data.val=instruct-heldout.jsonl", "data.synth.n_heldout=0"))
    check_config(_demo(tmp_path, "decoder.data.val=instruct-test.jsonl"))
    (tmp_path / "world").mkdir()
    # a manifest of one's own beside the world: taken as it is (an empty one would fail the decoder stage: refused)
    (tmp_path / "world" / "mine.jsonl").write_text('{"prompt": ["Describe", {"text": "a red star"}], "answer": "red"}\n')
    check_config(_demo(tmp_path, "decoder.data.val=mine.jsonl"))


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    pytest.importorskip("transformers")
    from tests.decoder.helpers import save_tiny_gpt2

    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2") / "gpt2", n_layer=1)


def _broken(folder, tmp_path, change):
    import json
    import shutil

    copy = shutil.copytree(folder, tmp_path / "broken")
    if change == "no tokenizer":
        for name in ("tokenizer.json", "vocab.json", "merges.txt"):
            (copy / name).unlink(missing_ok=True)
    elif change == "truncated weights":
        data = (copy / "model.safetensors").read_bytes()
        (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    else:
        config = json.loads((copy / "config.json").read_text())
        key, value = change
        (copy / "config.json").write_text(json.dumps({**config, key: value}))
    return copy


@pytest.mark.parametrize("change, message", [
    ("no tokenizer", r"broken: no tokenizer\.json, nor vocab\.json \+ merges\.txt$"),
    ("truncated weights", r"broken/model\.safetensors: not a readable safetensors file \(.*\)$"),
    (("model_type", "bert"), r"broken/config\.json: model_type 'bert' is not gpt2$"),
    (("activation_function", "relu"), r"broken/config\.json: activation 'relu' not supported"),
    (("n_positions", 8), r"broken's n_positions 8 is shorter than decoder\.soft_tokens \+ 6 = 10, the shortest prompt"),
])
def test_a_gpt2_folder_the_decoder_stage_cannot_load_is_refused(tmp_path, gpt2_folder, change, message):
    """Only its config.json's presence was checked: each failed in the decoder stage, after the whole align stage."""
    check_config(_demo(tmp_path, f"decoder.init_from_gpt2={gpt2_folder}"))
    broken = _broken(gpt2_folder, tmp_path, change)
    with pytest.raises(ConfigError, match=r"^decoder\.init_from_gpt2: .*" + message):
        check_config(_demo(tmp_path, f"decoder.init_from_gpt2={broken}"))


@pytest.mark.parametrize("adapt", ["decoder.freeze_lm=true", "decoder.lora_rank=4"])
def test_fsdp_with_a_frozen_or_adapted_gpt2_is_refused_before_work(tmp_path, gpt2_folder, adapt):
    """It was refused by the decoder stage, after the whole align stage had trained."""
    gpt2 = f"decoder.init_from_gpt2={gpt2_folder}"
    with pytest.raises(ConfigError, match=r"^decoder\.freeze_lm and decoder\.lora_rank train a few embedding rows "
                                          r"through a gradient hook, .*\(decoder\.train\.fsdp=false\)$"):
        check_config(_demo(tmp_path, gpt2, adapt, "decoder.train.fsdp=true"))
    check_config(_demo(tmp_path, gpt2, adapt))


@pytest.mark.parametrize("positional, size", [
    ("learned", r"1\.28e\+04 GB of weights, more than this machine's [0-9.e+]+ GB of memory"),  # built on meta
    ("rotary", r"too large to build in this machine's memory \(1\.28e\+04 GB at once\)"),  # on the CPU: its angles
])
def test_sizes_too_large_for_memory_are_one_line_naming_the_tower(tmp_path, positional, size):
    """model.embed_dim=1e9 was the CPU allocator's traceback ("can't allocate memory: you tried to
    allocate 512000000000 bytes"), in preflight where a tower is built on the CPU, else when the
    stage built the model."""
    config = _demo(tmp_path, "decoder=null", "loss.caption_weight=0", "model.embed_dim=100000000000",
                   towers=("text", "image"))
    config.model.towers["text"].encoder_args["positional"] = positional
    with pytest.raises(ConfigError, match=rf"^model\.towers\.text \(model\.embed_dim=100000000000\): {size}: "
                                          "check its sizes$"):
        check_config(config)


def _rows(folder, name, rows, raw=()):
    """An instruction manifest of `rows` (and `raw` lines) in `folder`; its name."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(line + "\n" for line in raw))
    return name


GOOD_ROWS = [{"prompt": ["What colour is", {"image": "images/s1.png"}], "answer": "red", "task": "colour"},
             {"prompt": ["Describe", {"text": "a red star"}], "answer": "a red star", "task": "describe"}]


def _own_rows(tmp_path, train, *overrides, val=None):
    """The demo config (text and image towers) training its decoder on the manifest `train` of tmp_path/world,
    in batches of one (its few rows make one)."""
    return _demo(tmp_path, "data.synth=null", f"decoder.data.train={train}", f"decoder.data.val={val or 'null'}",
                 "decoder.data.task_weights={}", "decoder.train.batch_size=1", *overrides, towers=("text", "image"))


def test_bad_instruction_rows_are_skipped_by_the_task_check_as_training_skips_them(tmp_path):
    """A misspelt media key in one row stopped the run ("the rows show imgae ... no such tower"), and
    a weight for a task only a bad row names passed, to fail after the align stage."""
    world = tmp_path / "world"
    typo = {"prompt": ["Describe", {"imgae": "images/s1.png"}], "answer": "x", "task": "describe"}
    empty = {"prompt": ["What", {"image": "images/s1.png"}], "answer": "", "task": "typo"}
    name = _rows(world, "mine.jsonl", [*GOOD_ROWS, typo, empty], raw=["{not json"])
    check_config(_own_rows(tmp_path, name))
    with pytest.raises(ConfigError, match=r"^decoder\.data\.task_weights: 'typo' is not a task of the instruction "
                                          r"rows \(their tasks: colour, describe\)$"):
        check_config(_own_rows(tmp_path, name, "decoder.data.task_weights={typo: 2}"))


def test_an_instruction_manifest_without_a_usable_row_is_named_as_such(tmp_path):
    """A UTF-16 file or a JSON array saved as .jsonl blamed filters never set ("no instruction row is
    left after decoder.data.tasks / prompt_modalities")."""
    import json

    world = tmp_path / "world"
    world.mkdir()
    (world / "u16.jsonl").write_bytes("".join(json.dumps(r) + "\n" for r in GOOD_ROWS).encode("utf-16"))
    (world / "array.jsonl").write_text(json.dumps(GOOD_ROWS) + "\n")
    with pytest.raises(ConfigError, match=r"^decoder\.data\.train: .*u16\.jsonl: manifest is UTF-16: save it as "
                                          r"UTF-8$"):
        check_config(_own_rows(tmp_path, "u16.jsonl"))
    with pytest.raises(ConfigError, match=r"^decoder\.data\.train: .*array\.jsonl: no usable instruction row \(1 "
                                          r"skipped; first, line 1: a row must be a JSON object, got list\)$"):
        check_config(_own_rows(tmp_path, "array.jsonl"))
    with pytest.raises(ConfigError, match=r"^decoder\.data\.val: .*u16\.jsonl: manifest is UTF-16"):
        check_config(_own_rows(tmp_path, _rows(world, "mine.jsonl", GOOD_ROWS), val="u16.jsonl"))


def test_the_validation_manifest_is_checked_against_the_task_selection(tmp_path):
    """decoder.data.tasks=[colour] with a validation file of other tasks passed preflight, and the
    decoder stage failed on it after the whole align stage had trained."""
    world = tmp_path / "world"
    train = _rows(world, "mine.jsonl", GOOD_ROWS)
    val = _rows(world, "val.jsonl", GOOD_ROWS[1:])
    check_config(_own_rows(tmp_path, train, val=val))
    with pytest.raises(ConfigError, match=r"^decoder\.data\.val: no row of val\.jsonl is left after decoder\.data\."
                                          r"tasks / prompt_modalities: give another validation manifest, or "
                                          r"decoder\.data\.val: null for none$"):
        check_config(_own_rows(tmp_path, train, "decoder.data.tasks=[colour]", val=val))
    check_config(_own_rows(tmp_path, train, "decoder.data.tasks=[colour]"))


def test_the_memory_check_is_skipped_where_there_is_no_sysconf(tmp_path, monkeypatch):
    """Without os.sysconf (Windows) every preflight died with an AttributeError."""
    import os

    monkeypatch.delattr(os, "sysconf")
    check_config(_demo(tmp_path, "decoder=null"))


def test_fewer_training_rows_than_a_decoder_batch_are_refused_before_the_align_stage(tmp_path):
    """4 rows kept by decoder.data.tasks with decoder.train.batch_size=16 passed preflight, and the decoder
    stage failed ("4 usable decoder rows, fewer than ...") after the whole align stage had trained."""
    world = tmp_path / "world"
    shape = {"prompt": ["Which shape is", {"image": "images/s1.png"}], "answer": "a star", "task": "shape"}
    train = _rows(world, "mine.jsonl", [*GOOD_ROWS * 4, shape, shape], raw=["{not json"])
    with pytest.raises(ConfigError, match=r"^decoder\.data\.train: .*mine\.jsonl keeps at most 2 usable row\(s\) "
                                          r"after decoder\.data\.tasks / prompt_modalities / task_weights, fewer "
                                          r"than decoder\.train\.batch_size=3: lower the batch size"):
        check_config(_own_rows(tmp_path, train, "decoder.data.tasks=[shape]", "decoder.train.batch_size=3"))
    check_config(_own_rows(tmp_path, train, "decoder.data.tasks=[shape]", "decoder.train.batch_size=2"))
    # counted as the stage counts them: the weights repeat rows (2 * 1.5 = 3), the bad line counts for none
    check_config(_own_rows(tmp_path, train, "decoder.data.tasks=[shape]", "decoder.data.task_weights={shape: 1.5}",
                           "decoder.train.batch_size=3"))
    with pytest.raises(ConfigError, match=r"keeps at most 10 usable row\(s\)"):
        check_config(_own_rows(tmp_path, train, "decoder.train.batch_size=11"))


def test_a_misnamed_validation_or_test_manifest_is_refused_before_work(tiny_world, tmp_path, caplog):
    """`data.val=vall.jsonl` trained without validation after a warning, and `data.test=tset.jsonl` went
    unnoticed into the run's config. The default names, which a user's own data may lack, still only warn."""
    from mmembed.config import load_config
    from tests.conftest import tiny_config

    config = tiny_config(tiny_world, tmp_path / "run")
    for key in ("val", "test"):
        with pytest.raises(ConfigError, match=rf"^data\.{key}: .*/nosuch\.jsonl not found: name a manifest that is "
                                              rf"there \(relative to data\.root\), or set data\.{key}=null for none$"):
            check_config(load_config(config, [f"data.{key}=nosuch.jsonl"]))
        check_config(load_config(config, [f"data.{key}=train.jsonl"]))  # there: fine
        check_config(load_config(config, [f"data.{key}=null"]))
    bare = tmp_path / "bare"  # the defaults' files absent: left to the training's warning
    bare.mkdir()
    (bare / "train.jsonl").write_text((tiny_world / "train.jsonl").read_text())
    check_config(load_config(tiny_config(bare, tmp_path / "run2")))
