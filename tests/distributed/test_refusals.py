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
