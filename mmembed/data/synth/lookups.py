"""Lookup rows beside a generated world: `write_lookup_rows` rebuilds the world's training scenes
from its world.json and writes `instruct-train-lookups<per_item>.jsonl`, the world's training
instruction rows plus questions that find one object by an attribute and ask another. The world
itself is written by generate.py; its folder's state is world_folder.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mmembed.checkpoint import atomic_write_text
from mmembed.data.synth.instructions import lookup_rows
from mmembed.data.synth.rules import SYNTH_VERSION
from mmembed.data.synth.world import sample_world
from mmembed.data.synth.world_folder import LOOKUPS, _busy
from mmembed.errors import UserError
from mmembed.file_lock import shared

log = logging.getLogger("mmembed.data.synth.generate")  # the generator's lines keep their logger name
MAX_LOOKUPS = 1_000


def write_lookup_rows(root: Path | str, per_item: int) -> Path:
    """Write `instruct-train-lookups<per_item>.jsonl` beside a world's manifests: the world's
    training instruction rows, then `per_item` more questions per two-object training scene and
    modality that find one object by an attribute and ask another (`instructions.lookup_rows`).
    Train a decoder on it with `decoder.data.train=instruct-train-lookups<per_item>.jsonl`.

    Raises:
        UserError: no world in `root`, or one written by another `SYNTH_VERSION` (its scenes
            cannot be rebuilt), or one with no training scenes, or `per_item` < 1, or the world
            is being generated (or its lookups written) by another process.
    """
    root = Path(root)
    if isinstance(per_item, bool) or not isinstance(per_item, int) or not 1 <= per_item <= MAX_LOOKUPS:
        raise UserError(f"lookups per item must be an integer in [1, {MAX_LOOKUPS}], got {per_item!r} "
                        "(every row is built in memory before the file is written)")
    if not root.is_dir():  # checked first: `exclusive` would create a lock file where the folder should be
        raise UserError(f"{root} holds no complete synthetic world; write one with `mmembed data synth`")
    # the world's readers' lock, which a generator waits for: a `data synth` replacing the world
    # mid-run left lookups that paired the new world's pictures with the old scenes' answers (the
    # lookups file itself is written whole, by one rename)
    with shared(root, _busy(root)):
        return _write_lookups(root, per_item)


def _write_lookups(root: Path, per_item: int) -> Path:
    try:
        world = json.loads((root / "world.json").read_text(encoding="utf-8"))
        params = world["params"]
        version, seed = params["version"], params["seed"]
        sampling = (seed, params["n"], params["n_heldout"], tuple(params["split"]),
                    [tuple(c) for c in world["heldout_combos"]])
        train = [json.loads(line) for line in (root / "train.jsonl").read_text(encoding="utf-8").splitlines()]
        base = (root / "instruct-train.jsonl").read_text(encoding="utf-8")
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{root} holds no complete synthetic world (world.json, train.jsonl, instruct-train.jsonl); "
                        "write one with `mmembed data synth`") from None
    if version != SYNTH_VERSION:
        raise UserError(f"{root} was written by world version {version}, this mmembed writes "
                        f"{SYNTH_VERSION}: regenerate it (`mmembed data synth --overwrite`)")
    if not train:  # lookups ask about training scenes: the file was empty, and recommended for training
        raise UserError(f"{root} has no training scenes (split={params['split']}), so no lookups to ask: "
                        "regenerate it with a training fraction above 0")
    try:
        scenes = sample_world(*sampling)
        rows = lookup_rows([s for s in scenes if s.split == "train"], train, seed, per_item, sampling[-1])
    except (ValueError, TypeError):  # (a hand-edited world.json: an "n" of "40" was a TypeError traceback)
        raise UserError(f"{root / 'train.jsonl'} does not hold the scenes its world.json describes; "
                        "regenerate the world (`mmembed data synth --overwrite`)") from None
    out = root / f"{LOOKUPS}{per_item}.jsonl"
    atomic_write_text(out, base + "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows))
    log.info("wrote %s: %d rows of the world and %d lookups", out, base.count("\n"), len(rows))
    return out
