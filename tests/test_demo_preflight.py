"""The demo refuses a config its report cannot be made from before it trains anything."""

from __future__ import annotations

import pytest

from mmembed import demo
from mmembed.errors import ConfigError


@pytest.mark.parametrize("overrides, message", [
    (["data.test=null"], r"^data\.test: the demo reports recall on the test split: set it"),
    (["data.synth.split=[0.9,0.1,0.0]"], r"^data\.synth gives the test split no scene \(n=6000, split=\[0\.9, 0\.1, "
                                         r"0\.0\]\), and the demo reports on it"),
    (["data.test=mine.jsonl"], r"^data\.test: the demo evaluates on .*mine\.jsonl, which is not a file: set data\.test "
                               r"to test\.jsonl"),
    (["data.synth=null", "decoder=null"],
     r"^data\.test: the demo evaluates on .*test\.jsonl, which is not a file: point data\.root"),
])
def test_a_test_split_the_report_cannot_read_is_refused_before_training(tmp_path, monkeypatch, overrides, message):
    """data.test=null trained the whole align stage, then failed with a TypeError traceback (Path / None)."""
    monkeypatch.setattr(demo, "train_align", lambda *a, **k: pytest.fail("trained past a bad config"))
    with pytest.raises(ConfigError, match=message):
        demo.run_demo("demo", [f"data.root={tmp_path / 'world'}", *overrides], out_dir=str(tmp_path / "run"))
    assert not (tmp_path / "world").exists()
