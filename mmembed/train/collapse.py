"""Collapse: a tower that gives the same vector for every input, and what the align stage does about it.

Contrastive training cannot recover from a collapsed tower: every row scores the same against
every other, the loss sits at ln(batch) and the gradients vanish. It happens in the first
steps when the learning rate is too high for the data (a small dataset, a deep tower), and a
run left alone then trains for its whole budget at chance.

So the monitor acts. A few collapsed steps in a row log a warning; `stop_after` in a row raise
`TowerCollapsed`. A fresh run whose collapse comes before anything was saved restarts itself
from scratch at a third of the learning rate (`train.collapse_restarts` times: what a user would
do by hand, minus the wasted budget); otherwise the error is one line naming the tower, the
likely cause and the fix.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import Tensor

from mmembed.checkpoint import read_json
from mmembed.config import Config
from mmembed.errors import CheckpointError, UserError
from mmembed.modality import Modality
from mmembed.train.collectives import all_reduce_values, broadcast_object
from mmembed.train.distributed import current_world
from mmembed.train.state import CKPT_DIR, complete_checkpoints, latest_checkpoint

log = logging.getLogger(__name__)

RESTART_LR_FACTOR = 1 / 3


class TowerCollapsed(UserError):
    """A tower's outputs stopped varying across the batch for `steps` batches in a row."""

    def __init__(self, modality: Modality, batches: int, steps: int, spread: float, lr: float, warmup: int):
        self.modality, self.batches, self.steps, self.lr = modality, batches, steps, lr
        super().__init__(
            f"the {modality} tower collapsed: it gave the same vector for every input for {steps} batches in a "
            f"row (by batch {batches}; largest per-dimension std {spread:.2g} of an even spread's), and contrastive "
            f"training does not recover from that. Likely cause: a learning rate too high for this data (train.lr={lr:g}, "
            f"{warmup} warm-up steps). Fix: train.lr={lr * RESTART_LR_FACTOR:.2g}, or a longer train.warmup_steps")


