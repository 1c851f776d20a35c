"""Training: one engine (`engine.Trainer`) and its stages — `align` (the shared space) and
`decoder` (a language model reading the space's vectors), run in that order."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import types
from pathlib import Path

from mmembed.config import Config

log = logging.getLogger(__name__)


def train(config: Config, resume: bool = False, overwrite: bool = False) -> Path:
    """Run the stages the config describes; returns the run directory.

    Without a `decoder:` section: the align stage. With one: the align stage, then the decoder
    stage in the same run directory — unless `model.init_from` names a trained run, whose shared
    space is then copied in instead of trained. `resume` continues the stage that was running;
    a fresh run refuses a folder that holds files unless `overwrite` (see `run_dir.py`).
    """
    from mmembed.train.align import train_align
    from mmembed.train.preflight import check_config

    config = _checked_again(config)
    check_config(config, resume)
    if config.decoder is None:
        return train_align(config, resume=resume, overwrite=overwrite)
    from mmembed.config import load_config
    from mmembed.decoder import DECODER_DIR
    from mmembed.model import CONFIG
    from mmembed.train.decoder import train_decoder
    from mmembed.train.collectives import barrier, main_first
    from mmembed.train.data_setup import data_in_use
    from mmembed.train.distributed import current_world
    from mmembed.train.run_dir import lock_run, read_paths
    from mmembed.train.state import latest_checkpoint, remove_partial_checkpoints

    run_dir = Path(config.train.out_dir)
    with lock_run(run_dir, resume=resume, overwrite=overwrite, keep=read_paths(config)):
        if resume and current_world().main:  # a checkpoint set aside by a killed re-save counts: put it back
            remove_partial_checkpoints(run_dir / DECODER_DIR)
        barrier()
        decoder_started = resume and latest_checkpoint(run_dir / DECODER_DIR) is not None
        if decoder_started:  # the align stage is done: its train section stays as it ran
            config = _align_as_it_ran(config, load_config(run_dir / CONFIG))
        elif resume and (run_dir / CONFIG).is_file():
            _check_space_source(run_dir, load_config(run_dir / CONFIG), config)
        with contextlib.ExitStack() as data_held:
            if not decoder_started:
                if config.model.init_from is not None:
                    config = copy_space(config, save=current_world().main)
                    barrier()
                else:
                    with main_first():  # the world made (rank 0 first), then read by both stages: no
                        data_held.enter_context(data_in_use(config.data))  # generator between them
                    train_align(config, resume=resume)
                    # the align stage may have restarted at a lower train.lr (a collapsed tower): keep
                    # the train section it saved, which the decoder stage writes into config.yaml again
                    config = dataclasses.replace(config, train=load_config(run_dir / CONFIG).train)
            # resumed before the decoder's first checkpoint: its folder holds nothing to continue from
            return train_decoder(config, resume=decoder_started, overwrite=resume and not decoder_started)


def _checked_again(config: Config) -> Config:
    """`config` built again from its values, so every load-time check runs on what Python changed:
    `cfg.train.epochs = 0` trained nothing, and the run's config.yaml then failed to load."""
    from mmembed.errors import ConfigError
    from mmembed.typed_config import from_dict, to_dict

    source = "the Config given to train() (a value set in Python)"
    try:
        return from_dict(Config, to_dict(config), where="", source=source)
    except ConfigError as e:  # __post_init__'s messages name the key but no source
        raise ConfigError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None


def _align_as_it_ran(config: Config, saved: Config) -> Config:
    """`config` with the train section the align stage ran with: on a resume past it, a changed one
    (train.epochs=3) trained nothing, yet config.yaml then recorded it."""
    from mmembed.typed_config import to_dict

    kept = dataclasses.replace(saved.train, out_dir=config.train.out_dir)  # the folder as named now
    was, now = to_dict(kept), to_dict(config.train)
    changed = [f"train.{k} {was[k]!r} -> {now[k]!r}" for k in was if was[k] != now.get(k)]
    if changed:
        log.warning("the align stage is finished, so %s changes nothing: --resume continues the decoder stage "
                    "(start over with --overwrite to train the space again)", ", ".join(changed))
    if _another_folder(saved.model.init_from, config.model.init_from):
        # warned, not refused: a source run that moved is resumed from its new place (preflight_resume's _WHERE_IT_STARTED)
        log.warning("the decoder stage began on the space %s, so model.init_from %r -> %r changes nothing: --resume "
                    "continues it on that space (start over with --overwrite to copy another)",
                    "copied from " + saved.model.init_from if saved.model.init_from else "trained here",
                    saved.model.init_from, config.model.init_from)
    # and the space as it is: a space copied from model.init_from has that run's sections, which
    # the decoder stage writes into config.yaml again (the user's own section described no towers)
    return dataclasses.replace(config, train=kept, model=saved.model, tokenizer=saved.tokenizer)


def _check_space_source(run_dir: Path, saved: Config, config: Config) -> None:
    """A resume before the decoder stage's first checkpoint that would change where the space comes
    from: `model.init_from` newly set copied that run's space over the one trained here (its align
    stage lost), and dropped it trained a space over the copied one."""
    from mmembed.errors import UserError

    was, now = saved.model.init_from, config.model.init_from
    if was is None and now is not None:
        raise UserError(f"{run_dir}: its space was trained here, so --resume with model.init_from={now} would "
                        "replace it with that run's: drop model.init_from to continue this run, or start over "
                        "with --overwrite")
    if was is not None and now is None:
        raise UserError(f"{run_dir}: its space was copied from {was}: resume with model.init_from={was} (or where "
                        "that run is now), or start over with --overwrite")


def _another_folder(was: str | None, now: str | None) -> bool:
    """Whether two model.init_from values name different folders (`runs/a/` is `runs/a`)."""
    return (was is None) != (now is None) or was is not None and Path(was).resolve() != Path(now).resolve()


def copy_space(config: Config, save: bool = True) -> Config:
    """Copy the shared space of `model.init_from` (weights, tower config, tokenizer) into
    `train.out_dir`; returns the config with that run's model and tokenizer sections
    (`save=False`: only the config, for the ranks that do not write)."""
    from mmembed.model import Model
    from mmembed.model_load import load_space

    source = Path(config.model.init_from)
    space = load_space(source)
    # the source's init_towers (a bound run's) picked what it loaded; here the whole space is copied
    model_section = dataclasses.replace(space.config.model, init_from=str(source), init_towers=None)
    config = dataclasses.replace(config, model=model_section, tokenizer=space.config.tokenizer)
    if save:
        # with the folder its relative paths are read from (a resume's cd)
        Model(config, space.space, space.tokenizer).save(config.train.out_dir, started_in=Path.cwd())
        log.info("shared space copied from %s into %s", source, config.train.out_dir)
    return config


__all__ = ["train"]


class _CallablePackage(types.ModuleType):
    """`mm.train(config)` is `train(config)`: Python sets `mmembed.train` to this package as soon as
    any of its modules is imported (`mmembed.evaluate` does), so the name can only be the package,
    and the package answers the call."""

    def __call__(self, config: Config, resume: bool = False, overwrite: bool = False) -> Path:
        return train(config, resume=resume, overwrite=overwrite)


sys.modules[__name__].__class__ = _CallablePackage
