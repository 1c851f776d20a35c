"""The synthetic world: determinism, valid files, held-out combinations, and proof that every
modality carries the attributes by the documented rules (decoded here independently, by FFT and
pixel statistics, not by re-running the generator)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mmembed.data.synth import ATTRIBUTES, describe_scene, generate_world, mentions, parse_caption, scene_label
from mmembed.data.synth.captions import SYNONYMS
from mmembed.data.synth.render_audio import harmonic_amplitudes
from mmembed.data.synth.render_image import outline
from mmembed.data.synth.rules import (
    GAIN_DB,
    ONSET_S,
    PALETTE_RGB,
    PITCH_HZ,
    RADIUS_FRACTION,
    REFERENCE_RMS,
    TIMBRE,
    X_FRACTION,
)
from mmembed.data.synth.world import SceneObject, choose_heldout_combos
from mmembed.cli import main
from mmembed.errors import UserError

SPLITS = ("train", "val", "test", "heldout")
N, N_HELDOUT = 48, 12


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(root: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]


def _all_rows(root: Path) -> list[dict]:
    return [r for split in SPLITS for r in _rows(root, split)]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "world"
    summary = generate_world(root, n=N, seed=7, n_heldout=N_HELDOUT, workers=1)
    assert summary.counts == {"train": 38, "val": 5, "test": 5, "heldout": N_HELDOUT}
    assert not summary.reused and summary.total == N + N_HELDOUT
    return root


# ---------------------------------------------------------------- determinism and files
def test_same_seed_gives_identical_bytes_with_any_worker_count(world, tmp_path, monkeypatch):
    import mmembed.data.synth.generate as gen

    monkeypatch.setattr(gen, "CHUNK", 8)  # several chunks, so the 2-process pool really runs
    seen = []
    generate_world(tmp_path / "again", n=N, seed=7, n_heldout=N_HELDOUT, workers=2, progress=lambda *a: seen.append(a))
    assert seen[-1] == (N + N_HELDOUT, N + N_HELDOUT) and seen == sorted(seen)
    first, second = _files(world), _files(tmp_path / "again")
    assert list(first) == list(second) and len(first) == 2 * (N + N_HELDOUT) + 9
    assert [k for k in first if first[k] != second[k]] == []


def test_different_seed_gives_different_files(world, tmp_path):
    generate_world(tmp_path / "other", n=N, seed=8, n_heldout=N_HELDOUT, workers=1)
    first, second = _files(world), _files(tmp_path / "other")
    media = [k for k in first if k.endswith((".png", ".wav"))]
    assert all(first[k] != second[k] for k in media)
    assert first["train.jsonl"] != second["train.jsonl"]


def test_manifest_rows_point_to_valid_media(world):
    rows = _all_rows(world)
    assert len({r["id"] for r in rows}) == len(rows) == N + N_HELDOUT
    for r in rows:
        assert r["image"] == f"images/{r['id']}.png" and r["audio"] == f"audio/{r['id']}.wav"
        assert r["text"] == r["captions"][0] and len(r["captions"]) == len(set(r["captions"])) >= 3
        objects = [SceneObject.from_dict(o) for o in r["objects"]]
        assert r["label"] == scene_label(objects) and 1 <= len(objects) <= 2
        assert len({o.position for o in objects}) == len(objects)
        assert all(getattr(o, a) in ATTRIBUTES[a] for o in objects for a in ATTRIBUTES)
        with Image.open(world / r["image"]) as im:
            assert (im.format, im.mode, im.size) == ("PNG", "RGB", (64, 64))
        info = sf.info(str(world / r["audio"]))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert 1.0 <= info.duration <= 2.0
        wave, _ = sf.read(str(world / r["audio"]))
        assert np.isfinite(wave).all() and np.abs(wave).max() < 0.9  # far from clipping


def test_world_json_documents_rules_and_counts(world):
    meta = json.loads((world / "world.json").read_text())
    assert meta["attributes"] == {k: list(v) for k, v in ATTRIBUTES.items()}
    assert meta["rules"]["audio"]["pitch_hz"] == PITCH_HZ and meta["rules"]["audio"]["timbre"] == TIMBRE
    assert meta["counts"] == {s: len(_rows(world, s)) for s in SPLITS}
    assert meta["params"]["seed"] == 7 and not (world / ".synth-incomplete").exists()


# ---------------------------------------------------------------- held-out combinations
def test_heldout_combos_never_in_train_val_test_and_in_every_heldout_row(world):
    combos = {tuple(c) for c in json.loads((world / "world.json").read_text())["heldout_combos"]}
    assert len(combos) == round(0.1 * 36)
    for split in ("train", "val", "test"):
        assert all((o["shape"], o["colour"]) not in combos for r in _rows(world, split) for o in r["objects"])
    assert all(any((o["shape"], o["colour"]) in combos for o in r["objects"]) for r in _rows(world, "heldout"))


def test_heldout_choice_is_seeded_and_spread_over_shapes_and_colours():
    picks = [choose_heldout_combos(seed, 0.1) for seed in range(5)]
    assert picks[0] == choose_heldout_combos(0, 0.1) and len({tuple(p) for p in picks}) > 1
    for p in picks:  # four combinations: four distinct shapes and four distinct colours
        assert len({s for s, _ in p}) == len({c for _, c in p}) == len(p) == 4
    with pytest.raises(UserError, match="heldout_fraction"):
        choose_heldout_combos(0, 0.9)


# ---------------------------------------------------------------- audio carries the meaning
FRAME = 160  # 10 ms at 16 kHz


def _events(wave: np.ndarray) -> list[int]:
    """Start sample of each run of loud 10 ms frames (events are >= 20 dB above the noise)."""
    n = len(wave) // FRAME
    loud = np.sqrt((wave[: n * FRAME].reshape(n, FRAME) ** 2).mean(1)) > 0.02
    return [i * FRAME for i in range(n) if loud[i] and (i == 0 or not loud[i - 1])]


def _band(spec: np.ndarray, freqs: np.ndarray, f: float) -> float:
    return float(np.sqrt((spec[np.abs(np.log2(freqs / f + 1e-12)) <= 0.1] ** 2).sum()))  # +-1.2 semitones


def _expected_fingerprint(timbre: str) -> np.ndarray:
    """Partials at f0 * (1, 2, 3, 4, 5, 6, 2.5) relative to f0, from the documented rules."""
    if timbre == "fm_bell":  # index 1: carrier J0 = 0.765; sidebands J1 = 0.440 at 2.5 f0, J2 = 0.115 at 6 f0
        return np.array([1, 0, 0, 0, 0, 0.115 / 0.765, 0.440 / 0.765])
    amps = np.abs(harmonic_amplitudes(timbre, 6))
    return np.append(amps / amps[0], 0.0)


def _decode_event(wave: np.ndarray, start: int, sr: int = 16000) -> dict[str, str]:
    seg = wave[start + int(0.04 * sr) : start + int(0.26 * sr)]  # the sustain of the event
    spec = np.abs(np.fft.rfft(seg * np.hanning(len(seg)), 1 << 15))
    freqs = np.fft.rfftfreq(1 << 15, 1 / sr)
    peak = freqs[np.argmax(spec)]
    colour = min(PITCH_HZ, key=lambda c: abs(np.log(peak / PITCH_HZ[c])))
    f0 = PITCH_HZ[colour]
    near = np.abs(np.log2(freqs / f0 + 1e-12)) <= 2 / 12
    power, f = spec[near] ** 2, freqs[near]
    spread = np.sqrt((power * (f - (power * f).sum() / power.sum()) ** 2).sum() / power.sum()) / f0
    fingerprint = np.array([_band(spec, freqs, k * f0) for k in (1, 2, 3, 4, 5, 6, 2.5)])
    fingerprint /= fingerprint[0]
    if spread > 0.025:  # vibrato wobbles +-1 semitone: ~4% spread; steady tones stay under 1.2%
        timbre = "vibrato"
    else:
        steady = {t for t in TIMBRE.values() if t != "vibrato"}
        timbre = min(steady, key=lambda t: np.linalg.norm(fingerprint - _expected_fingerprint(t)))
    level_db = 20 * np.log10(np.sqrt((seg**2).mean()) / REFERENCE_RMS)
    return {
        "colour": colour,
        "shape": {t: s for s, t in TIMBRE.items()}[timbre],
        "size": min(GAIN_DB, key=lambda s: abs(GAIN_DB[s] - level_db)),
        "position": min(ONSET_S, key=lambda p: abs(ONSET_S[p] - start / sr)),
    }


def test_every_attribute_is_decoded_from_the_audio_by_the_rules(world):
    for r in _all_rows(world):
        wave, sr = sf.read(str(world / r["audio"]))
        starts = _events(wave)
        assert len(starts) == len(r["objects"]), r["label"]
        decoded = [_decode_event(wave, s, sr) for s in starts]
        assert decoded == r["objects"], r["label"]


def test_large_events_are_louder_than_small_ones(world):
    levels: dict[str, list[float]] = {"small": [], "large": []}
    for r in _all_rows(world):
        wave, _ = sf.read(str(world / r["audio"]))
        for start, obj in zip(_events(wave), r["objects"]):
            seg = wave[start + 640 : start + 4160]
            levels[obj["size"]].append(20 * np.log10(np.sqrt((seg**2).mean())))
    assert min(levels["large"]) - max(levels["small"]) > 8.0  # 12 dB apart, +-1 dB jitter each


# ---------------------------------------------------------------- image carries the meaning
def _decode_image(path: Path) -> list[dict[str, str]]:
    """Colour, size and position of each object from pixels: background from the top and bottom
    rows (objects never reach them), foreground by colour distance, one blob per third."""
    pixels = np.asarray(Image.open(path), dtype=np.float64)  # (H, W, 3)
    h, w, _ = pixels.shape
    background = np.median(np.concatenate([pixels[:3], pixels[-3:]]).reshape(-1, 3), axis=0)
    mask = np.abs(pixels - background).max(axis=2) > 35
    objects = []
    for position, fx in X_FRACTION.items():
        cols = slice(int((fx - 1 / 6) * w), int((fx + 1 / 6) * w))
        ys, xs = np.nonzero(mask[:, cols])
        if len(xs) < 12:  # a few noise pixels, not an object
            continue
        colour_rgb = np.median(pixels[:, cols][ys, xs], axis=0)
        colour = min(PALETTE_RGB, key=lambda c: np.linalg.norm(colour_rgb - PALETTE_RGB[c]))
        centre = (xs.mean() + cols.start) / w
        assert min(X_FRACTION, key=lambda p: abs(X_FRACTION[p] - centre)) == position  # centroid in its slot
        objects.append({"colour": colour, "area": len(xs), "position": position})
    return objects


def _polygon_area(points) -> float:
    x, y = np.array(points).T
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def test_colour_size_and_position_are_decoded_from_the_pixels(world):
    for r in _all_rows(world):
        found = _decode_image(world / r["image"])
        assert [(f["colour"], f["position"]) for f in found] == [(o["colour"], o["position"]) for o in r["objects"]]
        for f, o in zip(found, r["objects"]):
            # radius implied by the blob's area and the shape's documented outline
            radius = np.sqrt(f["area"] / _polygon_area(outline(o["shape"]))) / 64
            assert min(RADIUS_FRACTION, key=lambda s: abs(RADIUS_FRACTION[s] - radius)) == o["size"], r["label"]


# ---------------------------------------------------------------- text carries the meaning
def test_every_caption_parses_back_to_the_scene_objects(world):
    for r in _all_rows(world):
        for caption in r["captions"]:
            assert sorted(parse_caption(caption)) == sorted(SceneObject.from_dict(o) for o in r["objects"]), caption


def test_synonyms_never_cross_attributes_or_values():
    words = [w for table in SYNONYMS.values() for ws in table.values() for w in ws]
    assert len(words) == len(set(words))
    assert all(len(SYNONYMS["colour"][c]) == 1 for c in ATTRIBUTES["colour"])  # colours stay unambiguous
    with pytest.raises(ValueError, match="not 4 per object"):
        parse_caption("a big red circle")


ASKED = {
    "what colour": "colour",
    "what shape": "shape",
    "where is": "position",
    "what size": "size",
    "small or large": "size",
}


def _check_question(question: str, answer: str, objects: list[dict]) -> None:
    if question == "how many objects are there?":
        assert answer == {1: "one", 2: "two"}[len(objects)]
        return
    if question.startswith("is there"):
        wanted = dict(mentions(question))
        assert answer == ("yes" if any(all(o[k] == v for k, v in wanted.items()) for o in objects) else "no")
        return
    asked = next(attr for cue, attr in ASKED.items() if cue in question)
    ref = dict(mentions(question.replace("small or large", "")))
    assert asked not in ref, question  # the question never gives its answer away
    matches = [o for o in objects if all(o[k] == v for k, v in ref.items())]
    assert len(matches) == 1 and matches[0][asked] == answer, question


def test_questions_are_unambiguous_and_answers_match_objects(world):
    for r in _all_rows(world):
        for qa in r["qa"]:
            _check_question(qa["question"], qa["answer"], r["objects"])
        if len(r["objects"]) == 1:  # count, existence, and all four attributes of the object
            assert len(r["qa"]) == 6


def test_pair_questions_compare_with_a_scene_of_the_same_split(world):
    answers = []
    for split in SPLITS:
        rows = {r["id"]: r for r in _rows(world, split)}
        for r in rows.values():
            for pair in r["pairs"]:
                other = rows[pair["other"]]  # KeyError if the partner is in another split
                assert pair["other"] != r["id"] and pair["modalities"][0] != pair["modalities"][1]
                key = next(k for k in ("colour", "shape", "scene", "number") if k in pair["question"])
                prop = {
                    "colour": lambda row: {o["colour"] for o in row["objects"]},
                    "shape": lambda row: {o["shape"] for o in row["objects"]},
                    "scene": lambda row: row["label"],
                    "number": lambda row: len(row["objects"]),
                }[key]
                assert pair["answer"] == ("yes" if prop(r) == prop(other) else "no"), pair
                answers.append(pair["answer"])
    assert 0.2 < answers.count("yes") / len(answers) < 0.8


def test_describe_scene_names_what_is_seen_and_heard(world):
    row = _rows(world, "train")[0]
    text = describe_scene(row)
    for o in row["objects"]:
        assert f"{PITCH_HZ[o['colour']]:.0f} Hz" in text and o["colour"] in text and o["shape"] in text
    with pytest.raises(ValueError, match="objects"):
        describe_scene({"text": "no objects here"})


_STAR = {"shape": "star", "colour": "red", "size": "small", "position": "left"}


@pytest.mark.parametrize("row, message", [
    ({"objects": []}, "non-empty 'objects' list"),
    ({"objects": "abc"}, "non-empty 'objects' list"),
    ({"objects": None}, "non-empty 'objects' list"),
    ({"objects": ["abc"]}, "an object must be a mapping"),
    ({"objects": [{"shape": "star"}]}, "has colour=None; expected one of red"),
    ({"objects": [{**_STAR, "shape": "hexagon"}]}, "has shape='hexagon'; expected one of circle"),
    ({"objects": [_STAR, {**_STAR, "size": 3}]}, "has size=3; expected one of small, large"),
])
def test_describe_scene_names_what_is_wrong_with_a_malformed_row(row, message):
    """It raised a bare IndexError, KeyError or TypeError, though it promises a ValueError."""
    with pytest.raises(ValueError, match=message):
        describe_scene(row)


# ---------------------------------------------------------------- caching, interruption, errors
def test_rerun_reuses_a_complete_world_and_regenerates_after_interruption(tmp_path, monkeypatch):
    import mmembed.data.synth.generate as gen

    root = tmp_path / "w"
    generate_world(root, n=8, seed=1, workers=1)
    before = _files(root)
    stamp = (root / "world.json").stat().st_mtime_ns
    again = generate_world(root, n=8, seed=1, workers=1)
    assert again.reused and (root / "world.json").stat().st_mtime_ns == stamp

    calls = []
    render = gen._render_chunk

    def crash_on_second_chunk(task):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C mid-generation
        return render(task)

    monkeypatch.setattr(gen, "CHUNK", 2)
    monkeypatch.setattr(gen, "_render_chunk", crash_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        generate_world(root, n=8, seed=1, workers=1, overwrite=True)
    assert not (root / "world.json").exists()  # the interrupted world reads as incomplete
    monkeypatch.setattr(gen, "_render_chunk", render)
    redone = generate_world(root, n=8, seed=1, workers=1)
    assert not redone.reused and _files(root) == before


def test_changed_parameters_regenerate_without_stale_files(tmp_path, caplog):
    """A config whose data.synth changed replaces the world (`replace`, what prepare_data passes),
    saying so; the command and the Python default refuse: `mmembed data synth --out data/shapes --n 10`
    deleted the 6,000 scenes the demo's runs were trained on, with only a warning."""
    root = tmp_path / "w"
    generate_world(root, n=20, seed=1, workers=1)
    with pytest.raises(UserError, match=r"w holds a synthetic world made with other parameters \(n 20 → 10, n_heldout 2 → 1\), and "
                                        r"runs trained on it read it: pass --overwrite \(overwrite=True\)"):
        generate_world(root, n=10, seed=1, workers=1)
    assert len(list((root / "images").iterdir())) == 22  # untouched
    assert main(["data", "synth", "--out", str(root), "--n", "10", "--seed", "1", "--workers", "1"]) == 2
    assert len(list((root / "images").iterdir())) == 22
    with caplog.at_level(logging.WARNING):
        small = generate_world(root, n=10, seed=1, workers=1, replace=True)
    assert not small.reused and len(list((root / "images").iterdir())) == small.total == 11
    assert "replacing the synthetic world" in caplog.text and "n 20 → 10" in caplog.text  # said, not silent


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, "n=0"),
        ({"n": 10, "split": (0.5, 0.2, 0.2)}, "summing to 1"),
        ({"n": 10, "heldout_fraction": 0.95}, "heldout_fraction"),
        ({"n": 10, "image_size": 8}, "image_size"),
        ({"n": 10, "seed": -1}, "seed"),
        ({"n": 10, "sample_rate": 8000}, "upper partials alias"),  # an 8 kHz bell folds a partial onto green's
        ({"n": 10, "heldout_fraction": 0.0, "n_heldout": 5}, "held-out combinations"),
        # it said "set heldout_fraction > 0" of a fraction that was
        ({"n": 10, "heldout_fraction": 0.01, "n_heldout": 5}, r"round\(0.01 x 36\) = 0 of the 36"),
        ({"n": 10**12}, r"must be an integer in \[1, 1,000,000\]"),  # it filled the memory, then the disk
    ],
)
def test_bad_parameters_are_one_readable_error(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        generate_world(tmp_path / "w", **kwargs)
    assert not (tmp_path / "w" / "images").exists()  # rejected before touching the disk


def test_a_second_generator_of_one_folder_is_refused(tmp_path):
    """Two at once: the second cleared the first's files mid-run, and the folder ended as a world
    of both runs' scenes whose world.json described the first (and no marker said otherwise)."""
    import subprocess
    import sys

    root = tmp_path / "w"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from pathlib import Path; from mmembed.file_lock import exclusive\n"
        f"Path({str(root)!r}).mkdir()\n"
        f"with exclusive(Path({str(root)!r}), str): print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="is being written by another process .*; wait for it"):
            generate_world(root, n=4, workers=1)
    finally:
        holder.kill()
        holder.wait()
    assert generate_world(root, n=4, workers=1).total == 4  # the lock went with its holder


def test_lookups_and_a_generator_of_one_world_exclude_each_other(tmp_path, monkeypatch):
    """Lookups took no lock: a `data synth` replacing the world while they were built left them
    pairing the new world's pictures with the old scenes' answers."""
    fcntl = pytest.importorskip("fcntl")
    import os
    import threading

    from mmembed.data.synth import lookups

    root = tmp_path / "w"
    generate_world(root, n=20, seed=1, workers=1)
    fd = os.open(root, os.O_RDONLY)  # another holder of the world's lock (a generator's)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match="is being written by another process"):
            lookups.write_lookup_rows(root, 2)
    finally:
        os.close(fd)
    assert not list(root.glob("instruct-train-lookups*"))
    # and a generator started while the lookups are being built is refused
    refused, lookup_rows = [], lookups.lookup_rows

    def replace_meanwhile(*args):
        def regenerate():
            try:
                generate_world(root, n=10, seed=5, workers=1)
            except UserError as e:
                refused.append(str(e))
        thread = threading.Thread(target=regenerate)  # another thread takes the lock as another process would
        thread.start()
        thread.join()
        return lookup_rows(*args)

    monkeypatch.setattr(lookups, "lookup_rows", replace_meanwhile)
    before = (root / "world.json").read_bytes()
    lookups.write_lookup_rows(root, 2)
    assert refused and "is in use by another process: a world being written" in refused[0]
    assert (root / "world.json").read_bytes() == before


def test_regenerating_removes_the_lookups_written_for_the_old_world(tmp_path):
    """They paired the new world's pictures with the old scenes' answers."""
    from mmembed.data.synth.lookups import write_lookup_rows

    root = tmp_path / "w"
    generate_world(root, n=20, seed=1, workers=1)
    assert write_lookup_rows(root, 2).is_file()
    generate_world(root, n=20, seed=2, workers=1, replace=True)
    assert not list(root.glob("instruct-train-lookups*"))


def test_a_crash_while_clearing_the_old_world_leaves_an_incomplete_one(tmp_path, monkeypatch):
    """world.json went first and the marker came after the clear: a crash in between left a
    folder the next run refused as "not a world made here"."""
    import shutil

    root = tmp_path / "w"
    generate_world(root, n=4, seed=0, workers=1)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_world(root, n=4, seed=1, workers=1, replace=True)
    monkeypatch.undo()
    assert (root / ".synth-incomplete").is_file()
    assert generate_world(root, n=4, seed=1, workers=1).total == 4


def test_the_heldout_fraction_the_error_suggests_holds_a_pair_out(tmp_path):
    """It said "set it to 1/72 (0.014) or more", but round(1/72 x 36) = round(0.5) = 0 fails the same way."""
    import re

    with pytest.raises(UserError, match=r"round\(0.01 x 36\) = 0") as failed:
        generate_world(tmp_path / "w", n=20, heldout_fraction=0.01, n_heldout=5)
    suggested = re.search(r"set it to more than 1/72 \(e\.g\. ([0-9.]+)\)", str(failed.value))
    assert suggested, str(failed.value)
    assert choose_heldout_combos(0, float(suggested.group(1))) and not choose_heldout_combos(0, 1 / 72)
    with pytest.raises(UserError, match="more than 1/72"):
        generate_world(tmp_path / "w", n=20, heldout_fraction=1 / 72, n_heldout=5)


@pytest.mark.parametrize("kwargs", [
    {"n": True}, {"seed": True}, {"workers": True}, {"n_heldout": True},
    {"split": (True, False, False)}, {"heldout_fraction": False},
])
def test_bools_are_refused(tmp_path, kwargs):
    """n=True made a 1-scene world with "n": true in its world.json; seed=True, a split of bools passed."""
    with pytest.raises(UserError, match="must be"):
        generate_world(tmp_path / "w", **{"n": 4, "workers": 1, **kwargs})


def test_numpy_numbers_make_the_world_plain_ones_make(tmp_path):
    """n=np.int64(20) was refused as "must be an integer"."""
    plain = generate_world(tmp_path / "plain", n=6, seed=2, workers=1, n_heldout=1)
    numpy = generate_world(tmp_path / "numpy", n=np.int64(6), seed=np.int32(2), image_size=np.int64(64),
                           workers=np.int64(1), n_heldout=np.int64(1), split=tuple(np.array([0.8, 0.1, 0.1])))
    assert _files(numpy.root) == _files(plain.root)  # world.json included: plain ints, not numpy's
    assert type(json.loads(numpy.world_json.read_text())["params"]["n"]) is int


def test_refuses_to_write_into_an_unrelated_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        generate_world(tmp_path, n=4)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_refuses_a_folder_whose_world_json_it_did_not_write(tmp_path):
    """Another tool's world.json (and its images/) must not read as a synthetic world to clear."""
    (tmp_path / "world.json").write_text(json.dumps({"format": "someone-elses", "scenes": 3}))
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "mine.png").write_bytes(b"not ours")
    with pytest.raises(UserError, match="not empty.*--overwrite"):
        generate_world(tmp_path, n=4, workers=1)
    assert (tmp_path / "images" / "mine.png").read_bytes() == b"not ours"
    assert json.loads((tmp_path / "world.json").read_text())["format"] == "someone-elses"
    generate_world(tmp_path, n=4, workers=1, overwrite=True)  # told to: it may
    assert json.loads((tmp_path / "world.json").read_text())["format"] == "mmembed-synth"


