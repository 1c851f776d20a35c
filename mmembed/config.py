"""One config path: YAML → nested typed dataclasses → dotted `key.sub=value` overrides.

This file is the schema's root (`Config`, the model, tokenizer and data sections) and its loading;
the training sections are in `config_train.py`, the decoder stage's in `config_decoder.py`, and
`typed_config` builds them all. Unknown keys, wrong types and missing files
fail at load time with a message that names the key and the file. Modules never receive these objects: builders unpack them into plain
arguments (torchtune style).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mmembed.config_decoder import _DECODER_UNREAD, DecoderConfig, _decoder_train
from mmembed.config_train import LossConfig, TrainConfig
from mmembed.errors import ConfigError
from mmembed.modality import Modality
# the config API: `from mmembed.config import from_dict, check_kwargs` builds any of these sections
from mmembed.typed_config import apply_override, check_kwargs, from_dict, join_key, read_mapping, to_dict  # noqa: F401

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


@dataclass
class TowerConfig:
    """One modality's path into the shared space: preprocess → encoder → head."""

    encoder: str  # key in encoders.ENCODERS
    encoder_args: dict[str, Any] = field(default_factory=dict)  # that encoder's keyword arguments
    preprocess: dict[str, Any] = field(default_factory=dict)  # the modality preprocessor's arguments
    head: Literal["linear", "mlp", "none"] = "linear"  # LayerNorm → Linear, LayerNorm → MLP, or identity
    freeze: bool = False  # keep encoder and head fixed during training


def _tower_name(name: Any, key: str, source: str) -> None:
    """ConfigError naming the key for a tower that is not a modality's, one set to null included."""
    try:
        Modality.parse(name)
    except ValueError as e:
        raise ConfigError(f"{source}: {key}: {e}") from None


@dataclass
class ModelConfig:
    embed_dim: int = 256  # D, the shared space's dimension
    towers: dict[str, TowerConfig] = field(default_factory=dict, metadata={"key_check": _tower_name})  # by modality
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


# a run's config.yaml starts with this line: its relative paths (data.root, ...) are read from that folder
STARTED_IN = "# relative paths below are read from the folder this run was started in: "


def save_config(config: Config, path: str | Path, started_in: Path | None = None) -> None:
    """`config` as YAML; `started_in` (a run's: the working directory of its `mmembed train`) recorded
    in a first comment line, which `started_in` reads back."""
    from mmembed.checkpoint import atomic_write_text

    # ASCII: a folder name that is not UTF-8 (its bytes kept as lone surrogates) is written as escapes
    head = f"{STARTED_IN}{json.dumps(str(started_in))}\n" if started_in is not None else ""
    atomic_write_text(Path(path), head + yaml.safe_dump(to_dict(config), sort_keys=False))


def started_in(path: str | Path) -> Path | None:
    """The folder a run's config.yaml says the run was started in; None when it says none."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline().rstrip("\n")
        return Path(json.loads(first.removeprefix(STARTED_IN))) if first.startswith(STARTED_IN) else None
    except (OSError, ValueError, TypeError):
        return None
