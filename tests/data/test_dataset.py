"""ManifestDataset + collate + loader: bad rows skipped and counted, deterministic resumable order."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from mmembed.data import Batch, ManifestDataset, SkipCounter, build_loader, collate, label_ids, read_manifest
from mmembed.data.dataset import Sample, Skipped
from mmembed.data.loader import EpochBatchSampler, reason_kind
from mmembed.errors import BadInput, UserError
from mmembed.modality import Modality
from mmembed.preprocess import AudioPreprocessor, ImagePreprocessor, TextPreprocessor
from mmembed.tokenizer import Tokenizer

I, A, T = Modality.IMAGE, Modality.AUDIO, Modality.TEXT
GOOD = [1, 2, 7, 12, 13]
BAD = {3: "corrupt or truncated", 4: "not a readable image", 5: "empty file", 6: "missing file",
       8: "zero-length", 9: "NaN", 10: "not a readable audio", 11: "empty caption"}


def _world(root: Path) -> Path:
    """13 manifest rows: 5 good (some lacking modalities), 8 with one hostile item each."""
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / f"{name}.png")
        sf.write(root / f"{name}.wav", rng.uniform(-0.5, 0.5, 4000).astype(np.float32), 16000, subtype="FLOAT")
    good_png = (root / "a.png").read_bytes()
    (root / "trunc.png").write_bytes(good_png[: len(good_png) // 2])
    (root / "page.png").write_text("<html><body>not an image</body></html>")
    (root / "zero.png").write_bytes(b"")
    sf.write(root / "short.wav", np.zeros(0, np.float32), 16000)
    sf.write(root / "nan.wav", np.full(1000, np.nan, np.float32), 16000, subtype="FLOAT")
    (root / "text.wav").write_text("definitely not audio " * 20)
    rows = [
        {"image": "a.png", "audio": "a.wav", "text": "a red circle", "label": "s1"},  # 1
        {"image": "b.png", "text": "a blue square", "label": "s2"},  # 2
        {"image": "trunc.png", "text": "t"},  # 3
        {"image": "page.png", "text": "t"},  # 4
        {"image": "zero.png", "text": "t"},  # 5
        {"image": "missing.png", "text": "t"},  # 6
        {"audio": "c.wav", "text": "a green circle hums", "label": "s1"},  # 7
        {"audio": "short.wav", "text": "t"},  # 8
        {"audio": "nan.wav", "text": "t"},  # 9
        {"audio": "text.wav", "text": "t"},  # 10
        {"image": "c.png", "text": ""},  # 11
        {"text": "just text"},  # 12
        {"image": "c.png", "audio": "b.wav", "text": "a blue square beeps", "label": "s2"},  # 13
    ]
    path = root / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(["a red circle", "a blue square beeps", "a green circle hums"], vocab_size=300)


@pytest.fixture
def world(tmp_path) -> Path:
    return _world(tmp_path)


def _pres(tok, train: bool = False, random_crop: bool = False) -> dict:
    return {
        T: TextPreprocessor(tok, max_length=16),
        I: ImagePreprocessor(16, augment=True, affine_degrees=10, color_jitter=0.2, train=train),
        A: AudioPreprocessor(n_mels=16, max_seconds=0.5, random_crop=random_crop, train=train),
    }


def _epoch(loader) -> list[Batch]:
    return list(loader)


def _rows(batches: list[Batch]) -> list[int]:
    return [r for b in batches for r in b.rows.tolist()]


def _assert_batches_equal(xs: list[Batch], ys: list[Batch]) -> None:
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert torch.equal(x.rows, y.rows) and x.skipped == y.skipped
        assert x.inputs.keys() == y.inputs.keys()
        for m in x.inputs:
            assert torch.equal(x.inputs[m], y.inputs[m]) and torch.equal(x.present[m], y.present[m])


# ---------------------------------------------------------------------------- skipping


def test_epoch_completes_skipping_and_counting_every_hostile_row(world, tok, caplog):
    ds = ManifestDataset(read_manifest(world), _pres(tok))
    counter = SkipCounter(every_s=3600)
    with caplog.at_level(logging.WARNING, logger="mmembed.data.loader"):
        batches = _epoch(build_loader(ds, 4, shuffle=True, seed=0))
        for b in batches:
            counter.update(b.skipped)
    assert sorted(_rows(batches)) == GOOD
    skipped = dict(s for b in batches for s in b.skipped)
    assert sorted(skipped) == sorted(BAD)
    for line, reason in BAD.items():
        assert reason in skipped[line], (line, skipped[line])
    assert counter.total == len(BAD)
    assert len([r for r in caplog.records if "skipped" in r.getMessage()]) == 1  # rate-limited
    assert "image: missing file …" in counter.summary() and counter.summary().startswith("skipped 8 row(s)")
    for b in _epoch(build_loader(ds, 4, shuffle=True, seed=1)):  # a second epoch skips the same rows
        counter.update(b.skipped)
    assert counter.total == len(BAD) and counter.summary().startswith("skipped 8 row(s)")


def test_strict_mode_raises_naming_file_and_row(world, tok):
    ds = ManifestDataset(read_manifest(world), _pres(tok), strict=True)
    assert isinstance(ds[0], Sample)
    with pytest.raises(BadInput, match=r"m\.jsonl:3: image: corrupt or truncated image: .*trunc\.png"):
        ds[2]
    with pytest.raises(BadInput, match=r"m\.jsonl:6: image: missing file .*missing\.png"):
        ds[5]
    with pytest.raises(BadInput, match=r"m\.jsonl:3: "):  # the loader stops at the first bad row
        _epoch(build_loader(ds, 13, shuffle=False))


def test_workers_give_the_same_batches_including_augmentation(world, tok):
    """Per-sample seeds: augmentation is a function of (seed, epoch, index), not of the worker."""
    ds = ManifestDataset(read_manifest(world), _pres(tok, train=True, random_crop=True))
    assert ds.stochastic and ds.augmenting == [I]
    serial = _epoch(build_loader(ds, 3, shuffle=True, seed=5))
    parallel = _epoch(build_loader(ds, 3, shuffle=True, seed=5, num_workers=2))
    _assert_batches_equal(serial, parallel)
    again = build_loader(ds, 3, shuffle=True, seed=6)
    assert _rows(_epoch(again)) != _rows(serial)


def test_a_samples_seed_leaves_the_training_processs_generators_as_they_were(world, tok, monkeypatch):
    """With no workers, samples load in the training process: their seeds must not move its CPU
    generator (dropout) nor reseed its GPUs."""
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    ds = ManifestDataset(read_manifest(world), _pres(tok, train=True, random_crop=True))
    torch.manual_seed(0)
    reseeded.clear()
    before = torch.get_rng_state()
    ds[(0, 12345)]
    assert torch.equal(torch.get_rng_state(), before) and reseeded == []


class _Meanwhile:
    """An audio preprocessor whose call for `first` starts `then` in another thread and draws once
    that thread's call has begun; that call draws once the first one has."""

    def __init__(self, pre: AudioPreprocessor, first: str) -> None:
        self.pre, self.first, self.then = pre, first, None
        self.began, self.drawn = threading.Event(), threading.Event()

    def __getattr__(self, name: str):
        return getattr(self.pre, name)

    def __call__(self, item, **kwargs):
        if not str(item).endswith(self.first):
            self.began.set()
            assert self.drawn.wait(10)
            return self.pre(item, **kwargs)
        self.thread = threading.Thread(target=self.then)
        self.thread.start()
        assert self.began.wait(10)
        out = self.pre(item, **kwargs)
        self.drawn.set()
        return out


