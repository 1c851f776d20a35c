"""Write a synthetic world to disk: PNG + WAV per scene, JSONL manifests per split, world.json.

Layout of `out_dir`:

    images/s000000.png   audio/s000000.wav   ...
    train.jsonl  val.jsonl  test.jsonl  heldout.jsonl
    instruct-train.jsonl ... instruct-heldout.jsonl   decoder prompts and answers (instructions.py)
    world.json           written last: its presence marks a complete world

Scenes are sampled (cheaply) in the calling process; pictures and sounds are rendered by a
process pool over chunks. Each scene's pixels and samples come from its own seeded generator,
so the files are byte-identical whatever the number of workers. The workers leave Ctrl-C to the
calling process, which cancels the pool, and die with it when it is killed.

A world's folder (the unfinished marker, reuse, clearing, `WorldSummary`) is world_folder.py;
lookup rows written beside a world are lookups.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import multiprocessing
import numbers
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from mmembed.checkpoint import atomic_write, atomic_write_json, atomic_write_text, make_output_folder
from mmembed.data.synth.captions import POSITION_PHRASES, SYNONYMS, captions_for
from mmembed.data.synth.instructions import instruction_rows
from mmembed.data.synth.questions import pairs_for_split, questions_for
from mmembed.data.synth.render_audio import render_audio, save_wav
from mmembed.data.synth.render_image import render_image, save_png
from mmembed.data.synth.rules import ATTRIBUTES, SYNTH_VERSION, rules_json
from mmembed.data.synth.world import (
    KIND_WORLD,
    SPLITS,
    STREAM_AUDIO,
    STREAM_IMAGE,
    STREAM_TEXT,
    Scene,
    choose_heldout_combos,
    rng_for,
    sample_world,
    split_counts,
)
from mmembed.data.synth.world_folder import (
    INCOMPLETE,
    WorldSummary,
    _busy,
    _in_use,
    holds_other_files,
    _changed,
    _clear,
    _existing,
    _made_here,
    _summary,
)
from mmembed.errors import UserError
from mmembed.file_lock import exclusive, shared

log = logging.getLogger(__name__)
# a typo of a few zeros filled the memory before a file was written: scenes are sampled in memory,
# and a split's manifest rows are held while its instructions are written (20k scenes: +110 MB)
MAX_SCENES = 1_000_000

T = TypeVar("T")
CHUNK = 64  # scenes per pool task: large enough to amortise IPC, small enough to balance 2 workers
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _render_chunk(task: tuple[str, int, int, int, list[Scene]]) -> int:
    """Render and write the files of a chunk of scenes (runs in a pool worker)."""
    root, seed, image_size, sample_rate, scenes = task
    for s in scenes:
        pixels = render_image(s.objects, rng_for(seed, s.kind, s.index, STREAM_IMAGE), image_size)
        save_png(pixels, os.path.join(root, "images", f"{s.id}.png"))
        wave = render_audio(s.objects, rng_for(seed, s.kind, s.index, STREAM_AUDIO), sample_rate)
        save_wav(wave, os.path.join(root, "audio", f"{s.id}.wav"), sample_rate)
    return len(scenes)


def _die_with_parent() -> bool:
    """Have Linux kill this process when its parent dies; False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        args = (ctypes.c_ulong(v) for v in (int(signal.SIGKILL), 0, 0, 0))  # prctl reads unsigned longs
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, *args) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:  # an orphan is adopted by another process
        time.sleep(0.5)
    os._exit(1)


def _init_worker(parent: int) -> None:
    """First thing in each render worker. Ctrl-C is the parent's to handle (a worker printed a
    KeyboardInterrupt traceback), and the worker dies with its parent (a killed `data synth` left
    its workers rendering forever)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by _sigint_held
    if not _die_with_parent():
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # it died before the line above took effect
        os._exit(1)


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold Ctrl-C back while the workers start: each inherits it blocked, so none is interrupted
    before `_init_worker` ignores it; this process gets it on leaving."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _render_all(
    root: Path,
    scenes: list[Scene],
    params: dict[str, Any],
    workers: int,
    progress: Callable[[int, int], None] | None,
    meanwhile: Callable[[], T],
) -> T:
    """Render every scene with `workers` processes; run `meanwhile()` here while they work."""
    settings = (str(root), params["seed"], params["image_size"], params["sample_rate"])
    tasks = [(*settings, scenes[i : i + CHUNK]) for i in range(0, len(scenes), CHUNK)]
    pool = None
    if workers > 1 and len(tasks) > 1:
        # fork is cheapest (workers inherit the imported modules); spawn elsewhere.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method),
                                   initializer=_init_worker, initargs=(os.getpid(),))
    try:
        # Executor.map submits every task at once (starting the workers), so they render during `meanwhile`.
        with _sigint_held():
            results = pool.map(_render_chunk, tasks) if pool is not None else map(_render_chunk, tasks)
        value = meanwhile()
        done = 0
        for count in results:
            done += count
            if progress is not None:
                progress(done, len(scenes))
        return value
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)  # waits for the running chunks: no worker outlives this


def manifest_row(scene: Scene, seed: int, pairs: list[dict[str, Any]],
                 heldout: Sequence[tuple[str, str]] = ()) -> dict[str, Any]:
    """The JSONL row of one scene: media paths, captions, label, objects, QA and pairs; no text
    outside the held-out split names a `heldout` pair."""
    rng = rng_for(seed, scene.kind, scene.index, STREAM_TEXT)
    captions = captions_for(scene.objects, rng)
    return {
        "id": scene.id,
        "image": f"images/{scene.id}.png",
        "audio": f"audio/{scene.id}.wav",
        "text": captions[0],
        "captions": captions,
        "label": scene.label,
        "objects": [o.as_dict() for o in scene.objects],
        "qa": questions_for(scene.objects, rng, () if scene.split == "heldout" else heldout),
        "pairs": pairs,
    }


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """One JSON row a line, written as the rows come (the instruction rows of a split, ~11 a scene,
    were held as a list and then as one string: ~25 KB of memory a scene, 25 GB for 1M scenes)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, separators=(",", ":")) + "\n" for row in rows)

    atomic_write(path, write)


