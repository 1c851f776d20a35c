"""What rank 0 alone refuses is refused on every rank, as the same one line; what a lost run's
line tells the user to do is what the restart will accept."""

import pytest
import torch
import torch.multiprocessing as mp

from mmembed.errors import UserError
from mmembed.train.distributed import _resume_hint
from mmembed.train.run_dir import UNSTARTED, prepare_run_dir, run_lock
from tests.distributed.workers import W, refusal_worker

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _outcomes(folder, case) -> list[str]:
    mp.spawn(refusal_worker, args=(str(folder / "init"), str(folder), case), nprocs=W, join=True)
    return [(folder / f"rank{r}.txt").read_text() for r in range(W)]


def test_a_run_folder_another_trainer_holds_is_refused_on_every_rank(tmp_path):
    """The lock was taken on rank 0 after the refusals were shared: rank 1 went on and lost its peer."""
    (tmp_path / "run").mkdir()
    with run_lock(tmp_path / "run"):
        outcomes = _outcomes(tmp_path, "lock")
    assert outcomes[0].startswith("UserError: ") and "is in use by a trainer" in outcomes[0], outcomes
    assert outcomes[1] == outcomes[0]


def test_an_error_rank_0_raises_in_main_first_is_raised_on_every_rank(tmp_path):
    """Rank 1 waited in main_first's barrier, then said it had lost contact with rank 0."""
    assert _outcomes(tmp_path, "main_first") == ["ConfigError: data.train: not found"] * W


def test_a_config_that_differs_between_the_processes_is_refused_on_every_rank(tmp_path):
    """Two nodes started with different batch sizes trained on a corrupted global batch, then hung for
    train.dist_timeout_minutes and recommended --resume."""
    expected = ("ConfigError: the config differs between the processes: train.batch_size is 16 on rank 0 and 4 on "
                "rank 1 (start every process with the same command)")
    assert _outcomes(tmp_path, "config") == [expected] * W


@pytest.mark.parametrize("files", [(), (UNSTARTED, "config.yaml"), ("config.yaml", "tokenizer.json"),
                                   ("config.yaml", "metrics.jsonl")])
def test_the_hint_of_a_run_lost_before_its_first_checkpoint_is_what_a_restart_accepts(tmp_path, files):
    """It said "start the run again" where the folder held the start's files, which a plain restart refuses."""
    run = tmp_path / "run"
    run.mkdir()
    for name in files:
        (run / name).write_text("")
    hint = _resume_hint(run)
    assert hint.startswith("; no checkpoint was written yet: start the run again")
    try:
        prepare_run_dir(run, resume=False, overwrite=False)
        refused = False
    except UserError as e:
        refused = True
        assert "--overwrite" in str(e)
    assert hint.endswith(" with --overwrite") == refused
    assert refused == (files not in ((), (UNSTARTED, "config.yaml")))


def _raised_while_handling(*errors: BaseException) -> BaseException:
    """The last of `errors`, raised while handling the one before it, and so on (its __context__ chain)."""
    try:
        if len(errors) == 1:
            raise errors[0]
        try:
            raise _raised_while_handling(*errors[:-1])
        except BaseException:
            raise errors[-1]  # noqa: B904 - the implicit context is the point
    except BaseException as e:
        return e


def test_a_stop_unwound_through_dataloader_workers_is_still_said_in_one_line():
    """With data.num_workers > 0, torchrun's SIGTERM killed the workers too, and PyTorch's "DataLoader worker
    (pid N) is killed by signal: Terminated." replaced the stop being unwound: 86 lines of traceback and no
    line; and a SIGTERM was called "another process of the run failed: its error is above" when nothing had."""
    from mmembed.train.distributed import _stopped, _Terminated

    worker = RuntimeError("DataLoader worker (pid 19184) is killed by signal: Terminated.")
    stopped = _stopped(_raised_while_handling(_Terminated(), worker), 1, None)
    assert stopped.startswith("rank 1: stopped by SIGTERM (torchrun sends it to every process once one has ended")
    peer = RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error: Connection reset by peer")
    lost = _stopped(_raised_while_handling(peer, _Terminated(), worker), 0, None)
    assert lost == "rank 0: lost contact with another process of the run ([gloo/transport/tcp/pair.cc:545] Read " \
                   "error: Connection reset by peer)"
    assert _stopped(RuntimeError("The size of tensor a (3) must match the size of tensor b (4)"), 0, None) is None
    assert _stopped(_raised_while_handling(ValueError("own"), worker), 0, None) is None  # a worker's own death


@pytest.mark.parametrize("argv", [["eval", "RUN", "--manifest", "m.jsonl"], ["generate", "RUN", "--prompt", "hi"],
                                  ["train-queries", "RUN"], ["demo"]])
def test_a_command_that_does_not_share_its_work_refuses_torchrun_in_one_line(argv, monkeypatch, capsys):
    """Under torchrun every process ran `eval` whole (its table printed and its JSON written once per
    process) and `train-queries` found its own sibling holding the run's lock."""
    from mmembed.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"mmembed: error: mmembed {argv[0]} runs in one process: start it without torchrun (only train "
                   "and index share their work among its processes)")