def test_samples_loaded_by_two_threads_at_once_are_their_own_and_leave_the_global_rng(tmp_path, tok):
    """Each thread reseeded the shared global generator: a sample drew another's crop, and the caller's RNG moved."""
    rng = np.random.default_rng(0)
    for name in ("x", "y"):
        sf.write(tmp_path / f"{name}.wav", rng.uniform(-0.5, 0.5, 16000).astype(np.float32), 16000)
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"audio": f"{n}.wav", "text": "a red circle"}) + "\n" for n in "xy"))
    pre = AudioPreprocessor(n_mels=16, max_seconds=0.2, random_crop=True, train=True)
    keys = [(0, 11), (1, 22)]
    want = [ManifestDataset(read_manifest(path), {A: pre})[k].inputs[A] for k in keys]
    meanwhile = _Meanwhile(pre, "x.wav")
    ds = ManifestDataset(read_manifest(path), {A: meanwhile})
    got = {}
    meanwhile.then = lambda: got.__setitem__(1, ds[keys[1]].inputs[A])
    torch.manual_seed(0)
    before = torch.get_rng_state()
    got[0] = ds[keys[0]].inputs[A]  # the other thread's sample loads meanwhile
    meanwhile.thread.join()
    assert ds.stochastic and not torch.equal(want[0], want[1])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(torch.get_rng_state(), before)


