"""The examples run as a user runs them (a fresh process, from the command line)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, cwd: Path | None = None) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_example_01_embeds_three_modalities():
    out = run_example("01_embed_three_modalities.py")
    assert "cos(image, text)" in out and "cos(image, audio)" in out


@pytest.mark.slow
def test_example_02_trains_a_tiny_space_above_chance(tmp_path):
    out = run_example("02_train_tiny_space.py", str(tmp_path / "ex02"))
    recall = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in out.splitlines()
              if line.startswith("| ") and "→" in line}
    assert len(recall) == 6 and min(recall.values()) > 10  # chance is 1% of 100 test scenes


@pytest.mark.slow
def test_examples_03_and_04_prompt_and_remember(tmp_path):
    """03 trains a small run with a decoder when there is none (in its working directory), 04
    runs its three processes on it; a missing run, or a run whose world is not reachable from
    the working directory, is one line in both."""
    out = run_example("03_prompt_with_image_and_sound.py", cwd=tmp_path)  # no runs/demo there
    assert "training a small run first" in out
    out = run_example("04_remember_across_sessions.py", "runs/example-03", cwd=tmp_path)
    assert "[process 1]" in out and "[process 2]" in out and "exported" in out
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name, args, cwd, ending in [
        ("04_remember_across_sessions.py", ["runs/none"], tmp_path, "or pass such a run folder"),
        # a mistyped run started minutes of training in 03
        ("03_prompt_with_image_and_sound.py", ["runs/none"], tmp_path, "`mmembed train` wrote"),
        # the run's world is relative to where it was trained: a FileNotFoundError / CalledProcessError
        ("03_prompt_with_image_and_sound.py", ["../runs/example-03"], elsewhere, "the run was trained in"),
        ("04_remember_across_sessions.py", ["../runs/example-03"], elsewhere, "the run was trained in")]:
        done = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 1 and done.stderr.strip().endswith(ending), done.stderr[-2000:]
        assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_example_05_trains_on_a_folder_of_files(tmp_path, tiny_world):
    """A folder per colour built from the tiny world's files: manifests written, a run trained, the
    probe's table printed."""
    import json
    import os

    folder = tmp_path / "files"
    for line in (tiny_world / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        colour = folder / row["objects"][0]["colour"]
        colour.mkdir(parents=True, exist_ok=True)
        for column in ("image", "audio"):
            os.link(tiny_world / row[column], colour / Path(row[column]).name)
        (colour / f"{row['id']}.txt").write_text(row["text"])
    out = run_example("05_train_on_a_folder.py", str(tmp_path / "ex05"), str(folder))
    assert out.startswith("manifests: train ") and "6 classes" in out.splitlines()[0]
    assert "| linear probe | accuracy % |" in out and "| zero-shot | accuracy % |" in out
