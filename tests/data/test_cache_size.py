"""The estimate of a dataset's cache: what the cache then holds, computed without filling it or
drawing from the run's random stream."""

import os

import pytest
import torch

from mmembed.data import ManifestDataset, read_manifest
from mmembed.data.cache_size import available_memory, check_cache_fits, estimate_cache_bytes
from mmembed.errors import ConfigError
from mmembed.modality import Modality
from mmembed.preprocess import ImagePreprocessor


def _held(dataset: ManifestDataset) -> int:
    return sum(t.numel() * t.element_size() for s in dataset.cache.values() for t in s.inputs.values())


def test_the_estimate_is_what_the_filled_cache_holds_and_changes_nothing(tiny_world):
    """data.cache=true filled the memory with no estimate of how much it would take."""
    manifest = read_manifest(tiny_world / "train.jsonl", root=tiny_world)
    dataset = ManifestDataset(manifest, {Modality.IMAGE: ImagePreprocessor(24)}, cache=True)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    size = estimate_cache_bytes(dataset)
    assert torch.equal(torch.get_rng_state(), state) and dataset.cache == {}  # the run goes on as it was
    dataset.materialize()
    assert size == _held(dataset) == len(dataset) * 3 * 24 * 24 * 4


def test_available_memory_is_read():
    """No figure of the machine's memory was read: nothing to compare an estimate with."""
    free = available_memory()
    assert free is not None and 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_each_process_of_a_multi_gpu_run_counts_its_own_cache(tiny_world, monkeypatch):
    """Under torchrun each process of a machine holds a whole cache: one copy was set against all its memory."""
    manifest = read_manifest(tiny_world / "train.jsonl", root=tiny_world)
    dataset = ManifestDataset(manifest, {Modality.IMAGE: ImagePreprocessor(24)}, cache=True)
    one = len(dataset) * 3 * 24 * 24 * 4
    monkeypatch.setattr("mmembed.data.cache_size.available_memory", lambda: 3 * one)
    assert check_cache_fits(dataset, "training set") == one  # a third of the memory: within half
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"bytes per row × rows × 2 processes on this machine\), more than 50%"):
        check_cache_fits(dataset, "training set")
