"""`mmembed scale`: a tiny sweep and a tiny regularisation study end to end, and their numbers."""

import json

import pytest

from mmembed.cli import main
from mmembed.errors import ConfigError, UserError
from mmembed.insight.lm_data import token_rows, train_world_tokenizer, world_documents
from mmembed.insight.power_law import fit_power_law
from mmembed.insight.sweep_config import load_scaling_config

TINY = ["tokens=12000", "context=32", "val_tokens=2048", "bootstrap=20", "recipe.batch_size=16",
        "recipe.eval_every=10", "recipe.eval_rows=32", "recipe.warmup_steps=5",
        "sizes=[{width: 16, layers: 1, heads: 2}, {width: 24, layers: 1, heads: 2}, {width: 32, layers: 1, heads: 2}]",
        "next_size={width: 40, layers: 1, heads: 2}"]


def test_world_documents_are_seeded_and_rows_overlap_by_one_id():
    assert world_documents(5, seed=3) == world_documents(5, seed=3)
    assert world_documents(5, seed=3) != world_documents(5, seed=4)
    tok = train_world_tokenizer(300, seed=0, documents=300)
    rows = token_rows(tok, 1000, context=16, seed=1)
    assert rows.shape == (63, 17)  # ceil(1000 / 16) rows of 16 inputs + 1 target
    assert (rows[1:, 0] == rows[:-1, -1]).all()  # every id is predicted exactly once
    assert tok.eos_id in rows.flatten().tolist()  # documents are separated


def _documents(rows, eos: int) -> list[tuple[int, ...]]:
    """The whole documents in packed rows (ids between two <eos>), as id tuples."""
    flat = rows[:, :-1].flatten().tolist() + [int(rows[-1, -1])]
    cuts = [i for i, t in enumerate(flat) if t == eos]
    return [tuple(flat[a + 1:b]) for a, b in zip([-1, *cuts], cuts)]


def test_validation_rows_share_no_document_with_training(monkeypatch):
    """About 3% of the validation documents (simple scenes, which recur across seeds) were also
    training documents, though lm_data said another seed shared none."""
    import numpy as np

    from mmembed.insight import lm_data, scaling
    from mmembed.insight.sweep_config import load_scaling_config

    def small_world(n: int, seed: int) -> list[str]:  # half the scenes from a handful, as simple scenes recur
        rng = np.random.default_rng(seed)
        return [f"simple scene {rng.integers(4)}." if rng.random() < 0.5 else f"scene {rng.integers(10**9)}."
                for _ in range(n)]

    monkeypatch.setattr(lm_data, "world_documents", small_world)
    config = load_scaling_config("scaling", ["context=16", "val_tokens=2048", "vocab_size=300"])
    _, train, val = scaling.world_text(config, 4096)
    tok = train_world_tokenizer(config.vocab_size, seed=config.seed + 1)
    trained = set(_documents(train, tok.eos_id))
    assert val.shape == (128, 17) and not trained & set(_documents(val, tok.eos_id))
    unfiltered = token_rows(tok, config.val_tokens, config.context, seed=config.seed + 3)
    assert trained & set(_documents(unfiltered, tok.eos_id))  # what the old validation rows held
    seen: set[int] = set()
    assert (token_rows(tok, 4096, 16, seed=config.seed + 2, seen=seen) == train).all()  # training is unchanged
    assert {lm_data.document_key(tok.decode(list(d))) for d in trained} <= seen  # it records what it packed


