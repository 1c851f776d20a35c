"""`mmembed scale target=towers`: a tiny ladder of shared spaces end to end, and its numbers
checked against independent recomputations (the loss from the saved model, the FLOPs from a
counter around a whole training run)."""

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

import mmembed as mm
from mmembed.cli import main
from mmembed.config import ConfigError, load_config
from mmembed.data import EpochBatchSampler, ManifestDataset, read_manifest
from mmembed.insight.flops import measured_flops
from mmembed.insight.power_law import PowerLawFit
from mmembed.insight.sweep_config import load_scaling_config
from mmembed.insight.tower_scaling import heads_for, rung_config, run_tower_sweep, space_parameters
from mmembed.losses import build_loss
from mmembed.modality import Modality
from mmembed.preprocess import build_preprocessor
from mmembed.space import build_space
from mmembed.tokenizer import load_tokenizer
from mmembed.train.align import train_align
from tests.conftest import tiny_config

WIDTHS = [16, 24, 32]


def tower_overrides(config: Path) -> list[str]:
    return ["target=towers", "bootstrap=20", f"towers.config={config}", f"towers.widths={WIDTHS}",
            "towers.next_width=40"]


@pytest.fixture(scope="module")
def sweep(tiny_world, tmp_path_factory):
    """One `mmembed scale --verify` run over 3 tiny widths, 1 epoch each: (out dir, stdout)."""
    base = tmp_path_factory.mktemp("towers")
    config = tiny_config(tiny_world, base / "base", epochs=1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["scale", "--verify", "--out", str(base / "sweep"), *tower_overrides(config)]) == 0
    return base / "sweep", out.getvalue()


def test_heads_divide_the_width_with_heads_of_at_least_32_channels():
    assert [heads_for(w) for w in (16, 32, 48, 64, 96, 100, 128, 160)] == [1, 1, 1, 2, 3, 2, 4, 5]


def test_rung_config_scales_every_tower_and_nothing_else(tiny_world, tmp_path):
    path = tiny_config(tiny_world, tmp_path / "base")
    config = load_scaling_config("scaling", [*tower_overrides(path), f"out_dir={tmp_path / 'sweep'}"])
    base, cfg = load_config(path), rung_config(config, 64)
    assert cfg.train.out_dir == str(tmp_path / "sweep" / "towers" / "w64")
    assert cfg.model.embed_dim == base.model.embed_dim == 32
    for name, tower in cfg.model.towers.items():
        expected = base.model.towers[name].encoder_args | {"width": 64, "heads": 2}
        assert tower.encoder_args == expected
    # N leaves out exactly the token table and any learned position table
    space = build_space(cfg.model, vocab_size=300)
    tables = sum(p.numel() for n, p in space.named_parameters() if n.endswith(("token_embedding.weight",
                                                                                "positional.embedding.weight")))
    n, total = space_parameters(space)
    assert total == sum(p.numel() for p in space.parameters()) and tables > 0 and n == total - tables


def test_a_ladder_needs_three_widths_and_the_params_axis(tiny_world, tmp_path):
    path = tiny_config(tiny_world, tmp_path / "base")
    with pytest.raises(ConfigError, match="at least 3 different widths"):
        run_tower_sweep(load_scaling_config("scaling", [*tower_overrides(path), "towers.widths=[16, 32]"]))
    with pytest.raises(ConfigError, match="axis: params"):
        run_tower_sweep(load_scaling_config("scaling", [*tower_overrides(path), "axis=data"]))


def test_ladder_records_parameters_samples_flops_and_loss(sweep):
    out, stdout = sweep
    doc = json.loads((out / "scaling.json").read_text())
    assert doc["target"] == "towers" and "samples" in doc["units"]["tokens"]
    rungs = doc["rungs"]
    assert [r["label"] for r in rungs] == ["w16 L1 h1", "w24 L1 h1", "w32 L1 h1"]
    params = [r["params"] for r in rungs]
    assert params[0] < params[1] < params[2] and all(r["params_total"] > r["params"] for r in rungs)
    for r in rungs:
        assert r["tokens"] == 48  # D = samples: 51 training rows → 3 batches of 16, one epoch
        assert r["flops_estimate"] == 6 * r["params"] * r["tokens"]
        assert r["flops_measured"] > r["flops_estimate"]  # every token of every tower, not one per sample
        assert math.isfinite(r["val_loss"]) and r["val_loss"] > 0
        assert [p["step"] for p in r["curve"]] == [2, 3]  # every checkpoint; the last is the saved model
        assert r["curve"][-1]["val_loss"] == pytest.approx(r["val_loss"], rel=1e-6)
    assert [r["flops_measured"] for r in rungs] == sorted(r["flops_measured"] for r in rungs)
    assert "D is training samples" in stdout and "prediction for w40 L1 h1" in stdout and "trained:" in stdout