def _write_manifests(root: Path, scenes: list[Scene], seed: int, heldout: list[tuple[str, str]]
                     ) -> dict[str, int]:
    counts = {}
    for k, split in enumerate(SPLITS):
        members = [s for s in scenes if s.split == split]
        pairs = pairs_for_split(members, rng_for(seed, KIND_WORLD, k + 1, STREAM_TEXT))
        rows = [manifest_row(s, seed, pairs[s.id], heldout) for s in members]
        _write_jsonl(root / f"{split}.jsonl", rows)
        _write_jsonl(root / f"instruct-{split}.jsonl", instruction_rows(members, rows, seed, heldout))
        counts[split] = len(members)
    return counts


def _integer(x: Any) -> bool:
    """An int or a numpy integer; not a bool (n=True made a 1-scene world with "n": true in world.json)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def validate_params(
    n: int, seed: int, image_size: int, sample_rate: int = 16000, workers: int = 1, split: Any = (0.8, 0.1, 0.1),
    heldout_fraction: Any = 0.1,
) -> None:
    """UserError naming the first parameter of a world that cannot be generated."""
    checks = [
        (_number(heldout_fraction), f"heldout_fraction={heldout_fraction!r} must be a number"),
        (_integer(n) and 1 <= n <= MAX_SCENES, f"n={n!r} must be an integer in [1, {MAX_SCENES:,}] "
                                                      "(every scene is sampled in memory first)"),
        (_integer(seed) and seed >= 0, f"seed={seed!r} must be an integer >= 0"),
        (_integer(image_size) and 16 <= image_size <= 1024, f"image_size={image_size!r} must be in [16, 1024]"),
        (
            _integer(sample_rate) and 16000 <= sample_rate <= 96000,  # below, the bells' partials alias
            f"sample_rate={sample_rate!r} must be in [16000, 96000] (below 16 kHz the upper partials alias)",
        ),
        (_integer(workers) and workers >= 1, f"workers={workers!r} must be >= 1"),
        (
            isinstance(split, (list, tuple)) and len(split) == 3 and all(_number(f) for f in split),
            f"split={split!r} must be a list or tuple of three fractions (train, val, test) summing to 1",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    split_counts(n, tuple(split))  # the fractions sum to 1


def _world_json(params: dict[str, Any], heldout: list[tuple[str, str]], counts: dict[str, int]) -> dict[str, Any]:
    rules = rules_json()
    rules["text"] = {"synonyms": SYNONYMS, "position_phrases": POSITION_PHRASES}
    return {
        "format": "mmembed-synth",
        "params": params,
        "attributes": {k: list(v) for k, v in ATTRIBUTES.items()},
        "rules": rules,
        "heldout_combos": [list(c) for c in heldout],
        "counts": counts,
        "manifests": {split: f"{split}.jsonl" for split in SPLITS},
        "instructions": {split: f"instruct-{split}.jsonl" for split in SPLITS},
    }


def generate_world(
    out_dir: Path | str,
    n: int,
    seed: int = 0,
    image_size: int = 64,
    sample_rate: int = 16000,
    workers: int = 2,
    split: tuple[float, float, float] = (0.8, 0.1, 0.1),
    heldout_fraction: float = 0.1,
    n_heldout: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    replace: bool = False,
) -> WorldSummary:
    """Generate (or reuse) the built-in synthetic world of shapes, tones and captions.

    Args:
        out_dir: folder to write into; created if missing.
        n: number of in-distribution scenes, divided among train/val/test by `split`.
        seed: world seed; the same seed and parameters give byte-identical files.
        image_size: picture width and height in pixels.
        sample_rate: audio samples per second.
        workers: render processes (1 = in this process); does not change any output byte.
        split: (train, val, test) fractions of `n`, summing to 1.
        heldout_fraction: fraction (0 to 0.5) of the 36 (shape, colour) pairs kept out of
            train/val/test.
        n_heldout: scenes in `heldout.jsonl`, each holding a held-out pair; default n // 10
            (0 when no pair is held out).
        overwrite: regenerate even if an identical complete world is already there, and allow
            writing into a non-empty folder that is not a synthetic world.
        progress: called as progress(done, total) while rendering (e.g. to drive a tqdm bar).
        replace: replace a world made here with other parameters, with a warning (what a config's
            changed `data.synth` does); otherwise that needs `overwrite` (`mmembed data synth --n 10`
            into the demo's world deleted the 6,000 scenes its runs were trained on).

    Returns:
        WorldSummary with the manifest and instruction-manifest paths and per-split counts;
        `reused` is True when a complete world with the same parameters was found and nothing
        was written.

    Raises:
        UserError: bad parameters, or `out_dir` holds unrelated files, or a world made with other
            parameters without `replace`, and overwrite is False.
    """
    root = Path(out_dir)
    validate_params(n, seed, image_size, sample_rate, workers, split, heldout_fraction)
    # numpy integers are welcome, as plain ints: world.json is JSON
    n, seed, image_size, sample_rate, workers = (int(v) for v in (n, seed, image_size, sample_rate, workers))
    heldout_fraction = float(heldout_fraction)
    heldout = choose_heldout_combos(seed, heldout_fraction)
    if n_heldout is None:
        n_heldout = n // 10 if heldout else 0
    if not _integer(n_heldout) or not 0 <= n_heldout <= MAX_SCENES - n:  # every scene is sampled in memory first
        raise UserError(f"n_heldout={n_heldout!r} must be an integer in [0, {MAX_SCENES - n:,}] "
                        f"(n + n_heldout at most {MAX_SCENES:,}: every scene is sampled in memory first)")
    n_heldout = int(n_heldout)
    if n_heldout > 0 and not heldout:
        # round() halves to even: 1/72 x 36 = 0.5 rounds to 0, so the threshold itself holds out none
        raise UserError(f"n_heldout={n_heldout} needs held-out combinations, and heldout_fraction={heldout_fraction} "
                        f"holds out round({heldout_fraction} x 36) = 0 of the 36 (shape, colour) pairs: "
                        "set it to more than 1/72 (e.g. 0.014), or n_heldout=0")
    params = {
        "version": SYNTH_VERSION,
        "n": n,
        "n_heldout": n_heldout,
        "seed": seed,
        "image_size": image_size,
        "sample_rate": sample_rate,
        "split": [float(f) for f in split],
        "heldout_fraction": heldout_fraction,
    }
    make_output_folder(root, "out_dir")  # a file there or above it: one line, exit 2
    if not overwrite:  # an identical world is only read: the readers' lock, which runs training on it hold too
        with shared(root, _busy(root)):
            if (world := _existing(root, params)) is not None:
                log.info("reusing the synthetic world in %s (same parameters)", root)
                return _summary(root, world, reused=True)
    # one generator at a time, and none while a run reads the world (the folder itself is the lock:
    # no file in the world): a second one cleared the first's files mid-run, and the two left a world
    # of mixed scenes that read as complete; a demo with another world size deleted the one a running
    # demo trained on
    with exclusive(root, _in_use(root)):
        return _generate(root, params, heldout, workers, overwrite, progress, replace)


def _generate(root: Path, params: dict[str, Any], heldout: list[tuple[str, str]], workers: int, overwrite: bool,
              progress: Callable[[int, int], None] | None, replace: bool) -> WorldSummary:
    if not overwrite and (world := _existing(root, params)) is not None:
        log.info("reusing the synthetic world in %s (same parameters)", root)
        return _summary(root, world, reused=True)
    marker = root / INCOMPLETE
    changed = _changed(root, params) if _made_here(root) else None
    if changed not in (None, "incomplete", "unknown") and not overwrite and not replace:  # a damaged one goes
        raise UserError(f"{root} holds a synthetic world made with other parameters ({changed}), and runs trained "
                        "on it read it: pass --overwrite (overwrite=True) to replace it, or choose another folder")
    if changed is not None and not overwrite:  # a run with other data.synth values replaces the world
        if changed in ("incomplete", "unknown"):  # the same parameters, or unreadable ones: files missing
            log.warning("replacing the synthetic world in %s: some of its files are missing", root)
        else:
            log.warning("replacing the synthetic world in %s: it was made with other parameters (%s)", root, changed)
    if holds_other_files(root) and not overwrite:  # (a config's data.synth is refused earlier: `prepare_data`)
        raise UserError(f"{root} is not empty and holds no synthetic world made here; choose an empty folder or pass "
                        "--overwrite (overwrite=True)")
    atomic_write_text(marker, json.dumps(params))  # before the clear: a crash in it leaves an incomplete world
    _clear(root)
    for sub in ("images", "audio"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    scenes = sample_world(params["seed"], params["n"], params["n_heldout"], tuple(params["split"]), heldout)
    log.info("generating %d scenes in %s with %d workers", len(scenes), root, workers)
    write_manifests = functools.partial(_write_manifests, root, scenes, params["seed"], heldout)
    counts = _render_all(root, scenes, params, workers, progress, meanwhile=write_manifests)
    world = _world_json(params, heldout, counts)
    atomic_write_json(root / "world.json", world)
    marker.unlink()
    return _summary(root, world, reused=False)
