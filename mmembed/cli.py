"""`mmembed` command line: a thin layer over the Python API.

Each subcommand parses its arguments and calls one library function; results are printed here
and nowhere else. A user mistake (bad path, bad option, bad config) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from mmembed.errors import UserError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse prints the usage block before an error; users asked for one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{self.prog}: {message} (see --help)")


def _add(sub, name: str, help: str, handler: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.set_defaults(handler=handler)
    return p


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. train.lr=3e-4")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mmembed", description="Multimodal shared embeddings: train, evaluate, search, prompt.",
        epilog="Input limits (keys of a tower's preprocess: block): images in PNG, JPEG, GIF, BMP, TIFF or WebP "
               "only (formats), at most 64 M pixels (max_pixels), 16,384 px a side (max_side) and 50:1 "
               "(max_aspect); audio at 4-192 kHz (min_sample_rate, max_sample_rate). A bad item is skipped and "
               "counted (data.strict=true: an error). A fresh `train` refuses a non-empty train.out_dir unless "
               "--overwrite (or --resume).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = _add(sub, "demo", "synthesise the built-in world, train the shared space, evaluate, write a report", _demo)
    p.add_argument("--config", default="demo", help="config name or YAML path (default: demo)")
    p.add_argument("--out", default=None, help="run directory (default: the config's train.out_dir)")
    _overrides(p)

    p = _add(sub, "data", "datasets: generate the built-in synthetic world", _data)
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser, required=True)
    s = data_sub.add_parser("synth", help="write the synthetic shapes world (images, audio, captions, QA)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--n", type=int, default=2000, help="number of scenes")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--overwrite", action="store_true",
                   help="regenerate even if the same world is there, and write into a non-empty folder that holds "
                        "no world made by mmembed (its images/, audio/ and manifests are replaced)")

    p = _add(sub, "tokenizer", "train a byte-level BPE tokenizer", _tokenizer)
    tok_sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", parser_class=_Parser, required=True)
    t = tok_sub.add_parser("train", help="train on text files, write DIR/tokenizer.json")
    t.add_argument("--corpus", nargs="+", required=True, help="text files")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True, help="output folder")

    p = _add(sub, "train", "train a model from a config", _train)
    p.add_argument("config", help="config name or YAML path")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.out_dir")
    mode.add_argument("--overwrite", action="store_true",
                      help="delete what train.out_dir holds and start over (without it, a fresh run refuses a "
                           "folder that holds files)")
    _overrides(p)

    p = _add(sub, "eval", "recall@K for every ordered modality pair, zero-shot classification", _eval)
    p.add_argument("run", help="run directory")
    p.add_argument("--manifest", required=True, help="JSONL/CSV manifest to evaluate on")
    p.add_argument("--labels", nargs="+", help="class names for zero-shot classification")
    p.add_argument("--template", default="a photo of a {label}", help="zero-shot prompt template")
    p.add_argument("--json", dest="json_out", help="also write the report to this JSON file")

    p = _add(sub, "index", "embed a manifest into a searchable index", _index)
    p.add_argument("run", help="run directory")
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True, help="index folder")
    p.add_argument("--backend", default="exact", choices=["exact", "faiss_flat", "faiss_ivf", "faiss_hnsw"])

    p = _add(sub, "search", "search an index with text, image and/or audio (composed) queries", _search)
    p.add_argument("index", help="index folder")
    p.add_argument("--run", help="run directory (default: the one the index was built with)")
    p.add_argument("--text", action="append", default=[], help="query text (repeatable)")
    p.add_argument("--image", action="append", default=[], help="query image path (repeatable)")
    p.add_argument("--audio", action="append", default=[], help="query audio path (repeatable)")
    p.add_argument("--weight", action="append", type=float, default=[],
                   help="one weight per query item, in the order text, image, audio items were given (negative = 'not like this')")
    p.add_argument("--target", choices=["text", "image", "audio"], help="restrict hits to one modality")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print hits as JSON")

    p = _add(sub, "generate", "answer a prompt that mixes text, images and sounds", _generate)
    p.add_argument("run", help="run directory with a decoder stage")
    p.add_argument("--prompt", required=True,
                   help='text with inline media, e.g. "Describe <image:a.png> and <audio:b.wav>"')
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="seed the sampling")
    p.add_argument("--stream", action="store_true", help="print the answer as it is decoded")
    p.add_argument("--json", action="store_true", help="print text, token ids, log-probs and entropies as JSON")

    p = _add(sub, "chat", "a conversation with persistent multimodal memory", _chat)
    p.add_argument("run", help="run directory with a decoder stage")
    p.add_argument("--memory", required=True, help="the memory file (SQLite; created when absent)")
    p.add_argument("--user", required=True, help="whose memory: recall never reads another user's items")
    p.add_argument("--session", default=None, help="conversation to continue or start (default: the latest)")
    p.add_argument("--new", action="store_true", help="start a new conversation")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")

    for name, text in [("scale", "scaling-law sweeps and power-law fits")]:
        p = _add(sub, name, text, _not_yet)
        p.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        return int(args.handler(args) or 0)
    except UserError as e:
        print(f"mmembed: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mmembed: interrupted", file=sys.stderr)
        return 130


# --- handlers: parse → one library call → print -------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from mmembed.demo import run_demo

    report = run_demo(args.config, args.overrides, out_dir=args.out)
    print(f"report: {report}")
    return 0


def _data(args: argparse.Namespace) -> int:
    from mmembed.data.synth import generate_world

    if args.n <= 0:
        raise UserError(f"--n must be positive, got {args.n}")
    summary = generate_world(Path(args.out), n=args.n, seed=args.seed, image_size=args.image_size,
                             workers=args.workers, overwrite=args.overwrite)
    print(summary)
    return 0


def _tokenizer(args: argparse.Namespace) -> int:
    from mmembed.tokenizer import train_tokenizer

    path = train_tokenizer([Path(p) for p in args.corpus], vocab_size=args.vocab_size, out_dir=Path(args.out))
    print(f"wrote {path}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from mmembed.config import load_config
    from mmembed.train import train

    config = load_config(args.config, args.overrides)
    run_dir = train(config, resume=args.resume, overwrite=args.overwrite)
    print(f"run: {run_dir}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from mmembed.evaluate import run_eval

    table, report = run_eval(args.run, args.manifest, labels=args.labels, template=args.template)
    print(table)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))
    return 0


def _index(args: argparse.Namespace) -> int:
    import mmembed as mm

    model = mm.load(args.run)
    index = mm.Index.build(model, args.manifest, backend=args.backend)
    index.save(args.out, run_dir=args.run)
    print(f"indexed {len(index)} items → {args.out}")
    return 0


def _search(args: argparse.Namespace) -> int:
    from mmembed.retrieval import run_search

    print(run_search(args.index, run=args.run, text=args.text, image=args.image, audio=args.audio,
                     weights=args.weight, target=args.target, k=args.k, as_json=args.json))
    return 0


def _generate(args: argparse.Namespace) -> int:
    import mmembed as mm
    from mmembed.decoder import parse_inline

    if args.stream and args.json:
        raise UserError("--stream and --json exclude each other")
    prompt = parse_inline(args.prompt)
    model = mm.load(args.run)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, stop=args.stop, seed=args.seed)
    try:
        if args.stream:
            for piece in model.stream(prompt, **options):
                print(piece, end="", flush=True)
            print()
            return 0
        out = model.generate(prompt, **options)
    except ValueError as e:  # sampling arguments: one line, like every other usage mistake
        raise UserError(str(e)) from None
    if args.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "logprobs": out.logprobs,
                          "entropy": out.entropy, "mean_entropy": out.mean_entropy,
                          "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens}))
    else:
        print(out.text)
    return 0


def _chat(args: argparse.Namespace) -> int:
    import mmembed as mm
    from mmembed.memory.chat import run_chat

    model = mm.load(args.run)
    with mm.Session(model, memory=args.memory, user=args.user, session=args.session, new=args.new) as session:
        print(f"session {session.session} of {args.user} in {args.memory}", file=sys.stderr)
        run_chat(session, sys.stdin, sys.stdout, prompt="> " if sys.stdin.isatty() else "",
                 max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    return 0


def _not_yet(args: argparse.Namespace) -> int:
    print(f"mmembed {args.command}: not available yet — it arrives with the scaling issue; today "
          "mmembed trains, evaluates, searches, generates and chats with memory.", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
