"""What `mmembed generate` runs: which options go together, then one answer, a stream or a
temperature sweep, and the plots asked for. The options themselves are defined in `mmembed.cli`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from mmembed.decoder.prompt import Media, parse_inline
from mmembed.errors import UserError
from mmembed.terminal import for_terminal


def run_generate(args: argparse.Namespace) -> int:
    """`mmembed generate RUN --prompt ...`: one answer, a stream or a temperature sweep, and the
    plots asked for; prints the answer (or its JSON) on stdout. Returns the exit status."""
    import mmembed as mm

    check_options(args)
    prompt = parse_inline(args.prompt)
    check_outputs({flag: p for flag, p in (("--attention-png", args.attention_png), ("--plot", args.plot)) if p},
                  prompt, Path(args.run))
    model = mm.load(args.run)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, stop=args.stop, seed=args.seed)
    try:
        if args.temperature_sweep is not None:
            _sweep(args, model, prompt, options)
        elif args.stream:
            for piece in model.stream(prompt, **options):
                print(for_terminal(piece), end="", flush=True)
            print()
        else:
            _answer(args, model, prompt, options)
    except ValueError as e:  # sampling arguments: one line, like every other usage mistake
        raise UserError(str(e)) from None
    if args.attention_png:
        _wrote(model.attention_maps(prompt).plot(args.attention_png))
    return 0


def check_outputs(outs: dict[str, str | Path], prompt: list, run: Path | None = None) -> None:
    """The plots (flag → file) go to files that can be written, before the decoding (a folder
    failed after it), and of their own: not a picture or a sound of the prompt (the heatmap
    replaced the image it was drawn from), nor each other, nor a file already in the `run` folder
    (its curves.png and retrieval.png, which its report shows, were replaced without a word)."""
    from mmembed.checkpoint import check_output_file

    media = {Path(p.item).resolve() for p in prompt if isinstance(p, Media) and isinstance(p.item, (str, Path))}
    seen: set[Path] = set()
    for flag, out in outs.items():
        check_output_file(out, flag)
        out = Path(out)
        target = out.resolve()
        if target in media:
            raise UserError(f"{out} is a file of the prompt: write the plot to another file")
        if run is not None and target.is_file() and target.is_relative_to(run.resolve()):
            raise UserError(f"{flag} {out} would overwrite one of the run's files: write the plot to another file")
        if target in seen:
            raise UserError(f"--attention-png and --plot both name {out}: give each its own file")
        seen.add(target)


def check_options(args: argparse.Namespace) -> None:
    """Which `generate` options go together (their --help says so)."""
    if args.stream and (args.json or args.plot or args.temperature_sweep is not None):
        raise UserError("--stream excludes --json, --plot and --temperature-sweep")
    if args.best_of != 1 and (args.stream or args.temperature_sweep is not None):
        raise UserError("--best-of chooses among whole answers: it excludes --stream and --temperature-sweep")
    if args.temperature_sweep is not None and args.temperature != 0:
        raise UserError("--temperature-sweep gives the temperatures: drop --temperature")
    if args.rerank_weight != 1.0 and args.best_of == 1:  # it was ignored
        raise UserError("--rerank-weight weighs the space's judgement among --best-of answers: give --best-of too")
    if args.samples is not None and args.temperature_sweep is None:
        raise UserError("--samples counts the answers per temperature of --temperature-sweep: give that too")


def _answer(args: argparse.Namespace, model, prompt: list, options: dict) -> None:
    out = model.generate(prompt, **options, best_of=args.best_of, rerank_weight=args.rerank_weight)
    if args.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "logprobs": out.logprobs,
                          "entropy": out.entropy, "mean_entropy": out.mean_entropy,
                          "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens,
                          "candidates": [dataclasses.asdict(c) for c in out.candidates]}))
    else:
        print(for_terminal(out.text))  # a terminal gets its escape codes escaped, a pipe the exact text
    if args.plot:
        _wrote(model.token_entropy(prompt, out).plot(args.plot))


def _sweep(args: argparse.Namespace, model, prompt: list, options: dict) -> None:
    from mmembed.insight import plot_sweep, sweep_json, sweep_table

    options = {k: v for k, v in options.items() if k != "temperature"}
    options["seed"] = 0 if args.seed is None else args.seed
    rows = model.temperature_sweep(prompt, args.temperature_sweep, samples=8 if args.samples is None else args.samples,
                                   **options)
    print(sweep_json(rows) if args.json else for_terminal(sweep_table(rows)))
    if args.plot:
        _wrote(plot_sweep(rows, args.plot))


def _wrote(path: Path) -> None:
    print(f"wrote {path}", file=sys.stderr)  # stderr: stdout stays the answer (or its JSON)
