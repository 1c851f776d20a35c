"""What `mmembed chat` (a conversation with persistent memory on stdin/stdout) and `mmembed
train-queries` (the query tower that recall uses) run. The options are defined in `mmembed.cli`."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from mmembed.errors import UserError


def run_chat_command(args: argparse.Namespace) -> int:
    """`mmembed chat RUN --memory F --user U`: a conversation on stdin/stdout, remembered in F."""
    import mmembed as mm
    from mmembed.decoder.score import check_generation
    from mmembed.memory.chat import run_chat

    generate = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    try:
        check_generation(**generate)  # before the model loads and the chat begins: one line, exit 2
    except ValueError as e:
        raise UserError(str(e)) from None
    for name, stream in (("input", sys.stdin), ("output", sys.stdout)):  # `<&-`, `>&-`: an AttributeError on None
        if stream is None:
            raise UserError(f"standard {name} is closed: mmembed chat reads the conversation from standard input "
                            "and writes the answers to standard output")
    model = mm.load(args.run)
    if hasattr(sys.stdin, "reconfigure"):  # undecodable bytes in a line: that turn's one-line error, not the end
        sys.stdin.reconfigure(errors="surrogateescape")
    scripted = not sys.stdin.isatty()
    with mm.Session(model, memory=args.memory, user=args.user, session=args.session, new=args.new) as session:
        print(f"session {session.session} of {args.user} in {args.memory}", file=sys.stderr)
        tally = run_chat(session, sys.stdin, sys.stdout, prompt="" if scripted else "> ", err=sys.stderr, **generate)
    if scripted and tally.refused:  # a script must be able to tell that some of its lines were not answered
        print(f"mmembed: {tally.refused} line(s) refused, {tally.answered} answered", file=sys.stderr)
        return 1
    return 0


def run_train_queries(args: argparse.Namespace) -> int:
    """`mmembed train-queries RUN`: train the query tower on episodes (given, or the world's) and save it,
    holding the run folder's trainer lock throughout: a trainer started meanwhile (`--overwrite`, a
    new space) left the run with a tower of the old space, which made it unloadable, and a second
    train-queries replaced the first one's tower without --overwrite."""
    from mmembed.config_train import MAX_SEED
    from mmembed.model_load import load_space
    from mmembed.train.queries import QUERY_WEIGHTS, save_query_tower, train_query_tower

    if args.steps < 1 or args.episode_size < 2 or not 0 <= args.seed < MAX_SEED:  # seed + 1 draws validation
        raise UserError(f"--steps must be >= 1, --episode-size >= 2 and --seed in [0, {MAX_SEED - 1}] "
                        f"(got {args.steps}, {args.episode_size}, {args.seed})")
    run = Path(args.run)
    _check_tower_target(run, args.overwrite)
    space = _weights_stamp(run)  # the space the tower is trained for; a trainer replaces the file
    model = load_space(run)
    with _query_lock(run):
        _check_unchanged(run, space, args.overwrite)  # what a trainer or train-queries did since the checks
        train, val = _episodes(args, model)
        report = train_query_tower(model, train, val, steps=args.steps, lr=args.lr, seed=args.seed)
        _check_unchanged(run, space, args.overwrite)
        save_query_tower(model, run, report)
    before, after = report.before, report.after
    print(f"query tower: {report.steps} steps in {report.seconds:.0f} s; the asked item first among its episode's "
          f"{before['recall@1']:.3f} → {after['recall@1']:.3f}, in the top 3 {before['recall@3']:.3f} → "
          f"{after['recall@3']:.3f} ({report.questions} validation questions; before: the text tower)")
    print(f"saved: {run / QUERY_WEIGHTS}")
    return 0


def _check_tower_target(run: Path, overwrite: bool) -> None:
    from mmembed.checkpoint import unwritable_above
    from mmembed.train.queries import QUERY_WEIGHTS

    tower = run / QUERY_WEIGHTS
    if tower.exists() and not overwrite:  # 75 s of training or more, replaced without a word
        raise UserError(f"{tower} already exists: pass --overwrite to train a new one in its place")
    # the tower is saved into the run: a read-only run failed only after all the training
    if run.is_dir() and (parent := unwritable_above(tower)) is not None:
        raise UserError(f"{tower}: {parent} cannot be written (read-only, or no permission)")


def _weights_stamp(run: Path) -> tuple[int, int, int] | None:
    from mmembed.model import WEIGHTS

    try:
        st = (run / WEIGHTS).stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns  # written atomically: a new file, a new inode


def _check_unchanged(run: Path, space: tuple[int, int, int] | None, overwrite: bool) -> None:
    from mmembed.model import WEIGHTS

    _check_tower_target(run, overwrite)
    if _weights_stamp(run) != space:
        raise UserError(f"{run / WEIGHTS} was replaced since train-queries read it (the run trained again?), so "
                        "a tower trained for it would not fit: nothing was saved; run train-queries again")


def _query_lock(run: Path) -> contextlib.AbstractContextManager:
    """The lock a trainer holds on its run folder (`run_dir.run_lock`), with a message for train-queries."""
    from mmembed.train.run_dir import run_lock

    return run_lock(run, lambda holder: (
        f"{run} is in use ({holder}: a trainer, or another train-queries); wait for it to finish, then run "
        "train-queries again"))


def _episodes(args: argparse.Namespace, model: Any) -> tuple[list, list]:
    """(training, validation) episodes: from --episodes (a tenth held out unless --val-episodes), else
    drawn from the run's synthetic world."""
    from mmembed.data.episodes import read_episodes
    from mmembed.retrieval.embed import outside_root_allowed

    # read as the run's manifests were: its data.allow_outside_root (the refusal names that key)
    outside = outside_root_allowed(model)
    if args.episodes:
        train = read_episodes(args.episodes, allow_outside_root=outside)
        if args.val_episodes:
            return train, read_episodes(args.val_episodes, allow_outside_root=outside)
        if len(train) < 2:  # validating on the one training episode would score what it learned
            raise UserError(f"{args.episodes}: {len(train)} episode(s): give at least 2 (a tenth is held out "
                            "for validation) or --val-episodes")
        cut = max(1, len(train) // 10)
        return train[cut:], train[:cut]
    from mmembed.data.synth.episodes import world_episodes

    root = Path(model.config.data.root)
    if not root.is_absolute() and not (root / "train.jsonl").is_file():  # read from here, not the run's folder
        raise UserError(f"the run's data.root {root} is relative to the folder it was trained in, and "
                        f"{Path.cwd()} holds no {root / 'train.jsonl'}: run this from that folder, or give "
                        "--episodes")
    train = world_episodes(root, "train", args.episode_size, n=args.steps * 4, seed=args.seed)
    if args.val_episodes:
        return train, read_episodes(args.val_episodes, allow_outside_root=outside)
    return train, world_episodes(root, "val", 30, n=40, seed=args.seed + 1)