def test_image_size_and_sample_rate_are_honoured(tmp_path):
    summary = generate_world(tmp_path / "w", n=6, seed=2, image_size=96, sample_rate=22050, workers=1)
    for r in _rows(tmp_path / "w", "train"):
        with Image.open(summary.root / r["image"]) as im:
            assert im.size == (96, 96)
        wave, sr = sf.read(str(summary.root / r["audio"]))
        assert sr == 22050 and [_decode_event(wave, s, sr) for s in _events(wave)] == r["objects"]


def test_training_refuses_a_world_whose_generation_was_interrupted(tmp_path):
    """A Ctrl-C mid-render left manifests naming media never written, and `train` ran on them with
    a warning that it skipped most rows."""
    from mmembed.config import DataConfig
    from mmembed.errors import UserError
    from mmembed.train.data_setup import prepare_data

    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "train.jsonl").write_text('{"image": "images/s0.png", "text": "a red star"}\n')
    (tmp_path / "w" / ".synth-incomplete").write_text("{}")
    with pytest.raises(UserError, match=r"generation was interrupted \(\.synth-incomplete\).*--overwrite"):
        prepare_data(DataConfig(root=str(tmp_path / "w")))
    (tmp_path / "w" / ".synth-incomplete").unlink()
    assert prepare_data(DataConfig(root=str(tmp_path / "w"))) == tmp_path / "w"


