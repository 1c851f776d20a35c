"""The shared space: per-modality towers (encoder → head → L2 normalise) and the logit scale.

    raw ─► preprocess ─► encoder (B, T, W) ─► pooled (B, W) ─► head ─► (B, D) ─► unit vectors

Modules here receive built submodules and plain numbers; `build_space` turns a config into them.
Nothing in this file names a particular modality: towers live in an `nn.ModuleDict` keyed by it.
"""

from __future__ import annotations

import inspect
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from encoders.linear import Linear
from encoders.weights import state_fault
from mmembed.checkpoint import load_tensors
from mmembed.config import ModelConfig, check_kwargs
from mmembed.errors import ConfigError, UserError
from mmembed.losses import SIGLIP_INIT_LOGIT_BIAS, SIGLIP_INIT_LOGIT_SCALE
from mmembed.modality import Modality

log = logging.getLogger(__name__)


def build_head(kind: str, width: int, dim: int) -> nn.Module:
    """LayerNorm → Linear (ImageBind), LayerNorm → MLP, or identity (dims must already match)."""
    if kind == "linear":
        return nn.Sequential(nn.LayerNorm(width), Linear(width, dim, bias=False))
    if kind == "mlp":
        return nn.Sequential(nn.LayerNorm(width), Linear(width, width), nn.GELU(), Linear(width, dim, bias=False))
    if kind == "none":
        if width != dim:
            raise ValueError(f"head 'none' needs encoder width == embed_dim, got {width} vs {dim}")
        return nn.Identity()
    raise ValueError(f"unknown head {kind!r}; valid: linear, mlp, none")


class Tower(nn.Module):
    """One modality's encoder and projection head."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        # an encoder with a `pooled` method computes the pooled vector without the per-token features
        pooled_fn = getattr(self.encoder, "pooled", None)
        pooled = pooled_fn(x, mask) if pooled_fn is not None else self.encoder(x, mask).pooled  # (N, W)
        return F.normalize(self.head(pooled).float(), dim=-1)  # (N, D), unit norm


class SharedSpace(nn.Module):
    """Towers keyed by modality plus CLIP's learnable temperature (and SigLIP's bias).

    The logit scale is stored as its log (as in CLIP) and clamped to `max_logit_scale` after every
    optimizer step by `clamp_()`; reading it through `logit_scale` clamps as well, so a value
    pushed past the bound between steps never reaches the loss.
    """

    def __init__(self, towers: dict[Modality, Tower], embed_dim: int, init_logit_scale: float = 1 / 0.07,
                 max_logit_scale: float = 100.0, learn_logit_scale: bool = True, init_logit_bias: float = -10.0):
        super().__init__()
        if not towers:
            raise ValueError("a shared space needs at least one tower")
        self.towers = nn.ModuleDict({str(m): t for m, t in towers.items()})
        self.embed_dim = embed_dim
        self.max_log_scale = math.log(max_logit_scale)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)), requires_grad=learn_logit_scale)
        self.logit_bias = nn.Parameter(torch.tensor(init_logit_bias))

    @property
    def modalities(self) -> list[Modality]:
        return [Modality(m) for m in self.towers]

    @property
    def logit_scale(self) -> Tensor:
        """exp of the learned log scale, at most `max_logit_scale`. The gradient passes the bound
        (straight through): `clamp_` after every step keeps the parameter at it, and a clamp's zero
        gradient there would hold the scale at the bound for good even when the loss wants it lower."""
        s = self.log_logit_scale
        return (s - (s - s.clamp(max=self.max_log_scale)).detach()).exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_logit_scale.clamp_(max=self.max_log_scale)

    def encode(self, modality: Modality | str, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Embed one modality's preprocessed batch. Returns (N, D) unit vectors (float32)."""
        key = str(modality)
        if key not in self.towers:
            raise KeyError(f"this model has no {key} tower (it has: {', '.join(self.towers)})")
        return self.towers[key](x, mask)

    def forward(self, inputs: dict[Modality, Tensor], masks: dict[Modality, Tensor | None],
                present: dict[Modality, Tensor]) -> dict[Modality, Tensor]:
        """Embed a training batch. Rows lacking a modality hold zeros in that modality's output.

        Shapes: inputs[m] has only the n_m rows that have m; present[m] is (B,) bool with n_m
        True entries; the result for each m is (B, D).
        """
        out = {}
        for m, x in inputs.items():
            z = self.encode(m, x, masks.get(m))  # (n_m, D)
            if z.shape[0] == present[m].shape[0]:  # every row has m: nothing to scatter
                out[m] = z
                continue
            full = z.new_zeros(present[m].shape[0], z.shape[1])
            full[present[m]] = z
            out[m] = full  # (B, D)
        return out


