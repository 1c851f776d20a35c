"""One config path: YAML → nested typed dataclasses → dotted `key.sub=value` overrides.

This file is the schema; `typed_config` builds it. Unknown keys, wrong types and missing files
fail at load time with a message that names the key and the file. Modules never receive these objects: builders unpack them into plain
arguments (torchtune style).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mmembed.errors import ConfigError
from mmembed.modality import Modality
# the config API: `from mmembed.config import from_dict, check_kwargs` builds any of these sections
from mmembed.typed_config import apply_override, check_kwargs, from_dict, join_key, read_mapping, to_dict  # noqa: F401

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


MAX_DIST_TIMEOUT = 7 * 24 * 60  # minutes
MAX_SEED = 2**32 - 1  # numpy's legacy seeding takes no more (train.seed, and the commands' --seed)

@dataclass
class TowerConfig:
    """One modality's path into the shared space: preprocess → encoder → head."""

    encoder: str  # key in encoders.ENCODERS
    encoder_args: dict[str, Any] = field(default_factory=dict)  # that encoder's keyword arguments
    preprocess: dict[str, Any] = field(default_factory=dict)  # the modality preprocessor's arguments
    head: Literal["linear", "mlp", "none"] = "linear"  # LayerNorm → Linear, LayerNorm → MLP, or identity
    freeze: bool = False  # keep encoder and head fixed during training


@dataclass
class ModelConfig:
    embed_dim: int = 256  # D, the shared space's dimension
    towers: dict[str, TowerConfig] = field(default_factory=dict)  # keyed by modality name
    init_logit_scale: float | None = None  # None: 1/0.07 for InfoNCE (CLIP), 10 for SigLIP (paper)
    max_logit_scale: float = 100.0  # clamp after every step (CLIP)
    learn_logit_scale: bool = True
    init_from: str | None = None  # an earlier run dir; towers and heads with matching names load from it
    init_towers: list[str] | None = None  # which towers to take from init_from (None = every matching one)

    def __post_init__(self) -> None:
        if self.embed_dim < 1:
            raise ConfigError(f"model.embed_dim must be >= 1, got {self.embed_dim!r}")
        if not 0 < self.max_logit_scale < math.inf:
            raise ConfigError(f"model.max_logit_scale must be a finite number > 0, got {self.max_logit_scale!r}")
        if self.init_logit_scale is not None and not 0 < self.init_logit_scale <= self.max_logit_scale:
            raise ConfigError(f"model.init_logit_scale must be in (0, model.max_logit_scale = {self.max_logit_scale}] "
                              f"or null, got {self.init_logit_scale!r}")

    def check(self, where: str, source: str) -> None:
        """Each tower's encoder and preprocess arguments against their builders' signatures, naming the
        file: a misspelt one passed the load and was reported later as `config: unknown key`. An
        unknown encoder or modality is left to the build (and the run's preflight), which name it."""
        from encoders import ENCODERS
        from mmembed.preprocess import PREPROCESSORS

        for name, tower in self.towers.items():
            at = join_key(where, f"towers.{name}")
            if tower.encoder in ENCODERS:
                check_kwargs(ENCODERS[tower.encoder], dict(tower.encoder_args), join_key(at, "encoder_args"), source)
            try:
                preprocessor = PREPROCESSORS[Modality.parse(name)]
            except (ValueError, KeyError):
                continue
            check_kwargs(preprocessor, dict(tower.preprocess), join_key(at, "preprocess"), source)


@dataclass
class TokenizerConfig:
    kind: Literal["bpe", "clip"] = "bpe"  # our byte-level BPE, or open_clip's CLIP BPE
    path: str | None = None  # tokenizer.json to load; None: train one on the training captions
    vocab_size: int = 2048  # when training one


