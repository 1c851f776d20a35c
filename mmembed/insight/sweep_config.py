"""Configuration of `mmembed scale`: the model ladder, the budget, the recipe, the regularisation grid.

Read from YAML with the project's loader (unknown keys and wrong types fail at load time, naming
the key) and overridable with `key.sub=value` like every other config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mmembed.config import ConfigError, load_dataclass
from mmembed.config_train import MAX_SEED


@dataclass
class ModelSize:
    """One rung of the ladder: a decoder's shape (mlp_ratio 4, the context of the sweep)."""

    width: int
    layers: int
    heads: int


@dataclass
class RecipeConfig:
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    dropout: float = 0.0
    eval_every: int = 50  # steps
    eval_rows: int = 128  # training rows scored per evaluation (validation: every row, every evaluation)


@dataclass
class TowerLadder:
    """`target: towers`: the shared-space towers of a training config, scaled by width."""

    config: str = "demo"  # the training config whose towers are scaled (name or YAML path)
    widths: list[int] = field(default_factory=lambda: [32, 48, 64, 96, 128])
    next_width: int = 160  # the size predicted, and trained with --verify
    overrides: list[str] = field(default_factory=list)  # applied to every rung, e.g. train.epochs=2


@dataclass
class RegularisationConfig:
    """`--study regularisation`: one model trained for many epochs on a small subset, per setting."""

    size: ModelSize = field(default_factory=lambda: ModelSize(width=128, layers=4, heads=4))
    train_tokens: int = 16384  # the small subset: few enough to be memorised
    epochs: int = 30
    dropouts: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.3])
    weight_decays: list[float] = field(default_factory=lambda: [0.0, 0.1])
    eval_every: int = 16


