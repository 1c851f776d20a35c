"""A re-save interrupted at any step leaves the old or the new index, loadable, never a mix.

A kill is simulated before the k-th filesystem step of a save (each `os.replace`, `os.rename`
and `shutil.rmtree`) for every k, in process (an exception that no `except Exception` clean-up
sees) and, in the slow test, with `os._exit` in a child process.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mmembed.errors import UserError
from mmembed.retrieval import Index, index_format, persist

D = 8


class Killed(BaseException):
    """Stands in for SIGKILL: clean-up code that catches `Exception` never runs."""


def make(seed: int, n: int) -> Index:
    idx = Index(D, fingerprint=f"fake-{seed}")
    idx.add(torch.randn(n, D, generator=torch.Generator().manual_seed(seed)), "text",
            [{"seed": seed, "row": i, "caption": f"index {seed} row {i}"} for i in range(n)])
    return idx


def snapshot(idx: Index) -> tuple:
    ids = idx.ids()
    return ids, torch.stack([idx.vector(i) for i in ids]), [idx.metadata(i) for i in ids], idx.fingerprint


def same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and torch.equal(a[1], b[1]) and a[2] == b[2] and a[3] == b[3]


def save_killed_before_step(idx: Index, folder: Path, k: int) -> bool:
    """Save, dying before the k-th filesystem step; True if the save finished first."""
    done = 0

    def wrap(real):
        def step(*args, **kwargs):
            nonlocal done
            if done + 1 == k:
                raise Killed(f"step {k}")
            done += 1
            return real(*args, **kwargs)
        return step

    with pytest.MonkeyPatch.context() as mp:
        for module, name in [(os, "replace"), (os, "rename"), (shutil, "rmtree")]:
            mp.setattr(module, name, wrap(getattr(module, name)))
        try:
            idx.save(folder)
        except Killed:
            return False
    return True


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir())


def test_resave_killed_at_every_step_leaves_old_or_new(tmp_path):
    old, new = make(1, 5), make(2, 7)
    k, outcomes = 0, []
    while True:
        k += 1
        folder = tmp_path / f"k{k}" / "ix"
        old.save(folder)
        finished = save_killed_before_step(new, folder, k)
        got = snapshot(Index.load(folder))  # stale temporaries beside it are ignored
        assert same(got, snapshot(old)) or same(got, snapshot(new)), f"killed before step {k}: a mix"
        outcomes.append("new" if same(got, snapshot(new)) else "old")
        make(3, 2).save(folder)  # the next save cleans up what the killed one left
        assert siblings(folder) == ["ix"] and same(snapshot(Index.load(folder)), snapshot(make(3, 2)))
        if finished:
            break
    assert k >= 4 and outcomes[0] == "old" and outcomes[-1] == "new"


def test_first_save_killed_at_every_step(tmp_path):
    idx = make(1, 4)
    for k in range(1, 20):
        folder = tmp_path / f"k{k}" / "ix"
        finished = save_killed_before_step(idx, folder, k)
        if folder.exists() or finished:
            assert same(snapshot(Index.load(folder)), snapshot(idx))
        else:
            with pytest.raises(UserError, match="index folder not found"):
                Index.load(folder)
        idx.save(folder)
        assert siblings(folder) == ["ix"]
        if finished:
            return
    raise AssertionError("the save never finished")


def test_new_folder_gets_normal_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    folder = make(1, 3).save(tmp_path / "a" / "b" / "ix")
    assert same(snapshot(Index.load(folder)), snapshot(make(1, 3)))
    assert siblings(folder) == ["ix"]
    for path in [folder.parent, folder]:
        assert path.stat().st_mode & 0o777 == 0o777 & ~umask, path
    for path in folder.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_ordinary_error_mid_swap_keeps_old_and_cleans_up(tmp_path, monkeypatch):
    folder = tmp_path / "ix"
    make(1, 5).save(folder)
    real, failed = os.rename, []

    def full_disk(src, dst):
        if Path(dst) == folder and not failed:  # the new folder moving in
            failed.append(src)
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "rename", full_disk)
    with pytest.raises(OSError, match="No space"):
        make(2, 7).save(folder)
    monkeypatch.undo()
    assert same(snapshot(Index.load(folder)), snapshot(make(1, 5)))
    assert siblings(folder) == ["ix"]


def test_refuses_to_replace_a_folder_holding_other_files(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(UserError, match="model.safetensors"):
        make(1, 3).save(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == b"weights"
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    assert same(snapshot(Index.load(make(1, 3).save(tmp_path / "empty"))), snapshot(make(1, 3)))


def test_an_index_inside_another_index_folder_is_refused(tmp_path):
    """Saved as ix/sub, it made ix hold another file, and ix's next save was refused (or, had it not
    been, would have deleted it): refused at its own save, naming the folder around it."""
    make(1, 3).save(tmp_path / "ix")
    with pytest.raises(UserError, match=r"it is inside the index folder .*ix, which a save of that index replaces"):
        make(2, 3).save(tmp_path / "ix" / "sub" / "inner")
    assert not (tmp_path / "ix" / "sub").exists()
    make(1, 4).save(tmp_path / "ix")  # the outer one saves again
    make(2, 3).save(tmp_path / "beside")


def test_reader_during_a_resave_gets_old_or_new(tmp_path, monkeypatch):
    folder = tmp_path / "ix"
    make(1, 5).save(folder)
    real, calls = index_format.load_tensors, []

    def resave_then_load(path):
        if not calls:  # the reader has the old header; a writer swaps in a new index now
            make(2, 7).save(folder)
        calls.append(path)
        return real(path)

    monkeypatch.setattr(index_format, "load_tensors", resave_then_load)
    assert same(snapshot(Index.load(folder)), snapshot(make(2, 7)))


CHILD = textwrap.dedent("""
    import os, shutil, sys, torch
    from tests.retrieval.test_persist_atomic import make
    folder, k, done = sys.argv[1], int(sys.argv[2]), 0
    def wrap(real):
        def step(*args, **kwargs):
            global done
            if done + 1 == k:
                os._exit(9)
            done += 1
            return real(*args, **kwargs)
        return step
    for module, name in [(os, "replace"), (os, "rename"), (shutil, "rmtree")]:
        setattr(module, name, wrap(getattr(module, name)))
    make(2, 7).save(folder)
