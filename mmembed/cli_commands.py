"""What the commands without a package of their own run (`demo`, `data`, `tokenizer`, `index`,
`search`, `serve`): parse → one library call → print.

Their options, and `main`, are in `cli.py`; the other commands run each package's `commands.py`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mmembed.errors import UserError


# --- handlers: parse → one library call → print -------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from mmembed.demo import run_demo

    report = run_demo(args.config, args.overrides, out_dir=args.out)
    print(f"report: {report}")
    return 0


def _data(args: argparse.Namespace) -> int:
    from mmembed.data.synth import generate_world, write_lookup_rows

    if args.data_command == "manifest":
        return _folder_manifest(args)
    if args.data_command == "lookups":
        path = write_lookup_rows(Path(args.world), args.per_item)
        print(f"wrote {path}; train a decoder on it with decoder.data.train={path.name}")
        return 0
    if args.n <= 0:
        raise UserError(f"--n must be positive, got {args.n}")
    summary = generate_world(Path(args.out), n=args.n, seed=args.seed, image_size=args.image_size,
                             workers=args.workers, overwrite=args.overwrite)
    counts = ", ".join(f"{split} {summary.counts.get(split, 0)}" for split in summary.manifests)
    print(f"{'reused' if summary.reused else 'wrote'} the world in {summary.root}: {summary.total} scenes ({counts}); "
          f"manifests {', '.join(p.name for p in summary.manifests.values())}, instructions "
          f"{', '.join(p.name for p in summary.instructions.values())}")
    return 0


def _folder_manifest(args: argparse.Namespace) -> int:
    from mmembed.data.folder import write_folder_manifests

    split = None
    if args.split is not None:
        try:
            split = [float(f) for f in args.split.split(",")]
        except ValueError:
            raise UserError(f"--split: give comma-separated fractions such as 0.8,0.1,0.1, got {args.split!r}") from None
    done = write_folder_manifests(args.folder, out_dir=args.out, split=split, seed=args.seed, labels=args.labels,
                                  caption_lines=args.caption_lines, overwrite=args.overwrite)
    written = ", ".join(f"{path} ({done.rows[name]} rows)" for name, path in done.files.items())
    items = ", ".join(f"{m.value} {n}" for m, n in done.items.items() if n)
    labels = f"; {done.labels} labels" if done.labels else ""
    print(f"wrote {written}; items: {items}{labels}")
    if done.unlabelled:
        print(f"{done.unlabelled} rows of files directly in {args.folder} have no label (only subfolders are classes); "
              "`mmembed eval` then matches every row by row")
    if done.skipped:
        print(f"skipped: {done.skipped_line()}")
    if done.absolute:
        print("paths are absolute (the folder is not inside --out): read them with data.allow_outside_root=true")
    return 0


def _tokenizer(args: argparse.Namespace) -> int:
    if args.tokenizer_command == "stats":
        from mmembed.insight.commands import run_tokenizer_stats

        return run_tokenizer_stats(args)
    from mmembed.insight.commands import output_folder
    from mmembed.tokenizer import load_tokenizer, train_tokenizer

    with output_folder(args.out):  # Ctrl-C or a refusal removes the folders it made (never one that was there)
        path = train_tokenizer([Path(p) for p in args.corpus], vocab_size=args.vocab_size, out_dir=args.out,
                               overwrite=args.overwrite)
    size = load_tokenizer(path).vocab_size  # an embedding table is sized by it, not by --vocab-size
    short = f" ({size} tokens: the corpus ran out of merges before {args.vocab_size})" if size < args.vocab_size else ""
    print(f"wrote {path}{short}")
    return 0


def _index(args: argparse.Namespace) -> int:
    import mmembed as mm
    from mmembed.train.distributed import distributed_command, resolve_device

    from mmembed.data.synth.world_folder import check_complete
    from mmembed.retrieval.embed import allowing_outside_root
    from mmembed.retrieval.persist import check_target

    check_target(args.out)  # a mistyped --out is one line before the embedding, not a traceback after it
    check_complete(Path(args.manifest).parent)  # before the model loads
    with distributed_command() as world:  # under torchrun each rank embeds a share; rank 0 writes
        model = allowing_outside_root(mm.load(args.run), args.allow_outside_root)
        if world.active:
            model.to(resolve_device("auto", world))
        index = mm.Index.build(model, args.manifest, backend=args.backend, batch_size=args.batch_size)
    if world.main:
        index.save(args.out, run_dir=args.run)
        print(f"indexed {len(index)} items → {args.out}")
    return 0


def _search(args: argparse.Namespace) -> int:
    from mmembed.retrieval import run_search

    modalities = ("text", "image", "audio")  # run_search's keyword order, which its flat weights follow
    items = {m: [value for kind, value in args.items if kind == m] for m in modalities}
    weights = args.weight
    if len(weights) == len(args.items):  # else run_search refuses the count
        order = sorted(range(len(weights)), key=lambda i: modalities.index(args.items[i][0]))  # stable
        weights = [weights[i] for i in order]
    print(run_search(args.index, run=args.run, weights=weights, target=args.target, k=args.k, as_json=args.json,
                     **items))
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        from mmembed.serve import bind, bracketed, create_app, is_loopback, open_state, run, url_of
    except ImportError as e:
        raise UserError(f"mmembed serve needs the web extra ({e.name} is missing): "
                        "pip install -c constraints.txt -e '.[serve]'") from None
    import mmembed as mm

    sock = bind(args.host, args.port)  # a busy port fails before the model loads
    state = open_state(mm.load(args.run), run=Path(args.run).resolve().name, index=args.index, memory=args.memory)
    if not is_loopback(args.host):
        print(f"mmembed serve: listening on {bracketed(args.host)}:{args.port}: other machines can reach this server",
              file=sys.stderr)
    print(f"mmembed serve: {url_of(sock)} (Ctrl+C to stop)", flush=True)
    try:
        run(create_app(state), sock)
    except KeyboardInterrupt:  # Ctrl+C is how a server is stopped: uvicorn has shut down cleanly by now
        pass
    print("mmembed serve: stopped", file=sys.stderr)
    return 0
