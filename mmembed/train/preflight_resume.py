"""What a resumed run checks before any work: that the config keeps the sections its checkpoint's
weights are of (the space's model and tokenizer, the align stage's captioner, the decoder's
shape), naming each changed key. `preflight.check_config` runs it; the other checks are in
preflight.py and preflight_decoder.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mmembed.config import Config
from mmembed.config_decoder import DecoderConfig
from mmembed.errors import ConfigError, UserError
from mmembed.train.preflight_decoder import _space_copied

log = logging.getLogger(__name__)


# where a run's weights and tokenizer came from, not what they are: a resume reads the checkpoint and the
# run's own tokenizer.json, so these may move (a bind run whose source run moved is resumed from its new place)
_WHERE_IT_STARTED = {"model.init_from", "model.init_towers", "tokenizer.path"}


def _check_same_space(config: Config) -> None:
    """A resume's model and tokenizer sections are the run's own (its config.yaml): its weights are
    of that space. A changed one was written into config.yaml before the checkpoint refused it (or
    after the decoder stage finished), and the run no longer loaded. A run whose space was copied
    from model.init_from holds that run's sections instead: the resume keeps them. So are the
    settings that shape the checkpoint's other weights: the captioner the align stage trains beside
    the space (loss.caption_weight zero or not, loss.captioner) while that stage is resumed, and the
    decoder once its stage has a checkpoint; a change failed as the checkpoint loaded, in a raw
    state-dict message (the decoder's after every media item was embedded)."""
    from mmembed.config import load_config
    from mmembed.decoder import DECODER_DIR
    from mmembed.model import CONFIG
    from mmembed.train.state import latest_checkpoint

    run_dir = Path(config.train.out_dir)
    if not (run_dir / CONFIG).is_file():
        return
    ran = load_config(run_dir / CONFIG)
    decoder_started = config.decoder is not None and latest_checkpoint(run_dir / DECODER_DIR) is not None
    changed = []
    if not _space_copied(config):  # a bind run (init_from, no decoder) trains its own space
        changed = _space_changes(ran, config)
        if not decoder_started:  # the align stage resumes: its checkpoint holds the captioner
            changed += _captioner_changes(ran, config)
    if decoder_started and ran.decoder is not None:
        changed += _decoder_changes(ran.decoder, config.decoder)
    if changed:
        raise ConfigError(f"--resume: {', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}: the run's "
                          f"weights are of its config.yaml; resume without the change, or start over with "
                          "--overwrite")
    if not decoder_started and (said := said_changes(ran, config)):
        log.warning("--resume: %s: taken from the next step on (the steps before trained with the run's own)",
                    ", ".join(said))


# a tower's preprocess keys that act on training samples only (augmentation): no weight is of them
_TRAINING_ONLY = {"augment", "crop_scale", "affine_degrees", "affine_translate", "color_jitter", "hflip",
                  "spec_augment", "freq_mask", "time_mask", "freq_shift", "time_stretch", "random_crop"}


def _space_changes(ran: Config, config: Config) -> list[str]:
    from mmembed.typed_config import to_dict

    return [change for section in ("model", "tokenizer")
            for change in changes(section, to_dict(getattr(ran, section)), to_dict(getattr(config, section)))
            if change.split(" ")[0] not in _WHERE_IT_STARTED and not _training_only(change)]


def _training_only(change: str) -> bool:
    parts = change.split(" ")[0].split(".")  # model.towers.image.preprocess.augment
    return len(parts) == 5 and parts[3] == "preprocess" and parts[4] in _TRAINING_ONLY


# what a resume takes from here on, though the steps before trained otherwise: said, not refused (not
# train.lr, which a collapse restart's resume keeps at its own rate with its own word, nor the optimizer's
# settings, which the engine names as it restores them)
_SAID_ON_RESUME = ("train.warmup_steps", "loss.", "data.caption_sampling")


def said_changes(ran: Config, config: Config) -> list[str]:
    """The changes a resume of the align stage takes from its next step (warm-up, loss, caption
    sampling, augmentation): applied, and named in a warning (they were applied silently, a changed
    loss.kind swapping the objective mid-run without a word)."""
    from mmembed.typed_config import to_dict

    found = [c for c in changes("", {k: to_dict(getattr(ran, k)) for k in ("train", "loss", "data")},
                                {k: to_dict(getattr(config, k)) for k in ("train", "loss", "data")})
             if c.split(" ")[0].startswith(_SAID_ON_RESUME)]
    return found + [c for c in changes("model", to_dict(ran.model), to_dict(config.model)) if _training_only(c)]


def _captioner_changes(ran: Config, config: Config) -> list[str]:
    """The align stage's checkpoint holds a captioner when loss.caption_weight > 0, of loss.captioner's size."""
    was, now = ran.loss, config.loss
    if (was.caption_weight > 0) != (now.caption_weight > 0):
        return [f"loss.caption_weight {was.caption_weight!r} -> {now.caption_weight!r}"]
    return changes("loss.captioner", dict(was.captioner), dict(now.captioner)) if now.caption_weight > 0 else []


# the decoder fields its checkpoint's weights are shaped by, or mean nothing without (heads, the kind of
# positions); GPT-2's come from its folder. Not window, norm_eps or activation: a resume took those before.
_DECODER_SHAPE = ("width", "layers", "heads", "mlp_ratio", "positional", "tie_embeddings", "conv_kernel",
                  "soft_tokens", "projector", "projector_hidden", "whiten", "lora_rank")


def _decoder_changes(was: DecoderConfig, now: DecoderConfig) -> list[str]:
    from mmembed.decoder import with_gpt2_architecture

    if (was.init_from_gpt2 is None) != (now.init_from_gpt2 is None):  # the path itself may move
        return [f"decoder.init_from_gpt2 {was.init_from_gpt2!r} -> {now.init_from_gpt2!r}"]
    try:
        was, now = with_gpt2_architecture(was), with_gpt2_architecture(now)
    except UserError:  # a GPT-2 folder that cannot be read: check_gpt2 names it
        return []
    learned = "learned" in (was.positional, now.positional)  # a table of `context` rows: context shapes it
    shape = [{k: getattr(d, k) for k in _DECODER_SHAPE + (("context",) if learned else ())} for d in (was, now)]
    return changes("decoder", *shape)


def changes(prefix: str, was: dict, now: dict) -> list[str]:
    """`prefix.key old -> new` (`key old -> new` for an empty prefix) for each key of two (nested)
    dicts whose values differ."""
    was, now, dot = _flat(was), _flat(now), "." if prefix else ""
    return [f"{prefix}{dot}{k} {was.get(k)!r} -> {now.get(k)!r}" for k in sorted(was.keys() | now.keys())
            if was.get(k) != now.get(k)]


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
