import logging
import re
from pathlib import Path

import pytest
import yaml

from mmembed.config import CONFIG_DIR, Config, apply_override, check_kwargs, load_config
from mmembed.errors import ConfigError


SWEEP_CONFIGS = {"scaling"}  # `mmembed scale` configs (ScalingConfig), not training configs


@pytest.mark.parametrize("path", sorted(p for p in CONFIG_DIR.glob("*.yaml") if p.stem not in SWEEP_CONFIGS),
                         ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_builds(path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.model.towers, f"{path.name} defines no towers"
    from encoders import ENCODERS
    from mmembed.space import build_space

    for name, tower in config.model.towers.items():
        assert tower.encoder in ENCODERS
    if all(not t.encoder.startswith("open_clip") for t in config.model.towers.values()):
        space = build_space(config.model, vocab_size=300)
        assert {str(m) for m in space.modalities} == set(config.model.towers)


def test_shipped_sweep_config_loads_as_a_scaling_config():
    from mmembed.insight.sweep_config import ScalingConfig, load_scaling_config

    config = load_scaling_config("scaling")
    assert isinstance(config, ScalingConfig) and len(config.sizes) >= 5
    with pytest.raises(ConfigError, match=r"this is a scaling config .*run it with `mmembed scale`"):
        load_config("scaling")  # a sweep config is not a training config: one clear line


def test_shipped_name_resolves():
    assert load_config("demo").train.out_dir


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_key_and_file(tmp_path):
    p = _write(tmp_path, "train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.lrr") as e:
        load_config(p)
    assert str(p) in str(e.value)


def test_wrong_type_names_key(tmp_path):
    p = _write(tmp_path, "train:\n  batch_size: lots\n")
    with pytest.raises(ConfigError, match=r"train\.batch_size must be int"):
        load_config(p)


def test_nested_tower_keys_checked(tmp_path):
    p = _write(tmp_path, "model:\n  towers:\n    text:\n      encoder: x\n      hed: linear\n")
    with pytest.raises(ConfigError, match=r"model\.towers\.text\.hed"):
        load_config(p)


def test_literal_checked(tmp_path):
    p = _write(tmp_path, "train:\n  precision: fp8\n")
    with pytest.raises(ConfigError, match=r"train\.precision must be one of"):
        load_config(p)


def test_overrides_apply_and_are_typed(tmp_path):
    p = _write(tmp_path, "train:\n  lr: 0.1\n")
    c = load_config(p, ["train.lr=3e-4", "train.max_steps=7", "train.betas=[0.8, 0.9]"])
    assert c.train.lr == pytest.approx(3e-4) and c.train.max_steps == 7 and c.train.betas == (0.8, 0.9)
    c = load_config(p, ["train.max_steps=1e4"])  # YAML reads 1e4 as a string: a whole number is an int
    assert c.train.max_steps == 10_000 and type(c.train.max_steps) is int
    with pytest.raises(ConfigError, match=r"train\.max_steps must be int, got str '2\.5e0'"):
        load_config(p, ["train.max_steps=2.5e0"])


def test_bad_override_names_key(tmp_path):
    p = _write(tmp_path, "{}\n")
    with pytest.raises(ConfigError, match=r"train\.epochs must be int"):
        load_config(p, ["train.epochs=many"])
    with pytest.raises(ConfigError, match=r"unknown key 'train\.nope'"):
        load_config(p, ["train.nope=1"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_override({}, "train.lr")


@pytest.mark.parametrize("override, message", [
    ("train.epochs=-1", r"train\.epochs must be >= 1, got -1"),
    ("train.batch_size=0", r"train\.batch_size must be >= 1, got 0"),
    ("train.lr=.nan", r"train\.lr must be a finite number > 0, got nan"),
    ("train.lr=0", r"train\.lr must be a finite number > 0"),
    ("train.min_lr_ratio=1.5", r"train\.min_lr_ratio must be in \[0, 1\]"),
    ("train.betas=[0.9, 1.0]", r"train\.betas must be two numbers in \[0, 1\)"),
    ("train.max_minutes=0", r"train\.max_minutes must be > 0 or null"),
    ("train.weight_decay=-0.1", r"train\.weight_decay must be a finite number >= 0"),
    ("decoder.train.max_steps=0", r"decoder\.train\.max_steps must be >= 1 or null"),
    ("decoder.train.early_stop_patience=0", r"decoder\.train\.early_stop_patience must be >= 1 or null"),
    ("train.seed=-1", r"train\.seed must be in \[0, 4294967295\]"),  # were numpy's traceback at the start
    ("loss.caption_weight=.inf", r"loss\.caption_weight must be a finite number >= 0"),  # an overflowing loss
    # a traceback after the whole align stage; -1 silently dropped the last validation row
    ("decoder.data.prompt_modalities=[img]", r"decoder\.data\.prompt_modalities: unknown modality 'img'"),
    ("decoder.data.val_rows=-1", r"decoder\.data\.val_rows must be >= 0, got -1"),
    ("decoder.train.seed=4294967296", r"decoder\.train\.seed must be in \[0, 4294967295\]"),
    # each was found after the align stage, or named no key
    ("decoder.train.schedule_by=time", r"decoder\.train\.schedule_by=time needs a time budget: set "
                                       r"decoder\.train\.max_minutes"),
    ("decoder.data.task_weights={larger: -1}", r"decoder\.data\.task_weights must be finite and >= 0: larger=-1"),
    ("train.dist_timeout_minutes=1e12", r"train\.dist_timeout_minutes must be in \(0, 10080\]"),  # a C++ timeout
    ("data.synth.n=0", r"data\.synth: n=0 must be an integer in \[1,"),
    ("data.synth.split=[0.5,0.5,0.5]", r"data\.synth: split=.* summing to 1"),
    # passed, and the run hung sampling 10^10 scenes in memory (n is capped for that reason)
    ("data.synth.n_heldout=1e10", r"data\.synth\.n_heldout must be in \[0, 994,000\] or null, got 10,000,000,000"),
])
def test_training_numbers_out_of_range_name_the_key(override, message):
    """Ranges the types cannot say: `train.epochs=-1` used to start a run (no align steps, then
    the decoder), `train.lr=nan` to train on NaN until the bad-step guard stopped it."""
    with pytest.raises(ConfigError, match=message):
        load_config("demo", [override])
    assert load_config("demo", ["train.max_steps=null", "train.warmup_steps=0", "train.keep_last=0",
                                "train.progress_every_s=0"]).train.keep_last == 0  # the edges allowed


@pytest.mark.parametrize("override, message", [
    ("decoder.width=0", r"decoder\.width must be >= 1, got 0"),
    ("decoder.heads=3", r"decoder\.width \(128\) must be a multiple of decoder\.heads \(3\)"),
    ("decoder.heads=128", r"rotary positions need an even head width"),
    ("decoder.context=1", r"decoder\.context must be >= 2"),
    ("decoder.soft_tokens=0", r"decoder\.soft_tokens must be >= 1"),
    ("decoder.dropout=1.0", r"decoder\.dropout must be in \[0, 1\)"),
    ("decoder.vector_marker_prob=2", r"decoder\.vector_marker_prob must be in \[0, 1\]"),
    ("decoder.freeze_lm=true", r"decoder\.freeze_lm keeps a pretrained language model as loaded: set "
                                 r"decoder\.init_from_gpt2 too"),
    ("decoder.lora_rank=8", r"decoder\.lora_rank adapts a pretrained language model: set decoder\.init_from_gpt2"),
    ("decoder.lora_rank=0", r"decoder\.lora_rank must be an integer >= 1 or null, got 0"),
    ("decoder.lora_alpha=0", r"decoder\.lora_alpha must be > 0"),
    # passed: the whitening matrix was then 0 and the decoder trained on blank vectors
    ("decoder.whiten_eps=.inf", r"decoder\.whiten_eps must be a finite number > 0, got inf"),
    ("decoder.whiten_eps=.nan", r"decoder\.whiten_eps must be a finite number > 0, got nan"),
    ("model.embed_dim=0", r"model\.embed_dim must be >= 1"),
    ("model.init_logit_scale=500", r"model\.init_logit_scale must be in \(0, model\.max_logit_scale"),
    ("data.num_workers=-1", r"data\.num_workers must be >= 0"),
])
def test_model_and_decoder_shapes_out_of_range_name_the_key(override, message):
    """These used to pass the config and fail minutes later, after the align stage (or, for
    model.embed_dim=0, with a traceback)."""
    with pytest.raises(ConfigError, match=message):
        load_config("demo", [override])


def test_sinusoidal_decoder_needs_an_even_width_not_an_even_head_width():
    """DecoderConfig refused width 30 with 2 heads under sinusoidal positions (an odd head width),
    which the Decoder builds and runs: the table is added to the input once, at the model width."""
    from mmembed.decoder.model import Decoder

    shape = ["decoder.width=30", "decoder.heads=2"]
    assert load_config("demo", [*shape, "decoder.positional=sinusoidal"]).decoder.width == 30
    Decoder(50, 30, 1, 2, max_len=8, positional="sinusoidal")  # the module agrees
    with pytest.raises(ConfigError, match=r"sinusoidal positions need an even decoder\.width, got 31"):
        load_config("demo", ["decoder.width=31", "decoder.heads=1", "decoder.positional=sinusoidal"])
    with pytest.raises(ConfigError, match=r"rotary positions need an even head width"):
        load_config("demo", [*shape, "decoder.positional=rotary"])


def test_a_pretrained_decoders_shape_comes_from_its_folder_not_the_config():
    config = load_config("demo", ["decoder.init_from_gpt2=/some/gpt2", "decoder.width=999", "decoder.heads=2"])
    assert config.decoder.width == 999  # not checked: builder.with_gpt2_architecture replaces it


def test_bad_yaml_is_one_line_saying_where(tmp_path):
    p = _write(tmp_path, "train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(expected ',' or '\]', but got '<stream end>' "
                                          r"at line 3, column 1\)$") as e:
        load_config(p)
    assert "\n" not in str(e.value)


def test_missing_file_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_check_kwargs_against_signature():
    def builder(width: int = 8, dropout: float = 0.0, kind: str = "a"):
        return width

    assert check_kwargs(builder, {"width": 4, "dropout": 1}, "enc") == {"width": 4, "dropout": 1.0}
    with pytest.raises(ConfigError, match=r"enc\.widht"):
        check_kwargs(builder, {"widht": 4}, "enc")
    with pytest.raises(ConfigError, match=r"enc\.width must be int"):
        check_kwargs(builder, {"width": "4"}, "enc")


def test_encoder_argument_errors_name_the_tower():
    """An encoder's own argument check (a plain ValueError in encoders/) reaches the user as a
    ConfigError naming the tower, which the CLI prints as one line."""
    from mmembed.space import build_space

    config = load_config("demo", ["model.towers.audio.encoder_args.timbre_kernel=8"])
    with pytest.raises(ConfigError, match=r"model\.towers\.audio: timbre_kernel=8 must be a positive odd number"):
        build_space(config.model, vocab_size=300)
    config = load_config("demo", ["model.towers.image.encoder=vitt"])
    with pytest.raises(ConfigError, match=r"model\.towers\.image\.encoder: unknown encoder 'vitt'"):
        build_space(config.model, vocab_size=300)
    config = load_config("demo")
    config.model.towers["video"] = config.model.towers.pop("audio")  # were plain ValueError tracebacks
    with pytest.raises(ConfigError, match=r"model\.towers\.video: unknown modality 'video'"):
        build_space(config.model, vocab_size=300)
    config.model.towers = {}
    with pytest.raises(ConfigError, match=r"model\.towers: a shared space needs at least one tower"):
        build_space(config.model, vocab_size=300)


def test_yaml_mistakes_are_one_line_errors(tmp_path):
    """A key given twice was silently the last one (a second `train:` block dropped the first's
    settings); a key YAML reads as a bool (`on:`) beside a typo crashed sorting the unknown keys;
    a file that is not UTF-8 was a UnicodeDecodeError; ' #' in an override cut the value."""
    cases = {"dup.yaml": ("train: {lr: 0.5, epochs: 3}\ntrain: {batch_size: 4}\n", "the key 'train' is given twice"),
             "dup2.yaml": ("train:\n  lr: 0.5\n  lr: 0.1\n", "the key 'lr' is given twice"),
             "bool.yaml": ("train:\n  lr: 0.1\n  on: 2\n  foo: 3\n", "unknown key"),
             "latin.yaml": (b"train:\n  out_dir: caf\xe9\n", "not UTF-8 text")}
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ConfigError, match=message):
            load_config(path)
    with pytest.raises(ConfigError, match="as the start of a comment"):
        load_config("demo", ["train.out_dir=runs/lr #2"])
    assert load_config("demo", ['train.out_dir="runs/lr #2"']).train.out_dir == "runs/lr #2"
    merged = tmp_path / "merge.yaml"  # a merge key may be overridden: not a duplicate
    merged.write_text("base: &b {lr: 0.5}\ntrain:\n  <<: *b\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key 'base'"):
        load_config(merged)


def test_an_override_into_a_section_set_to_null_makes_it_anew(tmp_path):
    """`data.synth=null data.synth.n=100` said 'synth is not a section'; so did `decoder.width=64` on a
    config whose decoder: section is empty."""
    cfg = load_config("demo", ["data.synth=null", "data.synth.n=100"])
    assert cfg.data.synth is not None and cfg.data.synth.n == 100
    path = tmp_path / "c.yaml"
    path.write_text("decoder:\n  # width: 64\n")
    assert load_config(path, ["decoder.width=64"]).decoder.width == 64
    path.write_text("decoder: null\n")
    assert load_config(path, ["decoder.width=64"]).decoder.width == 64


def test_an_empty_section_is_the_section_with_its_defaults(tmp_path):
    """A bare `decoder:` (or `synth:`) read as null: the decoder stage the README says it adds was
    silently skipped, and an empty `synth:` hinted to set data.synth. An explicit null still leaves it out."""
    from mmembed.config import SynthConfig
    from mmembed.config_decoder import DecoderConfig, _decoder_train

    path = tmp_path / "c.yaml"
    path.write_text("data:\n  synth:   # the built-in world\ndecoder:\n  # all defaults\n")
    cfg = load_config(path)
    assert cfg.decoder == DecoderConfig() and cfg.data.synth == SynthConfig()
    assert load_config(path, ["decoder=null", "data.synth=~"]).decoder is None
    for explicit in ("null", "~"):
        path.write_text(f"data:\n  synth: {explicit}\ndecoder: {explicit}\n")
        cfg = load_config(path)
        assert cfg.decoder is None and cfg.data.synth is None
    path.write_text("decoder:\n  train:\n")  # a nested one keeps the decoder's own train defaults
    assert load_config(path).decoder.train == _decoder_train()
    path.write_text("train:\n  max_steps:\nmodel:\n  towers:\n    text:\n      encoder: x\n      encoder_args:\n"
                    "        foo:\n")  # not a section: null, as YAML reads it
    cfg = load_config(path)
    assert cfg.train.max_steps is None and cfg.model.towers["text"].encoder_args == {"foo": None}
    # a section without defaults of its own stays null (a scaling config's bare `data_size:` was
    # refused as "missing required key 'data_size.width'")
    from mmembed.insight.sweep_config import load_scaling_config

    scaling = (Path(__file__).parents[1] / "configs" / "scaling.yaml").read_text(encoding="utf-8")
    path.write_text(scaling.replace("data_size: {width: 96, layers: 3, heads: 3}", "data_size:   # --axis data only"))
    assert load_scaling_config(path).data_size is None


def test_an_alias_shared_by_two_sections_is_overridden_in_one(tmp_path):
    """`decoder: {train: *tr}` is the align train section's own object: decoder.train.lr=1e-5 set
    both learning rates, and config.yaml recorded it."""
    from mmembed.config import save_config

    path = tmp_path / "anchor.yaml"
    path.write_text("train: &tr {lr: 3.0e-3, batch_size: 16}\ndecoder: {width: 32, heads: 2, train: *tr}\n")
    cfg = load_config(path, ["decoder.train.lr=1e-5"])
    assert (cfg.train.lr, cfg.decoder.train.lr) == (3e-3, 1e-5)
    assert cfg.decoder.train.batch_size == 16  # the alias itself still reads
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").train.lr == 3e-3
    path.write_text("train: &tr {lr: 3.0e-3}\ndecoder: {train: *tr}\n")
    assert load_config(path, ["train.lr=1e-2"]).decoder.train.lr == 3e-3
    path.write_text("data: &d {train: *d}\n")  # an alias inside its own anchor: one line, no RecursionError
    with pytest.raises(ConfigError, match="refers to the mapping or list it is in"):
        load_config(path)


def test_a_path_set_from_python_saves(tmp_path):
    """cfg.train.out_dir = Path(...) then mm.train: a RepresenterError traceback from save_config."""
    from mmembed.config import save_config

    cfg = load_config("demo")
    cfg.train.out_dir = tmp_path / "run"
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml").train.out_dir == str(tmp_path / "run")


@pytest.mark.parametrize("overrides, message", [
    (["loss.mode=anchor", "loss.anchor=imag"], r"loss\.anchor 'imag'"),
    (["loss.pair_weights={foo-bar: 1}"], r"loss\.pair_weights key 'foo-bar'"),
    (["model.towers.image.encoder=vitt"], r"model\.towers\.image\.encoder: unknown encoder 'vitt'"),
    (["model.init_towers=[image, txet]"], r"model\.init_towers: 'txet' is not one of model\.towers"),
    (["tokenizer.path=/nonexistent/tok.json"], r"tokenizer\.path: no tokenizer file"),
    (["tokenizer.vocab_size=0"], r"tokenizer\.vocab_size must be in \[263, 1,048,576\]"),
    (["tokenizer.vocab_size=2000000000"], r"tokenizer\.vocab_size must be in \[263, .*got 2,000,000,000"),
    (["model.init_from=/nonexistent/run"], r"model\.init_from: /nonexistent/run holds no trained model"),
    (["decoder.init_from_gpt2=/nonexistent/gpt2"], r"decoder\.init_from_gpt2: /nonexistent/gpt2 has no config\.json"),
    (["data.synth.n=30", "data.synth.split=[1.0,0,0]"], r"gives the val split no scene.*data\.val=null"),
    (["decoder.data.tasks=[colr]"], r"decoder\.data\.tasks: 'colr' is not a task of the instruction rows \(their"),
    (["decoder.data.task_weights={shap: 2}"], r"decoder\.data\.task_weights: 'shap' is not a task"),
])
def test_a_run_checks_its_names_and_files_before_any_work(tmp_path, overrides, message):
    """Each was found after the world was generated and the tokenizer trained, and left a run
    folder the corrected config was then refused."""
    from mmembed.train import train

    cfg = load_config("demo", [f"data.root={tmp_path / 'world'}", f"train.out_dir={tmp_path / 'run'}", *overrides])
    with pytest.raises(ConfigError, match=message):
        train(cfg)
    assert not (tmp_path / "world").exists() and not (tmp_path / "run").exists()


def test_a_sweep_seed_past_numpys_is_refused_at_load():
    from mmembed.insight.sweep_config import load_scaling_config

    with pytest.raises(ConfigError, match=r"seed must be in \[0, 4294967295\]"):
        load_scaling_config("scaling", ["seed=1e20"])


def test_the_readmes_config_paths_work_from_any_folder(tmp_path, monkeypatch):
    """`mmembed train configs/demo.yaml` outside the repository said the file was not found and
    listed demo among the shipped configs."""
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/demo.yaml") == load_config("demo")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text("train: {epochs: 3}\n")  # a local file wins
    assert load_config("configs/demo.yaml").train.epochs == 3


def test_an_error_in_an_override_names_the_override_not_the_file():
    """`train.nosuch=1` said '/…/configs/demo.yaml: unknown key', blaming the shipped file."""
    for override, message in (("train.nosuch=1", "unknown key 'train.nosuch'"),
                              ("train.lr=abc", "train.lr must be float")):
        with pytest.raises(ConfigError, match=rf"^an override of \S*demo.yaml: {message}"):
            load_config("demo", [override])


def test_an_early_stop_metric_validation_never_reports_is_refused_before_work(tmp_path, monkeypatch):
    """It was a warning at the first evaluation (168 steps into the demo), then neither a best
    checkpoint nor an early stop; metrics.jsonl's own name for it (val/recall@1) is taken."""
    monkeypatch.chdir(tmp_path)  # the demo's relative data.root: a world left in the checkout was read and checked
    from mmembed.train import train
    from mmembed.train.preflight import check_config

    for bad, key in (("train.early_stop_metric=recall@2", "train"), ("decoder.train.early_stop_metric=bleu",
                                                                      "decoder.train")):
        cfg = load_config("demo", [bad, f"data.root={tmp_path / 'w'}", f"train.out_dir={tmp_path / 'r'}"])
        with pytest.raises(ConfigError, match=rf"^{key}\.early_stop_metric '\w+@?\d?' is not a validation metric"):
            train(cfg)
    for good in ("val/recall@1", "image→text/recall@1", "median_rank"):
        check_config(load_config("demo", [f"train.early_stop_metric={good}"]))


def test_a_resume_is_not_held_to_the_files_its_run_started_from(tmp_path, monkeypatch):
    """A run trained with tokenizer.path, or model.init_from, holds its own copy of them: the file
    deleted afterwards, its --resume was refused."""
    from mmembed.train.preflight import check_config

    monkeypatch.chdir(tmp_path)  # the demo's relative data.root: a world left in the checkout was read and checked
    cfg = load_config("demo", ["tokenizer.path=/nonexistent/tok.json", "model.init_from=/nonexistent/run"])
    with pytest.raises(ConfigError, match="tokenizer.path"):
        check_config(cfg)
    check_config(cfg, resume=True)


def test_a_bind_runs_resume_is_held_to_its_config(tmp_path):
    """A run with model.init_from and no decoder trains its own space (the bind recipe), yet its --resume
    skipped the same-space check: a changed tower failed on the checkpoint, after config.yaml had been
    rewritten with it."""
    from mmembed.config import save_config
    from mmembed.train.preflight import check_config

    bind = ["decoder=null", "model.init_from=/nonexistent/run", f"train.out_dir={tmp_path / 'run'}"]
    (tmp_path / "run").mkdir()
    save_config(load_config("demo", bind), tmp_path / "run" / "config.yaml")
    check_config(load_config("demo", bind), resume=True)
    moved = [*bind, "model.init_from=/elsewhere/run", "tokenizer.path=/elsewhere/run/tokenizer.json"]
    check_config(load_config("demo", moved), resume=True)  # where it started may move: the checkpoint holds it
    with pytest.raises(ConfigError, match=r"model\.towers\.text\.freeze False -> True"):
        check_config(load_config("demo", [*bind, "model.towers.text.freeze=true"]), resume=True)


def test_the_demo_checks_its_config_before_the_world(tmp_path, monkeypatch):
    from mmembed import demo

    monkeypatch.chdir(tmp_path)  # the demo's relative data.root: a world left in the checkout was read and checked
    monkeypatch.setattr(demo, "train_align", lambda *a, **k: pytest.fail("trained past a bad config"))
    with pytest.raises(ConfigError, match="early_stop_metric"):
        demo.run_demo("demo", ["train.early_stop_metric=recal@1"], out_dir=str(tmp_path / "d"))


def test_a_sweep_of_more_tokens_than_memory_holds_is_refused():
    """val_tokens=1e20 printed its size and then built documents for ever."""
    from mmembed.insight.sweep_config import load_scaling_config

    with pytest.raises(ConfigError, match="val_tokens must be at most 1,000,000,000"):
        load_scaling_config("scaling", ["val_tokens=99999999999999999999"])


def test_decoder_rows_that_show_a_modality_the_space_lacks_are_refused_before_work(tmp_path):
    """A space without an audio tower and the world's instruction rows (pictures and sounds): the
    decoder stage said "this model has no audio tower" after the whole align stage had trained."""
    import dataclasses

    from mmembed.train import train

    cfg = load_config("demo", [f"data.root={tmp_path / 'world'}", f"train.out_dir={tmp_path / 'run'}"])
    towers = {name: tower for name, tower in cfg.model.towers.items() if name != "audio"}
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, towers=towers),
                              loss=dataclasses.replace(cfg.loss, pair_weights={}))
    with pytest.raises(ConfigError, match=r"rows show audio, and model\.towers has no such tower: set "
                                          r"decoder\.data\.prompt_modalities"):
        train(cfg)
    assert not (tmp_path / "world").exists() and not (tmp_path / "run").exists()
    cfg.decoder.data.prompt_modalities = ["image", "text"]
    cfg.decoder.data.task_weights = {}  # the demo's {larger: 3} weighs rows of a picture and a sound
    from mmembed.train.preflight import check_config

    check_config(cfg)


def test_n_heldout_is_capped_with_n_at_max_scenes():
    """data.synth.n_heldout had no upper bound: 1e10 passed the config and the run hung filling the memory."""
    from mmembed.data.synth.generate import MAX_SCENES

    room = MAX_SCENES - load_config("demo").data.synth.n
    assert load_config("demo", [f"data.synth.n_heldout={room}"]).data.synth.n_heldout == room
    with pytest.raises(ConfigError, match=rf"data\.synth\.n_heldout must be in \[0, {room:,}\]"):
        load_config("demo", [f"data.synth.n_heldout={room + 1}"])


def test_a_context_too_short_for_one_media_item_is_refused_at_load():
    """soft_tokens >= context passed the config and failed after the whole align stage ('no usable
    training rows ... 135 tokens exceed the context of 64')."""
    from mmembed.decoder.prompt import PromptFormat, Slot
    from tests.decoder.helpers import tokenizer

    k = 60
    fmt = PromptFormat(tokenizer(), soft_tokens=k)
    answer = fmt.encode_answer("a")
    assert len(answer) == 2  # one answer token and <eos>
    shortest = len(fmt.encode([Slot("image")])) + len(answer)  # the shortest row the stage can train on
    assert load_config("demo", [f"decoder.soft_tokens={k}", f"decoder.context={shortest}"]).decoder.context == shortest
    with pytest.raises(ConfigError, match=rf"decoder\.context \({shortest - 1}\) must be >= decoder\.soft_tokens "
                                          rf"\+ 6 = {shortest}"):
        load_config("demo", [f"decoder.soft_tokens={k}", f"decoder.context={shortest - 1}"])


def test_train_checks_a_config_changed_in_python_again(tmp_path, monkeypatch):
    """cfg.train.epochs = 0; mm.train(cfg) returned an untrained model, whose config.yaml mm.load then refused."""
    import mmembed as mm
    from mmembed.train import align

    monkeypatch.setattr(align, "train_align", lambda *a, **k: pytest.fail("trained past a bad config"))
    cfg = load_config("demo", [f"data.root={tmp_path / 'world'}", f"train.out_dir={tmp_path / 'run'}"])
    cfg.train.epochs = 0
    with pytest.raises(ConfigError, match=r"^the Config given to train\(\) \(a value set in Python\): "
                                          r"train\.epochs must be >= 1, got 0$"):
        mm.train(cfg)
    cfg.train.epochs, cfg.decoder.whiten_eps = 1, float("inf")  # a __post_init__ check names its source too
    with pytest.raises(ConfigError, match=r"^the Config given to train\(\) .*: decoder\.whiten_eps must be"):
        mm.train(cfg)
    assert not (tmp_path / "world").exists() and not (tmp_path / "run").exists()
    from mmembed.train import preflight

    ran = []  # a valid config reaches the stage as it was
    monkeypatch.setattr(preflight, "check_config", lambda *a, **k: None)
    monkeypatch.setattr(align, "train_align", lambda config, **k: ran.append(config))
    cfg.decoder, cfg.train.lr = None, 1  # an int where a float goes: read as YAML would read it
    mm.train(cfg)
    assert ran == [cfg] and type(ran[0].train.lr) is float


def test_decoder_train_keys_the_stage_never_reads_are_ignored_with_a_warning(tmp_path, caplog):
    """decoder.train.out_dir=/tmp/elsewhere trained, wrote nothing there, and config.yaml recorded that
    folder; decoder.train.collapse_steps and the like were accepted and never read either. (Refusing
    them broke `decoder: {train: *tr}` with an override of train.out_dir, and old runs' configs.)"""
    from mmembed.config import save_config

    for override, key in (("decoder.train.out_dir=/tmp/elsewhere", "out_dir='/tmp/elsewhere'"),
                          ("decoder.train.collapse_steps=1", "collapse_steps=1"),
                          ("decoder.train.collapse_restarts=0", "collapse_restarts=0"),
                          ("decoder.train.dist_timeout_minutes=5", "dist_timeout_minutes=5.0")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mmembed.config"):
            cfg = load_config("demo", [override])
        assert cfg.decoder.train.out_dir is None and cfg.decoder.train.collapse_steps == 10
        assert f"does not read decoder.train.{key} (" in caplog.text and caplog.text.rstrip().endswith("ignored")
    path = tmp_path / "c.yaml"  # the align block's own values, through an alias, are no setting of their own
    path.write_text(f"train: &tr {{out_dir: {tmp_path / 'run'}, collapse_steps: 3}}\ndecoder: {{train: *tr}}\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mmembed.config"):
        cfg = load_config(path)
        assert load_config(path, [f"train.out_dir={tmp_path / 'other'}"]).train.out_dir == str(tmp_path / "other")
    assert "does not read decoder.train.collapse_steps" not in caplog.text
    assert cfg.decoder.train.out_dir is None and cfg.decoder.train.collapse_steps == 10
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["decoder"]["train"]["out_dir"] is None and saved["train"]["out_dir"] == str(tmp_path / "run")
    assert load_config(tmp_path / "config.yaml") == cfg
    with pytest.raises(ConfigError, match=r"train\.out_dir must be a folder, got null"):
        load_config("demo", ["train.out_dir=null"])


def test_an_old_runs_config_recording_decoder_out_dir_still_loads(tmp_path):
    """Every run's config.yaml recorded decoder.train.out_dir: runs/demo (and the collapse keys at
    their defaults): mm.load, eval and --resume read it."""
    import mmembed as mm
    from mmembed.config import save_config
    from mmembed.decoder import build_prompt_model
    from mmembed.model import CONFIG, Model
    from mmembed.space import build_space
    from mmembed.train.preflight import check_config
    from tests.conftest import TINY_MODEL
    from tests.decoder.helpers import tokenizer

    run = tmp_path / "run"
    cfg = load_config("demo", [f"train.out_dir={run}", f"data.root={tmp_path / 'world'}",
                               "decoder.width=32", "decoder.heads=2", "decoder.layers=1", "decoder.context=32"])
    cfg.model = load_config(tiny_config_path(tmp_path)).model
    model = Model(cfg, build_space(cfg.model, tokenizer().vocab_size, pretrained=False), tokenizer())
    model.prompt_model = build_prompt_model(cfg.decoder, tokenizer(), TINY_MODEL["embed_dim"])
    model.save(run)
    raw = yaml.safe_load((run / CONFIG).read_text())
    raw["decoder"]["train"] |= {"out_dir": "runs/demo", "collapse_steps": 10, "collapse_restarts": 2,
                                "dist_timeout_minutes": 30.0}  # as config.yaml recorded it
    (run / CONFIG).write_text(yaml.safe_dump(raw))
    loaded = mm.load(run)
    assert loaded.config.decoder.train.out_dir is None and loaded.prompt_model is not None
    check_config(load_config(run / CONFIG), resume=True)  # --resume reads it twice: the config given and the run's
    save_config(loaded.config, tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == loaded.config


def tiny_config_path(tmp_path: Path) -> Path:
    from tests.conftest import tiny_config

    return tiny_config(tmp_path / "world", tmp_path / "tiny")


def test_a_file_of_the_other_command_says_which_it_is(tmp_path):
    """`mmembed train scaling` said "unknown key 'axis'", `mmembed scale demo` "unknown key 'data'",
    and `mmembed train runs/x` "config file not found" though the folder holds config.yaml."""
    from mmembed.insight.sweep_config import load_scaling_config

    with pytest.raises(ConfigError, match=r"scaling\.yaml: this is a scaling config \(keys axis, .*\), not a "
                                          r"training config: run it with `mmembed scale`"):
        load_config("scaling")
    with pytest.raises(ConfigError, match=r"demo\.yaml: this is a training config \(keys data, .*\), not a "
                                          r"scaling config: run it with `mmembed train`"):
        load_scaling_config("demo")
    path = tmp_path / "typo.yaml"  # a key of both kinds and a typo: a typo in a training config
    path.write_text("train: {epochs: 1}\naxis: params\n")
    with pytest.raises(ConfigError, match="unknown key 'axis'"):
        load_config(path)
    (tmp_path / "run").mkdir()
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "run")
    (tmp_path / "run" / "config.yaml").write_text("train: {epochs: 1}\n")
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'run'} is a folder, not a config file: its config is "
                                          rf"{tmp_path / 'run' / 'config.yaml'}$"):
        load_config(tmp_path / "run")