def test_a_config_pointing_the_world_at_its_own_data_is_told_how_to_use_it(tmp_path):
    """`mmembed train CFG data.root=MINE data.synth={...} --overwrite` said only 'pass --overwrite',
    which is the run folder's (and `mmembed demo` has none): the message says what a config sets."""
    import re

    from mmembed.config import DataConfig, SynthConfig
    from mmembed.train.data_setup import prepare_data

    (tmp_path / "train.jsonl").write_text('{"image": "a.png", "text": "mine"}\n')
    with pytest.raises(UserError, match=rf"^data\.root {re.escape(str(tmp_path))} is not empty and holds no synthetic "
                                        rf"world made here, which data\.synth would write: set data\.synth=null to "
                                        rf"train on the manifests in {re.escape(str(tmp_path))}, or choose an empty "
                                        r"data\.root$"):
        prepare_data(DataConfig(root=str(tmp_path), synth=SynthConfig(n=4)))
    assert [p.name for p in tmp_path.iterdir()] == ["train.jsonl"]


def test_n_heldout_is_capped_with_n_before_any_scene_is_sampled(tmp_path):
    """generate_world took any n_heldout (a config caps n + n_heldout at MAX_SCENES): a typo of a
    few zeros sampled every scene in memory before anything was written."""
    from mmembed.data.synth.generate import MAX_SCENES

    with pytest.raises(UserError, match=rf"^n_heldout=1000000000 must be an integer in \[0, {MAX_SCENES - 10:,}\]"):
        generate_world(tmp_path / "w", n=10, n_heldout=10**9)
    assert not (tmp_path / "w").exists()
