"""What the insight commands run: `mmembed tokenizer stats` (compression and embedding parameters
against vocabulary size), `mmembed map` (a 2-D map of an index) and `mmembed scale` (scaling-law
sweeps and the regularisation study). The options themselves are defined in `mmembed.cli`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmembed.errors import UserError


def run_tokenizer_stats(args: argparse.Namespace) -> int:
    """`mmembed tokenizer stats`: train BPE at each size; print the table, write the plot, JSON and CSV."""
    from tqdm.auto import tqdm

    from mmembed.checkpoint import make_output_folder
    from mmembed.insight.tokenizer_stats import (DEFAULT_EMBED_WIDTH, check_stats_arguments, format_stats_table,
                                                 parse_vocab_sizes, plot_tokenizer_stats, tokenizer_stats,
                                                 write_stats)

    sizes = parse_vocab_sizes(args.vocab_sizes)
    width = DEFAULT_EMBED_WIDTH if args.embed_width is None else args.embed_width
    check_stats_arguments(sizes, width, args.holdout_every)  # before the output folder is made
    make_output_folder(args.out)  # before training every size
    with tqdm(total=len(sizes), desc="train BPE", unit="size", leave=False) as bar:
        rows = tokenizer_stats(args.corpus, sizes, embed_width=width, holdout_every=args.holdout_every,
                               progress=lambda _: bar.update())
    paths = [plot_tokenizer_stats(rows, Path(args.out) / "tokenizer_stats.png"), *write_stats(rows, args.out)]
    print(format_stats_table(rows, holdout_every=args.holdout_every))
    print(f"embedding params = vocab reached x {width}; wrote {', '.join(map(str, paths))}")
    return 0


def run_map(args: argparse.Namespace) -> int:
    """`mmembed map INDEX --color-by COLUMN --out F.png`: draw the index in 2-D."""
    from mmembed.insight.embedding_map import embedding_map

    drawn = embedding_map(args.index, args.color_by, args.out, method=args.method, max_points=args.max_points,
                          seed=args.seed)
    kind = "colourbar" if drawn.numeric else "legend"
    instead = f" ({args.method} needs 4 or more points, not all in one place)" if drawn.method != args.method else ""
    print(f"{len(drawn.rows)} points by {drawn.method}{instead}, colour = {args.color_by} ({kind}) → {drawn.path}")
    return 0


def run_scale(args: argparse.Namespace) -> int:
    """`mmembed scale [CONFIG]`: a scaling-law sweep (decoder or towers), or `--study regularisation`."""
    from mmembed.insight.sweep_config import load_scaling_config

    if "=" in args.config:  # `mmembed scale tokens=2e5`: an override, the shipped config
        args.overrides, args.config = [args.config, *args.overrides], "scaling"
    overrides = [*args.overrides, *([f"axis={args.axis}"] if args.axis else [])]
    config = load_scaling_config(args.config, overrides)
    if args.out:  # the folder as typed: an override would read it as YAML ("#2" a comment, "2024" a number)
        config.out_dir = args.out
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if args.study == "regularisation":
        from mmembed.insight.regularisation import run_regularisation

        if args.verify:
            raise UserError("--verify belongs to the sweep, not to --study regularisation")
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