def test_a_stochastic_preprocessor_without_a_generator_argument_still_draws_per_seed(tmp_path):
    """A user's stochastic preprocessor written to the protocol's `__call__(item)` got
    "unexpected keyword argument 'generator'" once the crop drew from a per-sample generator."""

    class Jitter:  # the documented protocol, without generator=
        modality, stochastic, random_options = Modality.TEXT, True, ("jitter",)

        def __call__(self, item):
            return torch.rand(3)

        def collate(self, samples):
            return torch.stack(samples), None

    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"text": "hi"}) + "\n")
    ds = ManifestDataset(read_manifest(path), {Modality.TEXT: Jitter()})
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a, b, c = ds[(0, 7)].inputs[Modality.TEXT], ds[(0, 7)].inputs[Modality.TEXT], ds[(0, 8)].inputs[Modality.TEXT]
    assert torch.equal(a, b) and not torch.equal(a, c)  # a pure function of the seed, as before
    assert torch.equal(torch.get_rng_state(), before)


# ---------------------------------------------------------------------------- collate


def test_collate_shapes_masks_present_and_labels(world, tok):
    pres = _pres(tok)
    ds = ManifestDataset(read_manifest(world), pres)
    samples = [ds[i - 1] for i in (1, 2, 6, 7, 12)]  # line 6 is a skip marker
    assert isinstance(samples[2], Skipped)
    b = collate(samples, pres)
    assert len(b) == 4 and b.rows.tolist() == [1, 2, 7, 12] and b.skipped == [(6, samples[2].reason)]
    assert b.present[I].tolist() == [True, True, False, False]
    assert b.present[A].tolist() == [True, False, True, False]
    assert b.present[T].tolist() == [True, True, True, True]
    assert b.inputs[I].shape == (2, 3, 16, 16) and b.masks[I] is None
    assert b.inputs[A].shape[:2] == (2, 16) and b.masks[A].shape == (2, b.inputs[A].shape[2])
    lengths = [s.inputs[T].numel() for s in samples if isinstance(s, Sample)]
    assert b.inputs[T].shape[0] == 4 and b.masks[T].sum(1).tolist() == lengths
    assert torch.equal(b.inputs[I][1], samples[1].inputs[I])  # row order kept among present rows
    ids = b.labels.tolist()
    assert ids[0] == ids[2] != ids[1] and ids[3] == -1 and min(ids[:3]) >= 0 and b.keys == ["s1", "s2", "s1", None]
    # the same label gets the same id in any batch (and on any rank: the distributed loss compares them)
    assert label_ids(["s2", "s9", "s1"]).tolist()[::2] == [ids[1], ids[0]]


