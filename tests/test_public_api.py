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