@dataclass
class SynthConfig:
    n: int = 2000  # scenes in train + val + test
    seed: int = 0
    image_size: int = 64
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train, val, test fractions of n
    n_heldout: int | None = None  # scenes with held-out attribute combinations; None = n // 10

    def check(self, where: str, source: str) -> None:
        """At load, naming the key: a bad value was the generator's error (no key), and a valid one
        that cannot work (a split summing to 1.5) came after the run had started."""
        from mmembed.data.synth.generate import MAX_SCENES, validate_params
        from mmembed.errors import UserError

        try:
            validate_params(self.n, self.seed, self.image_size, split=self.split)
        except UserError as e:
            raise ConfigError(f"{source}: {where}: {e}") from None
        # n_heldout: 1e10 passed, and the run hung filling the memory (n is capped for the same reason)
        if self.n_heldout is not None and not 0 <= self.n_heldout <= MAX_SCENES - self.n:
            raise ConfigError(f"{source}: {join_key(where, 'n_heldout')} must be in [0, {MAX_SCENES - self.n:,}] or "
                              f"null, got {self.n_heldout:,} (n + n_heldout <= {MAX_SCENES:,}: every scene is "
                              "sampled in memory first)")


@dataclass
class DataConfig:
    root: str = "data/shapes"  # folder of the manifests; relative paths in a manifest resolve here
    train: str = "train.jsonl"
    val: str | None = "val.jsonl"
    test: str | None = "test.jsonl"
    # when set, generate the world in root, or reuse it there if complete with these parameters; a
    # world made with other parameters is replaced (with a warning)
    synth: SynthConfig | None = None
    allow_outside_root: bool = False  # allow absolute paths / `..` in manifests
    strict: bool = False  # raise on the first bad row instead of skipping and counting it
    num_workers: int = 0
    cache: bool = False  # keep decoded, preprocessed samples in memory after the first epoch
    # training caption per row: its primary `text`, or one per epoch drawn (seeded) from `text` +
    # the row's `captions` list; evaluation and indexing always read `text`
    caption_sampling: Literal["primary", "random"] = "primary"

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0 (0: load in the training process), got {self.num_workers!r}")


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


@dataclass
class DecoderDataConfig:
    train: str = "instruct-train.jsonl"  # instruction manifest (prompt segments + answer), under data.root
    val: str | None = "instruct-val.jsonl"
    tasks: list[str] | None = None  # keep only rows of these tasks (None: all)
    prompt_modalities: list[str] | None = None  # keep only rows whose media are all of these modalities
    # the validation manifest's first rows, scored at each evaluation (those too long left out, logged)
    val_rows: int = 1000
    # Training rows of a task repeated by its weight (e.g. {exists: 3}; 0 drops it, others keep 1):
    # the epoch's task mixture. Validation stays as written.
    task_weights: dict[str, float] = field(default_factory=dict)
    # Training: pack each batch's prompts into rows of the context (each prompt attends only to
    # itself; same loss, none of the padding: the demo's decoder steps take about half the time)
    pack: bool = True

    def check(self, where: str, source: str) -> None:
        """At load: a typo in a modality name was a ValueError traceback after the whole align
        stage had run; a negative val_rows sliced from the end (-1 dropped the last row)."""
        if self.val_rows < 0:
            raise ConfigError(f"{source}: {join_key(where, 'val_rows')} must be >= 0, got {self.val_rows}")
        bad = sorted(str(t) for t, w in self.task_weights.items() if not 0 <= w < math.inf)
        if bad:
            raise ConfigError(f"{source}: {join_key(where, 'task_weights')} must be finite and >= 0: "
                              + ", ".join(f"{t}={self.task_weights[t]}" for t in bad))
        for name in self.prompt_modalities or []:
            try:
                Modality.parse(name)
            except ValueError as e:
                raise ConfigError(f"{source}: {join_key(where, 'prompt_modalities')}: {e}") from None


def _decoder_train() -> TrainConfig:
    return TrainConfig(out_dir=None, batch_size=64, epochs=1, lr=2e-3, warmup_steps=50, weight_decay=0.1,
                       early_stop_metric="answer_accuracy", checkpoint_every=200)


# decoder.train keys the decoder stage never reads, and what governs each instead
_DECODER_UNREAD = {"out_dir": "the stage writes into <train.out_dir>/decoder",
                   "collapse_steps": "the collapse guard is the align stage's (train.collapse_steps)",
                   "collapse_restarts": "the collapse guard is the align stage's (train.collapse_restarts)",
                   "dist_timeout_minutes": "torchrun's timeout is train.dist_timeout_minutes"}


