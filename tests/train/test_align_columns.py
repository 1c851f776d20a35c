"""The align stage on a manifest whose modality column is misnamed: one line naming the column,
before any training."""

import json

import pytest

from mmembed.config import load_config
from mmembed.errors import UserError
from mmembed.tokenizer import Tokenizer
from mmembed.train.align import train_align
from tests.conftest import tiny_config


def _captioned_world(tiny_world, tmp_path):
    """`tiny_world` whose rows hold `image` and a `caption` column (not `text`), no audio."""
    world = tmp_path / "world"
    world.mkdir()
    for entry in tiny_world.iterdir():
        (world / entry.name).symlink_to(entry)
    rows = [json.loads(line) for line in (tiny_world / "train.jsonl").read_text().splitlines()]
    (world / "train.jsonl").unlink()
    (world / "train.jsonl").write_text("".join(json.dumps({"image": r["image"], "caption": r["text"]}) + "\n"
                                               for r in rows))
    return world


def test_a_caption_column_is_named_where_no_tokenizer_can_be_trained(tiny_world, tmp_path):
    """It said "no captions in cap.jsonl to train a tokenizer on; set tokenizer.path": wrong advice."""
    cfg = load_config(tiny_config(_captioned_world(tiny_world, tmp_path), tmp_path / "run", epochs=1))
    # (since the data's own errors come first: no row pairs two modalities, the caption being metadata)
    with pytest.raises(UserError, match=r"train\.jsonl: no row has two of the modalities .*: no pair to learn from; "
                                        r"column 'caption' is metadata \(did you mean 'text'\?\)$"):
        train_align(cfg)


def test_a_caption_column_is_named_before_training_with_a_given_tokenizer(tiny_world, tmp_path):
    """With tokenizer.path set, every batch was decoded and the run then failed with "all N batch(es)
    had no usable row ... (the skipped rows are counted above)", though no row was skipped."""
    Tokenizer.train(["a red circle", "a blue square"], vocab_size=300).save(tmp_path / "tokenizer.json")
    path = tiny_config(_captioned_world(tiny_world, tmp_path), tmp_path / "run", epochs=1)
    cfg = load_config(path, [f"tokenizer.path={tmp_path / 'tokenizer.json'}"])
    with pytest.raises(UserError, match=r"no row has two of the modalities this model trains on .*rows have: "
                                        r"image\): no pair to learn from; column 'caption' is metadata"):
        train_align(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
