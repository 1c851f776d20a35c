"""The align stage: contrastive training of the shared space on a manifest.

    manifest ─► ManifestDataset (train-time preprocessing) ─► Batch ─► SharedSpace ─► loss
                                                                      └─ val split ─► recall

`train_align(config)` is what `mmembed train CONFIG` runs; it returns the run directory, which
`mm.load` opens directly. Under torchrun each process trains on its shard of every global batch
through DDP (distributed.py); rank 0 prepares the data, the tokenizer and the run folder first,
and saves the model.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from encoders.blocks import set_grad_checkpointing
from mmembed.checkpoint import read_json
from mmembed.config import Config, save_config
from mmembed.data import ManifestDataset, SkipCounter, build_loader, read_manifest
from mmembed.errors import ConfigError, UserError
from mmembed.evaluate import pairwise_report
from mmembed.losses import build_loss
from mmembed.modality import Modality
from mmembed.model import CONFIG, TOKENIZER, Model, build_model
from mmembed.preprocess import build_preprocessor
from mmembed.space import SharedSpace
from mmembed.train.captioning import CAPTION, Captioner, caption_losses, caption_objective
from mmembed.train.collapse import CollapseMonitor, TowerCollapsed, restart_config
from mmembed.train.data_setup import prepare_data, prepare_tokenizer
from mmembed.train.distributed import (Forward, all_gather_objects, any_rank, as_output, barrier, current_world,
                                       main_first, parallelize, resolve_device, seed_ranks)
from mmembed.train.engine import FitResult, StepOutput, Trainer
from mmembed.train.plots import plot_curves
from mmembed.train.run_dir import UNSTARTED, lock_run, read_paths
from mmembed.train.state import check_same_rows, remove_partial_checkpoints, resume_checkpoint

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def space_forward(space: SharedSpace, inputs, masks, present, with_bias: bool = False, fill=None):
    """The align stage's forward as one module call (what DDP wraps): the embeddings, and the
    logit scale and bias the loss reads — outputs, so DDP sees every parameter the loss uses.

    `fill` (sharded, FSDP): modality → a one-row input (x, mask), in the order every process runs
    the towers. Running a sharded block is a collective, so every process runs the towers of the
    modalities any process has, in that order; where this batch lacks one, its tower runs on the
    row, joined to the (all-zero, absent) embeddings with weight 0 so that its backward runs too.
    A modality no process has runs nowhere (its weights get no gradient, as on one process)."""
    if fill is None:
        emb = space(inputs, masks, present)
    else:
        emb = {}
        for (m, (x, mask)), anywhere in zip(fill.items(), any_rank([m in inputs for m in fill])):
            if m in inputs:
                emb.update(space({m: inputs[m]}, masks, {m: present[m]}))
            elif anywhere:
                z = space.encode(m, x, mask)  # (1, D)
                emb[m] = z.new_zeros(len(present[m]), z.shape[1]) + 0.0 * z.sum()
    return emb, space.logit_scale, as_output(space.logit_bias) if with_bias else None


class WithCaptioner(torch.nn.Module):
    """The space and its training-time captioner, trained (and checkpointed) as one module."""

    def __init__(self, space: SharedSpace, captioner: Captioner) -> None:
        super().__init__()
        self.space, self.captioner = space, captioner


def captioned_forward(net: WithCaptioner, inputs, masks, present, with_bias: bool = False, fill=None):
    """`space_forward`, plus each modality's captioning loss, inside the one module call DDP wraps
    (sharded, the captioner too runs for every modality of `fill`, in its order)."""
    emb, scale, bias = space_forward(net.space, inputs, masks, present, with_bias, fill)
    every = None
    if fill is not None:  # the modalities with captioned rows on any process
        has = present.get(CAPTION)
        here = [has is not None and m in emb and bool((present[m] & has).any()) for m in fill]
        every = [m for m, anywhere in zip(fill, any_rank(here)) if anywhere]
    return emb, scale, bias, caption_losses(net.captioner, emb, present, inputs.get(CAPTION), masks.get(CAPTION),
                                            every)


class IdleParts:
    """The towers (and the captioner) no process learned from in an optimizer step, for the
    engine's `idle`: one process leaves their gradients None, DDP and FSDP give them zeros. The
    step function records what each batch learned from (`saw`); a call agrees on it over the ranks
    (one collective) and starts the next step afresh."""

    def __init__(self, space: SharedSpace, captioner: torch.nn.Module | None = None) -> None:
        self.space, self.captioner = space, captioner
        self.used: set[str] = set()  # modalities in a pair that ran, or whose vectors wrote a caption here
        self.captioned = False

    def saw(self, modalities, captioned: bool = False) -> None:
        self.used.update(str(m) for m in modalities)
        self.captioned |= captioned

    def __call__(self) -> list[torch.nn.Parameter]:
        names = list(self.space.towers)
        *used, captioned = any_rank([m in self.used for m in names] + [self.captioned])
        self.used, self.captioned = set(), False
        idle = [p for m, u in zip(names, used) if not u for p in self.space.towers[m].parameters()]
        if self.captioner is not None and not captioned:
            idle += list(self.captioner.parameters())
        return idle


def make_step_fn(space: SharedSpace, loss_fn, device: torch.device, skips: SkipCounter,
                 monitor: CollapseMonitor, net: torch.nn.Module | None = None, caption_weight: float = 0.0,
                 idle: IdleParts | None = None) -> Callable:
    """`net`: the space's forward wrapped for several processes (`parallelize`); default: the space.
    With `caption_weight` > 0, `net` is `captioned_forward` over a `WithCaptioner`. `idle`: told
    what each batch learned from."""
    idle = idle if idle is not None else IdleParts(space)
    net = net if net is not None else Forward(space, space_forward)
    with_bias = loss_fn.kind == "siglip"

    def step(batch) -> StepOutput | None:
        skips.update(batch.skipped)
        if len(batch) == 0:  # every row was bad: the engine counts the batch and moves on
            return None
        batch = batch.to(device)
        emb, scale, bias, *captions = net(batch.inputs, batch.masks, batch.present, with_bias)
        monitor(emb, batch.present)
        out = loss_fn(emb, batch.present, scale, batch.labels, bias)
        metrics = {"logit_scale": float(space.logit_scale.detach())}
        metrics.update({f"loss/{k}": float(v) for k, v in out.per_pair.items()})
        total, learned = out.total, bool(out.per_pair)  # pairs are decided on the global batch
        idle.saw(m for pair in out.per_pair for m in pair.split("-"))  # keys: `pair_name`
        if captions:  # the mean over modalities of writing the caption from their vectors
            written = captions[0]
            # every tower's key on every rank, NaN where this batch has no such row: ranks average alike
            metrics.update({f"caption/{m}": float(written[m].mean.detach()) if m in written else math.nan
                            for m in space.modalities})
            objective = caption_objective(written, space.modalities)
            idle.saw([m for m in written if written[m].tokens > 0], captioned=objective is not None)
            if objective is not None:
                total, learned = total + caption_weight * objective, True
        # a batch with no pair of two rows and no caption still runs backward (other processes
        # wait in it); the engine skips a step that learned nothing
        return StepOutput(total, metrics, samples=len(batch), learned=learned)

    return step


@torch.inference_mode()
def embed_dataset(space: SharedSpace, loader, device: torch.device) -> tuple[dict[Modality, Tensor], dict[Modality, list[str]]]:
    """Embed every row of a loader. Keys are the rows' `label` (scene identity) when every row has
    one, else line numbers (as `mmembed eval` keys a manifest). In eval mode; each submodule's
    mode is restored afterwards (a frozen tower stays in eval)."""
    modes = {m: m.training for m in space.modules()}
    space.eval()
    embs: dict[Modality, list[Tensor]] = {}
    labels: dict[Modality, list[str | None]] = {}
    lines: dict[Modality, list[str]] = {}
    skipped: list = []
    try:
        for batch in loader:
            skipped.extend(batch.skipped)
            batch = batch.to(device)
            for m, x in batch.inputs.items():
                embs.setdefault(m, []).append(space.encode(m, x, batch.masks.get(m)).float().cpu())
                rows = batch.present[m].nonzero().flatten().tolist()
                labels.setdefault(m, []).extend(batch.keys[i] for i in rows)
                lines.setdefault(m, []).extend(f"line{int(batch.rows[i])}" for i in rows)
    finally:
        for module, training in modes.items():
            module.training = training
    if skipped and not getattr(loader, "warned_skips", False):  # once a run: every evaluation reads the same rows
        loader.warned_skips = True
        log.warning("validation: %d row(s) could not be read and are left out of every evaluation (first: line "
                    "%s: %s)", len(skipped), *skipped[0][:2])
    labelled = all(key is not None for keys in labels.values() for key in keys)
    return {m: torch.cat(v) for m, v in embs.items()}, (labels if labelled else lines)


def mean_recall(report: dict[str, dict]) -> dict[str, float]:
    """Average each metric over every ordered modality pair; keep per-pair recall@1 too."""
    out: dict[str, float] = {}
    if not report:
        return out
    for metric in next(iter(report.values())):
        out[metric] = float(np.mean([r[metric] for r in report.values()]))
    out.update({f"{pair}/recall@1": r["recall@1"] for pair, r in report.items()})
    return out


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
                return _train_align(config, run_dir, resume, callbacks, restarted)
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
                 restarted: dict | None) -> Path:
    world = current_world()
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    with main_first():  # rank 0 writes the data, the config and the tokenizer; the others read them
        root = prepare_data(cfg.data)
        tokenizer = prepare_tokenizer(cfg, root, run_dir if resume or not world.main else None)
        if world.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not resume:  # until the model is built and the data read: a stop before is no run
                (run_dir / UNSTARTED).touch()
                save_config(cfg, run_dir / CONFIG)  # a resume's, once its checkpoint is loaded (_StageState)
            if tokenizer is not None:
                tokenizer.save(run_dir / TOKENIZER)
    model = build_model(cfg, tokenizer)
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
    train_loader, steps, rows = train_loader_factory(cfg, root, tokenizer, active, skips)
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
    if world.main:
        (run_dir / UNSTARTED).unlink(missing_ok=True)
    # a resume writes config.yaml once its checkpoint is loaded: a refused one leaves the run's as it was
    write_config = functools.partial(save_config, cfg, run_dir / CONFIG) if world.main else None
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
            model = build_model(cfg, tokenizer)
            model.space.load_state_dict(weights)
    for state in all_gather_objects(skips.state_dict())[1:]:  # every process's skipped rows (a collective)
        skips.load_state_dict(state)
    if world.main:
        _finish(model, run_dir, result, skips)
    barrier()  # the saved model is on disk before any rank goes on (to the decoder stage)
    return run_dir


def one_process_step(cfg: Config, space: SharedSpace, loss_fn, tokenizer, device: torch.device,
                     skips: SkipCounter, monitor: CollapseMonitor) -> tuple[torch.nn.Module, Callable]:
    """The module the align stage trains (`with_captioner`) and its training step, in one process
    (no DDP): what the learning-rate range test runs and a towers sweep counts the FLOPs of."""
    trained = with_captioner(cfg, space, tokenizer, device)
    net = Forward(trained, captioned_forward if trained is not space else space_forward)
    return trained, make_step_fn(space, loss_fn, device, skips, monitor, net, cfg.loss.caption_weight)


def with_captioner(cfg: Config, space: SharedSpace, tokenizer, device: torch.device) -> torch.nn.Module:
    """The module the stage trains: the space, or the space and a captioner (`loss.caption_weight`)."""
    if cfg.loss.caption_weight == 0:
        return space
    if CAPTION not in space.modalities or getattr(tokenizer, "vocab_size", None) is None:
        raise UserError(f"loss.caption_weight needs a {CAPTION} tower and the run's own tokenizer")
    caption_len = build_preprocessor(CAPTION, cfg.model.towers[str(CAPTION)].preprocess, tokenizer=tokenizer).max_length
    try:
        captioner = Captioner(space.embed_dim, tokenizer.vocab_size, caption_len=caption_len, **cfg.loss.captioner)
    except (TypeError, ValueError) as e:
        raise UserError(f"loss.captioner: {e}") from None
    return WithCaptioner(space, captioner.to(device))


def check_towers_accept(space: SharedSpace, largest: dict) -> None:
    """ConfigError unless each tower takes its preprocessor's largest input: a text max_length past
    the encoder's max_len, a longer clip or other mel bands than the audio encoder's, another
    image size than the ViT's failed at the first long enough item, maybe hours in (or at serving)."""
    modes = {module: module.training for module in space.modules()}
    space.eval()  # no dropout draws (training's random stream stays as it was), no running statistics
    try:
        with torch.no_grad():
            for m, (x, mask) in largest.items():
                try:
                    space.encode(m, x, mask)
                except ValueError as e:
                    raise ConfigError(f"model.towers.{m}: the encoder refuses the largest input its preprocess "
                                      f"gives ({e}); make the preprocess and encoder_args sizes agree") from None
    finally:
        for module, mode in modes.items():
            module.train(mode)


