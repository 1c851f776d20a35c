"""What `mmembed train` runs: a run from a config (under torchrun, one process per rank), or a
learning-rate range test instead. The options themselves are defined in `mmembed.cli`."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from mmembed.config import Config, load_config
from mmembed.errors import UserError


def run_train(args: argparse.Namespace) -> int:
    """`mmembed train CONFIG [overrides]`: train, or `--find-lr`; prints the run folder."""
    from mmembed.train import train
    from mmembed.train.collectives import check_same_everywhere
    from mmembed.train.distributed import distributed_command
    from mmembed.typed_config import to_dict

    if args.find_lr_steps is not None and not args.find_lr:  # training started as if it were not there
        raise UserError("--find-lr-steps sets the range test's length: give --find-lr too")
    config = load_config(args.config, args.overrides)
    if args.resume or args.overwrite:  # a copied or moved run's config.yaml names the original's folder
        from mmembed.train.run_dir import check_resumed_folder

        check_resumed_folder(args.config, config.train.out_dir, args.overrides,
                             "--resume" if args.resume else "--overwrite")
    if args.find_lr:
        return run_find_lr(config, 100 if args.find_lr_steps is None else args.find_lr_steps)
    try:
        with distributed_command(config.train.device, config.train.dist_timeout_minutes, config.train.out_dir) as world:
            check_same_everywhere(to_dict(config), "the config")
            run_dir = train(config, resume=args.resume, overwrite=args.overwrite)
    except UserError as e:
        if hint := _started_elsewhere(args.config, e):
            e.args = (f"{e}{hint}",)  # the same error (its kind sets the exit status), said with where to run it
        raise
    if world.main:
        print(f"run: {run_dir}")
    return 0


def _started_elsewhere(config_path: str, error: UserError) -> str:
    """For a path not found while running a run's own config.yaml from another folder than the one
    the run was started in (which its first line records, and its relative paths are read from):
    where to run it. "" otherwise (`generate` and `eval` named that folder; a resume did not)."""
    from mmembed.config import resolve_config_path, started_in

    there = started_in(resolve_config_path(config_path))
    if there is None or there.resolve() == Path.cwd().resolve() or "not found" not in str(error):
        return ""
    return (f" (this config's relative paths are read from the folder its run was started in: "
            f"cd {shlex.quote(str(there))} first)")


def run_find_lr(config: Config, steps: int) -> int:
    """`mmembed train CONFIG --find-lr`: the range test; prints the suggested `train.lr`."""
    from mmembed.train.find_lr import find_lr

    f = find_lr(config, steps=steps)
    if f.suggested is None:
        print(f"the loss never fell (lowest at lr={f.lowest:.2g}); see {f.folder / 'lr_find.png'}")
    else:
        stop = (f"training fails above {f.ceiling:.2g}: the loss is back at its start or at chance, blew up, or a "
                "tower collapsed" if f.ceiling is not None else "no failure up to 1")
        print(f"suggested train.lr={f.suggested:.2g} (steepest fall of the loss; lowest loss at {f.lowest:.2g}; "
              f"{stop}); curve: {f.folder / 'lr_find.png'}")
    return 0