def test_sweep_writes_fit_prediction_and_verification(tmp_path, capsys):
    assert main(["scale", "--verify", "--out", str(tmp_path), *TINY]) == 0
    out = capsys.readouterr().out
    assert "fit against N" in out and "prediction for w40 L1 h2" in out and "trained:" in out
    doc = json.loads((tmp_path / "scaling.json").read_text())
    rungs = doc["rungs"]
    assert [r["label"] for r in rungs] == ["w16 L1 h2", "w24 L1 h2", "w32 L1 h2"]
    params = [r["params"] for r in rungs]
    assert params == sorted(params) and len(set(r["tokens"] for r in rungs)) == 1  # fixed data budget
    for r in rungs:
        assert r["flops_estimate"] == 6 * r["params"] * r["tokens"]
        assert r["flops_measured"] > r["flops_estimate"]  # + attention and the (tied) LM head
        assert r["best_val_loss"] == min(p["val_loss"] for p in r["curve"])
    refit = fit_power_law(params, [r["val_loss"] for r in rungs], bootstrap=0)
    assert doc["fit"]["alpha"] == pytest.approx(refit.alpha, rel=1e-6)
    assert doc["fit"]["r2"] == pytest.approx(refit.r2, rel=1e-6)
    p = doc["prediction"]
    assert p["val_loss"] == pytest.approx(refit.predict(p["x"]), rel=1e-6)
    assert p["x"] == p["result"]["params"]  # the predicted x is the trained model's N
    assert p["error"] == pytest.approx((p["val_loss"] - p["trained"]) / p["trained"])
    lines = (tmp_path / "scaling.csv").read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("rung,width,layers,heads,params")
    assert (tmp_path / "scaling.png").stat().st_size > 10_000


