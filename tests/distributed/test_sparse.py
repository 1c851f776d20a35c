"""`torchrun -m mmembed train` on 2 CPU processes (gloo) over rows that lack modalities: a tower no
process has rows for stays as one process leaves it; a share of unreadable rows says what to do."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from mmembed.checkpoint import load_tensors
from mmembed.data.loader import EpochBatchSampler
from mmembed.train.state import latest_checkpoint
from tests.conftest import tiny_config
from tests.distributed.test_torchrun import _no_dropout, _run, _torchrun, pytestmark  # noqa: F401
from tests.distributed.workers import free_env


def _manifest(world, name, edit):
    """The world's first 48 training rows, each passed through `edit(index, row)`."""
    rows = [json.loads(line) for line in (world / "train.jsonl").read_text().splitlines()][:48]
    (world / name).write_text("".join(json.dumps(edit(i, row)) + "\n" for i, row in enumerate(rows)))
    return name


def _sparse(i, row):
    """Audio in 4 rows of 48, no image in every third row."""
    return {k: v for k, v in row.items() if not (k == "audio" and i % 12 or k == "image" and i % 3 == 1)}


@pytest.mark.parametrize("fsdp", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["ddp", "fsdp"])
def test_a_tower_no_process_has_rows_for_is_left_as_on_one_process(tiny_world, tmp_path, fsdp):
    """Under DDP a tower no rank used got zero gradients, and AdamW moved it (momentum, weight decay) and
    counted its steps; rank 1 also logged an INFO line ("process 1 of 2 joined")."""
    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    data = {"data.train": _manifest(world, "sparse.jsonl", _sparse)}
    one = tiny_config(world, tmp_path / "one", _no_dropout(), batch_size=16, epochs=2)
    two = tiny_config(world, tmp_path / "two", _no_dropout(), batch_size=8, epochs=2, fsdp=fsdp)
    overrides = [f"{k}={v}" for k, v in data.items()]
    _run([sys.executable, "-m", "mmembed", "train", one, *overrides])
    r = _run(_torchrun(2, "train", two, *overrides))
    assert "process 1 of 2 joined" not in r.stderr
    for name in ("model.safetensors", "trainer.safetensors"):  # weights, AdamW moments and step counts
        wa = load_tensors(latest_checkpoint(tmp_path / "one") / name)
        wb = load_tensors(latest_checkpoint(tmp_path / "two") / name)
        keys = [k for k in wa if not k.startswith("rng.")]
        assert keys == [k for k in wb if not k.startswith("rng.")]
        for k in keys:
            torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-4, msg=k)


def test_a_share_of_unreadable_rows_names_the_remedy(tiny_world, tmp_path):
    """Every row rank 1 was dealt had a missing image: both ranks said all batches had no usable row,
    though each global batch had 8."""
    world = tmp_path / "world"
    shutil.copytree(tiny_world, world)
    sampler = EpochBatchSampler(48, 8, shuffle=True, seed=0, drop_last=True, rank=1, world_size=2)
    dealt = {i for batch in sampler for i, _ in batch}

    def missing(i, row):
        return {**row, "image": "images/missing.png"} if i in dealt else row

    two = tiny_config(world, tmp_path / "two", _no_dropout(), batch_size=8, epochs=1, seed=0)
    r = subprocess.run(_torchrun(2, "train", two, f"data.train={_manifest(world, 'half.jsonl', missing)}"),
                       capture_output=True, text=True, timeout=300, env=free_env())
    assert r.returncode != 0
    assert "only some process's share had no usable row" in r.stderr, r.stderr[-3000:]
    assert "use fewer processes or a larger batch_size" in r.stderr