def test_collate_omits_a_modality_no_row_has_and_handles_all_skipped(tok):
    pres = _pres(tok)
    b = collate([Sample(4, {T: torch.tensor([1, 2])}, None)], pres)
    assert list(b.inputs) == [T] and b.present[I].tolist() == [False]
    empty = collate([Skipped(9, "why")], pres)
    assert len(empty) == 0 and empty.inputs == {} and empty.skipped == [(9, "why")]


def test_batch_to_moves_every_tensor(world, tok):
    b = collate([ManifestDataset(read_manifest(world), _pres(tok))[0]], _pres(tok))
    moved = b.to("meta")
    tensors = [*moved.inputs.values(), *moved.present.values(), moved.labels, moved.rows]
    tensors += [m for m in moved.masks.values() if m is not None]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert b.rows.device.type == "cpu" and moved.keys == b.keys


# ---------------------------------------------------------------------------- order and resume


def test_same_seed_same_order_and_start_batch_yields_the_tail_without_loading_it(world, tok):
    ds = ManifestDataset(read_manifest(world), _pres(tok))
    full = _epoch(build_loader(ds, 3, shuffle=True, seed=1, epoch=2))
    _assert_batches_equal(full, _epoch(build_loader(ds, 3, shuffle=True, seed=1, epoch=2)))
    loads = []
    ds.load = lambda i, *caption, _load=ds.load: loads.append(i) or _load(i, *caption)
    loader = build_loader(ds, 3, shuffle=True, seed=1, epoch=2, start_batch=3)
    assert len(loader) == len(full) - 3
    tail = _epoch(loader)
    _assert_batches_equal(tail, full[3:])
    assert len(loads) == sum(len(b) + len(b.skipped) for b in full[3:])  # skipped batches never loaded
    loader.batch_sampler.set_epoch(3)
    assert len(loader) == len(full) and _rows(_epoch(loader)) != _rows(full)


def test_sampler_orders_shards_and_drops():
    plain = EpochBatchSampler(10, 4, shuffle=False)
    assert [[i for i, _ in b] for b in plain] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(EpochBatchSampler(10, 4, shuffle=False, drop_last=True)) == 2
    shards = [EpochBatchSampler(11, 2, shuffle=True, seed=3, rank=r, world_size=3) for r in range(3)]
    seen = [[i for b in s for i, _ in b] for s in shards]
    assert all(len(x) == 3 for x in seen) and len(set(sum(seen, []))) == 9  # equal, disjoint, 11 - 11 % 3
    a, b = EpochBatchSampler(50, 50, shuffle=True, seed=0), EpochBatchSampler(50, 50, shuffle=True, seed=0)
    b.set_epoch(1)
    assert next(iter(a)) != next(iter(b))
    seeds = [s for _, s in next(iter(a))]
    assert len(set(seeds)) == 50 and all(0 <= s < 2**63 for s in seeds)


# ---------------------------------------------------------------------------- cache


def test_cache_loads_each_row_once_and_refuses_augmentation(world, tok):
    ds = ManifestDataset(read_manifest(world), _pres(tok), cache=True)
    loads = []
    ds.load = lambda i, *caption, _load=ds.load: loads.append(i) or _load(i, *caption)
    first = _epoch(build_loader(ds, 4, shuffle=True, seed=0))
    second_loader = build_loader(ds, 4, shuffle=True, seed=0)
    assert sorted(loads) == list(range(13))
    _assert_batches_equal(_epoch(second_loader), first)
    assert len(loads) == 13  # nothing decoded twice, bad rows included


