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
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 4 and table[2].startswith("| 1 |") and table[3].startswith("| 2 |")  # header, rule, 2 hits


def test_composed_search_weights_reach_the_query(run_dir, tiny_world, tmp_path, capsys):
    """`--weight` values reach the query in item order (text, image, audio) with their signs:
    the hits are exactly the top scores of normalise(e_img + e_wav0 - e_wav1) over the index."""
    manifest = tiny_world / "test.jsonl"
    assert main(["index", str(run_dir), "--manifest", str(manifest), "--out", str(tmp_path / "idx")]) == 0
    wavs = sorted((tiny_world / "audio").glob("*.wav"))[:2]
    img = sorted((tiny_world / "images").glob("*.png"))[0]
    model = mm.load(run_dir)
    e_img = model.embed("image", [img])[0]
    e_wav = model.embed("audio", wavs)  # (2, D)
    index = mm.Index.load(tmp_path / "idx")
    ids = index.ids()
    stored = torch.stack([index.vector(i) for i in ids])  # (N, D)

    def expected(weights: list[float], k: int) -> tuple[list[int], list[float]]:
        q = torch.nn.functional.normalize(weights[0] * e_img + weights[1] * e_wav[0] + weights[2] * e_wav[1], dim=0)
        scores, rows = torch.topk(stored @ q, k)
        return [ids[r] for r in rows.tolist()], scores.tolist()

    def search(w_img: str, w_wav0: str, w_wav1: str) -> list[dict]:
        capsys.readouterr()
        # the audio items are given before the image: the weights follow the command line's order
        flags = [x for w in (w_wav0, w_wav1, w_img) for x in ("--weight", w)]
        assert main(["search", str(tmp_path / "idx"), "--audio", str(wavs[0]), "--audio", str(wavs[1]),
                     "--image", str(img), *flags, "-k", "5", "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    for weights in ([1.0, 1.0, -1.0], [1.0, 1.0, 1.0], [0.5, -2.0, 1.0]):
        hits = search(*map(str, weights))
        want_ids, want_scores = expected(weights, 5)
        assert [h["id"] for h in hits] == want_ids, weights
        torch.testing.assert_close(torch.tensor([h["score"] for h in hits]), torch.tensor(want_scores),
                                   atol=1e-5, rtol=0)
    # the check can tell the signs apart: adding wav1 instead of subtracting moves these scores
    sub_ids, sub_scores = expected([1.0, 1.0, -1.0], 5)
    add_scores = (stored @ torch.nn.functional.normalize(e_img + e_wav[0] + e_wav[1], dim=0)).tolist()
    assert max(abs(s - add_scores[ids.index(i)]) for i, s in zip(sub_ids, sub_scores)) > 1e-3

    capsys.readouterr()
    assert main(["search", str(tmp_path / "idx"), "--image", str(img), "--audio", str(wavs[0]), "--audio",
                 str(wavs[1]), "--weight", "1", "--weight", "-1"]) == 2
    assert "2 weights for 3 query items" in capsys.readouterr().err


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
    # both runs are named (it gave two fingerprints only), with what to do
    assert f"run {run_dir.resolve()})" in err and f"run {tmp_path / 'other'}" in err, err
    assert "search it with the model that built it, or build the index again with this one" in err


def test_allow_outside_root_reads_a_manifest_of_absolute_paths(run_dir, tiny_world, tmp_path, capsys):
    """`data manifest --out elsewhere` writes absolute paths; a run trained without data.allow_outside_root
    refused them in `index` and `eval` ("set allow_outside_root"), which only an edit of its config.yaml could."""
    rows = [json.loads(line) for line in (tiny_world / "test.jsonl").read_text().splitlines()]
    for row in rows:
        row.update({m: str(tiny_world / row[m]) for m in ("image", "audio")})
    manifest = tmp_path / "abs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["index", str(run_dir), "--manifest", str(manifest), "--out", str(tmp_path / "text-only")]) == 0
    assert f"indexed {len(rows)} items" in capsys.readouterr().out  # the captions alone
    assert main(["eval", str(run_dir), "--manifest", str(manifest)]) == 2
    assert "absolute path" in capsys.readouterr().err
    argv = ["--manifest", str(manifest), "--allow-outside-root"]
    assert main(["index", str(run_dir), *argv, "--out", str(tmp_path / "idx")]) == 0
    assert f"indexed {3 * len(rows)} items" in capsys.readouterr().out
    assert main(["eval", str(run_dir), *argv]) == 0 and "| text→image |" in capsys.readouterr().out
    assert mm.load(run_dir).config.data.allow_outside_root is False  # the run's own config is left as it was
