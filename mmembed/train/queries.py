"""A query tower: questions land on the item they ask about, the shared space untouched.

    episodes (shown items + questions, each naming one item) ─► item vectors, once, from the frozen space
    query tower = a copy of the text tower ─► question vector q
    loss: softmax over the episode's items of logit_scale · q·item, the asked item the target

The text tower places whole captions: "a large red star on the left and a small blue circle on
the right" finds its picture, but a question that names one object by some of its attributes
("What colour was the large star?") lands about as near every picture (docs/memory.md). Training
the shared text tower on such phrases would cost the space's own recall, since a phrase that fits
many scenes is a negative for all but one of them in a batch. So, as dense retrieval keeps a query
encoder beside its passage encoder (DPR, Karpukhin et al. 2020), the question gets a tower of its
own, trained where it is used: against the few items a user was shown (an episode), in which the
question names exactly one. Item vectors are the space's, so a memory store or an index built
before needs no re-embedding; `Model.embed_query` uses the tower, a `Session` recalls with it.

Episodes: `mmembed.data.episodes` (JSON lines; the built-in world writes them from its manifests).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from encoders.weights import state_fault
from mmembed.checkpoint import atomic_write_json, load_tensors, read_json, save_tensors
from mmembed.data.episodes import Episode
from mmembed.errors import CheckpointError, UserError
from mmembed.modality import Modality
from mmembed.train.align import seed_everything
from mmembed.train.optim import param_groups

log = logging.getLogger(__name__)

QUERY_WEIGHTS, QUERY_INFO = "query_tower.safetensors", "query_tower.json"
# A question's vector scores lower against its item than a whole caption's does (it names a part of
# it): the threshold a Session applies to it is the score this share of validation questions stay under
THRESHOLD_QUANTILE = 0.1


@dataclasses.dataclass
class QueryTowerReport:
    """Recall of the asked item among its episode's items on the validation episodes, with the text
    tower (before) and the trained query tower (after)."""

    steps: int
    seconds: float
    questions: int  # validation questions
    before: dict[str, float]  # {"recall@1": ..., "recall@3": ...}
    after: dict[str, float]
    threshold: float  # the score 90% of validation questions give their item: a Session's recall threshold


def item_vectors(model: Any, episodes: Sequence[Episode], batch_size: int = 64) -> dict[tuple[Modality, str], Tensor]:
    """Every distinct item of `episodes` embedded once by the (frozen) space."""
    wanted: dict[Modality, list[str]] = {}
    for ep in episodes:
        for modality, value in ep.items:
            wanted.setdefault(modality, []).append(value)
    table = {}
    for modality, values in wanted.items():
        values = list(dict.fromkeys(values))
        for value, z in zip(values, model.embed(modality, values, batch_size=batch_size)):
            table[(modality, value)] = z
    return table


def asked_ranks(encode: Any, episodes: Sequence[Episode],
                table: dict[tuple[Modality, str], Tensor]) -> tuple[Tensor, Tensor]:
    """Per question: the rank of the asked item among its episode's items (0 = first; ties count
    against it) and its score."""
    ranks, scores = [], []
    with torch.no_grad():
        for ep in episodes:
            items = torch.stack([table[i] for i in ep.items])  # (M, D)
            s = encode([text for text, _ in ep.questions]) @ items.T  # (Q, M)
            target = s.gather(1, torch.tensor([i for _, i in ep.questions])[:, None])  # (Q, 1)
            rank = (s >= target).sum(1) - 1  # (Q,)
            ranks.append(rank.masked_fill(target[:, 0].isnan(), items.shape[0] - 1))  # a NaN score is last
            scores.append(target[:, 0])
    return torch.cat(ranks), torch.cat(scores)


def recall_at(ranks: Tensor, ks: Sequence[int] = (1, 3)) -> dict[str, float]:
    return {f"recall@{k}": float((ranks < k).float().mean()) for k in ks}


def train_query_tower(model: Any, train: Sequence[Episode], val: Sequence[Episode], steps: int = 1500,
                      episodes_per_step: int = 4, lr: float = 1e-3, weight_decay: float = 0.05,
                      seed: int = 0) -> QueryTowerReport:
    """Train `model.query_tower` (started from a copy of its text tower) on `train`; recall on `val`."""
    if Modality.TEXT not in model.modalities:
        raise UserError("a query tower starts from the text tower, and this model has none")
    for name, value, ok, wanted in (("steps", steps, steps >= 1, ">= 1"),
                                    ("episodes_per_step", episodes_per_step, episodes_per_step >= 1, ">= 1"),
                                    ("lr", lr, 0 < lr < math.inf, "> 0 and finite")):
        if not ok:  # each by its own name: the CLI has --steps and --lr, and no episodes_per_step
            raise UserError(f"{name} must be {wanted}, got {value!r}")
    if not train or not val:
        raise UserError("a query tower needs training and validation episodes")
    seed_everything(seed)
    start = time.monotonic()
    table = item_vectors(model, [*train, *val])
    text_tower = model.space.towers[str(Modality.TEXT)]
    before = recall_at(asked_ranks(lambda texts: model.embed_query(texts, tower=text_tower), val, table)[0])
    tower = copy.deepcopy(text_tower).train().requires_grad_(True)  # a bound run froze its text tower
    pre = model.preprocessors[Modality.TEXT]
    scale = float(model.space.logit_scale.detach())
    opt = torch.optim.AdamW(param_groups(tower, weight_decay), lr=lr)  # no decay on norms, biases, embeddings
    warmup = max(1, min(50, steps // 2))  # a short run still reaches `lr`
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * s / steps)))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train))
    device = model.device
    for step in range(steps):
        loss = torch.zeros((), device=device)
        for j in range(episodes_per_step):
            ep = train[order[(step * episodes_per_step + j) % len(order)]]
            x, mask = pre.collate([pre(text) for text, _ in ep.questions])
            q = tower(x.to(device), None if mask is None else mask.to(device))  # (Q, D)
            items = torch.stack([table[i] for i in ep.items]).to(device)  # (M, D)
            target = torch.tensor([i for _, i in ep.questions], device=device)
            loss = loss + F.cross_entropy(scale * q @ items.T, target)
        opt.zero_grad(set_to_none=True)
        (loss / episodes_per_step).backward()
        torch.nn.utils.clip_grad_norm_(tower.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 250 == 0:
            log.info("query tower step %d/%d: loss %.3f", step + 1, steps, loss.item() / episodes_per_step)
    if not all(torch.isfinite(p).all() for p in tower.parameters()):  # keep the run's tower as it was
        raise UserError(f"query tower training diverged (non-finite weights after {steps} steps at lr {lr}): "
                        "lower --lr; nothing was saved")
    model.query_tower = tower.eval()
    ranks, scores = asked_ranks(model.embed_query, val, table)
    model.query_threshold = float(torch.quantile(scores, THRESHOLD_QUANTILE))
    return QueryTowerReport(steps=steps, seconds=time.monotonic() - start, questions=len(ranks), before=before,
                            after=recall_at(ranks), threshold=model.query_threshold)


def save_query_tower(model: Any, run_dir: str | Path, report: QueryTowerReport | None = None) -> Path:
    """Write the query tower beside the run's weights (atomically); `mm.load` picks it up."""
    if model.query_tower is None:
        raise UserError("this model has no query tower to save")
    run_dir = Path(run_dir)
    info = dataclasses.asdict(report) if report is not None else {}
    info.update(threshold=model.query_threshold, fingerprint=model.fingerprint)  # the space its items came from
    # the old record goes first: a kill between the two writes leaves new weights without a record
    # (refused at load), never beside the old tower's threshold
    (run_dir / QUERY_INFO).unlink(missing_ok=True)
    save_tensors(run_dir / QUERY_WEIGHTS, model.query_tower.state_dict())
    atomic_write_json(run_dir / QUERY_INFO, info)
    return run_dir / QUERY_WEIGHTS


