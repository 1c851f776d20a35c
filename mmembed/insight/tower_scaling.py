"""Scaling sweeps of the shared-space towers: train a ladder of widths, fit L(N), predict the next.

    training config ─► for each width: every tower's encoder width (and heads) set ─► train_align
        (same seed, same data, same epochs) ─► N, samples seen, FLOPs, wall time, validation loss
    fit L(N) and L(C) ─► prediction for `towers.next_width` ─► (--verify) train it, report the error
    ─► scaling.json, scaling.csv, scaling.png (the decoder sweep's `write_report`, axis "params")

What each number is:

* N: parameters of the shared space without its embedding tables (every `nn.Embedding`: token
  tables and learned position tables), as `Decoder.num_parameters` counts; the total beside it.
* D: training samples seen (rows of the manifest, each with every modality it has). A "token" is
  not defined across towers, so 6·N·D is 6·N·samples: it differs from the measured FLOPs by
  about the tokens per sample, and is reported only beside them.
* Measured FLOPs: `torch.utils.flop_counter` over the forward and backward of the real training
  step (the space and the configured loss) on the run's own batches. After training, the run's
  batches are replayed from the seeded loader (the same order, the same padding); FLOPs depend
  only on shapes, so each distinct batch shape is counted once and summed over every batch the
  run consumed. Training itself runs uncounted, so its wall time is not inflated.
* Validation loss: the align stage reports recall, not a loss, so the sweep computes one: the
  config's contrastive loss (`build_loss(cfg.loss)`, with the space's logit scale and bias) on
  the validation manifest, in eval mode and eval preprocessing, over consecutive chunks of
  `train.batch_size` rows in manifest order (the batch size changes the loss: the training one),
  averaged. A last partial chunk is dropped (fewer negatives would lower its loss); a manifest
  smaller than one batch is one chunk. Rows lacking a modality take part as in training (the
  loss uses the rows where both sides of a pair are present). It is also recorded at every
  checkpoint, which gives each rung its learning curve. The reported loss is the last weights'
  (a rung runs with `train.restore_best` off): the weights the samples and FLOPs trained, so it
  is the curve's last point; `best_val_loss` and `best_step` are the curve's lowest, for reading.
* Training loss: the last optimizer step's (train mode, one batch), as the trainer logs it.
* Wall time: `train_align` (tokenizer, data loading, evaluation and checkpoints included), less
  the time this module's own validation passes took inside it.

The same ladder for the decoder is `scaling.py`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import time
from collections.abc import Callable
from itertools import combinations
from pathlib import Path

import torch
from torch import nn

from mmembed.checkpoint import atomic_write_text, make_output_folder
from mmembed.config import Config, ConfigError, load_config
from mmembed.data import ManifestDataset, SkipCounter, build_loader, read_manifest
from mmembed.errors import UserError
from mmembed.insight.flops import estimated_training_flops, measured_flops
from mmembed.insight.lm_train import LMResult
from mmembed.insight.power_law import fit_power_law
from mmembed.insight.scaling import Rung, SweepReport, save_progress, size_label, write_report
from mmembed.insight.sweep_config import ModelSize, ScalingConfig
from mmembed.losses import build_loss
from mmembed.modality import Modality
from mmembed.model import TOKENIZER, build_model
from mmembed.model_load import load_space
from mmembed.preprocess import build_preprocessor
from mmembed.space import SharedSpace, build_space
from mmembed.train.align import train_align
from mmembed.train.align_data import train_loader_factory
from mmembed.train.align_step import WithCaptioner, one_process_step
from mmembed.train.collapse import CollapseMonitor
from mmembed.train.data_setup import prepare_data
from mmembed.train.distributed import resolve_device
from mmembed.train.preflight import check_config
from mmembed.train.state import Progress

log = logging.getLogger(__name__)

HEAD_DIM = 32  # channels per attention head on every rung
UNITS = {
    "params": "non-embedding parameters of the shared space (nn.Embedding tables left out)",
    "tokens": "training samples seen (D for the towers: a token is not defined across modalities)",
    "flops_estimate": "6 · N · samples (not tokens: below the measured count by about the tokens per sample)",
    "flops_measured": "torch.utils.flop_counter, forward + backward of every training batch (captioner included)",
    "val_loss": "the config's contrastive loss on the validation manifest, chunks of train.batch_size rows",
}


def run_tower_sweep(config: ScalingConfig, verify: bool = False,
                    progress: Callable[[str], None] = log.info) -> SweepReport:
    """Train the towers at every width of `config.towers`, fit, predict `next_width` (and with
    `verify` train it); write the files.

    Returns:
        The report; scaling.json, scaling.csv and scaling.png are in `config.out_dir` (a previous
        sweep's are removed as this one starts), each rung's run in `<out_dir>/towers/w<width>`.
    """
    ladder = config.towers
    if config.axis != "params":
        raise ConfigError("target: towers sweeps model size only (axis: params)")
    if len(ladder.widths) < 3:
        raise ConfigError(f"towers.widths: a fit needs at least 3 widths, got {len(ladder.widths)}")
    configs = rung_configs(config)  # every rung, next_width's too, builds: checked before the folder is made
    check_data(configs[ladder.widths[0]])  # the rungs differ only in width: one check is every rung's
    out = Path(config.out_dir)
    make_output_folder(out)  # a file above it is one line, before any training
    rungs = []
    for i, width in enumerate(ladder.widths):
        progress(f"[{i + 1}/{len(ladder.widths)}] towers at width {width}")
        rungs.append(train_rung(configs[width], progress))
        save_progress(rungs, out)
    losses = [r.result.val_loss for r in rungs]
    fit = fit_power_law([r.result.params for r in rungs], losses, bootstrap=config.bootstrap, seed=config.seed)
    compute_fit = fit_power_law([r.result.flops_measured for r in rungs], losses, bootstrap=config.bootstrap,
                                seed=config.seed)
    next_cfg = configs[ladder.next_width]
    # the untrained next rung's N, with the tokenizer every rung trained (the same data, the same one)
    x_next = space_parameters(build_model(next_cfg, _run_tokenizer(rung_dir(config, ladder.widths[0]))).space)[0]
    prediction = {"label": size_label(rung_size(next_cfg)), "x": x_next,
                  "val_loss": float(fit.predict(x_next))}
    if verify:
        progress(f"[verify] towers at width {ladder.next_width}")
        trained = train_rung(next_cfg, progress).result
        prediction |= {"trained": trained.val_loss,
                       "error": (prediction["val_loss"] - trained.val_loss) / trained.val_loss,
                       "result": trained.to_dict()}
    report = SweepReport("params", rungs, fit, compute_fit, prediction, files={}, data_unit="samples",
                         loss_unit="contrastive loss", note="D is training samples, not tokens: 6·N·samples "
                         "undercounts the measured FLOPs by about the tokens per sample")
    report.files = write_report(report, out)
    doc = json.loads((out / "scaling.json").read_text())
    doc |= {"target": "towers", "training_config": str(ladder.config), "units": UNITS}
    atomic_write_text(out / "scaling.json", json.dumps(doc, indent=2))
    return report


def rung_dir(config: ScalingConfig, width: int) -> Path:
    return Path(config.out_dir) / "towers" / f"w{width}"


def heads_for(width: int, head_dim: int = HEAD_DIM, rotary: bool = False) -> int:
    """The most attention heads of at least `head_dim` channels that divide `width` (at least 1);
    with `rotary`, the most that also leave an even head width (rotary turns pairs of channels),
    where one does: 66 gets 1 head of 66, not 2 of 33. Widths whose heads of 32 fit are unchanged."""
    heads = max(1, width // head_dim)
    while width % heads or (rotary and heads > 1 and (width // heads) % 2):
        heads -= 1
    return heads


def rung_config(config: ScalingConfig, width: int) -> Config:
    """The training config (`towers.config` + `towers.overrides`) with every tower's encoder at
    `width` (and `heads_for(width)` heads where the encoder has heads), run in `rung_dir`, keeping
    its last weights (`train.restore_best` off). Everything else, `model.embed_dim` and the seed
    included, is the config's."""
    from encoders import ENCODERS

    cfg = load_config(config.towers.config, config.towers.overrides)
    for name, tower in cfg.model.towers.items():
        if tower.encoder not in ENCODERS:
            raise ConfigError(f"model.towers.{name}.encoder: unknown encoder {tower.encoder!r}; "
                              f"valid: {', '.join(sorted(ENCODERS))}")
        accepted = inspect.signature(ENCODERS[tower.encoder]).parameters
        if "width" not in accepted:
            raise ConfigError(f"model.towers.{name}: encoder {tower.encoder!r} has no width to scale")
        tower.encoder_args["width"] = width
        if "heads" in accepted:
            default = accepted["positional"].default if "positional" in accepted else None
            rotary = tower.encoder_args.get("positional", default) == "rotary"
            tower.encoder_args["heads"] = heads_for(width, rotary=rotary)
    cfg.train.out_dir = str(rung_dir(config, width))
    # the last weights: the loss is scored on what every sample and FLOP counted trained (the best
    # recall's checkpoint, restored by default, was an earlier step's, scored beside the whole run's D and C)
    cfg.train.restore_best = False
    return cfg


def rung_configs(config: ScalingConfig) -> dict[int, Config]:
    """`rung_config` of every width and of `next_width`, each built once as a fresh space: a width
    the towers cannot take (an odd rotary head width) is one ConfigError before any training. It
    was found building the next rung, after the whole ladder had trained, and lost the fit."""
    configs = {w: rung_config(config, w) for w in [*config.towers.widths, config.towers.next_width]}
    for width, cfg in configs.items():
        try:
            build_space(cfg.model, cfg.tokenizer.vocab_size, cfg.loss.kind)  # the vocabulary size only sizes a table
        except ConfigError as e:
            raise ConfigError(f"towers width {width}: {e}") from None
    return configs


def check_data(cfg: Config) -> None:
    """What every rung reads, checked as `mmembed train` checks it (the config's names and files,
    the data root as train_align prepares it: the world generated when data.synth is set), and
    the validation manifest the sweep's loss needs. Each failed inside the first rung, after it
    had trained (no data.val) or made its folder (a data.root holding no world made there)."""
    if cfg.data.synth is None:  # why the sweep needs it, before the preflight's word on a misnamed data.val
        validation_manifest(cfg)
    check_config(dataclasses.replace(cfg, decoder=None))  # a rung trains the align stage alone
    prepare_data(cfg.data)
    if cfg.data.synth is not None:  # the world has written its manifests now
        validation_manifest(cfg)


def validation_manifest(cfg: Config) -> Path:
    """The validation manifest's path; UserError when data.val is unset or names no file."""
    path = Path(cfg.data.root) / str(cfg.data.val)
    if cfg.data.val is None or not path.is_file():
        raise UserError(f"a towers sweep needs a validation manifest (data.val), none at {path}: set data.val "
                        "(in towers.config or towers.overrides) to a manifest in data.root")
    return path


def rung_size(cfg: Config) -> ModelSize:
    """A rung's shape for the report: the first tower's width, layers and heads (0 where it has none)."""
    args = next(iter(cfg.model.towers.values())).encoder_args
    return ModelSize(width=int(args["width"]), layers=int(args.get("layers", 0)), heads=int(args.get("heads", 0)))


def space_parameters(space: nn.Module) -> tuple[int, int]:
    """(non-embedding, total) parameters; the embedding ones are every `nn.Embedding` table
    (token and learned position tables), as scaling-law papers count N."""
    params = {id(p): p.numel() for p in space.parameters()}
    tables = {id(m.weight): m.weight.numel() for m in space.modules() if isinstance(m, nn.Embedding)}
    total = sum(params.values())
    return total - sum(tables.values()), total


def train_rung(cfg: Config, progress: Callable[[str], None] = log.info) -> Rung:
    """Train the align stage of `cfg` from scratch (its run folder is overwritten) and measure it."""
    run_dir = Path(cfg.train.out_dir)
    recorder = CurveRecorder(cfg)
    start = time.perf_counter()
    train_align(cfg, callbacks=[recorder], overwrite=True)
    seconds = time.perf_counter() - start - recorder.seconds_validating
    model = load_space(run_dir)
    device = resolve_device(cfg.train.device)
    space = model.space.to(device)
    params, total = space_parameters(space)
    val_loss = contrastive_loss(space, build_loss(cfg.loss), recorder.loader, device)  # the curve's loader
    flops = training_flops(space, cfg, model.tokenizer, recorder.progress, device)
    samples = recorder.progress.samples
    result = LMResult(params=params, params_total=total, tokens=samples,
                      flops_estimate=estimated_training_flops(params, samples), flops_measured=flops,
                      seconds=seconds, train_loss=recorder.train_loss, val_loss=val_loss, curve=recorder.curve)
    size = rung_size(cfg)
    progress(f"    {size_label(size)}: N = {params:,}, {samples:,} samples, {flops:.2e} FLOPs, "
             f"val loss {val_loss:.4f} in {seconds:.0f} s")
    return Rung(size_label(size), result, size)


class CurveRecorder:
    """Trainer callback: the validation loss at every checkpoint (the rung's learning curve), the
    last step's training loss and the final `Progress` (steps, samples, batches consumed)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.curve: list[dict] = []
        self.progress = Progress()
        self.train_loss = math.nan
        self.seconds_validating = 0.0
        self.start = time.perf_counter()
        self.loader = None  # the validation loader, built at the first checkpoint

    def __call__(self, event: str, trainer, info: dict) -> None:
        if event == "step":
            self.train_loss = float(info["loss"])
            return
        if event != "checkpoint":
            return
        t0 = time.perf_counter()
        # the space, also where the stage trains it with a captioner (loss.caption_weight, the
        # demo's recipe: a towers sweep of it stopped at its first checkpoint)
        space = trainer.module.space if isinstance(trainer.module, WithCaptioner) else trainer.module
        if self.loader is None:  # the run's tokenizer is on disk by the first checkpoint
            self.loader = validation_loader(self.cfg, _run_tokenizer(trainer.run_dir), space)
        loss = contrastive_loss(space, build_loss(self.cfg.loss), self.loader, trainer.device)
        self.seconds_validating += time.perf_counter() - t0
        self.progress = p = trainer.progress
        point = {"step": p.step, "tokens": p.samples, "train_loss": self.train_loss, "val_loss": loss,
                 "seconds": time.perf_counter() - self.start - self.seconds_validating}
        if self.curve and self.curve[-1]["step"] == p.step:  # the final checkpoint can repeat the last one
            self.curve[-1] = point
        else:
            self.curve.append(point)


def _active(space: SharedSpace, cfg: Config) -> list[Modality]:
    """The modalities in a weighted pair of the loss: the ones training loads and encodes."""
    return sorted({m for a, b, _ in build_loss(cfg.loss).pairs(space.modalities) for m in (a, b)})


def validation_loader(cfg: Config, tokenizer, space: SharedSpace):
    """The validation manifest in manifest order, eval preprocessing, chunks of train.batch_size
    rows (the last partial chunk dropped; one chunk of every row when there are fewer)."""
    root, path = Path(cfg.data.root), validation_manifest(cfg)
    pre = {m: build_preprocessor(m, cfg.model.towers[str(m)].preprocess, tokenizer=tokenizer, train=False)
           for m in _active(space, cfg)}
    manifest = read_manifest(path, root=root, allow_outside_root=cfg.data.allow_outside_root, strict=cfg.data.strict)
    dataset = ManifestDataset(manifest, pre, strict=cfg.data.strict, cache=True)
    rows = cfg.train.batch_size
    if len(dataset) < rows:
        log.warning("validation manifest has %d rows, fewer than train.batch_size=%d: one chunk of %d rows "
                    "(fewer negatives: a lower loss than a full batch would give)", len(dataset), rows, len(dataset))
        rows = len(dataset)
    return build_loader(dataset, rows, shuffle=False, num_workers=0, seed=0, drop_last=True)


@torch.inference_mode()
def contrastive_loss(space: SharedSpace, loss_fn: nn.Module, loader, device: torch.device) -> float:
    """The mean over the loader's batches of `loss_fn` on the space's embeddings, in eval mode
    (each submodule's mode restored afterwards). Batches in which no pair has two rows are left out."""
    modes = {m: m.training for m in space.modules()}
    space.eval()
    losses = []
    try:
        for batch in loader:
            if len(batch) == 0:
                continue
            batch = batch.to(device)
            out = loss_fn(space(batch.inputs, batch.masks, batch.present), batch.present, space.logit_scale,
                          batch.labels, space.logit_bias)
            if out.per_pair:
                losses.append(float(out.total))
    finally:
        for m, training in modes.items():
            m.training = training
    if not losses:
        raise UserError("no validation chunk has two rows sharing a pair of modalities: no loss to compute")
    return sum(losses) / len(losses)


def training_flops(space: SharedSpace, cfg: Config, tokenizer, progress: Progress, device: torch.device) -> int:
    """FLOPs of every training batch the run consumed (forward + backward of what the align stage
    trains: the space, its loss and, with `loss.caption_weight`, the captioner), replayed from the
    seeded training loader; each distinct batch shape is counted once."""
    loss_fn = build_loss(cfg.loss)
    # a fresh captioner (with loss.caption_weight): FLOPs need no weights
    trained, step = one_process_step(cfg, space, loss_fn, tokenizer, device, SkipCounter(), CollapseMonitor())
    make, per_epoch, _ = train_loader_factory(cfg, Path(cfg.data.root), tokenizer, _active(space, cfg), SkipCounter())
    counts: dict[tuple, int] = {}
    total = 0
    for epoch in range(progress.epoch + 1):
        consumed = per_epoch if epoch < progress.epoch else progress.batch_in_epoch
        if consumed == 0:
            continue
        for i, batch in enumerate(make(epoch, 0)):
            if i >= consumed:
                break
            if len(batch) == 0:  # every row skipped: the trainer took no step
                continue
            key = batch_shape(batch)
            if key not in counts:
                counts[key] = step_flops(trained, step, batch)
            total += counts[key]
    log.info("training FLOPs: %.3e over %d batch shape(s)", total, len(counts))
    return total


def batch_shape(batch) -> tuple:
    """What a step's FLOPs depend on: rows, each modality's input shape, the rows each pair shares
    and each mask's real positions (the captioner's loss reads the caption tokens themselves)."""
    inputs = tuple((str(m), tuple(x.shape)) for m, x in sorted(batch.inputs.items()))
    present = sorted(batch.present.items())
    shared = tuple(int((p & q).sum()) for (_, p), (_, q) in combinations(present, 2))
    real = tuple((str(m), int(mask.sum())) for m, mask in sorted(batch.masks.items()) if mask is not None)
    return len(batch), inputs, shared, real


def step_flops(trained: nn.Module, step: Callable, batch) -> int:
    """FLOPs of one training step's forward and backward on `batch`: `step` is the align stage's
    (`make_step_fn`) over `trained`, the module it trains."""
    modes = {m: m.training for m in trained.modules()}
    trained.train()
    try:
        return measured_flops(lambda: step(batch).loss)
    finally:
        trained.zero_grad(set_to_none=True)
        for m, training in modes.items():
            m.training = training


def _run_tokenizer(run_dir: Path):
    """The tokenizer a run saved (None for a space without text)."""
    from mmembed.tokenizer import load_tokenizer

    path = Path(run_dir) / TOKENIZER
    return load_tokenizer(path) if path.is_file() else None
