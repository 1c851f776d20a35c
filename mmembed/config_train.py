"""The training sections of the config schema: `loss:` (what the align stage minimises) and
`train:` (the optimiser, schedule, guards and checkpoints of a stage; `decoder.train` is one too).

The root `Config` and the loading are in `config.py`; the decoder stage's sections in `config_decoder.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from mmembed.errors import ConfigError
from mmembed.typed_config import join_key

MAX_DIST_TIMEOUT = 7 * 24 * 60  # minutes
MAX_SEED = 2**32 - 1  # numpy's legacy seeding takes no more (train.seed, and the commands' --seed)


@dataclass
class LossConfig:
    kind: Literal["infonce", "siglip"] = "infonce"
    mode: Literal["all_pairs", "anchor"] = "all_pairs"  # anchor: bind every modality to one (ImageBind)
    anchor: str | None = None  # modality name, for mode=anchor
    pair_weights: dict[str, float] = field(default_factory=dict)  # "image-text": 1.0; default 1
    label_positives: bool = False  # rows sharing a `label` are not negatives of each other
    # CoCa: also ask every vector to write its row's caption (train/captioning.py); the weight of
    # that loss beside the contrastive one (0: off), and the training-time captioner's size
    caption_weight: float = 0.0
    captioner: dict[str, int] = field(default_factory=lambda: {"width": 128, "layers": 2, "heads": 4,
                                                               "soft_tokens": 4})

    def __post_init__(self) -> None:
        if not 0 <= self.caption_weight < math.inf:
            raise ConfigError(f"loss.caption_weight must be a finite number >= 0, got {self.caption_weight!r}")
        unknown = set(self.captioner) - {"width", "layers", "heads", "soft_tokens"}
        if unknown:
            raise ConfigError(f"loss.captioner: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                              "(valid: width, layers, heads, soft_tokens)")


@dataclass
class TrainConfig:
    out_dir: str | None = "runs/demo"  # null only under decoder.train, which writes into <train.out_dir>/decoder
    seed: int = 0
    batch_size: int = 128
    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimizer steps
    max_minutes: float | None = None  # stop (and checkpoint) after this much wall time, every resumed fit counted
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    # time: with max_minutes, the cosine ends at the time budget or the last step, whichever
    # comes first (a slower machine still anneals); the clock runs on over a resume
    schedule_by: Literal["steps", "time"] = "steps"
    warmup_steps: int = 50
    weight_decay: float = 0.1  # decoupled; none on norms, biases, embeddings and the logit scale
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float | None = 1.0
    # micro-batches per optimizer step. Align stage: the mean of each micro-batch's own InfoNCE over
    # batch_size rows (no more negatives; chance, and the logged loss, stay at ln(batch_size));
    # decoder stage: the one-batch update of accum_steps × batch_size rows (a sum over answer tokens)
    accum_steps: int = 1
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 = autocast
    # Recompute transformer blocks' activations in backward (less memory for large towers and decoders)
    grad_checkpointing: bool = False
    # torchrun: shard parameters, gradients and optimizer state over the processes (FSDP2) instead of DDP
    fsdp: bool = False
    eval_every: int | None = None  # steps; None = every epoch
    checkpoint_every: int = 200  # steps
    keep_last: int = 2  # checkpoints kept besides the best (the newest is always kept: --resume starts there)
    # evaluations without improvement before the run stops (null: never). With restore_best the
    # run keeps the best weights either way: stopping only saves the time a falling curve wastes
    early_stop_patience: int | None = 5
    # The validation metric that picks the best checkpoint (and drives early stopping): a loss
    # ("loss", "val_loss", "loss/...") or a rank (median_rank, mean_rank) is minimised, any other
    # metric maximised.
    early_stop_metric: str = "recall@1"
    restore_best: bool = True  # with validation, end with the best checkpoint's weights, not the last
    log_every: int = 10  # steps between metrics.jsonl rows
    progress_every_s: float = 30.0  # without a terminal (no progress bar): seconds between progress log lines
    max_bad_steps: int = 5  # consecutive NaN/Inf steps before the run stops
    # align stage: a tower giving one vector for every input for `collapse_steps` batches in a row
    # stops the run (mmembed/train/collapse.py); a fresh run collapsed before its first checkpoint
    # restarts instead at a third of the learning rate, at most `collapse_restarts` times
    collapse_steps: int = 10
    collapse_restarts: int = 2
    device: str = "auto"  # auto: this process's GPU (cuda:LOCAL_RANK under torchrun) when there is one, else the CPU
    # torchrun: how long a process waits in a collective (for a slow or lost peer) before failing
    dist_timeout_minutes: float = 30.0

    def check(self, where: str, source: str) -> None:
        """The ranges a config's types cannot say (`from_dict` calls this): a ConfigError naming the
        first key out of range, before a run starts on an epoch count of -1 or a learning rate of NaN."""
        def at_least(value: Any, low: float, optional: bool = False) -> bool:
            return (optional and value is None) or (value is not None and low <= value < math.inf)

        rules = [("batch_size", at_least(self.batch_size, 1), ">= 1"),
                 ("epochs", at_least(self.epochs, 1), ">= 1"),
                 ("max_steps", at_least(self.max_steps, 1, optional=True), ">= 1 or null"),
                 ("max_minutes", self.max_minutes is None or 0 < self.max_minutes < math.inf, "> 0 or null"),
                 ("lr", 0 < self.lr < math.inf, "a finite number > 0"),
                 ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
                 ("warmup_steps", at_least(self.warmup_steps, 0), ">= 0"),
                 ("weight_decay", at_least(self.weight_decay, 0), "a finite number >= 0"),
                 ("betas", all(0 <= b < 1 for b in self.betas), "two numbers in [0, 1)"),
                 ("grad_clip", self.grad_clip is None or 0 < self.grad_clip < math.inf, "> 0 or null"),
                 ("accum_steps", at_least(self.accum_steps, 1), ">= 1"),
                 ("eval_every", at_least(self.eval_every, 1, optional=True), ">= 1 or null"),
                 ("checkpoint_every", at_least(self.checkpoint_every, 1), ">= 1"),
                 ("keep_last", at_least(self.keep_last, 0), ">= 0"),
                 ("early_stop_patience", at_least(self.early_stop_patience, 1, optional=True), ">= 1 or null"),
                 ("log_every", at_least(self.log_every, 1), ">= 1"),
                 ("progress_every_s", at_least(self.progress_every_s, 0), ">= 0"),
                 ("max_bad_steps", at_least(self.max_bad_steps, 1), ">= 1"),
                 ("collapse_steps", at_least(self.collapse_steps, 1), ">= 1"),
                 ("collapse_restarts", at_least(self.collapse_restarts, 0), ">= 0"),
                 # gloo and NCCL take milliseconds in a C int: a week is far past any collective
                 ("dist_timeout_minutes", 0 < self.dist_timeout_minutes <= MAX_DIST_TIMEOUT,
                  f"in (0, {MAX_DIST_TIMEOUT}] (a week)"),
                 ("seed", 0 <= self.seed <= MAX_SEED, f"in [0, {MAX_SEED}] (numpy's seeds)")]
        for name, ok, wanted in rules:
            if not ok:
                raise ConfigError(f"{source}: {join_key(where, name)} must be {wanted}, got {getattr(self, name)!r}")
        if self.schedule_by == "time" and self.max_minutes is None:  # was found when the stage started
            raise ConfigError(f"{source}: {join_key(where, 'schedule_by')}=time needs a time budget: set "
                              f"{join_key(where, 'max_minutes')}")
