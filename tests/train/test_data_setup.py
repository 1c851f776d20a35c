"""What a run checks before its first step: a manifest without pairs or without captions is named
as such, before (and instead of) advice about the tokenizer; a tower left out needs none."""

import json

import pytest

from mmembed.config import load_config
from mmembed.data.loader import SkipCounter
from mmembed.errors import UserError
from mmembed.modality import Modality
from mmembed.tokenizer import Tokenizer
from mmembed.train.align import train_align
from mmembed.train.align_data import train_loader_factory
from mmembed.train.data_setup import prepare_tokenizer
from tests.conftest import tiny_config


def _world_of(tiny_world, tmp_path, columns: tuple[str, ...], absolute: int = 0):
    """`tiny_world` whose training rows keep only `columns`, the images of `rows[:absolute]` given by
    absolute path (refused at read time); and its row count."""
    world = tmp_path / "world"
    world.mkdir()
    for entry in tiny_world.iterdir():
        (world / entry.name).symlink_to(entry)
    rows = [json.loads(line) for line in (tiny_world / "train.jsonl").read_text().splitlines()]
    for r in rows[:absolute]:
        r["image"] = str(tiny_world / r["image"])
    (world / "train.jsonl").unlink()
    (world / "train.jsonl").write_text("".join(json.dumps({c: r[c] for c in columns}) + "\n" for r in rows))
    return world, len(rows)


def test_a_manifest_without_pairs_is_named_before_the_tokenizer(tiny_world, tmp_path):
    """An image-only manifest said "no captions ... set tokenizer.path", hiding that it has no pair."""
    world, _ = _world_of(tiny_world, tmp_path, ("image",))
    cfg = load_config(tiny_config(world, tmp_path / "run"))
    with pytest.raises(UserError, match=r"no row has two of the modalities .*rows have: image\): no pair"):
        prepare_tokenizer(cfg, world, None)


@pytest.mark.parametrize("given_tokenizer", [False, True])
def test_a_manifest_without_captions_names_the_text_tower(tiny_world, tmp_path, given_tokenizer):
    """Image+audio rows said "set tokenizer.path", which then trained a text tower on no caption."""
    world, _ = _world_of(tiny_world, tmp_path, ("image", "audio"))
    Tokenizer.train(["a red circle", "a blue square"], vocab_size=300).save(tmp_path / "tokenizer.json")
    overrides = [f"tokenizer.path={tmp_path / 'tokenizer.json'}"] if given_tokenizer else []
    cfg = load_config(tiny_config(world, tmp_path / "run"), overrides)
    with pytest.raises(UserError, match=r"no row has a caption .* for the text tower to learn from: leave the "
                                        r"text tower out with model.towers.text=null$") as e:
        prepare_tokenizer(cfg, world, None)
    assert "tokenizer.path" not in str(e.value)


def test_a_frozen_text_tower_needs_no_caption_but_its_runs_tokenizer(tiny_world, tmp_path):
    """The bind-audio recipe (image+audio rows, the text tower frozen from another run) was refused for
    having no caption, with advice that dropped the very tower audio->text retrieval goes through."""
    world, _ = _world_of(tiny_world, tmp_path, ("image", "audio"))
    Tokenizer.train(["a red circle", "a blue square"], vocab_size=300).save(tmp_path / "tokenizer.json")
    frozen = ["model.towers.text.freeze=true"]
    cfg = load_config(tiny_config(world, tmp_path / "run"), [*frozen, f"tokenizer.path={tmp_path / 'tokenizer.json'}"])
    assert prepare_tokenizer(cfg, world, None).vocab_size == Tokenizer.load(tmp_path / "tokenizer.json").vocab_size
    with pytest.raises(UserError, match=r"the frozen text tower needs the tokenizer of the run it comes from "
                                        r"\(tokenizer.path=RUN/tokenizer.json\)$"):
        prepare_tokenizer(load_config(tiny_config(world, tmp_path / "run"), frozen), world, None)


def test_a_run_without_a_text_tower_trains_without_captions(tiny_world, tmp_path):
    """`model.towers.text=null` was "model.towers.text must be a mapping, got null": no tower could be
    left out from the command line, so an image+audio manifest could not be trained on."""
    world, _ = _world_of(tiny_world, tmp_path, ("image", "audio"))
    cfg = load_config(tiny_config(world, tmp_path / "run", epochs=1), ["model.towers.text=null"])
    assert set(cfg.model.towers) == {"image", "audio"}
    assert prepare_tokenizer(cfg, world, None) is None
    run = train_align(cfg)
    assert (run / "model.safetensors").is_file() and not (run / "tokenizer.json").exists()


def test_too_few_rows_for_a_batch_counts_the_skipped_ones(tiny_world, tmp_path):
    """"training manifest has 3 rows, fewer than train.batch_size=16" of a manifest of many rows,
    most refused (absolute paths), without a word about them."""
    world, n = _world_of(tiny_world, tmp_path, ("image", "audio", "text"), absolute=-3)
    cfg = load_config(tiny_config(world, tmp_path / "run"))
    tok = Tokenizer.train(["a red circle", "a blue square"], vocab_size=300)
    with pytest.raises(UserError, match=rf"training manifest has 3 usable rows of {n} \({n - 3} skipped; first, "
                                        r"line 1: absolute path '.*' refused .*\), fewer than train.batch_size=16"):
        train_loader_factory(cfg, world, tok, [Modality.IMAGE, Modality.TEXT], SkipCounter())
