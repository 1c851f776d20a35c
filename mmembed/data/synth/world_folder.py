"""A world's folder on disk: the marker of an unfinished generation (`check_complete`), the
`WorldSummary` read back from world.json, how a complete world with the same parameters, one made
here with others, and the files to clear are recognised, and the refusal while it is being
written. generate.py writes the world; lookups.py writes lookup rows beside it.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmembed.data.synth.world import SPLITS
from mmembed.errors import UserError
from mmembed.file_lock import shared

INCOMPLETE = ".synth-incomplete"  # in a world folder while it is being made (and after an interrupted run)
LOOKUPS = "instruct-train-lookups"  # + per_item + .jsonl: `write_lookup_rows`


def reading(root: str | Path) -> contextlib.AbstractContextManager:
    """Hold the readers' lock on the data folder `root` (nothing when there is no such folder): a
    world's generator, which takes it exclusively, is refused while it is held, and a reader is
    refused while a generator writes. Readers do not exclude each other."""
    root = Path(root)
    return shared(root, _busy(root)) if root.is_dir() else contextlib.nullcontext()


def check_complete(root: str | Path, hint: str = "") -> None:
    """UserError when `root` holds a world whose generation was interrupted: its manifests name media
    never rendered, which training, an index or an evaluation would skip by the hundred."""
    if (Path(root) / INCOMPLETE).is_file():
        raise UserError(f"{root} holds a synthetic world whose generation was interrupted ({INCOMPLETE}): "
                        f"make it again with `mmembed data synth --out {root} --overwrite`{hint}")


@dataclass
class WorldSummary:
    """Where a generated world lives and what it holds."""

    root: Path
    manifests: dict[str, Path]  # split name -> JSONL path
    counts: dict[str, int]  # split name -> scenes
    world_json: Path
    heldout_combos: list[tuple[str, str]]
    reused: bool = False  # True when an identical complete world was already there
    params: dict[str, Any] = field(default_factory=dict)
    instructions: dict[str, Path] = field(default_factory=dict)  # split name -> instruct-{split}.jsonl

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _summary(root: Path, world: dict[str, Any], reused: bool) -> WorldSummary:
    return WorldSummary(
        root=root,
        manifests={split: root / f"{split}.jsonl" for split in SPLITS},
        counts=dict(world["counts"]),
        world_json=root / "world.json",
        heldout_combos=[tuple(c) for c in world["heldout_combos"]],
        reused=reused,
        params=dict(world["params"]),
        instructions={split: root / f"instruct-{split}.jsonl" for split in SPLITS},
    )


def _existing(root: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """The world.json of a complete world generated with exactly `params`, else None."""
    try:
        world = json.loads((root / "world.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(world, dict) or world.get("params") != params:
        return None
    total = sum(world.get("counts", {}).values())
    names = [f"{split}.jsonl" for split in SPLITS] + [f"instruct-{split}.jsonl" for split in SPLITS]
    if not all((root / name).is_file() for name in names):
        return None
    for sub in ("images", "audio"):
        if not (root / sub).is_dir() or sum(1 for _ in (root / sub).iterdir()) != total:
            return None
    return world


def matches(root: Path, params: dict[str, Any]) -> bool:
    """Whether `root` holds a complete world generated with exactly `params` (`WorldSummary.params`)."""
    return _existing(root, params) is not None


def _made_here(root: Path) -> bool:
    """A world.json written by this generator (another tool's world.json does not count)."""
    try:
        world = json.loads((root / "world.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(world, dict) and world.get("format") == "mmembed-synth"


def holds_other_files(root: Path) -> bool:
    """Whether `root` holds files but no world made here (complete or not): a user's own folder."""
    return (root.is_dir() and any(root.iterdir()) and not _made_here(root)
            and not (root / INCOMPLETE).is_file())


def _changed(root: Path, params: dict[str, Any]) -> str:
    """"n 60 → 40, seed 0 → 1": how the world in `root` differs from `params`."""
    try:
        old = json.loads((root / "world.json").read_text(encoding="utf-8")).get("params") or {}
    except (OSError, ValueError, AttributeError):
        return "unknown"
    return ", ".join(f"{k} {old.get(k)} → {v}" for k, v in params.items() if old.get(k) != v) or "incomplete"


def _clear(root: Path) -> None:
    """Remove only what a previous generation wrote; world.json first, so a crash mid-clear
    still reads as an incomplete world."""
    (root / "world.json").unlink(missing_ok=True)
    for split in SPLITS:
        (root / f"{split}.jsonl").unlink(missing_ok=True)
        (root / f"instruct-{split}.jsonl").unlink(missing_ok=True)
    for lookups in root.glob(f"{LOOKUPS}*.jsonl"):  # `write_lookup_rows`' files: the old scenes' answers
        lookups.unlink()
    for sub in ("images", "audio"):
        shutil.rmtree(root / sub, ignore_errors=True)


def _busy(root: Path) -> Callable[[str], str]:
    """The refusal of a reader (a run training on the world, lookups being built) while another
    process generates the world in `root`."""
    return lambda holder: (f"{root} is being written by {holder} (`mmembed data synth`, or a run making its "
                           "data.synth world); wait for it, or use another folder")


def _in_use(root: Path) -> Callable[[str], str]:
    """The refusal of a generator while another process writes the world in `root` or reads it."""
    return lambda holder: (f"{root} is in use by {holder}: a world being written (`mmembed data synth`) or read (a "
                           "run or demo training on it, lookups being built); wait for it to end, or write into "
                           "another folder")