def test_val_loss_is_the_contrastive_loss_of_the_saved_model(sweep):
    out, _ = sweep
    rung = json.loads((out / "scaling.json").read_text())["rungs"][1]
    model = mm.load(out / "towers" / "w24")
    cfg = model.config
    root = Path(cfg.data.root)
    rows = read_manifest(root / cfg.data.val, root=root).rows
    chunk = min(cfg.train.batch_size, len(rows))  # 6 validation rows: one chunk
    loss_fn, losses = build_loss(cfg.loss), []
    for start in range(0, len(rows) - chunk + 1, chunk):
        part = rows[start:start + chunk]
        emb = {m: model.embed(m, [r.items[m] for r in part]) for m in model.modalities}
        present = {m: torch.ones(chunk, dtype=torch.bool) for m in model.modalities}
        with torch.no_grad():
            losses.append(float(loss_fn(emb, present, model.space.logit_scale, None, model.space.logit_bias).total))
    assert set(model.modalities) == {Modality.TEXT, Modality.IMAGE, Modality.AUDIO}
    assert rung["val_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def _counted_training_flops(cfg) -> tuple[int, int]:
    """(FLOPs of the whole run's batches, rows drawn): a counter around a training run without a
    validation set, less what is not a training step — the check that each tower takes its
    largest input (its preprocessing and one forward each), the preprocessing of every row it
    draws (the mel filterbank is a matmul) and of the cache estimate's rows; optimizer updates
    count 0 FLOPs."""
    from mmembed.data.cache_size import estimate_cache_bytes
    from mmembed.model import build_model
    from mmembed.train.align_data import _one_row_inputs, check_towers_accept, trained_modalities

    counted = measured_flops(lambda: train_align(cfg, overwrite=True), backward=False)
    root = Path(cfg.data.root)
    tokenizer = load_tokenizer(Path(cfg.train.out_dir) / "tokenizer.json")
    space = build_model(cfg, tokenizer).space
    active = trained_modalities(build_loss(cfg.loss), space)
    checked = measured_flops(  # the largest inputs are preprocessed too (a mel filterbank)
        lambda: check_towers_accept(space, _one_row_inputs(cfg, tokenizer, active, torch.device("cpu"))),
        backward=False)
    pre = {Modality.parse(m): build_preprocessor(Modality.parse(m), t.preprocess, tokenizer=tokenizer, train=True)
           for m, t in cfg.model.towers.items()}
    dataset = ManifestDataset(read_manifest(root / cfg.data.train, root=root), pre)
    drawn = [i for batch in EpochBatchSampler(len(dataset), cfg.train.batch_size, shuffle=True, seed=cfg.train.seed,
                                              drop_last=True) for i, _ in batch]
    preprocessing = measured_flops(lambda: [dataset.load(i) for i in drawn], backward=False)
    # with data.cache, the rows preprocessed to estimate the cache's size before the first step
    probes = measured_flops(lambda: estimate_cache_bytes(dataset), backward=False) if cfg.data.cache else 0
    assert checked > 0 and preprocessing > 0
    return counted - preprocessing - checked - probes, len(drawn)


def test_measured_flops_equal_a_counter_around_the_whole_training_run(sweep, tmp_path):
    out, _ = sweep
    rung = json.loads((out / "scaling.json").read_text())["rungs"][0]
    cfg = load_config(out / "towers" / "w16" / "config.yaml", ["data.val=null", f"train.out_dir={tmp_path / 'run'}"])
    counted, drawn = _counted_training_flops(cfg)
    assert drawn == rung["tokens"] == 48 and rung["flops_measured"] == counted


def test_measured_flops_count_the_captioner_the_stage_trains(tiny_world, tmp_path):
    """With loss.caption_weight (the demo's recipe) the stage trains a captioner too: the count
    left it out (1.6x fewer FLOPs than the demo's real step, and the captioner's fixed size bent
    the compute fit's exponent as the towers grew)."""
    from mmembed.insight.tower_scaling import train_rung

    captioned = ["loss.caption_weight=1.0", "loss.captioner={width: 16, layers: 1, heads: 2, soft_tokens: 2}"]
    rung = train_rung(load_config(tiny_config(tiny_world, tmp_path / "a", epochs=1), captioned))
    cfg = load_config(tiny_config(tiny_world, tmp_path / "b", epochs=1), [*captioned, "data.val=null"])
    counted, _ = _counted_training_flops(cfg)
    assert rung.result.flops_measured == counted


def test_fit_prediction_and_verification_are_written(sweep):
    out, _ = sweep
    doc = json.loads((out / "scaling.json").read_text())
    fit, p = doc["fit"], doc["prediction"]
    assert fit["n"] == doc["compute_fit"]["n"] == 3 and fit["ci"] == {}  # 3 points, 3 parameters: no interval
    law = PowerLawFit(fit["E"], fit["A"], fit["alpha"], fit["r2"], fit["n"])
    assert p["label"] == "w40 L1 h1" and p["val_loss"] == pytest.approx(float(law.predict(p["x"])), rel=1e-9)
    assert p["x"] == p["result"]["params"] > doc["rungs"][-1]["params"]  # the untrained count is the trained N
    assert p["trained"] == p["result"]["val_loss"]
    assert p["error"] == pytest.approx((p["val_loss"] - p["trained"]) / p["trained"])
    lines = (out / "scaling.csv").read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("rung,width,layers,heads,params,params_total,tokens")
    assert lines[1].startswith("w16 L1 h1,16,1,1,")
    assert (out / "scaling.png").stat().st_size > 10_000


def test_rotary_towers_get_an_even_head_width_and_the_ladders_heads_are_unchanged():
    """Widths 66, 98 and 130 got 2 heads of 33, 49 and 65 channels: rotary towers cannot take them."""
    shipped = (32, 48, 64, 96, 128, 160)
    assert [heads_for(w, rotary=True) for w in shipped] == [heads_for(w) for w in shipped] == [1, 1, 2, 3, 4, 5]
    assert [heads_for(w, rotary=True) for w in (66, 98, 130, 192)] == [1, 1, 1, 6]
    assert heads_for(66) == 2  # a tower without rotary positions keeps its heads of 33
    config = load_scaling_config("scaling", ["target=towers", "towers.widths=[32, 66, 98]", "towers.next_width=130"])
    for width in (66, 98, 130):
        text = rung_config(config, width).model.towers["text"].encoder_args  # the demo's text tower is rotary
        assert text["positional"] == "rotary" and text["heads"] == 1


@pytest.mark.parametrize("override, match", [
    ("towers.next_width=33", r"towers width 33: model\.towers\.text: rotary needs an even head dimension"),
    ("towers.widths=[32, 33, 64]", r"towers width 33: model\.towers\.text: rotary needs an even head dimension"),
    ("towers.config=nope", "config file not found: nope"),
])
def test_a_rung_that_cannot_build_fails_before_any_training(override, match, tmp_path, monkeypatch):
    """An odd rotary head width failed building next_width's model after the whole ladder had
    trained (no fit, no scaling.json); a missing towers.config made the output folder first."""
    import mmembed.insight.tower_scaling as tower_scaling

    monkeypatch.setattr(tower_scaling, "train_rung", lambda *a, **k: pytest.fail("a rung trained"))
    config = load_scaling_config("scaling", ["target=towers", override, f"out_dir={tmp_path / 'sweep'}"])
    with pytest.raises(ConfigError, match=match):
        run_tower_sweep(config)
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("override, match", [
    ("data.val=nosuch.jsonl", "a towers sweep needs a validation manifest (data.val), none at"),
    ("data.val=null", "a towers sweep needs a validation manifest (data.val), none at"),
    ("data.synth={n: 64, image_size: 32}", "is not empty and holds no synthetic world made here"),
])
def test_data_every_rung_needs_is_checked_before_the_folder(override, match, tiny_world, tmp_path, monkeypatch,
                                                            capsys):
    """No validation manifest was found at the first rung's first checkpoint, after it trained, and
    a data.root holding no world made there inside the first rung: each left a half-written run."""
    import mmembed.insight.tower_scaling as tower_scaling

    monkeypatch.setattr(tower_scaling, "train_rung", lambda *a, **k: pytest.fail("a rung trained"))
    root = tmp_path / "data"
    root.mkdir()
    for name in ("train.jsonl", "val.jsonl"):  # manifests only: no world made here, and no rung reads them
        (root / name).write_text((tiny_world / name).read_text())
    config = tiny_config(tiny_world, tmp_path / "base", epochs=1)
    argv = ["scale", "--out", str(tmp_path / "sweep"), *tower_overrides(config),
            f"towers.overrides=[data.root={root}, '{override}']"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("mmembed: error:") and match in err, err
    assert not (tmp_path / "sweep").exists()


def test_a_second_sweep_that_fails_leaves_no_report_of_the_first(tiny_world, tmp_path, monkeypatch):
    """A towers sweep re-run into the same --out that failed at a rung left the first sweep's
    scaling.json and scaling.png (and, before any rung was written, its scaling.csv)."""
    import mmembed.insight.tower_scaling as tower_scaling
    from mmembed.insight.lm_train import LMResult
    from mmembed.insight.scaling import Rung
    from mmembed.insight.sweep_config import ModelSize

    class Stop(Exception):
        pass

    def second_fails(cfg, progress):
        width = int(next(iter(cfg.model.towers.values())).encoder_args["width"])
        if width != WIDTHS[0]:
            raise Stop
        point = {"step": 1, "tokens": 64, "train_loss": 2.0, "val_loss": 2.0, "seconds": 0.1}
        return Rung(f"w{width}", LMResult(width, width, 64, 1, 1, 0.1, 2.0, 2.0, [point]), ModelSize(width, 1, 1))

    out = tmp_path / "sweep"
    out.mkdir()
    for name in ("scaling.json", "scaling.csv", "scaling.png"):
        (out / name).write_text("the first sweep's")
    monkeypatch.setattr(tower_scaling, "train_rung", second_fails)
    config = tiny_config(tiny_world, tmp_path / "base", epochs=1)
    with pytest.raises(Stop):
        main(["scale", "--out", str(out), *tower_overrides(config)])
    assert {p.name for p in out.iterdir()} == {"scaling.csv"}
    lines = (out / "scaling.csv").read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith(f"w{WIDTHS[0]},")  # the rung it finished


def test_a_rung_reports_the_loss_of_the_weights_its_samples_and_flops_trained(tiny_world, tmp_path, monkeypatch):
    """A rung's saved weights were the best recall's checkpoint (an early step), scored beside the
    samples and FLOPs of the whole run: its val_loss was the curve's first point, not its last."""
    import mmembed.train.checkpointing as checkpointing
    from mmembed.insight.tower_scaling import train_rung

    # validation "peaks" at the first evaluation: no later one beats it
    monkeypatch.setattr(checkpointing, "better", lambda value, best, lower: best is None)
    path = tiny_config(tiny_world, tmp_path / "base", epochs=2)
    config = load_scaling_config("scaling", [*tower_overrides(path), f"out_dir={tmp_path / 'sweep'}"])
    result = train_rung(rung_config(config, 16)).result
    curve = result.curve
    assert len(curve) >= 2 and curve[0]["val_loss"] != pytest.approx(curve[-1]["val_loss"], rel=1e-4)
    assert result.val_loss == pytest.approx(curve[-1]["val_loss"], rel=1e-6)
    assert result.tokens == curve[-1]["tokens"] == 96  # 2 epochs of 3 batches of 16: every sample counted
    saved = json.loads((tmp_path / "sweep" / "towers" / "w16" / "metrics.jsonl").read_text().splitlines()[-1])
    assert saved["best_step"] < saved["weights_step"] == curve[-1]["step"]  # the best step is not what is scored
