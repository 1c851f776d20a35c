"""The `import mmembed as mm` surface: names resolve lazily and `mm.train` stays callable."""

import subprocess
import sys

import mmembed as mm


def test_mm_train_is_callable_after_any_training_module_was_imported():
    """`mmembed.evaluate` imports `mmembed.train.*`, which makes Python set `mmembed.train` to the
    package: example 02 then failed with "'module' object is not callable". The package answers
    the call, in a fresh process whatever the import order."""
    code = ("import mmembed as mm\nfrom mmembed.evaluate import run_eval\nimport mmembed.train.align\n"
            "assert callable(mm.train) and mm.train.align.__name__ == 'mmembed.train.align'\n"
            "from mmembed.train import train\nassert callable(train) and train.__name__ == 'train'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_mm_train_runs_the_stages_function(monkeypatch):
    import mmembed.train as package

    calls = []
    monkeypatch.setattr(package, "train",
                        lambda config, resume=False, overwrite=False: calls.append((config, resume, overwrite)) or "run")
    assert mm.train("cfg", overwrite=True) == "run" and calls == [("cfg", False, True)]


def test_every_public_name_resolves():
    for name in mm.__all__:
        assert getattr(mm, name) is not None, name


def test_tab_completion_lists_every_public_name_before_its_first_use():
    """`dir(mmembed)` listed a lazy name only after it had been used: `mm.<Tab>` offered no `Index`."""
    import subprocess
    import sys

    listed = subprocess.run([sys.executable, "-c", "import mmembed; print(' '.join(dir(mmembed)))"],
                            capture_output=True, text=True, check=True).stdout.split()
    import mmembed as mm

    assert set(mm.__all__) <= set(listed) and {"Index", "load", "Session", "Query"} <= set(listed)


def test_load_and_load_config_misuse_is_one_line(tmp_path):
    """Each was a traceback or a message about something else: a device torch cannot use (its
    RuntimeError at the first tensor moved), the run's config.yaml for its folder ("run
    directory not found" of a file that exists), one override string read letter by letter."""
    import pytest
    import torch

    from mmembed.errors import ConfigError, UserError

    (tmp_path / "config.yaml").write_text("{}")
    with pytest.raises(UserError, match="is a file: give the run's folder"):
        mm.load(tmp_path / "config.yaml")
    with pytest.raises(UserError, match="device 'nope'"):
        mm.load(tmp_path, device="nope")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="torch sees no CUDA GPU"):
            mm.load(tmp_path, device="cuda")
    with pytest.raises(ConfigError, match="got the one string 'train.epochs=3'"):
        mm.load_config("demo", "train.epochs=3")


def test_counts_take_numpy_integers_and_0d_tensors_everywhere():
    """`embed`'s batch_size refused np.int64(8) and torch.tensor(8) as "must be an integer", and
    `search`'s k refused a 0-d tensor, while generate took both (scalars.as_integer, one rule)."""
    import numpy as np
    import pytest
    import torch

    from mmembed.scalars import as_integer

    for value in (8, np.int64(8), np.uint8(8), np.array(8), torch.tensor(8), torch.tensor(8, dtype=torch.int16)):
        assert as_integer(value) == 8 and type(as_integer(value)) is int
    for value in (True, np.bool_(True), torch.tensor(True), np.array(True), 8.0, np.array(8.0), torch.tensor(8.0),
                  torch.tensor([8]), np.array([8]), "8", None):
        assert as_integer(value) is None, value
    from mmembed.decoder.answer import Stops

    # a 0-d stop was iterated: "TypeError: iteration over a 0-d array" (a regression review, this session)
    assert Stops.parse(np.array(5)).ids == Stops.parse(torch.tensor(5)).ids == {5}
    for value in (np.array(2.5), torch.tensor(True)):
        with pytest.raises(ValueError, match="stop must be non-empty strings and/or token ids"):
            Stops.parse(value)
    index = mm.Index(4)
    index.add(torch.eye(4), "image")
    for k in (2, np.int64(2), torch.tensor(2)):
        ids, _ = index.search_ids(torch.eye(4)[:1], k=k)
        assert ids.tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="k must be a positive int"):
        index.search_ids(torch.eye(4)[:1], k=torch.tensor(True))
