"""What the align stage reads, and how its validation measures the space: the modalities it
trains, the training loader (and the fingerprint of its rows a resume checks), the validation
loader, embedding it and averaging recall over the pairs, and each tower's largest one-row input,
which the towers must accept. The stage's run is in align.py, its forward and step in align_step.py.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmembed.config import Config
from mmembed.data import Manifest, ManifestDataset, SkipCounter, build_loader, read_manifest
from mmembed.data.cache_size import check_cache_fits, keep_validation_cached
from mmembed.errors import ConfigError, UserError
from mmembed.modality import Modality
from mmembed.preprocess import build_preprocessor
from mmembed.space import SharedSpace
from mmembed.train.data_setup import read_train_manifest, rows_fingerprint
from mmembed.evaluate_recall import shared_files_note
from mmembed.train.distributed import current_world

log = logging.getLogger("mmembed.train.align")  # the stage's lines keep their logger name (the CLI prints it)


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
    if not getattr(loader, "said_key", False):  # once a run (a loader object), as `mmembed eval`'s table says it
        with contextlib.suppress(AttributeError):  # a plain list of batches takes no attribute: said each time
            loader.said_key = True
        log.info("validation: recall matched by %s", "label (an item of the same label counts as a hit)" if labelled
                 else "row (only the row's own items count; give every row a label to match by label)")
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


def train_loader_factory(cfg: Config, root: Path, tokenizer, active: list[Modality], skips: SkipCounter,
                         manifest: Manifest | None = None) -> tuple[Callable, int, str]:
    """(make(epoch, start_sample) → the epoch's loader, steps per epoch, the rows' fingerprint:
    what a resumed run checks its data against, as its sample position means those rows).
    `manifest`: data.train as `read_train_manifest` read it (else read here)."""
    pre = {m: build_preprocessor(m, cfg.model.towers[str(m)].preprocess, tokenizer=tokenizer, train=True)
           for m in active}
    if manifest is None:
        manifest = read_train_manifest(cfg, root)
    skips.update(manifest.skipped)  # rows refused at read time (bad JSON, escaping paths) count too
    dataset = ManifestDataset(manifest, pre, strict=cfg.data.strict, cache=cfg.data.cache,
                              caption_sampling=cfg.data.caption_sampling)
    # a misnamed column ("caption", "imgae") leaves nothing to pair, or a tower untrained
    dataset.check_pairs(captioned=cfg.loss.caption_weight > 0)
    bs = cfg.train.batch_size
    check_batch_fits(manifest, bs, len(dataset))
    if cfg.data.cache:  # now, not when the first epoch has filled most of the memory
        check_cache_fits(dataset, "training set")

    world = current_world()

    def make(epoch: int, start_sample: int):
        return build_loader(dataset, bs, shuffle=True, num_workers=cfg.data.num_workers, seed=cfg.train.seed,
                            drop_last=True, epoch=epoch, start_sample=start_sample, rank=world.rank,
                            world_size=world.size, skips=skips)

    return make, len(dataset) // (bs * world.size), rows_fingerprint(manifest)


def check_batch_fits(manifest, batch_size: int, rows: int | None = None) -> None:
    """UserError when the training manifest's `rows` (usable rows: all of `manifest`'s by default) fill
    no batch (training drops the last, incomplete one)."""
    rows = len(manifest.rows) if rows is None else rows
    if rows < batch_size:
        smaller = f"set a smaller one (train.batch_size={2 ** (rows.bit_length() - 1)}), or " if rows >= 2 else ""
        raise UserError(f"training manifest has {_usable(manifest)}, fewer than train.batch_size={batch_size}: "
                        f"{smaller}give more rows")


def _usable(manifest) -> str:
    """"3 rows", or "3 usable rows of 32 (29 skipped; first, line 1: …)": refused rows are why so few remain."""
    if not manifest.skipped:
        return f"{len(manifest.rows)} rows"
    line, reason = manifest.skipped[0]
    return (f"{len(manifest.rows)} usable rows of {len(manifest.rows) + len(manifest.skipped)} "
            f"({len(manifest.skipped)} skipped; first, line {line}: {reason})")


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
    if not all(row.label is not None for row in manifest.rows) and (
            note := shared_files_note(manifest.rows, f"validation manifest {root / name}")):
        log.warning("%s", note)  # early stopping would follow a recall stuck near 0
    # validation measures the primary captions, whatever data.caption_sampling trains on
    dataset = ManifestDataset(manifest, pre, strict=cfg.data.strict, cache=True, caption_sampling="primary")
    if not keep_validation_cached(dataset, asked=cfg.data.cache):
        dataset.drop_cache()
    # a cache fills in this process at the first evaluation; a stream decodes in data.num_workers workers
    workers = 0 if dataset.cache is not None else cfg.data.num_workers
    return build_loader(dataset, 256, shuffle=False, num_workers=workers, seed=0, drop_last=False)
