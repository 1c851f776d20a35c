"""The align stage: contrastive training of the shared space on a manifest.

    manifest ─► ManifestDataset (train-time preprocessing) ─► Batch ─► SharedSpace ─► loss
                                                                      └─ val split ─► recall

`train_align(config)` is what `mmembed train CONFIG` runs; it returns the run directory, which
`mm.load` opens directly. Under torchrun each process trains on its shard of every global batch
through DDP (distributed.py); rank 0 prepares the data, the tokenizer and the run folder first,
and saves the model. This file holds the stage's run and what its checkpoints keep for a resume;
its forward and training step are in align_step.py, its loaders and validation in align_data.py.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encoders.blocks import set_grad_checkpointing
from mmembed.checkpoint import read_json
from mmembed.config import Config, save_config
from mmembed.data import SkipCounter
from mmembed.errors import UserError
from mmembed.evaluate_recall import pairwise_report
from mmembed.losses import build_loss
from mmembed.model import CONFIG, TOKENIZER, Model, build_model
from mmembed.train.align_data import (_eval_loader, _one_row_inputs, check_batch_fits, check_towers_accept,
                                      embed_dataset, mean_recall, train_loader_factory, trained_modalities)
from mmembed.train.align_step import IdleParts, captioned_forward, make_step_fn, space_forward, with_captioner
from mmembed.train.collapse import CollapseMonitor, TowerCollapsed, restart_config
from mmembed.train.collectives import all_gather_objects, barrier, main_first
from mmembed.train.data_setup import data_in_use, prepare_tokenizer, read_train_manifest
from mmembed.train.distributed import current_world, parallelize, resolve_device, seed_ranks
from mmembed.train.engine import FitResult, Trainer
from mmembed.train.plots import plot_curves
from mmembed.train.run_dir import UNSTARTED, lock_run, read_paths
from mmembed.train.state import check_same_rows, remove_partial_checkpoints, resume_checkpoint

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_align(config: Config, resume: bool = False, callbacks: list[Callable] = (), overwrite: bool = False) -> Path:
    """Train the shared space described by `config`; returns the run directory.

    With `resume=True` the latest complete checkpoint in `train.out_dir` is restored (weights,
    optimizer, RNGs, data position) and the run continues exactly where it stopped. A fresh run
    refuses a folder that holds files unless `overwrite` (which deletes them first); the folder
    is locked against a second trainer while this one runs. A tower that collapses before the
    first checkpoint restarts the stage at a lower learning rate (collapse.py), which the saved
    `config.yaml` records and a resume keeps (unless given another train.lr).
    """
    run_dir = Path(config.train.out_dir)
    with lock_run(run_dir, resume=resume, overwrite=overwrite, keep=read_paths(config)):
        if resume and current_world().main:  # a checkpoint set aside by a killed re-save counts: put it back
            remove_partial_checkpoints(run_dir)
        barrier()
        restarted = None
        if resume:  # before anything is written into the folder
            config, restarted = _as_it_ran(config, saved_stage(resume_checkpoint(run_dir)))
        given_lr, restarts = config.train.lr, 0
        while True:
            try:
                with contextlib.ExitStack() as data_held:  # the data's readers' lock, for the stage's length
                    return _train_align(config, run_dir, resume, callbacks, restarted, data_held)
            except TowerCollapsed as e:  # restart at a lower learning rate, or stop with the fix
                config = restart_config(config, e, run_dir, resume, restarts)
                restarts += 1
                restarted = {"from": given_lr, "to": config.train.lr}


def saved_stage(checkpoint: Path) -> dict:
    """The stage's own state in `checkpoint` (`_StageState`'s; {} where it has none), read before
    any work: what a resume must keep is checked, or taken, before the data and the model are built."""
    try:
        stage = read_json(checkpoint / "trainer.json")["progress"]["extra"].get("stage")
    except (KeyError, TypeError, AttributeError):  # the engine's load names what is wrong with it
        return {}
    return stage if isinstance(stage, dict) else {}


def check_same_seed(saved: int | None, current: int, key: str) -> None:
    """UserError when a resume changes the seed that shuffles the training rows (`saved`: None in
    older checkpoints): the rest of the epoch was dealt from another order, some rows twice."""
    if saved is not None and saved != current:
        raise UserError(f"--resume: {key} {saved!r} -> {current!r}: the checkpoint's place in the epoch is in the "
                        "order that seed shuffled the rows into; resume without the change to continue the run, or "
                        "start over (--overwrite, or another train.out_dir)")


def _as_it_ran(config: Config, stage: dict) -> tuple[Config, dict | None]:
    """`config` for resuming the checkpoint whose stage state is `stage`, and the collapse restart it
    continues (None: none). The seed must be the run's; a run a collapse restarted at a lower rate
    goes on at that rate unless train.lr is another than the one it was cut from (a lower one is
    the collapse error's advice)."""
    check_same_seed(stage.get("seed"), config.train.seed, "train.seed")
    restart = stage.get("restart")
    if not isinstance(restart, dict) or config.train.lr not in (restart.get("from"), restart.get("to")):
        return config, None
    if config.train.lr == restart["to"]:  # RUN/config.yaml, which records the lowered rate: kept for later resumes
        return config, restart
    if current_world().main:
        log.warning("--resume: training at train.lr=%.3g, the rate this run restarted at after a collapse, not the "
                    "config's %.3g (give another train.lr to change it)", restart["to"], restart["from"])
    return replace(config, train=replace(config.train, lr=float(restart["to"]))), restart


def _train_align(cfg: Config, run_dir: Path, resume: bool, callbacks: list[Callable],
                 restarted: dict | None, data_held: contextlib.ExitStack) -> Path:
    world = current_world()
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    with main_first():  # rank 0 writes the data, the config and the tokenizer; the others read them
        root = data_held.enter_context(data_in_use(cfg.data))
        manifest = read_train_manifest(cfg, root)  # once: the tokenizer's captions and the loader's rows
        check_batch_fits(manifest, cfg.train.batch_size)  # before the tokenizer is trained
        tokenizer = prepare_tokenizer(cfg, root, run_dir if resume or not world.main else None, manifest)
        if world.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not resume:  # until its first step: a stop before is no run
                (run_dir / UNSTARTED).touch()
                save_config(cfg, run_dir / CONFIG, Path.cwd())  # a resume's, once its checkpoint is loaded
            if tokenizer is not None:
                tokenizer.save(run_dir / TOKENIZER)
    # a resume's checkpoint holds every weight: model.init_from's run may have moved since it began
    model = build_model(cfg, tokenizer, restoring=resume)
    space = model.space.to(device)
    set_grad_checkpointing(space, cfg.train.grad_checkpointing)
    extra = {CONFIG: run_dir / CONFIG}
    if tokenizer is not None:
        extra[TOKENIZER] = run_dir / TOKENIZER

    loss_fn = build_loss(cfg.loss)
    active = trained_modalities(loss_fn, space)
    largest = _one_row_inputs(cfg, tokenizer, active, device)
    check_towers_accept(space, largest)
    skips = SkipCounter()
    train_loader, steps, rows = train_loader_factory(cfg, root, tokenizer, active, skips, manifest)
    val_loader = _eval_loader(cfg, root, cfg.data.val, tokenizer)
    trained = with_captioner(cfg, space, tokenizer, device)
    forward = captioned_forward if trained is not space else space_forward
    if cfg.train.fsdp and world.active:  # every process runs every tower, data or not (`space_forward`)
        forward = functools.partial(forward, fill=largest)
    # a batch may lack a modality: its tower then gets no gradient
    net = parallelize(trained, forward, device, fsdp=cfg.train.fsdp, bf16=cfg.train.precision == "bf16",
                      find_unused=True)
    seed_ranks(cfg.train.seed)
    monitor = CollapseMonitor(stop_after=cfg.train.collapse_steps, lr=cfg.train.lr, warmup=cfg.train.warmup_steps)
    idle = IdleParts(space, trained.captioner if trained is not space else None)
    step_fn = make_step_fn(space, loss_fn, device, skips, monitor, net, cfg.loss.caption_weight, idle)

    def evaluate() -> dict[str, float]:
        emb, keys = embed_dataset(space, val_loader, device)
        return mean_recall(pairwise_report(emb, keys))

    frozen = [space.towers[str(m)] for m in space.modalities if cfg.model.towers[str(m)].freeze]

    def after_step() -> None:
        space.clamp_()
        for tower in frozen:  # frozen towers stay in eval mode: no dropout, no BN statistics drift
            tower.eval()

    trained.train()
    after_step()
    if world.main:  # the run has started once it has taken a step: a start stopped before (its data unusable,
        callbacks = [*callbacks, _started(run_dir / UNSTARTED)]  # Ctrl+C) is replaced without --overwrite
    # a resume writes config.yaml once its checkpoint is loaded: a refused one leaves the run's as it was
    write_config = functools.partial(save_config, cfg, run_dir / CONFIG, Path.cwd()) if world.main else None
    trainer = Trainer(trained, step_fn, train_loader, steps, cfg.train, run_dir,
                      evaluate=evaluate if val_loader is not None else None, after_step=after_step,
                      callbacks=list(callbacks), extra_files=extra, device=device, net=net,
                      stateful=_StageState(monitor, skips, rows, cfg.train.seed, restarted, loaded=write_config),
                      on_skipped=lambda batch: skips.update(batch.skipped),  # (step_fn counts them otherwise)
                      idle=idle)
    result = trainer.fit(resume=resume)
    if trainer.sharded is not None:  # the saved model is a whole one: gather it into a fresh copy
        weights = trainer.full_weights()
        if trained is not space:  # the captioner stays behind
            weights = {k.removeprefix("space."): v for k, v in weights.items() if k.startswith("space.")}
        if world.main:
            model = build_model(cfg, tokenizer, restoring=True)
            model.space.load_state_dict(weights)
    for state in all_gather_objects(skips.state_dict())[1:]:  # every process's skipped rows (a collective)
        skips.load_state_dict(state)
    if world.main:
        _finish(model, run_dir, result, skips)
    barrier()  # the saved model is on disk before any rank goes on (to the decoder stage)
    return run_dir


def _started(marker: Path) -> Callable[..., None]:
    """A trainer callback removing a fresh run's `.unstarted` marker at its first step."""
    pending = [marker]

    def on_event(event: str, *_: Any) -> None:
        if event == "step" and pending:
            pending.pop().unlink(missing_ok=True)

    return on_event


class _StageState:
    """What the align stage keeps in its checkpoints besides the engine's: the collapse monitor's
    streaks, the rows skipped so far (a resumed run's summary counts those of its first part), the
    rows and the seed that shuffled them (which a resume must keep) and the collapse restart the run
    trains after ({"from": the config's train.lr, "to": the rate it runs at}; a resume goes on at it).
    `loaded` runs once a resume's checkpoint is loaded: its config.yaml is written then, so a refused
    resume leaves it as it was."""

    def __init__(self, monitor: CollapseMonitor, skips: SkipCounter, rows: str | None = None, seed: int | None = None,
                 restart: dict | None = None, loaded: Callable[[], object] | None = None) -> None:
        self.monitor, self.skips, self.rows, self.seed, self.restart = monitor, skips, rows, seed, restart
        self.loaded = loaded

    def state_dict(self) -> dict:
        return {"collapse": self.monitor.state_dict(), "skips": self.skips.state_dict(), "rows": self.rows,
                "seed": self.seed, "restart": self.restart}

    def merged(self, states: list[dict]) -> dict:
        """Every rank's state as one: the monitor's is shared, the skipped rows are each rank's own
        (a row is counted once, so loading this on every rank of a resumed run counts none twice)."""
        skips = SkipCounter()
        for state in states:
            skips.load_state_dict(state["skips"])
        return {**states[0], "skips": skips.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        check_same_rows(state.get("rows"), self.rows, "data.root / data.train")
        self.monitor.load_state_dict(state.get("collapse", state))  # older checkpoints: the monitor's alone
        self.skips.load_state_dict(state.get("skips", {}))
        if self.loaded is not None:
            self.loaded()


def _finish(model: Model, run_dir: Path, result: FitResult, skips: SkipCounter) -> None:
    model.space.eval()
    model.save(run_dir, started_in=Path.cwd())  # the folder its relative paths are read from
    summary = skips.summary()
    if summary:
        log.warning("skipped rows during training: %s", summary)
    try:
        plot_curves(run_dir / "metrics.jsonl", run_dir)
    except Exception as e:  # plotting is a convenience; a missing backend must not fail a run
        log.warning("could not draw curves: %s", e)
    log.info("run saved to %s (%s at step %d; its weights: step %d)", run_dir, result.stopped_because,
             result.progress.step, result.weights_step)
