"""The synthetic world's render workers: Ctrl-C is the caller's to handle, and none outlives a
killed generator or keeps its world locked."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmembed.data.synth import generate
from mmembed.data.synth.generate import generate_world
from mmembed.file_lock import exclusive

REPO = Path(__file__).resolve().parents[2]
SMALL = {"n": 200, "seed": 3, "image_size": 16, "n_heldout": 20}  # 220 scenes: 4 chunks of the pool
linux_fork = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forks, and reads /proc")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _interrupt_workers_then(monkeypatch, then=None) -> list[multiprocessing.Process]:
    """While the pool renders, send Ctrl-C's SIGINT to each of its workers (a terminal sends it to
    the whole group); returns the list those workers will be in."""
    write_manifests, before, workers = generate._write_manifests, set(multiprocessing.active_children()), []

    def meanwhile(*args, **kwargs):
        workers.extend(set(multiprocessing.active_children()) - before)  # the pool's, started by now
        for worker in workers:
            os.kill(worker.pid, signal.SIGINT)
        if then is not None:
            raise then
        return write_manifests(*args, **kwargs)

    monkeypatch.setattr(generate, "_write_manifests", meanwhile)
    return workers


@linux_fork
def test_render_workers_leave_ctrl_c_to_the_caller(tmp_path, monkeypatch, capfd):
    """Ctrl-C reached the render workers too: one printed a KeyboardInterrupt traceback, or sent the
    interrupt back as its chunk's result."""
    reference = generate_world(tmp_path / "one", workers=1, **SMALL)
    workers = _interrupt_workers_then(monkeypatch)
    try:
        generate_world(tmp_path / "two", workers=2, **SMALL)
    except KeyboardInterrupt:
        pytest.fail("a render worker was interrupted by the SIGINT meant for its parent")
    assert len(workers) == 2 and "Traceback" not in capfd.readouterr().err
    assert _files(tmp_path / "two") == _files(reference.root)


@linux_fork
def test_ctrl_c_in_the_caller_leaves_no_worker_behind(tmp_path, monkeypatch, capfd):
    """Ctrl-C printed a render worker's KeyboardInterrupt traceback; and the interrupted generator
    returns only once its workers are gone."""
    workers = _interrupt_workers_then(monkeypatch, then=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        generate_world(tmp_path / "w", workers=2, **SMALL)
    assert len(workers) == 2 and not any(w.is_alive() for w in workers)
    assert "Traceback" not in capfd.readouterr().err
    assert not (tmp_path / "w" / "world.json").exists()  # left unfinished, and marked so


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (command)"
        except (OSError, IndexError):
            continue  # ended while listed
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _poll(condition, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.slow
@linux_fork
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_a_killed_generator_leaves_no_worker_and_no_lock(tmp_path, sig):
    """Killing `mmembed data synth` left its render workers running forever, holding the world's
    folder lock, so the next generator was refused as "being written by another process"."""
    root = tmp_path / "w"
    script = (f"from mmembed.data.synth.generate import generate_world\n"
              f"generate_world({str(root)!r}, n=5000, seed=4, workers=2)")
    main = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        rendering = lambda: len(_children(main.pid)) == 2 and any((root / "images").glob("*.png"))  # noqa: E731
        assert _poll(rendering, 120), "the generator never started its two workers"
        workers = _children(main.pid)
        main.send_signal(sig)  # the main process only, as `kill PID` or the OOM killer does
        main.wait(60)
        assert _poll(lambda: not any(_alive(w) for w in workers), 30), "render workers outlived their parent"
        with exclusive(root, lambda holder: f"{root} is still locked by {holder}"):
            pass
    finally:
        try:
            os.killpg(main.pid, signal.SIGKILL)  # the group this test started: the generator and its workers
        except ProcessLookupError:
            pass
        main.wait()