def test_the_cache_refuses_a_random_preprocessor_naming_the_config_keys_that_lift_it(world, tok):
    """The refusal named Python arguments only (cache=False, "audio: random_crop"): a CLI user
    needs data.cache=false or model.towers.audio.preprocess.random_crop=false."""
    with pytest.raises(UserError) as e:
        ManifestDataset(read_manifest(world), _pres(tok, train=True, random_crop=True), cache=True)
    message = str(e.value)
    assert "set data.cache=false (cache=False)" in message
    assert message.endswith("or turn off model.towers.audio.preprocess.random_crop")


def test_skips_found_filling_the_cache_are_counted_once_and_it_logs_only_a_real_fill(world, tok, caplog):
    """With workers, the rows the cache fill skipped never reached the SkipCounter (a bad row in
    the tail drop_last drops went uncounted), and "cached 13 rows" was logged again every epoch."""
    ds = ManifestDataset(read_manifest(world), _pres(tok), cache=True)
    counter = SkipCounter(every_s=3600)
    with caplog.at_level(logging.INFO, logger="mmembed.data.loader"):
        loaders = [build_loader(ds, 4, shuffle=True, seed=0, num_workers=1, drop_last=True, epoch=e, skips=counter)
                   for e in range(3)]
        for batch in _epoch(loaders[-1]):
            counter.update(batch.skipped)  # as the training loop does: the same rows again
    messages = [r.getMessage() for r in caplog.records]
    cached = [m for m in messages if m.startswith("cached ")]
    assert len(cached) == 1 and cached[0].startswith("cached 13 rows in ")
    assert sum(m.startswith("skipped ") for m in messages) == 1
    assert sorted(line for _, line in counter.state_dict()["seen"]) == sorted(BAD)
    resumed = SkipCounter()  # a resumed run: its checkpointed counts, a fresh cache
    resumed.load_state_dict(counter.state_dict())
    again = ManifestDataset(read_manifest(world), _pres(tok), cache=True)
    build_loader(again, 4, shuffle=True, seed=0, num_workers=1, drop_last=True, epoch=1, skips=resumed)
    assert resumed.total == len(BAD) and resumed.by_kind == counter.by_kind


def _audio_by_row(batches: list[Batch], modality=A) -> dict[int, torch.Tensor]:
    """Manifest row → its (padded) features of `modality`, for the rows that have it."""
    return {row: x for b in batches if modality in b.inputs
            for row, x, present in zip(b.rows.tolist(), b.inputs[modality], b.present[modality]) if present}


def test_cached_images_get_fresh_augmentations_each_epoch_and_resume_exactly(world, tok):
    """Image augmentation runs after the cache, as SpecAugment does: cached = uncached, any
    number of workers, the cache stays clean, each epoch draws anew, and an epoch resumed
    mid-way draws what the uninterrupted one drew."""
    cached = ManifestDataset(read_manifest(world), _pres(tok, train=True), cache=True)
    plain = ManifestDataset(read_manifest(world), _pres(tok, train=True))
    assert not cached.stochastic and cached.augmenting == [I]
    epoch0 = _epoch(build_loader(cached, 4, shuffle=True, seed=0))
    _assert_batches_equal(_epoch(build_loader(plain, 4, shuffle=True, seed=0)), epoch0)
    _assert_batches_equal(_epoch(build_loader(cached, 4, shuffle=True, seed=0, num_workers=2)), epoch0)
    loader = build_loader(cached, 4, shuffle=True, seed=0)
    loader.batch_sampler.set_epoch(1)
    epoch1 = _epoch(loader)
    first, second = _audio_by_row(epoch0, I), _audio_by_row(epoch1, I)
    both = first.keys() & second.keys()  # (the sampler drops a short last batch)
    assert both and all(not torch.equal(first[r], second[r]) for r in both)
    loader.batch_sampler.set_epoch(1, start_batch=2)
    _assert_batches_equal(_epoch(loader), epoch1[2:])
    clean = ManifestDataset(read_manifest(world), _pres(tok))
    for i, result in cached.cache.items():
        if isinstance(result, Sample) and I in result.inputs:
            assert torch.equal(result.inputs[I], clean[i].inputs[I])  # no augmentation leaked into the cache