@dataclass
class DecoderConfig:
    """The decoder stage: a causal LM that reads interleaved text and shared-space vectors."""

    width: int = 256  # C
    layers: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    context: int = 256  # longest sequence (prompt + answer) in tokens, soft tokens included
    positional: Literal["rotary", "sinusoidal", "learned"] = "rotary"
    activation: Literal["gelu", "gelu_tanh"] = "gelu"
    dropout: float = 0.1
    tie_embeddings: bool = True  # output projection = token embedding matrix
    norm_eps: float = 1e-5  # LayerNorm epsilon (a GPT-2's `layer_norm_epsilon` with init_from_gpt2)
    # Sliding-window attention: a token sees itself and the window - 1 before it (training and
    # generation alike); generation then keeps `window` keys per layer and, with rotary or
    # sinusoidal positions, runs past `context`. None: full causal attention within the context.
    window: int | None = None
    # A short causal convolution of this many taps before each block's attention
    # (encoders/short_conv.py): each token carries the few before it, which makes associative
    # recall learnable when the key is the last token (the demo's questions need more:
    # docs/decoder.md). 0: none (a plain GPT-2 block).
    conv_kernel: int = 0
    soft_tokens: int = 4  # k: decoder embeddings per media item
    projector: Literal["mlp", "linear"] = "mlp"
    projector_hidden: int | None = None  # MLP hidden width (None: 2 * width)
    # Training only: Gaussian noise of this std per component on the shared-space vectors before the
    # projector, then renormalised (CapDec): the decoder learns a neighbourhood, not a point, so a
    # vector of another modality that lands nearby reads the same.
    media_noise: float = 0.0
    vector_marker_prob: float = 0.1  # training: mark an item <vector> instead of its modality this often
    # Whiten the vectors before the projector (decoder/whitening.py), with statistics of the
    # space's vectors of every modality of the align training manifest's first whiten_rows rows,
    # saved with the decoder. whiten_eps: added to each eigenvalue (a unit vector's variance
    # summed over all directions is about 1). Measured trade-off in docs/decoder.md.
    whiten: bool = False
    whiten_eps: float = 1e-3
    whiten_rows: int = 2048
    init_from_gpt2: str | None = None  # a GPT-2 folder saved by transformers: its weights and tokenizer
    # Keep that language model as loaded and train only the projector and the embeddings of the
    # tokens the prompt format adds (markers, <answer>): LLaVA's first stage, ClipCap's frozen GPT-2.
    # A few thousand rows of one task then cannot wear away what the LM knows.
    freeze_lm: bool = False
    # LoRA adapters (encoders/lora.py) of this rank on every linear layer of the pretrained LM's
    # blocks, trained beside the projector while the LM stays frozen (as with freeze_lm); merged
    # into the weights when the stage ends, so the saved decoder is a plain one. None: no adapters.
    lora_rank: int | None = None
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_rank
    data: DecoderDataConfig = field(default_factory=DecoderDataConfig)
    # the stage's own training: checkpoints and metrics go into <train.out_dir>/decoder, the weights into
    # <train.out_dir>/decoder.safetensors; the keys of _DECODER_UNREAD are not read (Config.check)
    train: TrainConfig = field(default_factory=_decoder_train)

    def __post_init__(self) -> None:
        if self.init_from_gpt2 is None:  # else the folder's config.json gives the shape
            self._check_shape()
        if self.soft_tokens < 1:
            raise ConfigError(f"decoder.soft_tokens must be >= 1, got {self.soft_tokens!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"decoder.dropout must be in [0, 1), got {self.dropout!r}")
        if not 0 <= self.media_noise < math.inf:
            raise ConfigError(f"decoder.media_noise must be >= 0, got {self.media_noise!r}")
        if not 0 <= self.vector_marker_prob <= 1:
            raise ConfigError(f"decoder.vector_marker_prob must be in [0, 1], got {self.vector_marker_prob!r}")
        if self.projector_hidden is not None and self.projector_hidden < 1:
            raise ConfigError(f"decoder.projector_hidden must be >= 1 or null, got {self.projector_hidden!r}")
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int)
                                        or self.window < 1):
            raise ConfigError(f"decoder.window must be an integer >= 1 or null, got {self.window!r}")
        if isinstance(self.conv_kernel, bool) or not isinstance(self.conv_kernel, int) or self.conv_kernel == 1 \
                or self.conv_kernel < 0:
            raise ConfigError(f"decoder.conv_kernel must be 0 (none) or an integer >= 2, got {self.conv_kernel!r}")
        if not 0 < self.whiten_eps < math.inf:  # .inf made the whitening matrix 0: a decoder trained blind
            raise ConfigError(f"decoder.whiten_eps must be a finite number > 0, got {self.whiten_eps!r}")
        if self.whiten_rows < 2:
            raise ConfigError(f"decoder.whiten_rows must be >= 2, got {self.whiten_rows!r}")
        if self.freeze_lm and self.init_from_gpt2 is None:
            raise ConfigError("decoder.freeze_lm keeps a pretrained language model as loaded: set "
                              "decoder.init_from_gpt2 too (a fresh decoder has nothing to keep)")
        if self.lora_rank is not None:
            if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 1:
                raise ConfigError(f"decoder.lora_rank must be an integer >= 1 or null, got {self.lora_rank!r}")
            if self.init_from_gpt2 is None:
                raise ConfigError("decoder.lora_rank adapts a pretrained language model: set decoder.init_from_gpt2 "
                                  "too (a fresh decoder trains all its weights)")
        if not 0 < self.lora_alpha < math.inf:
            raise ConfigError(f"decoder.lora_alpha must be > 0, got {self.lora_alpha!r}")

    def _check_shape(self) -> None:
        """The decoder's own modules check these too, but only when the decoder stage builds them,
        after the align stage's minutes: a config says so at load time."""
        for name, low in (("width", 1), ("layers", 1), ("heads", 1), ("context", 2)):
            if getattr(self, name) < low:
                raise ConfigError(f"decoder.{name} must be >= {low}, got {getattr(self, name)!r}")
        if self.width % self.heads:
            raise ConfigError(f"decoder.width ({self.width}) must be a multiple of decoder.heads ({self.heads})")
        # the shortest training row (decoder/prompt.py): <bos> <image> k x <media> </image> <answer>, one
        # answer token, <eos>. A longer k passed here and left no usable row after the whole align stage
        if self.context < self.soft_tokens + 6:
            raise ConfigError(f"decoder.context ({self.context}) must be >= decoder.soft_tokens + 6 = "
                              f"{self.soft_tokens + 6}: a prompt with one media item (<bos>, its two markers, "
                              f"{self.soft_tokens} soft tokens, <answer>) and a one-token answer with <eos>")
        # rotary turns pairs of each head's channels; sinusoidal positions are added to the input once
        if self.positional == "rotary" and (self.width // self.heads) % 2:
            raise ConfigError(f"rotary positions need an even head width: decoder.width / decoder.heads "
                              f"= {self.width} / {self.heads}")
        if self.positional == "sinusoidal" and self.width % 2:
            raise ConfigError(f"sinusoidal positions need an even decoder.width, got {self.width}")
        if not 0 < self.mlp_ratio < math.inf:
            raise ConfigError(f"decoder.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not 0 < self.norm_eps < 1:
            raise ConfigError(f"decoder.norm_eps must be in (0, 1), got {self.norm_eps!r}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decoder: DecoderConfig | None = None  # set: `mmembed train` also trains the decoder stage

    def check(self, where: str, source: str) -> None:
        if self.train.out_dir is None:
            raise ConfigError(f"{source}: {join_key(where, 'train.out_dir')} must be a folder, got null")
        if self.decoder is not None:
            self.decoder.train = _unread_at_defaults(self.train, self.decoder.train, join_key(where, "decoder.train"),
                                                     source)


def _unread_at_defaults(train: TrainConfig, stage: TrainConfig, where: str, source: str) -> TrainConfig:
    """`stage` (decoder.train) with the keys its stage never reads at their defaults (out_dir null),
    so config.yaml no longer records a folder never written. A value set there is a warning, not an
    error: `decoder: {train: *tr}` copies the align block's values, which an override of
    `train.out_dir` then leaves behind, and a finished run's config.yaml may record one. Not
    warned of: the default, the align block's own value, and TrainConfig's (runs/demo), which
    every run's config.yaml recorded there before."""
    defaults, plain = _decoder_train(), TrainConfig()
    ignored = [k for k in _DECODER_UNREAD
               if getattr(stage, k) not in (getattr(defaults, k), getattr(plain, k), getattr(train, k))]
    if ignored:
        given = ", ".join(f"{join_key(where, k)}={getattr(stage, k)!r}" for k in ignored)
        log.warning("%s: the decoder stage does not read %s (%s): ignored", source, given,
                    "; ".join(_DECODER_UNREAD[k] for k in ignored))
    return dataclasses.replace(stage, **{k: getattr(defaults, k) for k in _DECODER_UNREAD})


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def resolve_config_path(name: str | Path) -> Path:
    """A path to a YAML file, or the name of a shipped config (`demo` → configs/demo.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{path.stem}.yaml"
    # "demo", or "configs/demo.yaml" as the README writes it, run from outside the repository
    if path.suffix in ("", ".yaml") and path.parent in (Path("."), Path("configs")) and shipped.is_file():
        return shipped
    if (path / "config.yaml").is_file():  # a run's folder: `mmembed train runs/demo-s52`
        raise ConfigError(f"{name} is a folder, not a config file: its config is {path / 'config.yaml'}")
    if path.name == "config.yaml" and path.parent.is_dir() and path.parent != Path("."):  # a run's own, gone
        raise ConfigError(f"{path.parent} holds no config.yaml: a run folder needs the config its training wrote")
    valid = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config file not found: {name} (shipped configs: {valid})")


def load_config(name: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply `key.sub=value` overrides, return a validated `Config`."""
    return load_dataclass(Config, name, overrides)


def load_dataclass(cls: type, name: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Read a YAML file (a path or a shipped config's name), apply overrides, build `cls` from it."""
    if isinstance(overrides, str):  # "train.epochs=3" was read as the overrides "t", "r", ...
        raise ConfigError(f"overrides must be a list of key.sub=value strings, got the one string {overrides!r}")
    path = resolve_config_path(name)
    raw = read_mapping(path)
    _check_kind(cls, raw, path)
    for item in overrides:
        apply_override(raw, item, source=str(path))
    try:
        return from_dict(cls, raw, where="", source=str(path))
    except ConfigError:
        if not overrides or not _loads(cls, read_mapping(path)):
            raise
        # the file is fine: the override typed on the command line is what is wrong
        return from_dict(cls, raw, where="", source=f"an override of {path}")


def _check_kind(cls: type, raw: dict, path: Path) -> None:
    """A file whose top-level keys are all another command's: `mmembed train scaling` said
    "unknown key 'axis'", as if the scaling config had a typo."""
    keys = sorted(map(str, raw))
    if not keys or set(keys) & _field_names(cls):
        return
    from mmembed.insight.sweep_config import ScalingConfig  # here only: insight imports torch

    kinds = {Config: ("mmembed train", "a training config"), ScalingConfig: ("mmembed scale", "a scaling config")}
    for other, (command, kind) in kinds.items():
        if cls in kinds and other is not cls and set(keys) & _field_names(other):
            shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
            raise ConfigError(f"{path}: this is {kind} (keys {shown}), not {kinds[cls][1]}: run it with "
                              f"`{command}`; `{kinds[cls][0]}` reads {kinds[cls][1]}")


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _loads(cls: type, raw: dict) -> bool:
    try:
        from_dict(cls, raw, where="", source="")
    except ConfigError:
        return False
    return True


def save_config(config: Config, path: str | Path) -> None:
    from mmembed.checkpoint import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(config), sort_keys=False))