def test_a_run_folder_without_its_config_says_so(tmp_path):
    """A run folder whose config.yaml is gone (`mmembed generate RUN`) said "config file not found:
    RUN/config.yaml (shipped configs: ...)", as if a shipped config had been asked for."""
    (tmp_path / "run").mkdir()
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'run'} holds no config.yaml: a run folder needs"):
        load_config(tmp_path / "run" / "config.yaml")
    with pytest.raises(ConfigError, match="config file not found: nothere/config.yaml"):  # no such folder
        load_config("nothere/config.yaml")


def test_unknown_tower_arguments_fail_at_load_naming_the_file(tmp_path):
    """A misspelt encoder_args or preprocess key passed mm.load_config and was reported later, by the
    run's checks, as "config: unknown key ..." without the file."""
    path = tiny_config_path(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["model"]["towers"]["text"]["encoder_args"]["widht"] = 64
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=rf"^{path}: unknown key 'model\.towers\.text\.encoder_args\.widht' "
                                          r"\(valid: .*width"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^an override of \S*demo\.yaml: unknown key "
                                          r"'model\.towers\.image\.preprocess\.augmnt'"):
        load_config("demo", ["model.towers.image.preprocess.augmnt=true"])
    with pytest.raises(ConfigError, match=r"model\.towers\.text\.encoder_args\.width must be int"):
        load_config("demo", ["model.towers.text.encoder_args.width=wide"])


