"""What the engine tells the user about how a run ended: a resumed early stop, skipped non-finite
steps, the non-finite stop's advice, and the rows skipped by a run that took no step."""

import json
import logging

import pytest
import yaml

from mmembed.config import load_config
from mmembed.errors import UserError
from mmembed.train.align import train_align
from mmembed.train.engine import NonFiniteLossError
from tests.conftest import tiny_config
from tests.train.test_engine import _trainer
from tests.train.test_keep_best import STEPS, _fit


@pytest.mark.parametrize("patience, step, why", [(None, STEPS, "finished"), (4, 12, "early stop")])
def test_an_early_stopped_run_resumed_with_more_patience_trains_on(tmp_path, patience, step, why):
    """Resumed with early_stop_patience=null (or larger), an early-stopped run trained nothing and said nothing."""
    run = tmp_path / "run"
    _, _, first = _fit(run, early_stop_patience=3)
    assert (first.stopped_because, first.progress.step) == ("early stop", 10)
    _, _, again = _fit(run, early_stop_patience=patience, resume=True)
    assert (again.stopped_because, again.progress.step, again.weights_step) == (why, step, 4)


def test_an_early_stopped_run_resumed_with_the_same_patience_says_why_it_trains_no_further(tmp_path, caplog):
    """A resume that trained nothing said nothing of why, and its restore line ended "(last: n/a)"."""
    run = tmp_path / "run"
    _fit(run, early_stop_patience=3)
    with caplog.at_level(logging.INFO, logger="mmembed.train"):
        _, _, again = _fit(run, early_stop_patience=3, resume=True)
    assert again.progress.step == 10
    assert "stopped early at step 10" in caplog.text
    assert "larger train.early_stop_patience, or null" in caplog.text
    assert "restored the best checkpoint: step 4, recall@1 = 0.9 (last: 0.6)" in caplog.text
    assert json.loads((run / "checkpoints" / "step_0000010" / "trainer.json").read_text())[
        "progress"]["last_metric"] == pytest.approx(0.6)


def test_skipped_non_finite_steps_are_reported_at_the_end(tmp_path, caplog):
    """Two skipped NaN steps left a run two steps short with no word of why."""
    _, t = _trainer(tmp_path, nan_at={3, 5}, epochs=1)
    with caplog.at_level(logging.WARNING, logger="mmembed.train"):
        result = t.fit()
    assert (result.stopped_because, result.progress.step, result.progress.bad_steps) == ("finished", 6, 2)
    assert "2 step(s) with a non-finite loss or gradient were skipped: the run took 6 of its 8 planned steps" \
        in caplog.text


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_non_finite_stop_suggests_fp32_only_to_a_bf16_run(tmp_path, precision):
    """An fp32 run that stopped on NaN losses was told to try train.precision=fp32."""
    _, t = _trainer(tmp_path, nan_at=set(range(1, 100)), max_bad_steps=2, precision=precision)
    with pytest.raises(NonFiniteLossError) as caught:
        t.fit()
    assert "2 non-finite steps in a row" in str(caught.value)
    assert ("train.precision=fp32" in str(caught.value)) == (precision == "bf16")


def test_a_run_whose_every_row_is_bad_counts_every_skipped_row_in_its_error(tiny_world, tmp_path):
    """The error pointed at the count "above", the first rate-limited warning's (8 rows), not all 19."""
    root = tmp_path / "data"
    root.mkdir()
    rows = [{"id": f"r{i}", "image": f"images/missing{i}.png", "text": "a small red circle"} for i in range(20)]
    (root / "allbad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tiny_config(tiny_world, tmp_path / "run", epochs=2, batch_size=8)
    raw = yaml.safe_load(path.read_text())
    raw["data"] = {"root": str(root), "train": "allbad.jsonl", "val": None, "test": None}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match="no training step was taken") as caught:
        train_align(load_config(path))
    # 2 epochs of 2 batches of 8 (the last 4 rows of each shuffle dropped) reach 19 of the 20 rows
    assert "skipped 19 row(s)" in str(caught.value)
