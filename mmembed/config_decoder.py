"""The decoder stage's sections of the config schema: `decoder:` (the causal LM, its projector and
how it is trained) and `decoder.data:` (its instruction manifests).

The root `Config` and the loading are in `config.py`; `TrainConfig` (`decoder.train`) in `config_train.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from mmembed.config_train import TrainConfig
from mmembed.errors import ConfigError
from mmembed.modality import Modality
from mmembed.typed_config import join_key


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