@pytest.mark.parametrize("text, message", [
    ("model:\n  embed_dim: 0\n", r"model\.embed_dim must be >= 1, got 0"),
    ("decoder:\n  width: 0\n", r"decoder\.width must be >= 1, got 0"),
    ("loss:\n  caption_weight: -1\n", r"loss\.caption_weight must be a finite number >= 0"),
    ("data:\n  num_workers: -1\n", r"data\.num_workers must be >= 0"),
], ids=["model", "decoder", "loss", "data"])
def test_a_range_error_in_a_file_names_the_file(tmp_path, text, message):
    """`model: {embed_dim: 0}` said "model.embed_dim must be >= 1" without the file (train.lr: 0 named it)."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: {message}"):
        load_config(path)


def test_a_range_error_already_naming_its_source_is_not_prefixed_twice():
    """The prefix is added once: a message that begins with the source keeps it as it is."""
    from dataclasses import dataclass

    from mmembed.config import from_dict

    @dataclass
    class Section:
        n: int = 1

        def __post_init__(self) -> None:
            if self.n < 1:
                raise ConfigError(f"src.yaml: n must be >= 1, got {self.n}")

    with pytest.raises(ConfigError, match=r"^src\.yaml: n must be >= 1, got 0$"):
        from_dict(Section, {"n": 0}, where="", source="src.yaml")