class CollapseMonitor:
    """Watches every tower's batch of embeddings; warns after `patience` collapsed batches in a
    row and raises `TowerCollapsed` after `stop_after` (None: only warn). Collapsed: the largest
    per-dimension standard deviation over the batch's present rows is below `tol` / sqrt(D):
    unit vectors spread over D dimensions have per-dimension deviations near 1 / sqrt(D), so
    this is a spread a hundred times narrower. (An absolute 1e-4 missed a tower at 1e-3 of
    D = 32 whose loss sat at ln(batch) for the whole run; the demo's towers never go below 0.45
    / sqrt(D), at initialisation included.) Under torchrun the ranks agree, so they all raise at
    the same batch."""

    def __init__(self, patience: int = 3, tol: float = 1e-2, stop_after: int | None = None,
                 lr: float = 0.0, warmup: int = 0):
        self.patience, self.tol, self.stop_after = patience, tol, stop_after
        self.lr, self.warmup = lr, warmup
        self.streak: dict[Modality, int] = {}
        self.warned: set[Modality] = set()
        self.batches = 0

    def state_dict(self) -> dict[str, Any]:
        """Where the streaks stand (JSON), for a checkpoint: a resumed run stops where an
        uninterrupted one would."""
        return {"streak": {str(m): n for m, n in self.streak.items()}, "warned": sorted(map(str, self.warned)),
                "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streak = {Modality.parse(m): int(n) for m, n in state.get("streak", {}).items()}
        self.warned = {Modality.parse(m) for m in state.get("warned", [])}
        self.batches = int(state.get("batches", 0))

    def __call__(self, embeddings: dict[Modality, Tensor], present: dict[Modality, Tensor]) -> None:
        self.batches += 1
        spreads = {}
        for m, z in embeddings.items():
            rows = z.detach()[present[m]]
            if rows.shape[0] >= 2:  # in units of an even spread's 1 / sqrt(D)
                spreads[m] = rows.float().std(dim=0).max().item() * rows.shape[1] ** 0.5
        if current_world().active:
            spreads = _widest_over_ranks(spreads)
        for m, spread in spreads.items():
            self.streak[m] = self.streak.get(m, 0) + 1 if spread < self.tol else 0
            if self.streak[m] >= self.patience and m not in self.warned:
                self.warned.add(m)
                log.warning("collapsed embeddings: the %s tower has given the same vector for every input "
                            "for %d steps (max per-dimension std %.2g of an even spread's)", m, self.streak[m],
                            spread)
            if self.stop_after is not None and self.streak[m] >= self.stop_after:
                raise TowerCollapsed(m, self.batches, self.streak[m], spread, self.lr, self.warmup)


def _widest_over_ranks(spreads: dict[Modality, float]) -> dict[Modality, float]:
    """Every rank's spreads → the widest per modality over the ranks, so the streaks are the same
    everywhere. One value per modality in a fixed order (-1: too few rows on that rank), since a
    rank's batch may lack a modality the others have."""
    order = list(Modality)
    widest = all_reduce_values([spreads.get(m, -1.0) for m in order], "max")
    return {m: w for m, w in zip(order, widest) if w >= 0}


def restart_config(cfg: Config, error: TowerCollapsed, run_dir: Path, resume: bool, restarts_done: int) -> Config:
    """The config to restart a collapsed run with (the learning rate cut to a third), or raise
    `error` when the run must stop instead: resumed, out of restarts, or past its first
    checkpoint (whose weights the user may want: the error names the newest one from before the
    collapse, to resume with a lower train.lr, or says to start over)."""
    saved = latest_checkpoint(run_dir) if current_world().main else None
    saved = broadcast_object(saved)  # rank 0 owns the run folder: every rank takes its decision
    if resume or restarts_done >= cfg.train.collapse_restarts or saved is not None:
        if saved is not None:
            error.args = (f"{error} ({_where_to_restart(run_dir, error)})",)
        raise error
    lr = cfg.train.lr * RESTART_LR_FACTOR
    log.warning("the %s tower collapsed: restarting the stage from scratch at train.lr=%.3g (restart %d of "
                "at most %d)", error.modality, lr, restarts_done + 1, cfg.train.collapse_restarts)
    return replace(cfg, train=replace(cfg.train, lr=lr))


def _where_to_restart(run_dir: Path, error: TowerCollapsed) -> str:
    """The advice that ends the error: resume the newest checkpoint saved before the collapse began,
    or start over. The latest one may hold the collapsed tower already (its streak is saved with it),
    and resuming it collapsed again, pointing back at it."""
    done = complete_checkpoints(Path(run_dir) / CKPT_DIR)  # oldest first
    clean = [c for c in done if _before_collapse(c, error)]
    if not clean:
        return "every checkpoint was saved after the collapse began: start over with --overwrite and a lower train.lr"
    later = [c.name for c in done[done.index(clean[-1]) + 1:]]
    if not later:
        return f"the last checkpoint, {clean[-1]}, predates the collapse: resume it with --resume and a lower train.lr"
    # --resume takes the newest checkpoint: the collapsed ones have to go first
    return (f"the newest checkpoint saved before the collapse began is {clean[-1]}: move the later ones "
            f"({', '.join(later)}) out of {clean[-1].parent}, then resume with --resume and a lower train.lr")


def _before_collapse(checkpoint: Path, error: TowerCollapsed) -> bool:
    """Whether `checkpoint`'s weights are from before the error's streak began. Counted in the monitor's
    own batches, which the checkpoint records (micro-batches under accumulation, not steps); strictly
    before: the weights saved after batch k are those batch k + 1 ran on. A checkpoint that does not
    say (an older one, an unreadable one) is not advised."""
    try:
        saved = read_json(checkpoint / "trainer.json")["progress"]["extra"]["stage"]["collapse"]["batches"]
    except (CheckpointError, KeyError, TypeError):
        return False
    return isinstance(saved, int) and saved < error.batches - error.steps
