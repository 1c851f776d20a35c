"""Code that runs inside the processes the distributed tests start (importable by spawn)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mmembed.losses import ContrastiveLoss
from mmembed.modality import Modality
from mmembed.train.distributed import as_output

W, B, D_IN, D = 2, 6, 8, 5  # world size, rows per rank, input and embedding widths
MODALITIES = (Modality.TEXT, Modality.IMAGE, Modality.AUDIO)

# (kind, mode, anchor, label_positives, pair_weights)
CASES = {
    "infonce": ("infonce", "all_pairs", None, False, None),
    "infonce_labels": ("infonce", "all_pairs", None, True, None),
    "infonce_anchor_weighted": ("infonce", "anchor", "text", False, {"text-audio": 0.5}),
    "siglip": ("siglip", "all_pairs", None, False, None),
    "siglip_labels": ("siglip", "all_pairs", None, True, None),
}


class Towers(nn.Module):
    """One linear 'tower' per modality, a learnable logit scale and bias: the loss's inputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.towers = nn.ModuleDict({m.value: nn.Linear(D_IN, D) for m in MODALITIES})
        self.log_scale = nn.Parameter(torch.tensor(2.0))
        self.bias = nn.Parameter(torch.tensor(-3.0))


def forward(module: Towers, inputs: dict[Modality, torch.Tensor], with_bias: bool):
    """As the align stage's forward: the bias is an output only when the loss uses it."""
    emb = {m: F.normalize(module.towers[m.value](x), dim=-1) for m, x in inputs.items()}
    return emb, module.log_scale.exp(), as_output(module.bias) if with_bias else None


def global_batch():
    """Inputs, presence and labels of the whole global batch (W·B rows). Presence is uneven on
    purpose: rank 0 has no audio at all and rank 1 lacks some images, so the ranks hold different
    numbers of rows of each pair; labels repeat across ranks."""
    g = torch.Generator().manual_seed(1)
    inputs = {m: torch.randn(W * B, D_IN, generator=g) for m in MODALITIES}
    present = {m: torch.ones(W * B, dtype=torch.bool) for m in MODALITIES}
    present[Modality.AUDIO][:B] = False
    present[Modality.IMAGE][B + 1:B + 3] = False
    inputs[Modality.AUDIO][~present[Modality.AUDIO]] = 1e4  # junk rows: must not leak into the loss
    labels = torch.tensor([0, 1, 2, -1, 3, 0, 1, 4, -1, 5, 2, 6])
    return inputs, present, labels


def loss_and_grads(case: str, module: nn.Module, net, rows: slice, absent: tuple[Modality, ...] = ()):
    """`absent`: modalities this batch leaves out altogether (collate does so when no row has one).
    Towers whose parameters take no gradient (frozen) give vectors without one."""
    kind, mode, anchor, label_positives, weights = CASES[case]
    loss_fn = ContrastiveLoss(kind, mode, anchor, weights, label_positives)
    inputs, present, labels = global_batch()
    module.zero_grad(set_to_none=True)
    emb, scale, bias = net({m: x[rows] for m, x in inputs.items() if m not in absent}, kind == "siglip")
    out = loss_fn(emb, {m: p[rows] for m, p in present.items() if m not in absent}, scale, labels[rows], bias)
    out.total.backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in module.named_parameters()}
    return out.total.detach(), grads