def test_cached_features_get_fresh_spec_augment_masks_each_epoch(world, tok):
    """SpecAugment runs after the cache: cached and uncached batches agree, the cache stays
    clean, each epoch draws new masks, and workers do not change them."""
    pres = _pres(tok) | {A: AudioPreprocessor(n_mels=16, max_seconds=0.5, random_crop=False, spec_augment=True,
                                              freq_mask=6, time_mask=8, train=True)}
    cached = ManifestDataset(read_manifest(world), pres, cache=True)
    plain = ManifestDataset(read_manifest(world), pres)
    assert not cached.stochastic and cached.augmenting == [A]
    epoch0 = _epoch(build_loader(cached, 4, shuffle=True, seed=0))
    _assert_batches_equal(_epoch(build_loader(plain, 4, shuffle=True, seed=0)), epoch0)
    _assert_batches_equal(_epoch(build_loader(cached, 4, shuffle=True, seed=0, num_workers=2)), epoch0)
    clean = ManifestDataset(read_manifest(world), _pres(tok))
    for i, result in cached.cache.items():
        if isinstance(result, Sample) and A in result.inputs:
            assert torch.equal(result.inputs[A], clean[i].inputs[A])  # no mask leaked into the cache
    masked = [(b.inputs[A] == 0) & b.present[A][:, None, None] for b in epoch0 if A in b.inputs]
    assert any(m.any() for m in masked)
    later = build_loader(cached, 4, shuffle=True, seed=0)
    later.batch_sampler.set_epoch(1)
    a0, a1 = _audio_by_row(epoch0), _audio_by_row(_epoch(later))
    common = a0.keys() & a1.keys()  # the loader drops a last partial batch
    assert common and any(not torch.equal(a0[r], a1[r]) for r in common)


def test_materialize_with_workers_fills_the_cache(world, tok):
    ds = ManifestDataset(read_manifest(world), _pres(tok), cache=True)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    skipped = ds.materialize(num_workers=2, chunk=4)
    # the global random stream is left alone: its workers' seeds came from it (a resumed run's
    # dropout then differed from the uninterrupted run's, and results from the worker count)
    assert torch.equal(torch.get_rng_state(), before)
    assert len(ds.cache) == 13 and sorted(line for line, _ in skipped) == sorted(BAD)
    fresh = ManifestDataset(read_manifest(world), _pres(tok))
    for i in range(13):
        if isinstance(ds.cache[i], Sample):
            assert all(torch.equal(t, fresh[i].inputs[m]) for m, t in ds.cache[i].inputs.items())


# ---------------------------------------------------------------------------- misc


def test_modalities_without_a_preprocessor_are_ignored(world, tok):
    ds = ManifestDataset(read_manifest(world), {T: TextPreprocessor(tok, max_length=16)})
    assert ds.modalities == (T,)
    b = collate([ds[i] for i in range(13)], ds.preprocessors)
    assert list(b.inputs) == [T] and sorted(b.rows.tolist()) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13]
    text_only = read_manifest(world).rows[11:12]
    with pytest.raises(UserError, match="no row has a modality this model reads"):
        ManifestDataset(text_only, {I: ImagePreprocessor(16)})


