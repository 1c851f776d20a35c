"""A world that a run or a demo reads is not replaced under it: the readers hold the world's folder
shared, and a generator (which needs it alone) is refused until they end. A second demo into the
folder of a running one is refused for the whole demo, not only while a stage trains."""

from __future__ import annotations

import threading

import pytest
import yaml

from mmembed.data.synth import generate_world
from mmembed.errors import UserError
from tests.conftest import lock_holder, tiny_config


def _in_another_thread(work) -> str | None:
    """Run `work` in another thread (which takes locks as another process would); its UserError, or None."""
    refused = []

    def run():
        try:
            work()
        except UserError as e:
            refused.append(str(e))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return refused[0] if refused else None


def _taken(lock):
    """A function that takes `lock` (a context manager) and lets it go."""
    def take():
        with lock:
            pass
    return take


def test_a_world_being_trained_on_is_not_replaced_until_the_run_ends(tmp_path):
    """`mmembed data synth --overwrite`, or a run or demo with other data.synth values, deleted the
    world a running trainer read (a demo with a smaller world deleted the 6,000 scenes under one)."""
    from mmembed.config import load_config
    from mmembed.train.align import train_align

    root = tmp_path / "w"
    path = tiny_config(root, tmp_path / "run", epochs=1)
    raw = yaml.safe_load(path.read_text())
    raw["data"]["synth"] = {"n": 40, "image_size": 32}  # the run makes its world, then reads it
    path.write_text(yaml.safe_dump(raw))
    seen = []

    def meanwhile(event, *_):
        if event == "step" and not seen:
            seen.append(_in_another_thread(lambda: generate_world(root, n=20, image_size=32, replace=True)))
            seen.append(_in_another_thread(lambda: generate_world(root, n=20, image_size=32, overwrite=True)))
            # a reader of the same world is welcome (another run, or lookups)
            seen.append(_in_another_thread(lambda: generate_world(root, n=40, image_size=32)))

    train_align(load_config(path), callbacks=[meanwhile])
    assert seen[0] is not None and "is in use by another process" in seen[0], seen
    assert seen[1] is not None and "is in use by another process" in seen[1], seen
    assert seen[2] is None
    assert generate_world(root, n=20, image_size=32, replace=True).params["n"] == 20  # the run ended: its lock went


def test_a_demo_holds_its_folder_and_its_world_from_start_to_report(tmp_path, monkeypatch):
    """The demo locked its folder only while a stage trained: a second `demo --out SAME` between
    stages wiped the running one's joint run; and a demo of another world size replaced the world
    while the first evaluated on it."""
    import mmembed.demo as demo
    from mmembed.train.run_dir import run_lock

    out, root = tmp_path / "out", tmp_path / "w"
    seen = {}

    def pipeline(config, run_dir, bind, t0):  # what the demo does once its checks have passed
        seen["demo"] = _in_another_thread(lambda: _taken(run_lock(out))())
        seen["world"] = _in_another_thread(lambda: generate_world(root, n=20, image_size=32, replace=True))
        return run_dir / "report.md"

    monkeypatch.setattr(demo, "_run_demo", pipeline)
    demo.run_demo("demo", [f"data.root={root}", "data.synth.n=40", "data.synth.image_size=32", "decoder=null"],
                  out_dir=str(out))
    assert seen["demo"] is not None and "in use by a trainer" in seen["demo"], seen
    assert seen["world"] is not None and "is in use by another process" in seen["world"], seen
    assert generate_world(root, n=20, image_size=32, replace=True).params["n"] == 20  # both released at its end


def test_a_second_demo_into_a_running_ones_folder_is_one_line(tmp_path, capsys):
    from mmembed.cli import main

    out = tmp_path / "out"
    holder = lock_holder(out)
    try:
        assert main(["demo", "--out", str(out)]) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"is in use by another demo or trainer (pid {holder.pid})" in err, err


def test_a_demo_into_the_working_directory_is_refused_first(tmp_path, monkeypatch, capsys):
    """`--out .` (or a folder above the working directory) failed after the checks, in the align
    stage's overwrite ("which contains the working directory"); the world there was called a user's."""
    from mmembed.cli import main

    monkeypatch.chdir(tmp_path)
    for out in (".", str(tmp_path.parent)):
        assert main(["demo", "--out", out]) == 2
        err = capsys.readouterr().err.strip()
        assert "holds the working directory, and the demo replaces its folder" in err, err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("held", ["reader", "writer"])
def test_the_shared_lock_admits_readers_and_refuses_a_writer(tmp_path, held):
    from mmembed.file_lock import exclusive, shared

    folder = tmp_path / "f"
    folder.mkdir()
    take = shared if held == "reader" else exclusive
    with take(folder, lambda holder: f"busy: {holder}"):
        assert _in_another_thread(_taken(exclusive(folder, lambda h: f"busy: {h}"))) == "busy: another process"
        other_reader = _in_another_thread(_taken(shared(folder, lambda h: f"busy: {h}")))
        assert other_reader == (None if held == "reader" else "busy: another process")
        with shared(folder, str):  # re-entrant in the thread that holds it
            pass
        if held == "reader":  # upgrading would drop the shared lock first (flock): refused instead
            with pytest.raises(UserError, match="this process, which reads it"):
                with exclusive(folder, str):
                    pass


def test_a_training_run_holds_its_world_from_the_align_stage_through_the_decoder_stage(tmp_path, monkeypatch):
    """The align stage let the world go and the decoder stage took it again: a `data synth
    --overwrite` between them made the decoder train on another world than the space's."""
    from mmembed.config import save_config
    from mmembed.train import align, decoder, train
    from tests.train.test_decoder_stage import DECODER

    root = tmp_path / "w"
    generate_world(root, n=40, image_size=32)
    path = tiny_config(root, tmp_path / "run", epochs=1)
    raw = yaml.safe_load(path.read_text())
    raw["data"]["synth"] = {"n": 40, "image_size": 32}
    raw["decoder"] = DECODER
    path.write_text(yaml.safe_dump(raw))
    seen = []

    def align_stage(config, resume=False, **_):  # what the stage leaves: its config.yaml
        save_config(config, tmp_path / "run" / "config.yaml")
        return tmp_path / "run"

    def decoder_stage(config, **_):
        seen.append(_in_another_thread(lambda: generate_world(root, n=20, image_size=32, overwrite=True)))
        return tmp_path / "run"

    monkeypatch.setattr(align, "train_align", align_stage)
    monkeypatch.setattr(decoder, "train_decoder", decoder_stage)
    from mmembed.config import load_config

    train(load_config(path))
    assert seen[0] is not None and "is in use by another process" in seen[0], seen


def test_a_world_replaced_between_its_making_and_the_lock_is_refused(tmp_path, monkeypatch):
    """The world was checked before the readers' lock was taken: a generator in between went unseen."""
    from mmembed.config import load_config
    from mmembed.data.synth import world_folder
    from mmembed.train.data_setup import data_in_use

    root = tmp_path / "w"
    path = tiny_config(root, tmp_path / "run", epochs=1)
    raw = yaml.safe_load(path.read_text())
    raw["data"]["synth"] = {"n": 40, "image_size": 32}
    path.write_text(yaml.safe_dump(raw))
    real = world_folder.reading

    def late(folder):  # another process replaces the world just before this one locks it
        generate_world(root, n=20, image_size=32, overwrite=True)
        return real(folder)

    monkeypatch.setattr(world_folder, "reading", late)
    with pytest.raises(UserError, match="its synthetic world was replaced by another process as this run started"):
        with data_in_use(load_config(path).data):
            pass