def loss_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Each rank: its B rows of the global batch, through DDP; saves the global loss (the mean
    of the ranks' shares) and the parameters' averaged gradients for every case."""
    from mmembed.train.collectives import all_reduce_values
    from mmembed.train.distributed import Forward, parallelize

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    torch.set_num_threads(1)
    results = {}
    for case in CASES:
        module = Towers()
        net = parallelize(module, forward, torch.device("cpu"))
        assert not isinstance(net, Forward), "two processes must be wrapped in DDP"
        loss, grads = loss_and_grads(case, module, net, slice(rank * B, (rank + 1) * B))
        results[case] = {"loss": all_reduce_values([float(loss)])[0], "grads": grads}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()
    # gloo's threads (gloo_tcp_loop, pt_gloo_runloop) outlive destroy_process_group here, and the
    # interpreter's teardown sometimes destroys them still joinable: SIGABRT, "terminate called
    # without an active exception" (half the runs on 2026-12-05). The results are saved: skip it.
    os._exit(0)


# Uneven ranks, as real batches come: rank 0 holds no audio row, so its batch has no audio input at
# all, and rank 1 holds one row fewer (a bad row skipped). Together: rows 0-10 of the global batch.
UNEVEN = {0: (slice(0, B), (Modality.AUDIO,)), 1: (slice(B, 2 * B - 1), ())}


def uneven_worker(rank: int, init_file: str, out_dir: str) -> None:
    """As `loss_worker`, on the `UNEVEN` batches."""
    _uneven_cases(rank, init_file, out_dir, Towers)


def frozen_worker(rank: int, init_file: str, out_dir: str) -> None:
    """As `uneven_worker` with the audio tower frozen: rank 0 has no audio, rank 1's audio vectors
    take no gradient (gloo aborted: only rank 0 ran the all-gather's backward)."""
    _uneven_cases(rank, init_file, out_dir, frozen_towers)


def _uneven_cases(rank: int, init_file: str, out_dir: str, make_module) -> None:
    from mmembed.train.collectives import all_reduce_values
    from mmembed.train.distributed import parallelize

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    torch.set_num_threads(1)
    results = {}
    rows, absent = UNEVEN[rank]
    for case in CASES:
        module = make_module()
        net = parallelize(module, forward, torch.device("cpu"))
        loss, grads = loss_and_grads(case, module, net, rows, absent)
        results[case] = {"loss": all_reduce_values([float(loss)])[0], "grads": grads}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()
    os._exit(0)  # as loss_worker


def frozen_towers() -> Towers:
    module = Towers()
    module.towers[Modality.AUDIO.value].requires_grad_(False)
    return module


def rank_pids(torchrun_pid: int) -> dict[int, int]:
    """{rank: pid} of the worker processes a torchrun agent started (Linux /proc)."""
    out = {}
    children = Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split()
    for pid in map(int, children):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                out[int(item[5:])] = pid
    return out


def free_env() -> dict[str, str]:
    """The environment for a torchrun child of a test: one thread per process, no inherited rank,
    and no GPU: these are the CPU (gloo) runs CI makes, also on a machine with one GPU, where two
    processes asking for one GPU each are refused (test_devices.py)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


class Captioned(nn.Module):
    """Two linear 'towers' and a captioner: the align stage's captioning objective in miniature."""

    def __init__(self) -> None:
        super().__init__()
        from mmembed.train.captioning import Captioner

        torch.manual_seed(0)
        self.towers = nn.ModuleDict({m.value: nn.Linear(D_IN, 8) for m in CAPTIONED})
        self.captioner = Captioner(embed_dim=8, vocab_size=50, width=16, layers=1, heads=2, soft_tokens=2)


CAPTIONED = (Modality.TEXT, Modality.IMAGE)


def captioned_forward(module: Captioned, inputs, present, ids, mask):
    from mmembed.train.captioning import caption_losses

    emb = {}
    for m in CAPTIONED:  # as SharedSpace.forward: zeros where a row lacks the modality
        z = torch.zeros(len(present[m]), 8)
        if m in inputs:
            z[present[m]] = F.normalize(module.towers[m.value](inputs[m]), dim=-1)
        emb[m] = z
    return caption_losses(module.captioner, emb, present, ids, mask)


def captioned_batch(rows: slice):
    """Rank 0's 4 rows have long captions and images, rank 1's short captions and no image: the
    ranks hold different numbers of caption tokens of each modality."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2 * 4, D_IN, generator=g)
    lengths = torch.tensor([9, 8, 9, 7, 3, 4, 3, 3])
    ids = torch.randint(3, 50, (8, 9), generator=g)
    ids[:, 0] = 1
    mask = torch.arange(9)[None] < lengths[:, None]
    present = {Modality.TEXT: torch.ones(8, dtype=torch.bool), Modality.IMAGE: torch.arange(8) < 4}
    present = {m: p[rows] for m, p in present.items()}
    inputs = {m: x[rows][present[m]] for m in CAPTIONED if present[m].any()}
    return inputs, present, ids[rows], mask[rows]


def caption_loss_and_grads(module: Captioned, net, rows: slice):
    from mmembed.train.captioning import caption_objective

    module.zero_grad(set_to_none=True)
    objective = caption_objective(net(*captioned_batch(rows)), list(CAPTIONED))
    objective.backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in module.named_parameters()}
    return objective.detach(), grads


def caption_worker(rank: int, init_file: str, out_dir: str) -> None:
    """Each rank: its 4 rows through DDP; saves the global objective and the averaged gradients."""
    from mmembed.train.collectives import all_reduce_values
    from mmembed.train.distributed import parallelize

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W)
    torch.set_num_threads(1)
    module = Captioned()
    net = parallelize(module, captioned_forward, torch.device("cpu"))
    loss, grads = caption_loss_and_grads(module, net, slice(4 * rank, 4 * rank + 4))
    torch.save({"loss": all_reduce_values([float(loss)])[0], "grads": grads}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()
    os._exit(0)  # as loss_worker


def refusal_worker(rank: int, init_file: str, out_dir: str, case: str) -> None:
    """Each rank: what it raised (`type: message`) where rank 0 alone meets a refusal, written to
    rank{r}.txt. `lock`: the run folder `out_dir`/run is locked by another process; `main_first`:
    rank 0 raises a ConfigError in the block; `config`: rank 1's config differs. After it, the ranks meet in a barrier, as the run's
    next collective: a rank that went on without the refusal lost its peer there."""
    from datetime import timedelta

    from mmembed.errors import ConfigError, UserError
    from mmembed.train.collectives import check_same_everywhere, main_first
    from mmembed.train.run_dir import lock_run

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=W,
                            timeout=timedelta(seconds=30))
    outcome = "no error"
    try:
        if case == "lock":
            with lock_run(Path(out_dir) / "run", resume=True, overwrite=False):
                dist.barrier()
        elif case == "config":  # one node started with train.batch_size=4
            check_same_everywhere({"train": {"lr": 1e-3, "batch_size": 16 if rank == 0 else 4}}, "the config")
            dist.barrier()
        else:
            with main_first():
                if rank == 0:
                    raise ConfigError("data.train: not found")
            dist.barrier()
    except (UserError, RuntimeError) as e:
        outcome = f"{type(e).__name__}: {e}".splitlines()[0]
    (Path(out_dir) / f"rank{rank}.txt").write_text(outcome)
    os._exit(0)  # as loss_worker; a rank that lost its peer must not wait in the group's teardown