def test_skip_counter_rate_limits_and_groups_reasons(caplog):
    now = [0.0]
    counter = SkipCounter(every_s=30, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="mmembed.data.loader"):
        counter.update([(3, "image: missing file /d/a.png")])
        now[0] = 10
        counter.update([(4, "image: missing file /d/b.png"), (9, "text: empty caption")])
        counter.update([])
        now[0] = 31
        counter.update([(12, "audio: not a readable audio file: /d/x.wav (LibsndfileError: bad)")])
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "skipped 1 bad row(s)" in messages[0] and "skipped 4 bad row(s) (3 since the last warning)" in messages[1]
    assert counter.by_kind == {"image: missing file …": 2, "text: empty caption": 1,
                               "audio: not a readable audio file: …": 1}
    assert counter.summary().startswith("skipped 4 row(s): 2 × image: missing file … (e.g. line 3)")
    assert reason_kind("3 cells for 4 columns") == "… cells for … columns"
    # a word pair is no path: "audio contains …" hid what was wrong with the file
    assert reason_kind("audio: audio contains NaN/Inf samples") == "audio: audio contains NaN/Inf samples"
    assert reason_kind("image: missing file images/s0001.png") == "image: missing file …"
    counter.reset()
    assert counter.total == 0 and counter.summary() == ""


@pytest.mark.parametrize("reason, kind", [
    ("image: missing file /data/pets/{}.jpg", "image: missing file …"),
    ("image: missing file /data/pets/{}.jpg (the folder has 'x', the same name)", "image: missing file …"),
    ("image: not a file: /data/{} dir", "image: not a file: …"),
    ("audio: not a readable audio file: /data/{}.wav (LibsndfileError: bad)", "audio: not a readable audio file: …"),
    ("image: truncated or corrupt PNG file: /data/{}.png", "image: truncated or corrupt PNG file: …"),
    ("audio: zero-length audio: audio/{}.wav", "audio: zero-length audio: …"),
    ("image: corrupt or truncated image: /data/{}.png (OSError: x)", "image: corrupt or truncated image: …"),
    ("audio: /data/{}.wav has 3 channels; at most 2 are read", "audio: … has … channels; at most … are read"),
])
def test_paths_with_spaces_group_as_one_kind(reason, kind):
    """A path stopped at its first space: four missing files "cat one.jpg", "dog two.jpg", …
    made four kinds ("missing file … one.jpg", …) in the skip summary instead of one."""
    counter = SkipCounter()
    counter.update([(i, reason.format(name)) for i, name in enumerate(["cat one", "dog two", "bird three"], 1)])
    assert counter.by_kind == {kind: 3}


def test_skip_counts_survive_a_checkpoint_and_merge_over_processes():
    """A resumed run's summary forgot the rows skipped before the kill, and under torchrun only
    rank 0's skips reached it (6 bad rows were reported as 4)."""
    import json

    from mmembed.train.align import _StageState
    from mmembed.train.collapse import CollapseMonitor

    rank0, rank1 = SkipCounter(), SkipCounter()
    rank0.update([(3, "image: missing file: images/a.png"), (7, "audio: zero-length audio: audio/b.wav")])
    rank1.update([(3, "image: missing file: images/a.png"), (9, "image: missing file: images/c.png")])
    merged = SkipCounter()
    for state in (rank0.state_dict(), json.loads(json.dumps(rank1.state_dict()))):  # JSON, as checkpointed
        merged.load_state_dict(state)
    assert merged.total == 3 and merged.by_kind["image: missing file: …"] == 2
    assert merged.summary().startswith("skipped 3 row(s): 2 × image: missing file: … (e.g. line 3)")
    resumed = SkipCounter()
    stage = _StageState(CollapseMonitor(stop_after=5), resumed)
    saved = _StageState(CollapseMonitor(stop_after=5), rank0).state_dict()
    stage.load_state_dict(json.loads(json.dumps(saved)))
    resumed.update([(7, "audio: zero-length audio: audio/b.wav")])  # the same row in the resumed epoch: once
    assert resumed.total == 2
    stage.load_state_dict({"streak": {}, "warned": [], "batches": 4})  # a checkpoint of the monitor alone
    assert stage.monitor.batches == 4