def test_an_interrupted_sweep_keeps_the_rungs_it_finished(tmp_path, monkeypatch):
    """Ctrl-C (or a rung whose loss became NaN) at the third rung left an empty folder: scaling.csv
    was written once, after the whole ladder."""
    import mmembed.insight.scaling as scaling

    real, calls = scaling.train_lm, []

    def interrupted_at_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(scaling, "train_lm", interrupted_at_the_third)
    assert main(["scale", "--out", str(tmp_path), *TINY]) == 130  # "mmembed: interrupted"
    lines = (tmp_path / "scaling.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[1].startswith("w16 L1 h2,") and lines[2].startswith("w24 L1 h2,")


def test_data_axis_varies_tokens_for_one_model(tmp_path, capsys):
    argv = ["scale", "--axis", "data", "--out", str(tmp_path), *TINY, "data_tokens=[4096, 8192, 16384]",
            "data_size={width: 16, layers: 1, heads: 2}"]
    assert main(argv) == 0
    doc = json.loads((tmp_path / "scaling.json").read_text())
    assert len({r["params"] for r in doc["rungs"]}) == 1
    assert [r["tokens"] for r in doc["rungs"]] == [4096, 8192, 16384]
    assert doc["prediction"]["x"] == 32768  # the next budget: twice the last


def test_regularisation_study_reports_gap_and_early_stop(tmp_path, capsys):
    argv = ["scale", "--study", "regularisation", "--out", str(tmp_path), "context=32", "val_tokens=2048",
            "recipe.batch_size=16", "recipe.eval_rows=32", "recipe.warmup_steps=5",
            "regularisation.size={width: 32, layers: 1, heads: 2}", "regularisation.train_tokens=1024",
            "regularisation.epochs=12", "regularisation.eval_every=4", "regularisation.dropouts=[0.0, 0.3]",
            "regularisation.weight_decays=[0.0]"]
    assert main(argv) == 0
    assert "gap without regularisation" in capsys.readouterr().out
    doc = json.loads((tmp_path / "regularisation.json").read_text())
    assert [(s["dropout"], s["weight_decay"]) for s in doc["settings"]] == [(0.0, 0.0), (0.3, 0.0)]
    for s in doc["settings"]:
        curve = s["curve"]
        # the final validation loss scores all 64 validation rows, the curve's 32 (recipe.eval_rows)
        assert s["gap"] == pytest.approx(s["val_loss"] - curve[-1]["train_loss"])
        best = min(curve, key=lambda p: p["val_loss"])
        assert (s["early_stop_step"], s["early_stop_val_loss"]) == (best["step"], best["val_loss"])
    assert doc["settings"][0]["gap"] > 0  # 1k tokens for 12 epochs: memorised
    assert (tmp_path / "regularisation.png").stat().st_size > 10_000


@pytest.mark.parametrize("argv, match", [
    (["scale", "--study", "regularisation", "--verify"], "--verify belongs to the sweep"),
    (["scale", "sizes=[{width: 16, layers: 1, heads: 2}]"], "at least 3 model sizes"),
    (["scale", "sizes=[{width: 30, layers: 1, heads: 4}, {width: 16, layers: 1, heads: 2}, "
                "{width: 24, layers: 1, heads: 2}]"], "width divisible by heads"),
    (["scale", "recipe.lr=fast"], "recipe.lr must be float"),
    # each of these trained the whole ladder, then ended in a traceback (or never started one)
    (["scale", "next_size=null"], "next_size: the sweep predicts"),
    (["scale", "sizes=[{width: 16, layers: 1, heads: 2}, {width: 16, layers: 1, heads: 2}, "
                "{width: 24, layers: 1, heads: 2}]"], "every rung must have its own parameter count N"),
    # heads do not change N: the fit failed after the whole ladder trained (a ValueError traceback)
    (["scale", "sizes=[{width: 16, layers: 1, heads: 2}, {width: 16, layers: 1, heads: 4}, "
                "{width: 24, layers: 1, heads: 2}]"], "every rung must have its own parameter count N"),
    (["scale", "seed=-2"], "seed must be in [0, 4294967295]"),
    (["scale", "target=towers", "towers.widths=[16, 16, 24]"], "at least 3 different widths"),
    (["scale", "target=towers", "towers.widths=[16, 24, -8]"], "at least 3 different widths"),
    (["scale", "--axis", "data", "data_tokens=[1024, 1100, 4096]", "context=32", "recipe.batch_size=32"],
     "each budget must give a different, non-zero number"),
    (["scale", "recipe.batch_size=0"], "recipe.batch_size must be >= 1"),
    (["scale", "recipe.eval_every=0"], "recipe.eval_every must be >= 1"),
    (["scale", "context=0"], "context must be >= 1"),
    (["scale", "val_tokens=10"], "holds no validation row"),
    (["scale", "tokens=10"], "less than one batch"),
    (["scale", "recipe.dropout=1.5"], "dropout must be in [0, 1)"),
    (["scale", "regularisation.epochs=0"], "regularisation.epochs must be >= 1"),
    (["scale", "regularisation.dropouts=[]"], "must be non-empty"),
    (["scale", "--axis", "time"], "invalid choice"),
    # the study ran on the decoder at its one budget, ignoring both
    (["scale", "--study", "regularisation", "--axis", "data"], "--axis belongs to the sweep, not to --study"),
    (["scale", "--study", "regularisation", "target=towers"],
     "--study regularisation trains the decoder, not target=towers"),
    # an odd head width trained the whole ladder, then the rotary next_size raised a traceback
    (["scale", "next_size={width: 42, layers: 1, heads: 2}"], "into an even head width"),
    # NaN or infinite weight decay trained, then blamed the learning rate ("lower recipe.lr")
    (["scale", "recipe.weight_decay=.nan"], "weight_decay finite and >= 0"),
    (["scale", "--study", "regularisation", "regularisation.weight_decays=[.inf]"], "each finite, >= 0"),
    # built text in memory until killed; gave no confidence intervals without a word
    (["scale", "--axis", "data", "data_tokens=[2048, 4096, 10000000000000]"],
     "data_tokens must each be in [1, 1,000,000,000]"),
    (["scale", "bootstrap=-1"], "bootstrap must be >= 0"),
])
def test_bad_arguments_give_one_line(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("mmembed: error:") and match in err, err


@pytest.mark.parametrize("argv, match", [
    (["--verify", "--axis", "data", "data_tokens=[2048, 4096, 600000000]"],
     "axis=data builds 2 x max(data_tokens) = 1,200,000,000 tokens (the budget --verify trains"),
    # validation leaves out the documents of the budget --verify trains, with or without it
    (["--axis", "data", "data_tokens=[2048, 4096, 600000000]"],
     "axis=data builds 2 x max(data_tokens) = 1,200,000,000 tokens"),
    (["--study", "regularisation", "regularisation.train_tokens=100"],
     "regularisation.train_tokens=100 is less than one batch (32 rows of 64 tokens)"),
])
def test_a_budget_it_cannot_build_is_refused_before_the_folder(argv, match, tmp_path, capsys):
    """--verify built 2 x max(data_tokens) past the cap until killed; a regularisation subset under
    one batch failed after the tokenizer trained, naming no key. Both had made the folder."""
    assert main(["scale", *argv, "--out", str(tmp_path / "sweep")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and match in err and not (tmp_path / "sweep").exists(), err


def test_out_is_the_folder_as_typed(tmp_path, monkeypatch):
    """`--out` used to pass through the YAML override parser: "runs/sweep #2" wrote into runs/sweep,
    "2024" was refused as a number."""
    import mmembed.insight.scaling as scaling

    seen = []

    def stop(config, verify, progress):
        seen.append(config.out_dir)
        raise UserError("stopped before training")

    monkeypatch.setattr(scaling, "run_sweep", stop)
    for name in ("sweep #2", "2024", "yes", "a: b"):
        assert main(["scale", "--out", str(tmp_path / name)]) == 2
    assert seen == [str(tmp_path / n) for n in ("sweep #2", "2024", "yes", "a: b")]


def test_a_diverging_learning_rate_is_one_line(tmp_path, capsys):
    """It was a FloatingPointError traceback (exit 1), with the right advice inside it."""
    assert main(["scale", "--out", str(tmp_path), *TINY, "recipe.lr=1e6", "recipe.warmup_steps=0"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress lines
    assert last.startswith("mmembed: error: loss became nan") and "lower recipe.lr" in last, last



def test_the_counted_parameters_are_the_decoders():
    from mmembed.insight.scaling import build_decoder
    from mmembed.insight.sweep_config import ModelSize, block_parameters

    for size in (ModelSize(16, 1, 2), ModelSize(32, 2, 4), ModelSize(48, 3, 4), ModelSize(64, 4, 8)):
        assert block_parameters(size) == build_decoder(size, 300, 64, 0.0).num_parameters()


class _Stop(Exception):
    """Raised by a stand-in trainer: the sweep stops there."""


def test_verify_leaves_the_data_axis_validation_rows_unchanged(monkeypatch):
    """--verify on --axis data packed twice the training budget and left its documents out of
    validation: the validation rows, so every rung's loss and the fit it checks, changed with it."""
    import numpy as np

    from mmembed.insight import lm_data, scaling
    from mmembed.insight.sweep_config import load_scaling_config

    def small_world(n: int, seed: int) -> list[str]:  # simple scenes recur, as in the world: a few hundred of them
        rng = np.random.default_rng(seed)
        return [f"simple scene {rng.integers(300)}." if rng.random() < 0.5 else f"scene {rng.integers(10**9)}."
                for _ in range(n)]

    def first_validation(verify: bool):
        seen = []

        def record(model, train, val, recipe):
            seen.append((train, val))
            raise _Stop

        monkeypatch.setattr(scaling, "train_lm", record)
        config = load_scaling_config("scaling", ["axis=data", "context=16", "val_tokens=2048", "vocab_size=300",
                                                 "data_tokens=[1024, 2048, 4096]", "recipe.batch_size=16",
                                                 "data_size={width: 16, layers: 1, heads: 2}", "out_dir=unused"])
        with pytest.raises(_Stop):
            scaling.run_sweep(config, verify=verify, progress=lambda _: None)
        return seen[0]

    monkeypatch.setattr(lm_data, "world_documents", small_world)
    monkeypatch.setattr(scaling, "make_output_folder", lambda out: None)  # no folder: the sweep stops first
    monkeypatch.setattr(scaling, "clear_report", lambda out: None, raising=False)
    (train, val), (train_v, val_v) = first_validation(False), first_validation(True)
    assert val.shape == val_v.shape and (val == val_v).all()
    assert (train == train_v).all()  # the first rung's rows too


def _fake_train_lm(fail_at: int | None = None):
    """A stand-in for train_lm: a power law in N at once; raises _Stop at call `fail_at` (1-based)."""
    from mmembed.insight.lm_train import LMResult

    calls = []

    def train(model, train, val, recipe):
        calls.append(1)
        if len(calls) == fail_at:
            raise _Stop
        n, tokens = model.num_parameters(), train.shape[0] * (train.shape[1] - 1)
        loss = 0.5 + 40 * n ** -0.5
        return LMResult(n, n, tokens, 6 * n * tokens, 7 * n * tokens, 0.1, loss, loss,
                        [{"step": 1, "tokens": tokens, "train_loss": loss, "val_loss": loss, "seconds": 0.1}])

    return train


def test_a_second_sweep_that_fails_leaves_no_report_of_the_first(tmp_path, monkeypatch):
    """A sweep re-run into the same --out that failed at a rung left its scaling.csv beside the
    first sweep's scaling.json and scaling.png: a fit and a prediction the CSV does not support."""
    import mmembed.insight.scaling as scaling

    monkeypatch.setattr(scaling, "train_lm", _fake_train_lm())
    assert main(["scale", "--out", str(tmp_path), *TINY]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"scaling.json", "scaling.csv", "scaling.png"}
    monkeypatch.setattr(scaling, "train_lm", _fake_train_lm(fail_at=3))
    with pytest.raises(_Stop):
        main(["scale", "--out", str(tmp_path), *TINY])
    assert {p.name for p in tmp_path.iterdir()} == {"scaling.csv"}
    assert len((tmp_path / "scaling.csv").read_text().splitlines()) == 3  # the second sweep's 2 rungs


def test_a_sweep_stopped_before_its_first_rung_keeps_the_previous_report(tmp_path, monkeypatch):
    """The previous report was deleted as a sweep started: a Ctrl-C in its first minutes lost the fit."""
    import mmembed.insight.scaling as scaling

    monkeypatch.setattr(scaling, "train_lm", _fake_train_lm())
    assert main(["scale", "--out", str(tmp_path), *TINY]) == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(scaling, "train_lm", _fake_train_lm(fail_at=1))
    with pytest.raises(_Stop):
        main(["scale", "--out", str(tmp_path), *TINY])
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_the_smallest_gap_is_the_smallest_in_size():
    """A validation loss just below the training loss (-0.008, noise) was called the smallest gap over 0.001."""
    from types import SimpleNamespace

    from mmembed.insight.regularisation import RegularisationReport, Setting

    def setting(dropout, train, val):
        return Setting(dropout, 0.0, SimpleNamespace(train_loss=train, val_loss=val, best={"step": 4, "val_loss": val}))

    report = RegularisationReport([setting(0.0, 2.0, 2.001), setting(0.3, 2.0, 1.992), setting(0.5, 2.0, 2.3)],
                                  tokens=1024, epochs=2, files={})
    assert report.summary().splitlines()[-1] == ("gap without regularisation 0.001; smallest gap 0.001 (dropout 0.0, "
                                                  "weight decay 0.0)")


def test_a_vocabulary_below_the_bytes_or_an_empty_out_is_refused_before_any_folder(tmp_path, capsys):
    """vocab_size=100 was refused by the tokenizer once the sweep's folder was made; --out "" swept into the
    config's own out_dir."""
    with pytest.raises(ConfigError, match="vocab_size=100 is below the 263 byte and special tokens"):
        load_scaling_config("scaling", ["vocab_size=100"])
    for argv in (["scale", "vocab_size=100", "--out", str(tmp_path / "sweep")], ["scale", "--out", ""]):
        assert main(argv) == 2
        assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "sweep").exists()
