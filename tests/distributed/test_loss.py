"""The contrastive loss across 2 processes (gloo) equals one process on the same global batch."""

import pytest
import torch
import torch.multiprocessing as mp

from mmembed.train.distributed import Forward
from tests.distributed.workers import CASES, B, W, Towers, forward, loss_and_grads, loss_worker, uneven_worker

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _spawn(worker, folder) -> list[dict]:
    """Each rank's saved results of `worker` (loss and gradients per case)."""
    mp.spawn(worker, args=(str(folder / "init"), str(folder)), nprocs=W, join=True)
    return [torch.load(folder / f"rank{r}.pt") for r in range(W)]


def _assert_ranks_equal_one_process(ranks: list[dict], case: str, rows: slice, module=None):
    """Every rank's global loss and averaged gradients equal one process's on `rows`; returns those."""
    module = module or Towers()
    loss, grads = loss_and_grads(case, module, Forward(module, forward), rows)
    assert torch.isfinite(loss)
    for rank in ranks:
        got = rank[case]
        assert got["loss"] == pytest.approx(float(loss), abs=1e-5)
        assert grads.keys() == got["grads"].keys()
        for name, g in grads.items():
            torch.testing.assert_close(got["grads"][name], g, atol=1e-5, rtol=0, msg=f"{case}: grad of {name}")
    return grads


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _spawn(loss_worker, tmp_path_factory.mktemp("dist"))


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one_on_the_global_batch(two_ranks, case):
    grads = _assert_ranks_equal_one_process(two_ranks, case, slice(0, W * B))
    # the case is not trivial: the towers and the scale get real gradients
    assert grads["towers.text.weight"].abs().max() > 1e-3 and grads["log_scale"].abs() > 1e-4


@pytest.fixture(scope="module")
def uneven_ranks(tmp_path_factory):
    return _spawn(uneven_worker, tmp_path_factory.mktemp("uneven"))


@pytest.mark.parametrize("case", list(CASES))
def test_ranks_with_short_batches_or_a_missing_modality_still_equal_one_process(uneven_ranks, case):
    """Rank 0's batch has no audio input, rank 1's a row fewer: the ranks still run the same
    collectives (they aborted: gloo's "collective mismatch"), and the loss and gradients are one
    process's on the 11 rows they hold together."""
    _assert_ranks_equal_one_process(uneven_ranks, case, slice(0, 2 * B - 1))


@pytest.fixture(scope="module")
def frozen_ranks(tmp_path_factory):
    from tests.distributed.workers import frozen_worker

    return _spawn(frozen_worker, tmp_path_factory.mktemp("frozen"))


@pytest.mark.parametrize("case", list(CASES))
def test_a_frozen_tower_whose_modality_one_rank_lacks_still_equals_one_process(frozen_ranks, case):
    from tests.distributed.workers import frozen_towers

    grads = _assert_ranks_equal_one_process(frozen_ranks, case, slice(0, 2 * B - 1), frozen_towers())
    assert grads["towers.audio.weight"].abs().max() == 0 and grads["towers.text.weight"].abs().max() > 1e-3


def test_the_captioning_objective_over_two_processes_equals_one_process(tmp_path):
    """Caption tokens differ per process (long captions and images on one, short captions on the
    other): each modality's loss is still the mean over the global batch's tokens, not a mean of
    the processes' means (DDP averages gradients; each share is scaled by processes / tokens)."""
    from mmembed.train.distributed import Forward
    from tests.distributed.workers import Captioned, caption_loss_and_grads, caption_worker, captioned_forward

    ranks = _spawn(caption_worker, tmp_path)
    module = Captioned()
    loss, grads = caption_loss_and_grads(module, Forward(module, captioned_forward), slice(0, 8))
    for rank in ranks:
        assert rank["loss"] == pytest.approx(float(loss), abs=1e-5)
        for name, g in grads.items():
            torch.testing.assert_close(rank["grads"][name], g, atol=1e-5, rtol=0, msg=f"grad of {name}")
    assert grads["towers.image.weight"].abs().max() > 1e-4 and grads["captioner.decoder.token_embedding.weight"].abs().max() > 1e-4
