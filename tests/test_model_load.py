"""Opening a run folder (model_load.py): a run whose align stage has not finished says so and how to
continue it, never "is it a run directory?"."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import mmembed as mm
from mmembed.cli import main
from mmembed.errors import CheckpointError
from tests.conftest import lock_holder


def _stopped_run(root: Path) -> Path:
    """A run folder as a trainer killed in its align stage leaves it: config, tokenizer, a checkpoint, no weights."""
    run = root / "my run"
    ckpt = run / "checkpoints" / "step_0000078"
    ckpt.mkdir(parents=True)
    for name in ("config.yaml", "tokenizer.json", "metrics.jsonl"):
        (run / name).write_text("", encoding="utf-8")
    for name in ("model.safetensors", "trainer.safetensors", "trainer.json"):
        (ckpt / name).write_bytes(b"")
    return run


def test_a_run_stopped_in_its_align_stage_names_the_resume_command(tmp_path, capsys):
    """A run killed before its weights were written was called "not a run directory" (index, generate, load)."""
    run = _stopped_run(tmp_path)
    resume = shlex.join(["mmembed", "train", str(run / "config.yaml"), "--resume", f"train.out_dir={run}"])
    with pytest.raises(CheckpointError) as e:
        mm.load(run)
    assert str(e.value) == (f"the training of {run} has not finished (no model.safetensors), so it cannot be loaded: "
                            f"continue it with `{resume}` (its last checkpoint is {run / 'checkpoints/step_0000078'})")
    assert main(["generate", str(run), "--prompt", "a prompt"]) == 2
    assert capsys.readouterr().err == f"mmembed: error: {e.value}\n"


def test_the_resume_command_of_a_run_given_by_a_relative_path_works_from_anywhere(tmp_path, monkeypatch):
    """`mm.load("run")` named `mmembed train run/config.yaml --resume train.out_dir=run`: relative."""
    run = _stopped_run(tmp_path)
    monkeypatch.chdir(run.parent)
    resume = shlex.join(["mmembed", "train", str(run / "config.yaml"), "--resume", f"train.out_dir={run}"])
    with pytest.raises(CheckpointError, match=re.escape(f"`{resume}`")):
        mm.load(run.name)


def test_the_resume_command_goes_to_the_folder_the_run_was_started_in(tiny_world, tmp_path, monkeypatch, capsys):
    """A run trained with a relative data.root named `mmembed train RUN/config.yaml --resume ...`, which from
    any other folder failed: "training manifest not found: world/train.jsonl"."""
    from mmembed.config import load_config, started_in
    from tests.conftest import tiny_config

    monkeypatch.chdir(tiny_world.parent)
    config = tiny_config(Path(tiny_world.name), tmp_path / "run", epochs=1)  # data.root relative to here
    run = tmp_path / "run"
    assert main(["train", str(config), "train.max_steps=2"]) == 0
    assert started_in(run / "config.yaml") == tiny_world.parent
    assert load_config(run / "config.yaml").data.root == tiny_world.name  # as given: the comment line is no key
    (run / "model.safetensors").unlink()  # as a trainer killed in its align stage leaves it
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(CheckpointError) as e:
        mm.load(run)
    command = re.search(r"continue it with `(.*)`", str(e.value)).group(1)
    cd, _, train = command.partition(" && ")
    assert shlex.split(cd) == ["cd", str(tiny_world.parent)]
    # the resume command without its cd: the error now says where to run it (it said "not found" alone)
    assert main(shlex.split(train)[1:]) == 2
    err = capsys.readouterr().err
    assert "training manifest not found" in err and f"cd {shlex.quote(str(tiny_world.parent))} first)" in err
    monkeypatch.chdir(shlex.split(cd)[1])
    assert main(shlex.split(train)[1:]) == 0
    assert mm.load(run).fingerprint
    monkeypatch.chdir(tiny_world.parent)  # from the folder itself, no cd
    (run / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"continue it with `{shlex.join(['mmembed', 'train'])}")):
        mm.load(run)


def test_a_run_started_in_a_folder_whose_name_is_not_utf8_records_it(tmp_path):
    """Its config.yaml could not be written (UnicodeEncodeError: surrogates not allowed): the run crashed."""
    import os

    from mmembed.config import Config, save_config, started_in

    where = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9"))
    save_config(Config(), tmp_path / "config.yaml", where)
    assert started_in(tmp_path / "config.yaml") == where
    (tmp_path / "config.yaml").read_text(encoding="ascii").splitlines()[0].encode("ascii")


def test_a_run_still_training_says_so_and_names_its_trainer(tmp_path):
    """A run under way was called "not a run directory"; opening it must not take or write its lock."""
    run = _stopped_run(tmp_path)
    holder = lock_holder(run)
    try:
        with pytest.raises(CheckpointError, match=rf"^{tmp_path}/my run is still training \(pid {holder.pid} holds "
                                                  r"its \.lock; .*\), so it cannot be loaded yet: wait for it to finish$"):
            mm.load(run)
        assert (run / ".lock").read_text().strip() == str(holder.pid)
    finally:
        holder.kill()
        holder.wait()


def test_a_folder_that_is_no_run_is_still_said_to_be_none(tmp_path):
    (tmp_path / "some").mkdir()
    (tmp_path / "some" / "checkpoints").mkdir()  # a checkpoints folder alone is no run's
    with pytest.raises(CheckpointError, match=r"some holds no model\.safetensors \(is it a run directory\?\)"):
        mm.load(tmp_path / "some")


def test_a_decoder_copied_onto_another_space_is_refused(tmp_path, capsys):
    """A decoder.safetensors copied next to another run's model.safetensors loaded and answered from
    vectors it never read ("yes" for "which colour"), without a word; a decoder saved before the
    space was recorded still loads."""
    import shutil

    from mmembed.checkpoint import load_tensors, save_tensors, tensor_metadata
    from mmembed.decoder import DECODER_WEIGHTS
    from tests.conftest import tiny_model
    from tests.memory.test_session import with_decoder

    trained = with_decoder(tiny_model(0))
    trained.save(tmp_path / "a")
    assert tensor_metadata(tmp_path / "a" / DECODER_WEIGHTS) == {"space_fingerprint": trained.fingerprint}
    assert mm.load(tmp_path / "a").prompt_model is not None
    other = with_decoder(tiny_model(1))
    other.save(tmp_path / "b")
    shutil.copy(tmp_path / "a" / DECODER_WEIGHTS, tmp_path / "b" / DECODER_WEIGHTS)
    with pytest.raises(CheckpointError, match=rf"decoder\.safetensors was trained on another shared space "
                                              rf"\(fingerprint {trained.fingerprint}; this run's model\.safetensors "
                                              rf"is {other.fingerprint}\)"):
        mm.load(tmp_path / "b")
    assert main(["generate", str(tmp_path / "b"), "--prompt", "hi"]) == 2
    assert "trained on another shared space" in capsys.readouterr().err
    save_tensors(tmp_path / "b" / DECODER_WEIGHTS, load_tensors(tmp_path / "a" / DECODER_WEIGHTS))  # no record
    assert mm.load(tmp_path / "b").prompt_model is not None
