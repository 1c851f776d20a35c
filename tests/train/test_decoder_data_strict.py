"""Decoder instruction rows whose media cannot be read: skipped and counted, or raised in strict mode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import mmembed as mm
from mmembed.config import ModelConfig
from mmembed.errors import UserError
from mmembed.model import build_model
from mmembed.train.decoder import _datasets
from mmembed.typed_config import from_dict
from tests.conftest import TINY_MODEL
from tests.decoder.helpers import prompt_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = mm.load_config("demo")
    cfg.model = from_dict(ModelConfig, TINY_MODEL, "model", "test")
    tok = mm.Tokenizer.train(["what colour is the star red blue"] * 20, vocab_size=300)
    return build_model(cfg, tok)


def _data(root) -> None:
    """Rows 1 and 4 show a good picture; row 2 a truncated PNG, row 3 a missing file."""
    (root / "images").mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "images" / "good.png")
    (root / "images" / "cut.png").write_bytes((root / "images" / "good.png").read_bytes()[:200])
    names = ["good.png", "cut.png", "missing.png", "good.png"]
    rows = [{"prompt": ["What colour is the star in", {"image": f"images/{n}"}, "?"], "answer": "red",
             "task": "colour"} for n in names]
    (root / "it.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _config(root, strict: bool):
    return mm.load_config("demo", [f"data.strict={str(strict).lower()}", f"data.root={root}",
                                   "decoder.data.train=it.jsonl", "decoder.data.val=null",
                                   "decoder.data.task_weights={}"])


def test_strict_mode_raises_on_the_first_row_whose_media_cannot_be_read(tmp_path, model):
    """data.strict=true skipped and counted them, as the default does, instead of raising."""
    _data(tmp_path)
    with pytest.raises(UserError, match=r"it.jsonl:2: image: corrupt or truncated image: \S*cut.png") as caught:
        _datasets(_config(tmp_path, strict=True), prompt_model(), model)
    assert "item 0" not in str(caught.value)


def test_without_strict_the_rows_are_skipped_with_a_reason_that_names_no_item_number(tmp_path, model):
    """Each reason said "image item 0: ..." (its retry embedded the item alone), whatever its row."""
    _data(tmp_path)
    train, val, _, _ = _datasets(_config(tmp_path, strict=False), prompt_model(), model)
    assert len(train) == 2 and val is None
    reasons = dict(train.skipped)
    assert sorted(reasons) == [2, 3]
    assert reasons[2].startswith(f"image: corrupt or truncated image: {tmp_path / 'images' / 'cut.png'} (")
    assert reasons[3].startswith("image: missing file ") and reasons[3].endswith("missing.png")
