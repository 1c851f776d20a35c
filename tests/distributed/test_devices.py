"""One GPU per process: a torchrun job with more processes on a machine than it has GPUs is
refused on every rank with one clear line, before any process joins the group."""

import pytest
import torch

from mmembed.errors import UserError
from mmembed.train.distributed import init_distributed


@pytest.mark.parametrize("local_rank", [0, 1])
def test_more_processes_than_gpus_is_one_clear_line_on_every_rank(monkeypatch, local_rank):
    for name, value in {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": str(local_rank)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: pytest.fail("set_device reached"))
    with pytest.raises(UserError, match=r"2 processes on this machine but CUDA sees 1 GPU.*--nproc-per-node 1") as e:
        init_distributed("auto")
    assert "\n" not in str(e.value) and "train.device=cpu" in str(e.value)


def test_a_name_that_is_no_device_is_one_short_line():
    """train.device=gpu printed torch's list of some thirty device types."""
    from mmembed.errors import UserError
    from mmembed.train.distributed import checked_device

    with pytest.raises(UserError, match=r"^device 'gpu' is not a device name \(auto, cpu, cuda, cuda:N or mps\)$"):
        checked_device("gpu")


def test_cuda_under_torchrun_on_a_machine_without_a_gpu_is_one_line(monkeypatch):
    """train.device=cuda with several processes gave cuda:LOCAL_RANK unchecked: a traceback per rank
    at the first tensor moved ("Found no NVIDIA driver"), after the run folder was written."""
    from mmembed.train.distributed import World, resolve_device

    world = World(rank=1, size=2, local_rank=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match=r"^device 'cuda:1': torch sees no CUDA GPU on this machine"):
        resolve_device("cuda", world)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda", world) == torch.device("cuda:1")


def test_mps_on_a_machine_without_it_is_one_line_before_any_work():
    """device=mps where torch has no MPS gave torch's traceback ("not linked with support for mps
    devices"); as decoder.train.device it came after the whole align stage."""
    from mmembed.config import load_config
    from mmembed.errors import ConfigError
    from mmembed.train.distributed import checked_device
    from mmembed.train.preflight import check_config

    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(UserError, match=r"^device 'mps': torch sees no Apple GPU \(MPS\) on this machine"):
        checked_device("mps")
    with pytest.raises(ConfigError, match=r"decoder\.train\.device.*no Apple GPU"):
        check_config(load_config("demo", ["decoder.train.device=mps", "data.root=/nonexistent/world"]))


def test_a_ranks_own_error_leaves_it_deaf_to_torchrun_until_it_has_said_it(monkeypatch):
    """A UserError every rank raises (a manifest of which nothing can be read) put back SIGTERM's
    default before the line was printed: torchrun, seeing the faster rank exit, killed the other
    one silently (exit -15, its error line lost)."""
    import signal

    import mmembed.train.distributed as distributed
    from mmembed.train.distributed import World, distributed_command

    monkeypatch.setattr(distributed, "init_distributed", lambda *a, **k: World(rank=1, size=2, local_rank=1))
    monkeypatch.setattr(distributed, "shutdown", lambda: None)
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(UserError, match="nothing could be read"):
            with distributed_command("cpu"):
                raise UserError("nothing could be read")
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)