# encoder arguments naming weights to start from: a run's own weights replace them when it loads
_PRETRAINED_ARGS = ("pretrained", "weights")


def build_space(config: ModelConfig, vocab_size: int | None = None, loss_kind: str = "infonce",
                pretrained: bool = True) -> SharedSpace:
    """Config → modules. Encoder arguments are validated against the builder's signature, so a
    misspelt key fails here naming it; the text vocabulary size comes from the tokenizer.

    With `pretrained=False` (opening a trained run, whose weights file holds every tensor) the
    encoders are built without their pretrained files or tags: the file a run started from may
    have moved since, or a tag need a download, and neither changes the result."""
    from encoders import ENCODERS

    if not config.towers:
        raise ConfigError("model.towers: a shared space needs at least one tower (text, image or audio)")
    towers = {}
    for name, tower_cfg in config.towers.items():
        where = f"model.towers.{name}"
        try:
            modality = Modality.parse(name)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        if tower_cfg.encoder not in ENCODERS:
            valid = ", ".join(sorted(ENCODERS))
            raise ConfigError(f"{where}.encoder: unknown encoder {tower_cfg.encoder!r}; valid: {valid}")
        builder = ENCODERS[tower_cfg.encoder]
        args = check_kwargs(builder, dict(tower_cfg.encoder_args), f"{where}.encoder_args")
        if "vocab_size" in _params(builder) and "vocab_size" not in args:
            if vocab_size is None:
                raise ConfigError(f"{where}: the {tower_cfg.encoder} encoder needs a tokenizer for its vocabulary "
                                  "and none was given (a run keeps it in tokenizer.json)")
            args["vocab_size"] = vocab_size
        if not pretrained:
            args.update({k: None for k in _PRETRAINED_ARGS if k in args})
        try:  # encoders/ check their own arguments with plain ValueErrors: name the config key
            encoder = builder(**args)
            head = build_head(tower_cfg.head, encoder.width, config.embed_dim)
            if pretrained:  # a trained run's config.yaml is what it trained with (a tag's mean may differ)
                _check_preprocess(encoder, modality, tower_cfg.preprocess or {})
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        towers[modality] = Tower(encoder, head)
        if tower_cfg.freeze:
            towers[modality].requires_grad_(False)
    init_scale = config.init_logit_scale
    if init_scale is None:
        init_scale = SIGLIP_INIT_LOGIT_SCALE if loss_kind == "siglip" else 1 / 0.07
    return SharedSpace(towers, config.embed_dim, init_scale, config.max_logit_scale, config.learn_logit_scale,
                       init_logit_bias=SIGLIP_INIT_LOGIT_BIAS)


def _params(fn) -> set[str]:
    return set(inspect.signature(fn).parameters)


def _check_preprocess(encoder: nn.Module, modality: Modality, preprocess: dict) -> None:
    """ValueError when the inputs a tower asks for (its `preprocess_cfg`: an open_clip image tower's
    size, and a pretrained tag's mean and std) differ from what its preprocess block prepares: size
    64 on a 32 px tower failed at embed time, and a SigLIP tag's tower was fed CLIP's mean and std."""
    from mmembed.preprocess import PREPROCESSORS

    wanted = getattr(encoder, "preprocess_cfg", None) or {}
    defaults = {k: p.default for k, p in inspect.signature(PREPROCESSORS[modality]).parameters.items()}
    differ = []
    for key in ("size", "mean", "std"):
        if key in wanted and key in defaults:
            want, got = _plain(wanted[key], key), _plain(preprocess.get(key, defaults[key]), key)
            if not (len(want) == len(got) and all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(want, got))):
                differ.append((key, want, got))
    if differ:
        need = ", ".join(f"{k}: {_shown(w, k)}" for k, w, _ in differ)
        have = ", ".join(f"{k}: {_shown(g, k)}" for k, _, g in differ)
        raise ValueError(f"the tower takes preprocess {{{need}}}, not {{{have}}}: set those")


