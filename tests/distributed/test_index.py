"""`torchrun -m mmembed index` on 2 processes writes the index one process writes."""

import subprocess
import sys

import pytest
import torch

from mmembed.retrieval import Index
from tests.conftest import tiny_config
from tests.distributed.workers import free_env

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _run(cmd, returncode=0):
    r = subprocess.run([sys.executable, *map(str, cmd)], capture_output=True, text=True, timeout=300, env=free_env())
    assert r.returncode == returncode, r.stderr[-3000:]
    return r


@pytest.mark.slow  # 22 s of two processes: the default suite took 10:06 in a slow stretch
def test_two_process_index_equals_one_process_index(tiny_world, tmp_path):
    run = tmp_path / "run"
    _run(["-m", "mmembed", "train", tiny_config(tiny_world, run, epochs=1, batch_size=16)])
    manifest = tiny_world / "train.jsonl"  # 51 rows: 7 batches of 8 per modality, dealt 4 + 3
    _run(["-m", "mmembed", "index", run, "--manifest", manifest, "--out", tmp_path / "one", "--batch-size", 8])
    r = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mmembed", "index", run,
              "--manifest", manifest, "--out", tmp_path / "two", "--batch-size", 8])
    assert r.stdout.count("indexed ") == 1
    one, two = Index.load(tmp_path / "one"), Index.load(tmp_path / "two")
    assert len(one) == len(two) > 0
    assert one.ids() == two.ids()
    (va, ma, meta_a), (vb, mb, meta_b) = one.items(), two.items()
    assert torch.equal(va, vb)
    assert ma == mb and meta_a == meta_b
    # a manifest of which nothing can be read: the one line on every rank (rank 1 said it lost rank 0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(f'{{"image": "gone{i}.png"}}\n' for i in range(3)))
    r = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mmembed", "index", run,
              "--manifest", bad, "--out", tmp_path / "none"], returncode=1)
    errors = [line for line in r.stderr.splitlines() if line.startswith("mmembed: error:")]
    assert len(errors) == 2 and all("no item could be read" in line for line in errors), r.stderr[-2000:]
