"""The contrastive losses of `losses.py` over the global batch of several processes.

Each rank embeds its own B rows; the loss of the global batch (W·B rows) is what a single
process would compute on all of them. Each rank computes only its share, and DDP's gradient
average over the ranks puts the shares together:

* ``infonce`` — open_clip's ``gather_with_grad`` + ``local_loss``: every modality's embeddings
  are all-gathered with gradient; rank r scores only its rows against the global columns (both
  directions), so the logit blocks are (B, W·B) rather than (W·B, W·B) and memory grows linearly
  with the global batch.
* ``siglip`` — the chunked form of the SigLIP paper (Zhai et al. 2023, section 3.3): nothing is
  gathered; the other side's embeddings travel round the ring of ranks, one neighbour exchange
  per step, and rank r adds the sigmoid terms of its rows against each chunk as it arrives:
  (B, B) blocks only.

Rows lacking a modality are handled as in the single-process loss: the presence masks and
labels (small) are all-gathered, a pair uses only rows where both sides are present, counted
over the global batch, and junk rows are dropped by indexing before any arithmetic. Rank r's
share is scaled by W / n (n the pair's global row count), so the mean over ranks that DDP takes
is exactly the global loss, however unevenly the valid rows fall among the ranks.

Every rank runs the same collectives in the same order (a rank with no valid rows still takes
part: its share is an empty sum that keeps the gathered tensors in the graph), or the backward
pass would wait forever.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mmembed.modality import Modality
from mmembed.train.collectives import all_reduce_values, gather, gather_with_grad, neighbour_exchange
from mmembed.train.distributed import World


@dataclass
class GlobalBatch:
    """What rank `world.rank` knows of the global batch for the loss.

    Attributes:
        local: per modality, this rank's (B, D) embeddings (with gradient).
        gathered: per modality, the (W·B, D) embeddings of every rank (InfoNCE only).
        present: per modality, (W·B,) bool over the global batch.
        labels: (W·B,) label ids, or None.
    """

    world: World
    batch: int
    local: dict[Modality, Tensor]
    gathered: dict[Modality, Tensor]
    present: dict[Modality, Tensor]
    labels: Tensor | None

    @classmethod
    def collect(cls, world: World, embeddings: dict[Modality, Tensor], present: dict[Modality, Tensor],
                labels: Tensor | None, batch: int, with_embeddings: bool) -> GlobalBatch:
        some = next(iter(embeddings.values()))
        device, dim, dtype = some.device, some.shape[1], some.dtype
        # Every rank must run the same collectives on the same shapes, but a rank's batch can be
        # short (rows skipped as bad) or lack a modality (none of its rows has it): agree on the
        # modalities and the longest batch first, then pad; a padded row is present nowhere.
        kinds = list(Modality)
        held = ([float(m in embeddings) for m in kinds] + [float(batch)]
                + [float(m in embeddings and embeddings[m].requires_grad) for m in kinds])
        agreed = all_reduce_values(held, "max")
        order = [m for m, flag in zip(kinds, agreed) if flag]  # the same order on every rank
        rows = int(agreed[len(kinds)])
        graded = {m for m, flag in zip(kinds, agreed[len(kinds) + 1:]) if flag}
        pad = rows - batch
        # every rank runs the backward of a modality's all-gather, or none does (a frozen tower's
        # vectors take no gradient): a modality this rank lacks is zeros that take one where the
        # others' do; gloo aborted the run when only some ranks ran it
        local = {m: _with_grad(F.pad(embeddings[m], (0, 0, 0, pad)) if m in embeddings
                               else torch.zeros(rows, dim, dtype=dtype, device=device), m in graded)
                 for m in order}  # (B', D)
        every = torch.ones(batch, dtype=torch.bool, device=device)
        full = {m: F.pad(present.get(m, every) if m in embeddings else ~every, (0, pad)) for m in order}  # (B',)
        flags = gather(torch.stack([full[m] for m in order]).to(torch.uint8).T.contiguous()).bool()  # (W·B', M)
        glob_present = {m: flags[:, i] for i, m in enumerate(order)}
        glob_labels = gather(F.pad(labels, (0, pad), value=-1)) if labels is not None else None
        gathered = {m: gather_with_grad(local[m]) for m in order} if with_embeddings else {}
        return cls(world, rows, local, gathered, glob_present, glob_labels)

    def mine(self) -> slice:
        return slice(self.world.rank * self.batch, (self.world.rank + 1) * self.batch)

    def rows(self, a: Modality, b: Modality) -> Tensor:
        """(W·B,) bool: the global rows where both modalities are present."""
        return self.present[a] & self.present[b]

    def anchor(self) -> Tensor:
        """A zero that depends on every exchanged tensor: added to the total, it makes every
        rank run the backward collectives even where it has no row of its own."""
        tensors = [*self.gathered.values(), *self.local.values()]
        return sum(t[:0].sum() for t in tensors)


def _with_grad(t: Tensor, graded: bool) -> Tensor:
    """`t` as it is when it already takes a gradient or none is wanted, else a leaf that takes one."""
    return t if t.requires_grad or not graded else t.detach().requires_grad_()


def _same(q_labels: Tensor | None, labels: Tensor | None) -> Tensor | None:
    """(n_q, n) bool: same label id (>= 0) — not negatives (the diagonal is the caller's)."""
    if q_labels is None or labels is None:
        return None
    return (q_labels[:, None] == labels[None, :]) & (q_labels >= 0)[:, None]


def infonce_share(g: GlobalBatch, a: Modality, b: Modality, logit_scale: Tensor,
                  label_positives: bool) -> Tensor:
    """This rank's share of the symmetric InfoNCE loss of pair (a, b) over the global batch."""
    both = g.rows(a, b)
    n = int(both.sum())
    mine = torch.zeros_like(both)
    mine[g.mine()] = True
    q = both & mine
    targets = (torch.cumsum(both.long(), 0) - 1)[q]  # where each of my rows sits among the global ones
    same = None
    if label_positives and g.labels is not None:
        same = _same(g.labels[q], g.labels[both])
        same[torch.arange(len(targets), device=same.device), targets] = False
    total = 0.0
    for x, y in ((a, b), (b, a)):  # rows of x against every column of y, then the transpose
        logits = (logit_scale * g.gathered[x][q]) @ g.gathered[y][both].T  # (n_q, n)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        if same is not None:
            logits = logits.masked_fill(same, float("-inf"))
        total = total + F.cross_entropy(logits, targets, reduction="sum")
    return total * g.world.size / (2 * n)


def siglip_share(g: GlobalBatch, a: Modality, b: Modality, logit_scale: Tensor, logit_bias: Tensor,
                 label_positives: bool) -> Tensor:
    """This rank's share of the sigmoid loss of pair (a, b): its rows of `a` against every
    rank's rows of `b`, which arrive one chunk at a time round the ring of ranks."""
    world, size, B = g.world, g.world.size, g.batch
    both = g.rows(a, b)
    n = int(both.sum())
    q = both[g.mine()]
    za = g.local[a][q]
    q_labels = g.labels[g.mine()][q] if label_positives and g.labels is not None else None
    chunk = g.local[b]
    total = 0.0
    for step in range(size):
        if step:  # pass what we hold to the next rank, take the previous rank's
            chunk = neighbour_exchange(chunk, (world.rank + 1) % size, (world.rank - 1) % size)
        src = (world.rank - step) % size
        cols = both[src * B:(src + 1) * B]
        logits = (logit_scale * za) @ chunk[cols].T + logit_bias  # (n_q, n_src)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        positive = torch.zeros_like(logits, dtype=torch.bool)
        if step == 0:
            positive.fill_diagonal_(True)
        if q_labels is not None:
            positive |= _same(q_labels, g.labels[src * B:(src + 1) * B][cols])
        total = total + (-F.logsigmoid(torch.where(positive, logits, -logits)).sum())
    return total * size / n
