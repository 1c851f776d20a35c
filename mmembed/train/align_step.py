"""The align stage's forward and training step: the space's forward as the one module call DDP or
FSDP wraps (with the training-time captioner when loss.caption_weight > 0), the parts no process
learned from in a step, and the step function the engine runs. The stage's run is in align.py,
its loaders and validation in align_data.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from mmembed.config import Config
from mmembed.data import SkipCounter
from mmembed.errors import UserError
from mmembed.preprocess import build_preprocessor
from mmembed.space import SharedSpace
from mmembed.train.captioning import CAPTION, Captioner, caption_losses, caption_objective
from mmembed.train.collapse import CollapseMonitor
from mmembed.train.collectives import any_rank
from mmembed.train.distributed import Forward, as_output
from mmembed.train.engine import StepOutput


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
    """The towers (and the captioner, and the logit scale and bias when no pair ran) no process
    learned from in an optimizer step, for the engine's `idle`: one process leaves their gradients
    None, DDP and FSDP give them zeros. The step function records what each batch learned from
    (`saw`); a call agrees on it over the ranks (one collective) and starts the next step afresh."""

    def __init__(self, space: SharedSpace, captioner: torch.nn.Module | None = None) -> None:
        self.space, self.captioner = space, captioner
        self.used: set[str] = set()  # modalities in a pair that ran, or whose vectors wrote a caption here
        self.captioned = self.paired = False

    def saw(self, modalities, captioned: bool = False, paired: bool = False) -> None:
        self.used.update(str(m) for m in modalities)
        self.captioned |= captioned
        self.paired |= paired

    def __call__(self) -> list[torch.nn.Parameter]:
        names = list(self.space.towers)
        *used, captioned, paired = any_rank([m in self.used for m in names] + [self.captioned, self.paired])
        self.used, self.captioned, self.paired = set(), False, False
        idle = [p for m, u in zip(names, used) if not u for p in self.space.towers[m].parameters()]
        if not paired:  # only captions were written: the contrastive loss's scale and bias had no say
            idle += [self.space.log_logit_scale, self.space.logit_bias]
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
        idle.saw((m for pair in out.per_pair for m in pair.split("-")), paired=learned)  # keys: `pair_name`
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