def _one_row_inputs(cfg: Config, tokenizer, active: list[Modality], device: torch.device) -> dict:
    """Each trained modality's largest input (x, mask), one row, from its preprocessor's example."""
    fill = {}
    for m in active:
        pre = build_preprocessor(m, cfg.model.towers[str(m)].preprocess, tokenizer=tokenizer)
        x, mask = pre.collate([pre(pre.example())])
        fill[m] = (x.to(device), None if mask is None else mask.to(device))
    return fill


def trained_modalities(loss_fn, space: SharedSpace) -> list[Modality]:
    """The modalities in a weighted pair of the loss. Only these are loaded and encoded for
    training: a bound tower trained against one anchor does not pay for the others (validation
    still measures every pair)."""
    active = sorted({m for a, b, _ in loss_fn.pairs(space.modalities) for m in (a, b)})
    if not active:
        raise UserError("the loss trains no modality pair (check loss.mode, loss.anchor, loss.pair_weights)")
    return active


def train_loader_factory(cfg: Config, root: Path, tokenizer, active: list[Modality],
                          skips: SkipCounter) -> tuple[Callable, int, str]:
    """(make(epoch, start_sample) → the epoch's loader, steps per epoch, the rows' fingerprint:
    what a resumed run checks its data against, as its sample position means those rows)."""
    pre = {m: build_preprocessor(m, cfg.model.towers[str(m)].preprocess, tokenizer=tokenizer, train=True)
           for m in active}
    manifest = read_manifest(root / cfg.data.train, root=root, allow_outside_root=cfg.data.allow_outside_root,
                             strict=cfg.data.strict)
    skips.update(manifest.skipped)  # rows refused at read time (bad JSON, escaping paths) count too
    dataset = ManifestDataset(manifest, pre, strict=cfg.data.strict, cache=cfg.data.cache,
                              caption_sampling=cfg.data.caption_sampling)
    # a misnamed column ("caption", "imgae") leaves nothing to pair, or a tower untrained
    dataset.check_pairs(captioned=cfg.loss.caption_weight > 0)
    bs = cfg.train.batch_size
    if len(dataset) < bs:
        raise UserError(f"training manifest has {len(dataset)} rows, fewer than train.batch_size={bs}")

    world = current_world()

    def make(epoch: int, start_sample: int):
        return build_loader(dataset, bs, shuffle=True, num_workers=cfg.data.num_workers, seed=cfg.train.seed,
                            drop_last=True, epoch=epoch, start_sample=start_sample, rank=world.rank,
                            world_size=world.size, skips=skips)

    return make, len(dataset) // (bs * world.size), rows_fingerprint(manifest)


