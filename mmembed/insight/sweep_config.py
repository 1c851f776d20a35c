"""Configuration of `mmembed scale`: the model ladder, the budget, the recipe, the regularisation grid.

Read from YAML with the project's loader (unknown keys and wrong types fail at load time, naming
the key) and overridable with `key.sub=value` like every other config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mmembed.config import ConfigError, load_dataclass


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
    eval_rows: int = 128  # rows of each split scored per evaluation


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
        if self.target == "decoder" and self.axis == "params" and len(self.sizes) < 3:
            raise ConfigError(f"sizes: a fit needs at least 3 model sizes, got {len(self.sizes)}")
        if self.axis == "data" and (len(self.data_tokens) < 3 or self.data_size is None):
            raise ConfigError("axis=data needs data_size and at least 3 data_tokens")
        for s in [*self.sizes, *(x for x in (self.next_size, self.data_size, self.regularisation.size) if x)]:
            if s.width % s.heads:
                raise ConfigError(f"width {s.width} is not divisible by heads {s.heads}")


def load_scaling_config(name: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ScalingConfig:
    """Read a scaling YAML (a path, or the name of a shipped config) and apply overrides."""
    return load_dataclass(ScalingConfig, name, overrides)
