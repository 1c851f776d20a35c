"""Benchmark command lines report a user's mistake in one line (SystemExit), before any model loads
or any work runs; the runner skips a benchmark whose optional extra is missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from benchmarks import (
    bench_serve,
    best_of,
    memory_horizon,
    probe_lookup,
    probe_slots,
    run_all,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if a run's model is loaded."""
    from mmembed.model import Model

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(Model, "load", refuse)


@pytest.fixture
def world(tmp_path) -> Path:
    """A folder with the built-in world's file names (the checks only look for them)."""
    root = tmp_path / "world"
    root.mkdir()
    for name in ("train.jsonl", "test.jsonl", "instruct-test.jsonl"):
        (root / name).write_text("")
    return root


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A folder that looks like a run (config.yaml, model.safetensors) to the up-front checks."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("")
    (run / "model.safetensors").write_bytes(b"")
    return run


def test_run_based_scripts_refuse_a_missing_run_folder_before_loading(tmp_path, world, no_loading, monkeypatch):
    """A wrong run folder was a traceback from the loader (memory_horizon: the child's, then a
    CalledProcessError) in every run-based script."""
    monkeypatch.setattr(memory_horizon.subprocess, "run", lambda *a, **k: pytest.fail("a child process started"))
    not_a_run = tmp_path / "not-a-run"
    not_a_run.mkdir()
    for main, flag in ((probe_slots.main, "--root"), (probe_lookup.main, "--root"), (best_of.main, "--world"),
                       (memory_horizon.main, "--world")):
        with pytest.raises(SystemExit, match=r"nowhere: no such folder; pass a trained run's folder"):
            main([str(tmp_path / "nowhere"), flag, str(world)])
        with pytest.raises(SystemExit, match=r"not-a-run: no config.yaml or model.safetensors there"):
            main([str(not_a_run), flag, str(world)])


def test_probes_refuse_an_unknown_modality_before_loading(world, run_dir, no_loading, capsys):
    """--modalities imag was a ValueError traceback after the model had loaded."""
    for main in (probe_slots.main, probe_lookup.main):
        with pytest.raises(SystemExit):
            main([str(run_dir), "--root", str(world), "--modalities", "image", "imag"])
        assert "unknown modality 'imag'; valid: text, image, audio" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--n", "0"], r"^--n must be an integer in \[1, 1024\], got 0$"),
    (["--temperature", "0"], r"^--n > 1 samples its candidates: give a temperature > 0$"),
    (["--weight", "-1"], r"^--weight must be a finite number >= 0, got -1.0$"),
    (["--temperature", "nan"], r"^--temperature must be a finite number >= 0, got nan$"),
    (["--seed", "-1"], r"^--seed must be an integer in \[0, \d+\] or None, got -1$"),
])
def test_best_of_checks_its_settings_before_loading(world, run_dir, no_loading, flags, message):
    """A bad --n, --temperature or --weight was a ValueError after the first greedy pass (17 s)."""
    with pytest.raises(SystemExit, match=message):
        best_of.main([str(run_dir), "--world", str(world), *flags])


def test_best_of_says_the_run_has_no_decoder(tmp_path, tiny_world):
    """A run without a decoder stage was an AttributeError ('NoneType' object has no attribute 'lm')."""
    from tests.conftest import tiny_model

    run = tiny_model(0).save(tmp_path / "space-only")
    with pytest.raises(SystemExit, match=r"space-only: the run has no decoder .*train one with a decoder: section"):
        best_of.main([str(run), "--world", str(tiny_world)])


def test_bench_serve_refuses_a_missing_run_before_starting(tmp_path, monkeypatch):
    """--run to a wrong folder was a ConfigError about "shipped configs" (--run takes a run folder)."""
    monkeypatch.setattr(bench_serve, "run", lambda *a, **k: pytest.fail("the benchmark started"))
    with pytest.raises(SystemExit, match=r"--run .*nowhere: no such folder"):
        bench_serve.main(["--run", str(tmp_path / "nowhere"), "--quick"])
    with pytest.raises(SystemExit, match=r"--run .*: no config.yaml or model.safetensors there"):
        bench_serve.main(["--run", str(tmp_path), "--quick"])


def test_bench_serve_says_why_the_server_did_not_start(tmp_path, monkeypatch):
    """The server's error was lost: the message was '' and pointed at a log in a deleted folder."""
    real = subprocess.Popen
    error = "mmembed: error: run/model.safetensors: not a readable safetensors file"

    def broken_server(cmd, **kwargs):  # what `mmembed serve` does with a truncated checkpoint
        return real([sys.executable, "-c", f"import sys; print('loading', file=sys.stderr); sys.exit({error!r})"],
                    **kwargs)

    monkeypatch.setattr(bench_serve.subprocess, "Popen", broken_server)
    with pytest.raises(SystemExit, match=r"the server did not start .*exit status 1\): " + error):
        bench_serve.Server(tmp_path, tmp_path / "server.log")