def _plain(value, key: str) -> list[float]:
    """A size (one number, or open_clip's (height, width): one when square) or a mean/std triple, as a list."""
    values = [float(v) for v in value] if isinstance(value, (tuple, list)) else [float(value)]
    return values[:1] if key == "size" and len(values) == 2 and values[0] == values[1] else values


def _shown(values: list[float], key: str) -> str:
    if key == "size":
        return "x".join(str(int(v)) for v in values)
    return str([round(v, 8) for v in values])


def space_weights(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The shared space's tensors of a weights file: a run's own, or a checkpoint's of a run that
    trained a captioner beside the space (its module holds `space.*` and `captioner.*`)."""
    if any(k.startswith("space.") for k in state) and all(k.startswith(("space.", "captioner.")) for k in state):
        return {k.removeprefix("space."): v for k, v in state.items() if k.startswith("space.")}
    return state


def _few(names: list[str]) -> str:
    return f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"


def init_from_run(space: SharedSpace, weights: Path, towers: list[str] | None,
                  frozen: frozenset[str] = frozenset(), own_weights: frozenset[str] = frozenset()) -> None:
    """Copy every tensor whose name and shape match from an earlier run's weights (the bind
    recipe); with `towers`, only tensors of those towers.

    A tower named in `towers`, or one of the `frozen` towers (it would stay as initialised),
    must load whole: UserError naming what does not fit, or a frozen tower the run does not load
    at all (unless it is in `own_weights`, built from pretrained weights of its own). Another
    tower of both runs that loads in part is a warning."""
    state = space_weights(load_tensors(weights))
    own = space.state_dict()
    what = f"model.init_towers={towers}" if towers is not None else "model.init_from"
    unknown = sorted(set(towers or ()) - set(space.towers))
    if unknown:
        raise UserError(f"{what}: {', '.join(unknown)} is not a tower of this model ({', '.join(space.towers)})")
    wanted = None if towers is None else tuple(f"towers.{t}." for t in towers)
    taken = {k: v for k, v in state.items()
             if k in own and own[k].shape == v.shape and (wanted is None or k.startswith(wanted))}
    if not taken:
        raise UserError(f"{what}: {weights} has no tensor of this model's names and shapes")
    if fault := state_fault(space, taken):  # load_state_dict would cast an integer tensor, and copy NaN
        raise UserError(f"{what}: {weights}: {fault}")
    shared = {k.split(".")[1] for k in state if k.startswith("towers.")} & set(space.towers)
    loaded = shared & set(towers) if towers is not None else shared
    if unloaded := sorted((frozen & set(space.towers)) - own_weights - loaded):
        name = unloaded[0]  # it would stay frozen at its random initialisation, unsaid
        why = "model.init_towers leaves it out" if name in shared else f"{weights} has no {name} tower"
        raise UserError(f"{what}: the {name} tower is frozen and {why}: it would stay as initialised; load it "
                        f"({'add it to model.init_towers' if name in shared else 'from a run that has it'}) or set "
                        f"model.towers.{name}.freeze=false")
    for name in sorted(set(towers) if towers is not None else shared):
        mine = [k for k in own if k.startswith(f"towers.{name}.")]
        left = [k for k in mine if k not in taken]
        # and the other way: a source tensor with no place here (pool: flatten's map into a model that
        # pools by mean) is part of what the tower computed there
        extra = [k for k in state if k.startswith(f"towers.{name}.") and k not in own]
        if not left and not extra:
            continue
        if left:
            message = (f"{what}: the {name} tower of {weights} fits {len(mine) - len(left)} of its {len(mine)} "
                       f"tensors here (not {_few(left)}): its shapes or names differ from this config's")
        else:
            message = (f"{what}: the {name} tower of {weights} has tensors this config's lacks ({_few(extra)}): "
                       "it was built otherwise (compare the run's config.yaml)")
        if towers is not None or name in frozen:
            raise UserError(message + (" (and it is frozen: it would stay as initialised)" if name in frozen else ""))
        log.warning("%s; %s", message, "those tensors start fresh" if left else "the rest is left out")
    space.load_state_dict(taken, strict=False)
    towers = sorted({k.split(".")[1] for k in taken if k.startswith("towers.")})
    log.info("initialised %d tensors (towers: %s) from %s", len(taken), ", ".join(towers) or "none", weights)
