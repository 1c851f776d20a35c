"""What the insight commands run: `mmembed tokenizer stats` (compression and embedding parameters
against vocabulary size), `mmembed map` (a 2-D map of an index) and `mmembed scale` (scaling-law
sweeps and the regularisation study). The options themselves are defined in `mmembed.cli`."""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mmembed.errors import UserError


def run_tokenizer_stats(args: argparse.Namespace) -> int:
    """`mmembed tokenizer stats`: train BPE at each size; print the table, write the plot, JSON and CSV."""
    from tqdm.auto import tqdm

    from mmembed.insight.tokenizer_stats import (DEFAULT_EMBED_WIDTH, check_stats_arguments, format_stats_table,
                                                 parse_vocab_sizes, plot_tokenizer_stats, read_corpus, split_corpus,
                                                 split_stats, write_stats)

    sizes = parse_vocab_sizes(args.vocab_sizes)
    width = DEFAULT_EMBED_WIDTH if args.embed_width is None else args.embed_width
    check_stats_arguments(sizes, width, args.holdout_every)  # before the output folder is made
    train, held = split_corpus(read_corpus(args.corpus), args.holdout_every)  # a missing or short corpus too
    with output_folder(args.out):  # before training every size; removed again if the command fails
        # disable=None: no terminal (a log file), no bar, as in training
        with tqdm(total=len(sizes), desc="train BPE", unit="size", leave=False, disable=None) as bar:
            rows = split_stats(train, held, sizes, embed_width=width, progress=lambda _: bar.update())
        paths = [plot_tokenizer_stats(rows, Path(args.out) / "tokenizer_stats.png"), *write_stats(rows, args.out)]
    print(format_stats_table(rows, holdout_every=args.holdout_every))
    print(f"embedding params = vocab reached x {width}; wrote {', '.join(map(str, paths))}")
    return 0


@contextmanager
def output_folder(folder: str | Path) -> Iterator[Path]:
    """`make_output_folder`, and if the body fails or is interrupted, remove the folders it made
    (a failed command left an empty --out folder behind). A folder that was there is kept."""
    from mmembed.checkpoint import make_output_folder

    made = None  # the highest folder this call creates: `folder` or a missing parent of it
    for path in [Path(folder).absolute(), *Path(folder).absolute().parents]:
        if path.exists():
            break
        made = path
    make_output_folder(folder)
    try:
        yield Path(folder)
    except BaseException:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise


def run_map(args: argparse.Namespace) -> int:
    """`mmembed map INDEX --color-by COLUMN --out F.png`: draw the index in 2-D."""
    from mmembed.checkpoint import check_output_file
    from mmembed.insight.embedding_map import embedding_map
    from mmembed.retrieval import Index

    check_output_file(Path(args.out), "--out")  # before the index is loaded and projected
    check_not_in_an_index(Path(args.out))
    index = Index.load(args.index)
    check_not_an_item(Path(args.out), [index.metadata(i) for i in index.ids()])  # before the projection
    drawn = embedding_map(index, args.color_by, args.out, method=args.method, max_points=args.max_points,
                          seed=args.seed)
    kind = "colourbar" if drawn.numeric else "legend"
    instead = f" ({args.method} needs 4 or more points, not all in one place)" if drawn.method != args.method else ""
    print(f"{len(drawn.rows)} points by {drawn.method}{instead}, colour = {args.color_by} ({kind}) → {drawn.path}")
    return 0


def check_not_in_an_index(out: Path) -> None:
    """UserError when `out` is inside an index folder: a save replaces that folder as a whole, so
    it refuses one holding other files, and the index could no longer be saved there."""
    from mmembed.retrieval.index_format import HEADER, VECTORS

    for folder in Path(out).absolute().parents:
        if (folder / HEADER).is_file() and (folder / VECTORS).is_file():
            raise UserError(f"--out {out} is inside the index folder {folder}, which a save of the index "
                            "replaces as a whole; write the map outside it")


def check_not_an_item(out: Path, metadata: list[dict]) -> None:
    """UserError when `out` is the file of one of the index's items (its metadata's "item": an
    image the map would have replaced with itself)."""
    target = out.resolve()
    for meta in metadata:
        item = meta.get("item")
        # the name first: a text item's "item" is its caption, no path to resolve
        if isinstance(item, str) and Path(item).name == target.name and Path(item).resolve() == target:
            raise UserError(f"--out {out} is the file of an item of the index ({item}); write the map to "
                            "another file")


def run_scale(args: argparse.Namespace) -> int:
    """`mmembed scale [CONFIG]`: a scaling-law sweep (decoder or towers), or `--study regularisation`."""
    from mmembed.insight.sweep_config import load_scaling_config

    if "=" in args.config:  # `mmembed scale tokens=2e5`: an override, the shipped config
        args.overrides, args.config = [args.config, *args.overrides], "scaling"
    overrides = [*args.overrides, *([f"axis={args.axis}"] if args.axis else [])]
    config = load_scaling_config(args.config, overrides)
    if args.out is not None and not args.out.strip():  # "" fell back to the config's out_dir and swept there
        raise UserError("--out is empty; name the sweep's folder")
    if args.out:  # the folder as typed: an override would read it as YAML ("#2" a comment, "2024" a number)
        config.out_dir = args.out
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if args.study == "regularisation":
        from mmembed.insight.regularisation import run_regularisation

        check_study_arguments(args, config.target)
        report = run_regularisation(config, progress)
    elif config.target == "towers":
        from mmembed.insight.tower_scaling import run_tower_sweep

        report = run_tower_sweep(config, verify=args.verify, progress=progress)
    else:
        from mmembed.insight.scaling import run_sweep

        report = run_sweep(config, verify=args.verify, progress=progress)
    print(report.summary())
    for kind, path in report.files.items():
        print(f"{kind}: {path}")
    return 0


def check_study_arguments(args: argparse.Namespace, target: str) -> None:
    """UserError for a sweep's option given to `--study regularisation`, which trains one decoder
    on one budget: --axis and target=towers were ignored without a word."""
    for option, given in (("--verify", args.verify), ("--axis", args.axis)):
        if given:
            raise UserError(f"{option} belongs to the sweep, not to --study regularisation")
    if target != "decoder":
        raise UserError(f"--study regularisation trains the decoder, not target={target}: leave target out (or "
                        "set target=decoder)")