def test_memory_horizon_names_the_phase_whose_process_failed(tmp_path, run_dir, monkeypatch):
    """A failed child was its traceback followed by a CalledProcessError traceback."""
    real = subprocess.run

    def failing_child(cmd, **kwargs):
        script = "import sys; print('Traceback (most recent call last):', file=sys.stderr); sys.exit('UserError: boom')"
        return real([sys.executable, "-c", script], **kwargs)

    item = {"user": "u", "modality": "image", "path": "x.png", "show": "Look.", "question": ""}
    question = {"user": "u", "question": "What colour?", "answer": "red", "item": 0, "show": "", "modality": "",
                "path": ""}
    monkeypatch.setattr(memory_horizon, "plan", lambda *a, **k: ([[item]] * 3, [question]))
    monkeypatch.setattr(memory_horizon.subprocess, "run", failing_child)
    with pytest.raises(SystemExit, match=r"the 'show' process \(1 of 5\) failed with exit status 1: UserError: boom"):
        memory_horizon.run(run_dir, tmp_path, users=1, items=6, questions=1)


def test_run_all_refuses_an_out_it_cannot_write_before_the_first_benchmark(tmp_path, monkeypatch):
    """An --out under a file was a FileExistsError traceback after the first benchmark, losing its result."""
    monkeypatch.setattr(run_all, "run_one", lambda *a, **k: pytest.fail("a benchmark ran"))
    (tmp_path / "afile").write_text("")
    for out in (tmp_path / "afile" / "report.json", tmp_path / "afile" / "deeper" / "report.json"):
        with pytest.raises(SystemExit, match=r"--out .*report.json: cannot write a report there"):
            run_all.main(["--only", "loss", "--out", str(out)])


def _fake_module(monkeypatch, bench_id: str, missing: str) -> None:
    module = types.ModuleType(f"benchmarks.bench_{bench_id}")

    def run(quick: bool = False):
        raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)

    module.run = run
    monkeypatch.setitem(sys.modules, module.__name__, module)


def test_run_all_skips_a_benchmark_whose_optional_extra_is_missing(tmp_path, monkeypatch, capsys):
    """A missing faiss or transformers marked the benchmark FAILED and made the exit status 1."""
    _fake_module(monkeypatch, "zfaiss", "faiss")
    _fake_module(monkeypatch, "zhf", "transformers.generation")
    _fake_module(monkeypatch, "zbug", "numpyy")  # not an optional extra: a failure still
    monkeypatch.setattr(run_all, "available", lambda: ["zfaiss", "zhf", "zbug"])
    out = tmp_path / "report.json"
    assert run_all.main(["--only", "zfaiss,zhf", "--out", str(out)]) == 0
    report = run_all.run_all(["zfaiss", "zhf", "zbug"], quick=True, out=out)
    entries = report["benchmarks"]
    assert entries["zfaiss"]["status"] == "skipped" and "faiss is not installed" in entries["zfaiss"]["reason"]
    assert entries["zhf"]["status"] == "skipped" and "transformers is not installed" in entries["zhf"]["reason"]
    assert entries["zbug"]["status"] == "failed" and "numpyy" in entries["zbug"]["error"]
    assert run_all.summary_rows(report)[:2] == [("zfaiss", "skipped", "", entries["zfaiss"]["reason"]),
                                                ("zhf", "skipped", "", entries["zhf"]["reason"])]
    assert run_all.main(["--out", str(out)]) == 1


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
@pytest.mark.parametrize("plugins", [False, True])
def test_gpu_check_passes_plugin_flags_only_when_the_plugins_are_installed(tmp_path, plugins):
    """It always passed -n 7 --timeout=60: without pytest-xdist and pytest-timeout the step ended at once (rc=4)."""
    stubs, log = tmp_path / "bin", tmp_path / "calls.log"
    stubs.mkdir()
    (stubs / "python3").write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n'
                                   f'case "$*" in *"import xdist"*) exit {0 if plugins else 1};; esac\nexit 0\n')
    (stubs / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "GPU_CHECK_RES": str(tmp_path / "res")}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    (pytest_call,) = [line for line in log.read_text().splitlines() if line.startswith("-m pytest")]
    assert (" -n 7 --timeout=60 " in pytest_call) == plugins
    said = (tmp_path / "out" / "summary.txt").read_text()
    assert ("pytest: 7 workers" in said) == plugins and ("pytest: one process" in said) != plugins
