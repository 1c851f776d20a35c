"""The decoder stage: teach a causal LM to answer prompts that interleave text and media.

    run's shared space (frozen) ─► MediaTable (every media item embedded once)
    instruction rows ─► PromptDataset ─► batches ─► projector + decoder ─► loss on answer tokens
                                                    └─ val rows ─► loss, token and answer accuracy

`train_decoder(config)` runs on a run directory whose shared space is trained (the align stage
ran there, or `model.init_from` copied one in); it writes `decoder.safetensors` (and GPT-2's
tokenizer when the decoder has one) beside the space, so `mm.load(run_dir).generate(...)` works.
Checkpoints, metrics and curves go to `<run>/decoder/`; the engine is the align stage's, and
so is the way it runs under torchrun (DDP over the projector and decoder, rank 0 saves).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from encoders.blocks import set_grad_checkpointing
from encoders.lora import add_lora_, merge_lora_
from mmembed.config import Config, load_config, save_config
from mmembed.data import SkipCounter, read_manifest
from mmembed.data.instructions import InstructionRow, InstructionSet, read_instructions
from mmembed.data.synth.world_folder import reading
from mmembed.data.loader import EpochBatchSampler
from mmembed.decoder import (DECODER_DIR, PromptModel, answer_logits, build_prompt_model, decoder_tokenizer,
                             save_prompt_model, with_gpt2_architecture)
from mmembed.decoder.fusion import freeze_language_model
from mmembed.errors import UserError
from mmembed.gc_pause import collector_paused
from mmembed.model import CONFIG, WEIGHTS, Model
from mmembed.model_load import load_space
from mmembed.train.align import check_same_seed, saved_stage, seed_everything
from mmembed.train.collectives import barrier
from mmembed.train.distributed import current_world, parallelize, seed_ranks
from mmembed.train.decoder_data import MediaTable, PromptBatch, PromptDataset, collate_prompts, pack_prompts
from mmembed.train.engine import StepOutput, Trainer
from mmembed.train.plots import plot_curves
from mmembed.train.preflight import check_sharding, stage_device
from mmembed.train.run_dir import lock_run, prepare_run_dir
from mmembed.train.state import check_same_rows, resume_checkpoint

log = logging.getLogger(__name__)


def train_decoder(config: Config, resume: bool = False, callbacks: list[Callable] = (),
                  overwrite: bool = False) -> Path:
    """Train the decoder of the run in `config.train.out_dir`; returns the run directory.

    A fresh stage refuses a `<run>/decoder/` that holds an earlier stage's files unless
    `overwrite`; the run folder is locked while it trains."""
    if config.decoder is None:
        raise UserError("the config has no `decoder:` section")
    run_dir = Path(config.train.out_dir)
    if not (run_dir / WEIGHTS).is_file():  # before the lock, which would make the folder (and blame --resume)
        raise UserError(f"{run_dir} holds no {WEIGHTS} (is it a run directory? the decoder stage trains on the "
                        "space an align stage saved there)")
    with lock_run(run_dir, resume=True, overwrite=False):  # the run folder: rank 0 locks it, the others wait
        if current_world().main:  # inside the lock: never clear the decoder/ of a stage another trainer runs
            prepare_run_dir(run_dir / DECODER_DIR, resume=resume, overwrite=overwrite)
        barrier()
        with reading(config.data.root):  # its manifests and media: no world generator meanwhile
            return _train_decoder(config, run_dir, resume, callbacks)


def _train_decoder(config: Config, run_dir: Path, resume: bool, callbacks: list[Callable]) -> Path:
    config = dataclasses.replace(config, decoder=with_gpt2_architecture(config.decoder))
    cfg = config.decoder
    if resume:  # before the media are embedded
        saved = saved_stage(resume_checkpoint(run_dir / DECODER_DIR))
        check_same_seed(saved.get("seed"), cfg.train.seed, "decoder.train.seed")
    seed_everything(cfg.train.seed)
    device = stage_device("decoder.train", cfg.train.device)  # the preflight checked both; a direct call did not
    check_sharding(cfg)
    model = load_space(run_dir).to(device)
    model.space.requires_grad_(False)
    pm = build_prompt_model(cfg, decoder_tokenizer(cfg, model.tokenizer), model.embed_dim)
    lm = pm.lm.to(device)
    if cfg.freeze_lm or cfg.lora_rank is not None:
        freeze_language_model(lm, slice(pm.fmt.tokenizer.vocab_size, pm.fmt.vocab_size))
    if cfg.lora_rank is not None:
        add_lora_(lm.decoder.transformer, cfg.lora_rank, cfg.lora_alpha)
    set_grad_checkpointing(lm, cfg.train.grad_checkpointing)
    train_data, val_data, table, skips = _datasets(config, pm, model)
    if cfg.whiten:
        fit_whitening(config, pm, model, train_data.media_vectors())
    vectors = table.vectors.to(device)

    tc = cfg.train
    if len(train_data) < tc.batch_size:
        raise UserError(f"{len(train_data)} usable decoder rows, fewer than decoder.train.batch_size={tc.batch_size}")
    world = current_world()
    sampler = EpochBatchSampler(len(train_data), tc.batch_size, shuffle=True, seed=tc.seed, drop_last=True,
                                rank=world.rank, world_size=world.size)

    def collate(items: list) -> PromptBatch:
        return pack_prompts(items, pm.fmt.pad_id, cfg.context) if cfg.data.pack else collate_prompts(items, pm.fmt.pad_id)

    def make_loader(epoch: int, start_sample: int):
        sampler.set_epoch(epoch, start_sample=start_sample)
        return _Batches(sampler, lambda keys: collate([train_data[key] for key in keys]))

    net = parallelize(lm, answer_logits, device, fsdp=tc.fsdp, bf16=tc.precision == "bf16")
    seed_ranks(tc.seed)
    step_fn = make_step_fn(pm, vectors, cfg.media_noise, device, net)
    evaluate = (lambda: evaluate_answers(pm, val_data, vectors, device)) if val_data is not None else None
    lm.train()
    rows = _RowsState(train_data.fingerprint(), tc.seed, _context_change(run_dir, cfg.context) if resume else None)
    trainer = Trainer(lm, step_fn, make_loader, sampler.batches_per_epoch(), tc, run_dir / DECODER_DIR,
                      evaluate=evaluate, callbacks=list(callbacks), device=device, net=net, stateful=rows)
    result = trainer.fit(resume=resume)
    lm.eval()
    if cfg.lora_rank is not None:  # the adapters go into the weights: the saved decoder is a plain one
        merge_lora_(lm.decoder.transformer)
    if trainer.sharded is not None:  # the saved decoder is a whole one: gather it into a fresh copy
        weights = trainer.full_weights()
        if world.main:
            pm = build_prompt_model(cfg, decoder_tokenizer(cfg, model.tokenizer), model.embed_dim)
            pm.lm.load_state_dict(weights)
            pm.lm.eval()
    if world.main:
        _finish(config, pm, run_dir, result, skips, model.fingerprint)
    barrier()
    return run_dir


class _Batches:
    """The rest of an epoch's batches, collated as they are reached; sized, as the engine plans a
    resume on another number of processes from the batches left."""

    def __init__(self, sampler: EpochBatchSampler, collate: Callable[[list], PromptBatch]) -> None:
        self.sampler, self.collate = sampler, collate
        self.count = len(sampler)  # the sampler's start moves on with the next epoch's set_epoch

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        return (self.collate(keys) for keys in self.sampler)


class _RowsState:
    """What the decoder stage keeps in its checkpoints besides the engine's: a fingerprint of its
    training rows (after task selection and weights), which a resume must read again, and the seed
    that shuffles them, which it must keep (`_train_decoder` checks it first)."""

    def __init__(self, rows: str, seed: int | None = None, cause: str | None = None) -> None:
        self.rows, self.seed, self.cause = rows, seed, cause  # cause: a change that decides which rows fit

    def state_dict(self) -> dict:
        return {"rows": self.rows, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        check_same_rows(state.get("rows"), self.rows, "decoder.data", self.cause)


def _context_change(run_dir: Path, context: int) -> str | None:
    """The change 'decoder.context A -> B' when the run's config.yaml (what its checkpoints trained with) has
    another context: a resume may change it (rotary positions), but it decides which rows fit."""
    try:  # GPT-2's context is its folder's, as this stage's own config has it
        ran = load_config(run_dir / CONFIG).decoder
        ran = ran if ran is None else with_gpt2_architecture(ran)
    except UserError:  # missing or unreadable: the rows' own message stands
        return None
    return f"decoder.context {ran.context} -> {context}" if ran is not None and ran.context != context else None


def _finish(config: Config, pm: PromptModel, run_dir: Path, result, skips: SkipCounter,
            space_fingerprint: str) -> None:
    save_prompt_model(pm, run_dir, space_fingerprint)
    save_config(config, run_dir / CONFIG, Path.cwd())
    if skips.summary():
        log.warning("decoder stage: %s", skips.summary())
    try:
        plot_curves(run_dir / DECODER_DIR / "metrics.jsonl", run_dir / DECODER_DIR)
    except Exception as e:  # a convenience: a missing backend must not fail a run
        log.warning("could not draw curves: %s", e)
    log.info("decoder saved to %s (%s at step %d; its weights: step %d)", run_dir, result.stopped_because,
             result.progress.step, result.weights_step)


@collector_paused()  # tens of thousands of prompts as lists of ids: 22 s -> 16-17 s for the demo's (gc_pause.py)
def _datasets(config: Config, pm: PromptModel, model: Model
              ) -> tuple[PromptDataset, PromptDataset | None, MediaTable, SkipCounter]:
    """Training and validation rows as datasets, their media embedded, and the skips."""
    cfg, root = config.decoder, Path(config.data.root)
    train_set = _read(config, root, cfg.data.train)
    if cfg.data.task_weights:
        train_set = train_set.weighted(cfg.data.task_weights, seed=cfg.train.seed)
        if not train_set.rows:
            raise UserError(f"{root / cfg.data.train}: no row left after decoder.data.task_weights")
    val_set = _read(config, root, cfg.data.val, _VAL_HINT) if cfg.data.val is not None else None
    val_rows = val_set.rows[: cfg.data.val_rows] if val_set is not None else []
    table = MediaTable()
    table.add(train_set.rows)
    table.add(val_rows)
    t0 = time.perf_counter()
    table.embed(model)
    log.info("embedded %d media items with the frozen shared space in %.1f s", len(table.index),
             time.perf_counter() - t0)
    if config.data.strict:  # an unreadable media file is a bad row, as in the align manifests
        table.refuse_bad(train_set.rows, train_set.path)
        if val_set is not None:
            table.refuse_bad(val_rows, val_set.path)
    main = current_world().main  # every process reads the same rows: one of them says what it skipped
    skips = SkipCounter(logger=None if main else _OTHER_RANKS)
    skips.update(train_set.skipped)
    train_data = PromptDataset(train_set.rows, pm.fmt, table, cfg.context, cfg.vector_marker_prob,
                               what=f"training rows in {root / cfg.data.train}")
    skips.update(train_data.skipped)
    val_data = None
    if val_rows:
        val_data = PromptDataset(val_rows, pm.fmt, table, cfg.context,
                                 what=f"validation rows in {root / cfg.data.val}{_VAL_HINT}")
        if main:
            _warn_left_out(root / cfg.data.val, val_set, val_rows, val_data)
    return train_data, val_data, table, skips


_VAL_HINT = " (decoder.data.val: null for none)"
_OTHER_RANKS = logging.getLogger("mmembed.train.decoder.other_ranks")  # the same warnings as rank 0's: dropped
_OTHER_RANKS.disabled = True


def _warn_left_out(path: Path, val_set: InstructionSet, val_rows: list[InstructionRow],
                   val_data: PromptDataset) -> None:
    """Validation is scored on the rows it can use, and the metric that picks the best checkpoint
    leaves the others out: say how many. Bad rows were dropped without a word, and the rows the
    decoder could not take were counted against "the first N rows" though more lines were read."""
    if val_set.skipped:
        log.warning("validation manifest %s: %d row(s) skipped at read time (first, line %d: %s)", path,
                    len(val_set.skipped), *val_set.skipped[0])
    # the bad rows among those validation reached (all of them when it reached the selection's end)
    last = val_rows[-1].line if len(val_rows) < len(val_set.rows) else float("inf")
    bad = [skip for skip in val_set.skipped if skip[0] < last]
    if bad or val_data.skipped:
        log.warning("validation: %d of %d rows of %s left out (%d bad, %d the decoder cannot take; first, line %d: "
                    "%s); %d scored", len(bad) + len(val_data.skipped), len(bad) + len(val_rows), path, len(bad),
                    len(val_data.skipped), *min(bad + val_data.skipped), len(val_data))


def fit_whitening(config: Config, pm: PromptModel, model: Model, own: Tensor) -> None:
    """Fit the projector's whitening to the space: the vectors of every modality of the first
    `decoder.whiten_rows` rows of the align training manifest, pooled (so a decoder trained on
    one modality's prompts is fitted to the whole space); without that manifest, or when
    data.train is no align manifest (a space copied with model.init_from never read it: an
    instruction file named train.jsonl stopped the run), `own`, the vectors of the decoder's
    training media (never its validation rows')."""
    cfg = config.decoder
    vectors, source = own, "the decoder's training media"
    if (sampled := _align_sample(config, model)) is not None and len(sampled) >= 2:
        vectors, source = sampled, f"the align manifest {Path(config.data.root) / config.data.train}"
    if len(vectors) < 2:  # a text-only instruction set over a copied space had none, and was told only that
        raise UserError(f"decoder.whiten: {len(vectors)} readable media vector(s) to fit the whitening to, from "
                        f"{source}; it needs at least 2: point data.train at an align manifest of the space (its "
                        "media are sampled), or set decoder.whiten=false (a decoder of text-only prompts projects "
                        "no vector)")
    pm.lm.whitening.fit(vectors, cfg.whiten_eps)
    log.info("whitening fitted on %d vectors of %s (eps %g)", len(vectors), source, cfg.whiten_eps)


def _align_sample(config: Config, model: Model) -> Tensor | None:
    """The space's vectors of the first decoder.whiten_rows rows of data.train; None when it is
    missing or not an align manifest (said once, with the reason)."""
    root = Path(config.data.root)
    manifest = root / config.data.train
    if not manifest.is_file():
        return None
    try:
        rows = read_manifest(manifest, root=root, allow_outside_root=config.data.allow_outside_root,
                             strict=config.data.strict).rows[: config.decoder.whiten_rows]
    except UserError as e:  # the align stage, which would have refused it, did not run (model.init_from)
        log.warning("decoder.whiten: data.train is not an align manifest to sample the space from (%s); "
                    "fitting to the decoder's training media instead", e)
        return None
    sample = MediaTable()
    sample.add_refs((m, r.items[m]) for r in rows for m in model.modalities if m in r.items)
    sample.embed(model)
    return sample.good_vectors()


def _read(config: Config, root: Path, name: str, val_hint: str = "") -> InstructionSet:
    data = read_instructions(root / name, root=root, allow_outside_root=config.data.allow_outside_root,
                             strict=config.data.strict)
    selected = data.select(config.decoder.data.tasks, config.decoder.data.prompt_modalities)
    if not selected.rows:
        raise UserError(f"{root / name}: no row left after decoder.data.tasks / prompt_modalities{val_hint}")
    return selected


def media_vectors(vectors: torch.Tensor, index: torch.Tensor, noise: float) -> torch.Tensor:
    """The batch's media vectors; with `noise`, perturbed and renormalised (training only)."""
    z = vectors[index]
    if noise > 0:
        z = F.normalize(z + noise * torch.randn_like(z), dim=-1)
    return z


def make_step_fn(pm: PromptModel, vectors: torch.Tensor, noise: float, device: torch.device,
                 net: torch.nn.Module | None = None) -> Callable:
    """`net`: `answer_logits` over the LM wrapped for several processes (`parallelize`)."""
    def step(batch: PromptBatch) -> StepOutput:
        batch = batch.to(device)
        media = media_vectors(vectors, batch.media, noise)
        args = (batch.ids, media, batch.targets, batch.loss_mask)
        packing = {"mask": batch.mask, "positions": batch.positions}
        logits, targets = answer_logits(pm.lm, *args, **packing) if net is None else net(*args, **packing)
        loss = F.cross_entropy(logits.float(), targets)
        accuracy = float((logits.argmax(-1) == targets).float().mean())
        # a mean over this batch's answer tokens: the engine weighs micro-batches and ranks by them
        return StepOutput(loss, {"token_accuracy": accuracy}, samples=len(batch), weight=targets.numel())

    return step


@torch.inference_mode()
def evaluate_answers(pm: PromptModel, data: PromptDataset, vectors: torch.Tensor, device: torch.device,
                     batch_size: int = 256) -> dict[str, float]:
    """Teacher-forced validation: answer loss, token accuracy, and the fraction of rows whose
    every answer token (the end token too) is the argmax — exact answers under greedy decoding."""
    was_training = pm.lm.training
    pm.lm.eval()
    total_loss = correct_tokens = tokens = exact = 0.0
    for start in range(0, len(data), batch_size):
        items = [data[(i, 0)] for i in range(start, min(start + batch_size, len(data)))]
        batch = collate_prompts(items, pm.fmt.pad_id).to(device)
        logits, targets = answer_logits(pm.lm, batch.ids, vectors[batch.media], batch.targets, batch.loss_mask)
        total_loss += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        hit = logits.argmax(-1) == targets
        correct_tokens += float(hit.sum())
        tokens += targets.numel()
        row_of = batch.loss_mask.nonzero()[:, 0]  # the row of each answer position
        wrong_rows = torch.zeros(len(items), device=device).index_add_(0, row_of, (~hit).float())
        exact += float((wrong_rows == 0).sum())
    pm.lm.train(was_training)
    return {"loss": total_loss / tokens, "token_accuracy": correct_tokens / tokens, "answer_accuracy": exact / len(data)}
