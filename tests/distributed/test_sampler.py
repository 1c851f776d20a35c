"""The epoch order dealt to several ranks, and resumed on another number of ranks."""

import pytest

from mmembed.data.loader import EpochBatchSampler


def _epoch(n, batch, world, start_sample=0, drop_last=True):
    """Every rank's batches for epoch 3, as lists of indices."""
    out = []
    for rank in range(world):
        s = EpochBatchSampler(n, batch, shuffle=True, seed=5, drop_last=drop_last, rank=rank, world_size=world)
        s.set_epoch(3, start_sample=start_sample)
        out.append([[i for i, _ in b] for b in s])
    return out


def test_ranks_split_each_global_batch_of_the_single_process_order():
    one = _epoch(103, 8, 1)[0]
    two = _epoch(103, 4, 2)
    for b, whole in enumerate(one[: len(two[0])]):
        assert sorted(two[0][b] + two[1][b]) == sorted(whole)  # global batch b = the same 8 samples


@pytest.mark.parametrize("before,after", [(2, 1), (2, 3), (1, 2), (3, 2)])
@pytest.mark.parametrize("drop_last", [True, False])
def test_resume_on_another_world_size_sees_no_sample_twice(before, after, drop_last):
    n, batch, k = 101, 4, 3  # k global batches consumed before the stop
    first = _epoch(n, batch, before, drop_last=drop_last)
    seen = [i for rank in first for b in rank[:k] for i in b]
    assert len(seen) == k * batch * before
    rest = [i for rank in _epoch(n, batch, after, start_sample=k * batch * before, drop_last=drop_last)
            for b in rank for i in b]
    assert not set(seen) & set(rest)
    assert len(set(rest)) == len(rest)
    # what is left out is only the tail that does not fill a batch on every rank
    assert n - len(seen) - len(rest) < after * batch


def test_start_batch_equals_start_sample_in_this_world():
    a = EpochBatchSampler(50, 4, shuffle=True, seed=1, rank=1, world_size=2)
    b = EpochBatchSampler(50, 4, shuffle=True, seed=1, rank=1, world_size=2)
    a.set_epoch(2, start_batch=3)
    b.set_epoch(2, start_sample=3 * 4 * 2)
    assert list(a) == list(b) and len(a) == len(b) == len(list(a))