def rows_fingerprint(manifest) -> str:
    """sha256 of the rows a sampler permutes (their lines and items, in order; paths relative to
    the data root, so a run resumed where its data lies elsewhere still matches)."""
    def item(value) -> str:
        return str(value.relative_to(manifest.root)) if isinstance(value, Path) and value.is_relative_to(
            manifest.root) else str(value)

    digest = hashlib.sha256()
    for row in manifest.rows:
        digest.update(repr((row.line, sorted((str(m), item(v)) for m, v in row.items.items()))).encode())
    return digest.hexdigest()[:16]


def _eval_loader(cfg: Config, root: Path, name: str | None, tokenizer):
    if name is None:
        return None
    if not (root / name).is_file():  # the default names val.jsonl, which a user's own data may lack
        log.warning("data.val: %s not found: training without validation (no best checkpoint, no early "
                    "stopping); set data.val=null if that is meant", root / name)
        return None
    pre = {Modality.parse(m): build_preprocessor(Modality.parse(m), t.preprocess, tokenizer=tokenizer, train=False)
           for m, t in cfg.model.towers.items()}
    manifest = read_manifest(root / name, root=root, allow_outside_root=cfg.data.allow_outside_root,
                             strict=cfg.data.strict)
    if manifest.skipped:
        log.warning("validation manifest %s: %d row(s) skipped at read time (first, line %d: %s)",
                    root / name, len(manifest.skipped), *manifest.skipped[0])
    # validation measures the primary captions, whatever data.caption_sampling trains on
    dataset = ManifestDataset(manifest, pre, strict=cfg.data.strict, cache=True, caption_sampling="primary")
    return build_loader(dataset, 256, shuffle=False, num_workers=0, seed=0, drop_last=False)


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
    model.save(run_dir)
    summary = skips.summary()
    if summary:
        log.warning("skipped rows during training: %s", summary)
    try:
        plot_curves(run_dir / "metrics.jsonl", run_dir)
    except Exception as e:  # plotting is a convenience; a missing backend must not fail a run
        log.warning("could not draw curves: %s", e)
    log.info("run saved to %s (%s at step %d; its weights: step %d)", run_dir, result.stopped_because,
             result.progress.step, result.weights_step)