def load_query_tower(run_dir: Path, model: Any) -> tuple[torch.nn.Module | None, float | None]:
    """The run's query tower (a text tower's architecture with weights of its own) and its recall
    threshold, or (None, None). A tower trained against another space is refused: its questions
    would land where that space put the items."""
    path = run_dir / QUERY_WEIGHTS
    if not path.is_file():
        return None, None
    if str(Modality.TEXT) not in model.space.towers:
        raise CheckpointError(f"{path}: a query tower, but the space has no text tower to shape it")
    info_path = run_dir / QUERY_INFO
    again = f"train it again with `mmembed train-queries {run_dir} --overwrite`, or delete {path.name}"
    if not info_path.is_file():  # a kill between the two writes: the space it belongs to is unknown
        raise CheckpointError(f"{path} has no {QUERY_INFO} (the space it was trained for, its threshold): {again}")
    info = read_json(info_path)  # a broken file is a CheckpointError
    if not isinstance(info, dict) or "fingerprint" not in info:
        raise CheckpointError(f"{info_path}: not a query tower's record (no fingerprint): {again}")
    threshold = info.get("threshold")  # "0.06" crashed recall, NaN recalled anything
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not -math.inf < threshold < math.inf):
        raise CheckpointError(f"{info_path}: threshold must be a finite number, got {threshold!r}: {again}")
    if info["fingerprint"] != model.fingerprint:
        raise CheckpointError(f"{path} was trained for another space (fingerprint {info['fingerprint']}, this run's "
                              f"{model.fingerprint}): {again}")
    tower = copy.deepcopy(model.space.towers[str(Modality.TEXT)])
    state = load_tensors(path)
    if fault := state_fault(tower, state):  # NaN loads as it is: every worded turn would fail later
        raise CheckpointError(f"{path}: {fault}: {again}")
    try:
        tower.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match the text tower of config.yaml "
                              f"({str(e).strip().splitlines()[0][:200]})") from None
    return tower.eval(), threshold
