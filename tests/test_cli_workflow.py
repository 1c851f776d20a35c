"""The CLI end to end on a tiny untrained model: eval, index, search (text, composed, JSON)."""

import json

import pytest
import torch

import mmembed as mm
from mmembed.cli import main
from mmembed.config import ModelConfig, from_dict
from mmembed.model import build_model
from tests.conftest import TINY_MODEL


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = mm.load_config("demo")
    cfg.model = from_dict(ModelConfig, TINY_MODEL, "model", "test")
    tok = mm.Tokenizer.train(["a large red circle on the left", "a small blue star"] * 20, vocab_size=300)
    out = tmp_path_factory.mktemp("run")
    build_model(cfg, tok).save(out)
    return out


def test_eval_index_search(run_dir, tiny_world, tmp_path, capsys):
    manifest = tiny_world / "test.jsonl"
    assert main(["eval", str(run_dir), "--manifest", str(manifest), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "| text→image |" in out and "R@1" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["pairs"]) >= {"text→image", "image→audio", "audio→text"}

    assert main(["index", str(run_dir), "--manifest", str(manifest), "--out", str(tmp_path / "idx")]) == 0
    n_rows = sum(1 for _ in manifest.open())
    assert f"indexed {3 * n_rows} items" in capsys.readouterr().out

    assert main(["search", str(tmp_path / "idx"), "--text", "a small red circle on the left", "--target", "image",
                 "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and all(h["modality"] == "image" for h in hits)
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]

    wavs = sorted((tiny_world / "audio").glob("*.wav"))[:2]
    img = sorted((tiny_world / "images").glob("*.png"))[0]
    assert main(["search", str(tmp_path / "idx"), "--image", str(img), "--audio", str(wavs[0]), "--audio",
                 str(wavs[1]), "--weight", "1", "--weight", "1", "--weight", "-1", "-k", "2"]) == 0
    table = capsys.readouterr().out
    assert table.count("\n") >= 3  # header, rule, two hits


def test_search_with_other_model_is_refused(run_dir, tiny_world, tmp_path, capsys):
    assert main(["index", str(run_dir), "--manifest", str(tiny_world / "test.jsonl"), "--out", str(tmp_path / "i")]) == 0
    torch.manual_seed(1)
    other = mm.load(run_dir)
    with torch.no_grad():
        next(other.space.parameters()).add_(1.0)
    other._fingerprint = None
    other.save(tmp_path / "other")
    capsys.readouterr()
    assert main(["search", str(tmp_path / "i"), "--run", str(tmp_path / "other"), "--text", "x"]) == 2
    err = capsys.readouterr().err
    assert "index was built with model" in err and err.count("\n") == 1
