import os
import pickle
import re

import pytest
import torch

from mmembed.checkpoint import atomic_write, load_tensors, load_torch_weights, save_tensors
from mmembed.errors import CheckpointError


def test_save_load_bit_identical(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(5, 7, generator=g), "b": torch.randn(7, generator=g).double(),
               "i": torch.arange(10), "h": torch.randn(3, generator=g).to(torch.bfloat16)}
    save_tensors(tmp_path / "m.safetensors", tensors)
    back = load_tensors(tmp_path / "m.safetensors")
    assert back.keys() == tensors.keys()
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype
        assert torch.equal(back[k].view(torch.uint8) if back[k].dtype == torch.bfloat16 else back[k],
                           tensors[k].view(torch.uint8) if tensors[k].dtype == torch.bfloat16 else tensors[k])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    with open(evil, "wb") as f:
        pickle.dump({"w": _Evil(marker)}, f)
    with pytest.raises(CheckpointError, match="refused or unreadable"):
        load_torch_weights(evil)
    assert not marker.exists()
    # The same bytes under a safetensors name are not parsed as a pickle either.
    renamed = tmp_path / "model.safetensors"
    evil.rename(renamed)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_tensors(renamed)
    assert not marker.exists()


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    save_tensors(tmp_path / "m.safetensors", {"w": torch.randn(100, 100)})
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_tensors(tmp_path / "m.safetensors")


def test_failed_write_keeps_previous_file(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def boom(tmp):
        tmp.write_text("partial")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_atomic_writes_get_the_permissions_a_plain_write_would(tmp_path):
    import os

    from mmembed.checkpoint import atomic_write_text

    mask = os.umask(0o022)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        atomic = tmp_path / "atomic.txt"
        # the module read the umask at import; the test machine's is 022 (as on most systems)
        atomic_write_text(atomic, "x")
        assert oct(atomic.stat().st_mode & 0o777) == oct(plain.stat().st_mode & 0o777) == oct(0o644)
    finally:
        os.umask(mask)


def test_a_full_disk_is_an_os_error_naming_the_file(tmp_path, monkeypatch):
    """safetensors' writer reports a full disk as its own SafetensorError (no OSError): the CLI
    showed its traceback. An OSError of the temporary file named the temporary file."""
    import mmembed.checkpoint as checkpoint
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(OSError) as e:
        save_tensors(tmp_path / "model.safetensors", {"w": torch.zeros(2)})
    assert (e.value.errno, e.value.filename) == (28, str(tmp_path / "model.safetensors"))
    monkeypatch.undo()

    def read_only(tmp):
        raise OSError(30, "Read-only file system", str(tmp))

    with pytest.raises(OSError) as e:
        atomic_write(tmp_path / "report.json", read_only)
    assert e.value.filename == str(tmp_path / "report.json") and os.listdir(tmp_path) == []

    def full_write(tmp):  # a failed write() or fsync() names no file at all
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError) as e:
        atomic_write(tmp_path / "report.json", full_write)
    assert e.value.filename == str(tmp_path / "report.json")


def test_a_checkpoint_that_fails_or_a_prune_that_dies_leaves_nothing_behind(tmp_path, monkeypatch):
    """A failed save left its temporary folder on the full disk until the next run; a prune killed
    half-way left an incomplete step_* folder that no later prune or cleanup ever removed."""
    import mmembed.train.state as state

    module = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    for step in (1, 2):
        state.save_checkpoint(tmp_path, module, optimizer, state.Progress(step=step))
    real = state.save_tensors

    def full_at_the_optimizer(path, tensors, metadata=None):
        if path.name == "trainer.safetensors":
            raise OSError(28, "No space left on device", str(path))
        real(path, tensors, metadata)

    monkeypatch.setattr(state, "save_tensors", full_at_the_optimizer)
    with pytest.raises(OSError):
        state.save_checkpoint(tmp_path, module, optimizer, state.Progress(step=3))
    monkeypatch.undo()
    root = tmp_path / state.CKPT_DIR
    assert sorted(p.name for p in root.iterdir()) == ["step_0000001", "step_0000002"]
    (root / "step_0000001" / "model.safetensors").unlink()  # a delete killed after its first file:
    os.replace(root / "step_0000001", root / f".step_0000001.del{os.getpid()}")  # what `_delete` leaves
    state.remove_partial_checkpoints(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step_0000002"]


def test_a_refused_gpt2_pickle_is_one_line_naming_the_global(tmp_path):
    """The GPT-2 path kept torch's six lines, the first advising weights_only=False ("will likely succeed")."""
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(2), "x": _Evil(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        load_torch_weights(tmp_path / "pytorch_model.bin")
    message = str(e.value)
    assert re.search(r"it names \w+\.system;", message) and "\n" not in message and "weights_only" not in message
    assert not marker.exists()


@pytest.mark.parametrize("name", ["pytorch_model.bin", "weights"])
def test_a_safetensors_file_under_another_name_loads(tmp_path, name):
    """A safetensors file named .bin or with no suffix went to torch.load and was refused as a pickle."""
    tensors = {"w": torch.arange(6.0).reshape(2, 3)}
    save_tensors(tmp_path / name, tensors)
    assert torch.equal(load_torch_weights(tmp_path / name)["w"], tensors["w"])
