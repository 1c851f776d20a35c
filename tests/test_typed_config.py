"""Typed YAML: how an override's text and YAML's empty value reach the typed fields."""

import pytest

from mmembed.config import SynthConfig, load_config
from mmembed.config_decoder import DecoderConfig
from mmembed.errors import ConfigError


def test_an_override_of_a_text_field_takes_the_text_yaml_read_as_a_number_or_date():
    """`train.out_dir=2024-06-01` was refused as a date, and `train.out_dir="2024"` (the shell strips
    the quotes) as the int 2024."""
    for text in ("2024-06-01", "2024", "0x1F", "1.50", "2024-06-01 10:00:00"):
        assert load_config("demo", [f"train.out_dir={text}"]).train.out_dir == text
    assert load_config("demo", ["decoder.init_from_gpt2=null"]).decoder.init_from_gpt2 is None  # null stays null
    cfg = load_config("demo", ["tokenizer.path=2024", "train.lr=2e-3", "train.epochs=0x3"])
    assert (cfg.tokenizer.path, cfg.train.lr, cfg.train.epochs) == ("2024", 2e-3, 3)  # other fields: YAML's value
    with pytest.raises(ConfigError, match=r"train\.epochs must be int, got date"):
        load_config("demo", ["train.epochs=2024-06-01"])
    with pytest.raises(ConfigError, match=r"""train\.out_dir must be str, got bool True \(YAML reads on as a """
                                          r"""boolean: for the text, quote it: train\.out_dir='"on"'\)$"""):
        load_config("demo", ["train.out_dir=on"])


def test_a_number_for_a_text_field_in_a_file_hints_to_quote_it(tmp_path):
    """`out_dir: 2024` in a YAML file said only "must be str, got int 2024"."""
    path = tmp_path / "c.yaml"
    for value, shown in (("2024", "2024"), ("2024-06-01", "2024-06-01"), ("yes", "true")):
        path.write_text(f"train:\n  out_dir: {value}\n")
        with pytest.raises(ConfigError, match=rf'train\.out_dir must be str, got .* \(quote it: out_dir: "{shown}"\)$'):
            load_config(path)
    path.write_text('train:\n  out_dir: "2024"\n')
    assert load_config(path).train.out_dir == "2024"


def test_an_empty_override_is_the_section_with_its_defaults(tmp_path):
    """`decoder=` left the decoder out and `data.synth=` the world, while a YAML `decoder:` given no
    value is the section with its defaults (the README's rule for both)."""
    path = tmp_path / "c.yaml"
    path.write_text("train: {epochs: 1}\n")
    cfg = load_config(path, ["decoder=", "data.synth= "])
    assert cfg.decoder == DecoderConfig() and cfg.data.synth == SynthConfig()
    assert load_config(path, ["decoder=", "decoder.width=64"]).decoder.width == 64
    assert load_config("demo", ["decoder=null", "data.synth=null"]).decoder is None
    assert load_config("demo", ["train.max_steps="]).train.max_steps is None  # a field: null, as YAML reads it
    with pytest.raises(ConfigError, match=r"train\.lr must be float, got null$"):
        load_config("demo", ["train.lr="])


def test_a_tower_set_to_null_is_left_out(tmp_path):
    """`model.towers.text=null` was "model.towers.text must be a mapping, got null": a tower could be
    left out only by writing a config of its own, though `decoder=null` leaves a section out."""
    cfg = load_config("demo", ["model.towers.text=null", "loss.caption_weight=0"])
    assert set(cfg.model.towers) == {"image", "audio"}
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  towers:\n    text: null\n    image: {encoder: vit}\n")
    assert set(load_config(path).model.towers) == {"image"}
    with pytest.raises(ConfigError, match=r"loss\.pair_weights\.image-text must be float, got null$"):
        load_config("demo", ["loss.pair_weights.image-text=null"])  # a mapping of numbers keeps its null refused


def test_a_misspelt_tower_set_to_null_is_refused_by_name(tmp_path):
    """`model.towers.txt=null` (meant: text) was dropped with the nulls: the text tower trained on, exit 0."""
    with pytest.raises(ConfigError, match=r"model\.towers\.txt: unknown modality 'txt'; valid: text, image, audio$"):
        load_config("demo", ["model.towers.txt=null"])
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  towers:\n    imgae: null\n    image: {encoder: vit}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: model\.towers\.imgae: unknown modality 'imgae'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"model\.towers\.video: unknown modality 'video'"):
        load_config("demo", ["model.towers.video.encoder=vit"])  # as the build named it before