""")


@pytest.mark.slow
def test_process_killed_at_every_step_of_a_resave(tmp_path):
    root = Path(__file__).resolve().parents[2]
    for k in range(1, 20):
        folder = tmp_path / f"k{k}" / "ix"
        make(1, 5).save(folder)
        rc = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(k)], cwd=root, timeout=120).returncode
        got = snapshot(Index.load(folder))
        assert same(got, snapshot(make(1, 5))) or same(got, snapshot(make(2, 7))), f"killed before step {k}"
        make(3, 2).save(folder)
        assert siblings(folder) == ["ix"]
        if rc == 0:
            assert k >= 4
            return
        assert rc == 9
    raise AssertionError("the save never finished")


@pytest.mark.parametrize("resave", [False, True])
def test_ctrl_c_mid_save_leaves_no_staging_folder(tmp_path, monkeypatch, resave):
    """Ctrl-C after the files were staged left the whole `<out>.tmp-*` folder (MBs of vectors) beside --out."""
    folder = tmp_path / "sub" / "ix"
    if resave:
        make(1, 5).save(folder)
    real = persist._write_files

    def interrupted(*args):
        real(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(persist, "_write_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make(2, 7).save(folder)
    monkeypatch.undo()
    assert siblings(folder) == (["ix"] if resave else [])
    if resave:
        assert same(snapshot(Index.load(folder)), snapshot(make(1, 5)))