@dataclass
class ScalingConfig:
    out_dir: str = "runs/scaling"
    target: Literal["decoder", "towers"] = "decoder"
    axis: Literal["params", "data"] = "params"  # what varies: model size at a fixed data budget, or data
    seed: int = 0
    vocab_size: int = 512  # BPE learned on the world's text (it stops where the text runs out of merges)
    context: int = 64  # tokens per training row
    tokens: int = 1_000_000  # axis=params: training tokens per model (each seen once)
    sizes: list[ModelSize] = field(default_factory=list)  # axis=params: the ladder, smallest first
    next_size: ModelSize | None = None  # axis=params: predicted, and trained with --verify
    data_tokens: list[int] = field(default_factory=list)  # axis=data: the token budgets, smallest first
    data_size: ModelSize | None = None  # axis=data: the one model trained on each budget
    val_tokens: int = 32768
    bootstrap: int = 1000  # resamples for the fit's confidence intervals
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    towers: TowerLadder = field(default_factory=TowerLadder)
    regularisation: RegularisationConfig = field(default_factory=RegularisationConfig)

    def __post_init__(self) -> None:
        self._check_numbers()
        from mmembed.errors import UserError
        from mmembed.tokenizer import check_vocab_size

        try:  # at load, as every other value: the tokenizer refused it once the sweep's folder was made
            check_vocab_size(self.vocab_size)
        except UserError as e:
            raise ConfigError(str(e)) from None
        if self.target == "decoder" and self.axis == "params":
            if len(self.sizes) < 3:
                raise ConfigError(f"sizes: a fit needs at least 3 model sizes, got {len(self.sizes)}")
            counts = [block_parameters(s) for s in self.sizes]
            if len(set(counts)) != len(counts):  # heads do not change N; (16, 4) and (32, 1) share it too
                raise ConfigError(f"sizes: every rung must have its own parameter count N (a power law is fitted "
                                  f"over N), got {[f'{s.width}x{s.layers}' for s in self.sizes]}: {counts}")
            if self.next_size is None:
                raise ConfigError("next_size: the sweep predicts the loss of a next size; set one")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed must be in [0, {MAX_SEED}] (numpy's seeds), got {self.seed}")
        if self.target == "towers":
            w = self.towers.widths
            if len(w) < 3 or len(set(w)) != len(w) or min([*w, self.towers.next_width]) < 1:
                raise ConfigError(f"towers.widths: a fit needs at least 3 different widths >= 1 (and next_width "
                                  f">= 1), got {w} and {self.towers.next_width}")
        if self.axis == "data":
            if len(self.data_tokens) < 3 or self.data_size is None:
                raise ConfigError("axis=data needs data_size and at least 3 data_tokens")
            trained = [self.trained_tokens(d) for d in self.data_tokens]
            if len(set(trained)) != len(trained) or min(trained) < 1:
                raise ConfigError(f"data_tokens {self.data_tokens} train on {trained} tokens (whole batches of "
                                  f"{self.recipe.batch_size} rows of {self.context}): each budget must give a "
                                  "different, non-zero number")
        if self.target == "decoder" and self.axis == "params" and self.trained_tokens(self.tokens) < 1:
            raise ConfigError(f"tokens={self.tokens} is less than one batch ({self.recipe.batch_size} rows of "
                              f"{self.context} tokens)")
        for s in [*self.sizes, *(x for x in (self.next_size, self.data_size, self.regularisation.size) if x)]:
            if min(s.width, s.layers, s.heads) < 1 or s.width % s.heads or (s.width // s.heads) % 2:
                raise ConfigError(f"model size {s}: width, layers and heads must be >= 1, width divisible by heads "
                                  "into an even head width (the sweep's decoders use rotary positions)")

    def trained_tokens(self, tokens: int) -> int:
        """Tokens a budget of `tokens` trains on: whole rows of `context`, in whole batches."""
        rows = -(-tokens // self.context)
        return rows // self.recipe.batch_size * self.recipe.batch_size * self.context

    def _check_numbers(self) -> None:
        r, g = self.recipe, self.regularisation
        positive = {"context": self.context, "tokens": self.tokens, "val_tokens": self.val_tokens,
                    "recipe.batch_size": r.batch_size, "recipe.eval_every": r.eval_every,
                    "recipe.eval_rows": r.eval_rows, "regularisation.epochs": g.epochs,
                    "regularisation.eval_every": g.eval_every, "regularisation.train_tokens": g.train_tokens}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        for name in ("tokens", "val_tokens", "regularisation.train_tokens"):  # 1e20 built documents for ever
            if positive[name] > MAX_TOKENS:
                raise ConfigError(f"{name} must be at most {MAX_TOKENS:,} (the world's text is built in memory), "
                                  f"got {positive[name]:,}")
        for d in self.data_tokens:  # axis=data builds twice max(data_tokens) (the next budget): run_sweep checks
            if not 1 <= d <= MAX_TOKENS:
                raise ConfigError(f"data_tokens must each be in [1, {MAX_TOKENS:,}] (the world's text is built in "
                                  f"memory), got {d:,}")
        if self.bootstrap < 0:  # a negative count silently gave no confidence intervals
            raise ConfigError(f"bootstrap must be >= 0 (0: no confidence intervals), got {self.bootstrap}")
        if self.val_tokens < self.context:
            raise ConfigError(f"val_tokens={self.val_tokens} holds no validation row of context={self.context}")
        if not (math.isfinite(r.lr) and r.lr > 0) or r.warmup_steps < 0 or not 0 <= r.min_lr_ratio <= 1:
            raise ConfigError(f"recipe: lr must be > 0, warmup_steps >= 0 and min_lr_ratio in [0, 1] "
                              f"(got {r.lr}, {r.warmup_steps}, {r.min_lr_ratio})")
        if not 0 <= r.dropout < 1 or not _finite_at_least_0(r.weight_decay):
            raise ConfigError(f"recipe: dropout must be in [0, 1) and weight_decay finite and >= 0 (got {r.dropout}, "
                              f"{r.weight_decay})")
        if not g.dropouts or not g.weight_decays or any(not 0 <= d < 1 for d in g.dropouts) \
                or not all(map(_finite_at_least_0, g.weight_decays)):
            raise ConfigError("regularisation: dropouts (each in [0, 1)) and weight_decays (each finite, >= 0) must be "
                              f"non-empty, got {g.dropouts} and {g.weight_decays}")


MAX_TOKENS = 10**9  # of a sweep's world text (8 bytes a token in memory)


def _finite_at_least_0(x: float) -> bool:
    return math.isfinite(x) and x >= 0


def load_scaling_config(name: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ScalingConfig:
    """Read a scaling YAML (a path, or the name of a shipped config) and apply overrides."""
    return load_dataclass(ScalingConfig, name, overrides)


def block_parameters(size: ModelSize) -> int:
    """A decoder's parameters outside its embedding tables, as `Decoder.num_parameters` counts them
    (per block: attention 4w² + 4w, MLP 8w² + 5w, two norms 4w; a final norm 2w)."""
    w = size.width
    return size.layers * (12 * w * w + 13 * w) + 2 * w