def _renamed(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "renamed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_training_rows_without_a_pair_are_refused_naming_the_misnamed_column(tmp_path, tok):
    """{"image", "caption"}: every batch was decoded, then the run failed with "all 42 batch(es) had
    no usable row ... (the skipped rows are counted above)", though no row was skipped."""
    pres = {I: ImagePreprocessor(16), T: TextPreprocessor(tok, max_length=16)}
    rows = [{"image": f"{i}.png", "caption": "a red circle", "id": i} for i in range(4)]
    ds = ManifestDataset(read_manifest(_renamed(tmp_path, rows)), pres)  # evaluation or indexing: one modality is fine
    with pytest.raises(UserError, match=r"renamed\.jsonl: no row has two of the modalities .*rows have: image\).*"
                                        r"column 'caption' is metadata \(did you mean 'text'\?\)"):
        ds.check_pairs()
    plain = [{"image": f"{i}.png", "id": i} for i in range(4)]  # nothing close to a modality: the columns named
    with pytest.raises(UserError, match="columns read as metadata: id$"):
        ManifestDataset(read_manifest(_renamed(tmp_path, plain)), pres).check_pairs()
    misspelt = [{"imgae": f"{i}.png", "text": "a red circle"} for i in range(4)]
    with pytest.raises(UserError, match=r"no row has a modality this model reads .*column 'imgae' is metadata"):
        ManifestDataset(read_manifest(_renamed(tmp_path, misspelt)), {I: ImagePreprocessor(16)})


def test_rows_of_one_modality_each_train_a_captioning_loss_and_are_not_refused(tmp_path, tok):
    """With loss.caption_weight > 0 a text row alone trains (its own vector writes its caption): the
    pair check refused such a manifest, which had trained before it."""
    pres = {I: ImagePreprocessor(16), T: TextPreprocessor(tok, max_length=16)}
    rows = [{"text": "a red circle"}, {"image": "0.png"}, {"text": "a blue square"}, {"image": "1.png"}]
    ds = ManifestDataset(read_manifest(_renamed(tmp_path, rows)), pres)
    ds.check_pairs(captioned=True)
    with pytest.raises(UserError, match="no pair to learn from"):
        ds.check_pairs()
    images = ManifestDataset(read_manifest(_renamed(tmp_path, rows[1::2])), pres)  # no caption to write either
    with pytest.raises(UserError, match="no pair to learn from"):
        images.check_pairs(captioned=True)


def test_a_column_that_looks_like_a_modality_no_row_has_is_warned_of(tmp_path, tok, world, caplog):
    """{"imgae", "text", "audio"}: the run trained text and audio without a word, the image tower never."""
    rows = [{"imgae": f"{i}.png", "audio": f"{i}.wav", "text": "a red circle", "captions": ["a circle"]}
            for i in range(4)]
    with caplog.at_level(logging.WARNING, logger="mmembed.data.dataset"):
        ManifestDataset(read_manifest(_renamed(tmp_path, rows)), _pres(tok)).check_pairs()
        ManifestDataset(read_manifest(world), _pres(tok)).check_pairs()  # a column `captions` is no misspelt `text`
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "column 'imgae' is read as metadata and no row has image: did you mean 'image'?" \
        in warned[0], warned


def test_skipped_undecodable_lines_group_as_one_readable_kind(tmp_path):
    """Lines with bytes \\xff\\xfe were summarised as "1 × invalid UTF-… at byte …": the number in
    "UTF-8" was taken for a variable."""
    good = json.dumps({"text": "a red circle"}).encode()
    (tmp_path / "m.jsonl").write_bytes(b"\n".join([good, b'{"text": "\xff\xfe"}', good, b'{"text": "ab\xff"}', good]))
    counter = SkipCounter()
    counter.update(read_manifest(tmp_path / "m.jsonl").skipped)
    assert counter.summary() == "skipped 2 row(s): 2 × invalid UTF-8 at byte … (e.g. line 2)"
    assert reason_kind("image too large: /d/a.png 5000x3000 has a side > max_side 4096") == \
        "image too large: … …x… has a side > max_side …"
    assert reason_kind("value -3 of float32 data") == "value -… of float32 data"
