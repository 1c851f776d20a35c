"""`mmembed eval` against training's validation pass: the same rows, the same figures."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from mmembed.evaluate import manifest_report
from mmembed.evaluate_recall import pairwise_report
from tests.conftest import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(0)


def _val_manifest(root) -> str:
    """12 rows of text, image and audio; row 3's image is missing, row 6's audio is a text file, row 8's
    caption is empty, and a JSON line is broken."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir()
    (root / "wav").mkdir()
    rows = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        sf.write(root / "wav" / f"{i}.wav", rng.uniform(-0.5, 0.5, 4000).astype(np.float32), 16000)
        rows.append({"text": f"a {'large' if i % 2 else 'small'} circle number {i}", "image": f"img/{i}.png",
                     "audio": f"wav/{i}.wav", "label": f"s{i % 4}"})
    rows[3]["image"] = "img/missing.png"
    (root / "wav" / "page.wav").write_text("not a sound")
    rows[6]["audio"] = "wav/page.wav"
    rows[8]["text"] = " "
    lines = [json.dumps(r) for r in rows]
    lines.insert(10, "{not json")
    (root / "val.jsonl").write_text("\n".join(lines) + "\n")
    return "val.jsonl"


def test_eval_scores_the_rows_validation_scores(model, tmp_path):
    """A row with one unreadable item: validation dropped the whole row, `mmembed eval` only the item,
    so a logged val/recall (which chose the best checkpoint) could not be reproduced."""
    from mmembed.train.align_data import _eval_loader, embed_dataset

    name = _val_manifest(tmp_path)
    loader = _eval_loader(model.config, tmp_path, name, model.tokenizer)
    emb, keys = embed_dataset(model.space, loader, torch.device("cpu"))
    validation = pairwise_report(emb, keys)
    report = manifest_report(model, tmp_path / name)
    assert report["counts"] == {str(m): v.shape[0] for m, v in emb.items()} == {"text": 9, "image": 9, "audio": 9}
    assert report["skipped"] == 4 and [r["line"] for r in report["skipped_rows"]] == [4, 7, 9, 11]
    assert report["skipped_rows"][0]["reason"].startswith("image: ")
    assert set(report["pairs"]) == set(validation) and len(validation) == 6
    for pair, figures in validation.items():
        assert report["pairs"][pair] == pytest.approx(figures, abs=1e-6), pair
