"""`mmembed` command line: a thin layer over the Python API.

Each subcommand parses its arguments and calls one library function; results are printed by its
handler and nowhere else. A user mistake (bad path, bad option, bad config) prints one line and exits 2.
This file holds the options and `main`; the handlers of the commands without a package of their
own are in `cli_commands.py`, the others in each package's `commands.py`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path

from mmembed import __version__
from mmembed.allocator import keep_freed_memory
from mmembed.cli_commands import _data, _demo, _index, _search, _serve, _tokenizer
from mmembed.errors import PeerLostError, UserError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse prints the usage block before an error; users asked for one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # "mmembed: error: mmembed: unrecognized arguments" named the program twice: the command alone
        command = self.prog.removeprefix("mmembed").strip()
        raise UserError(f"{command + ': ' if command else ''}{message} (see --help)")


def _add(sub, name: str, help: str, handler: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=help)
    p.set_defaults(handler=handler)
    return p


def _lazy(target: str) -> Callable[[argparse.Namespace], int]:
    """The handler `module:function`, imported only when its command runs (so `--help` starts fast)."""
    module, _, name = target.partition(":")
    return lambda args: getattr(importlib.import_module(module), name)(args)


def _overrides(p: argparse.ArgumentParser, example: str = "train.lr=3e-4") -> None:
    # default=[]: without it argparse names the optional overrides among "the required arguments"
    p.add_argument("overrides", nargs="*", default=[], metavar="key.sub=value",
                   help=f"config overrides, e.g. {example}")


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse `argv`; `key.sub=value` overrides may also come after options (`train CFG --resume
    train.lr=1e-3`), which argparse alone refuses once the positional list has been consumed."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mmembed", description="Multimodal shared embeddings: train, evaluate, search, prompt.",
        epilog="Input limits (keys of a tower's preprocess: block): images in PNG, JPEG, GIF, BMP, TIFF or WebP "
               "only (formats), at most 64 M pixels (max_pixels), 16,384 px a side (max_side) and 50:1 "
               "(max_aspect); audio at 4-192 kHz (min_sample_rate, max_sample_rate). A bad item is skipped and "
               "counted (data.strict=true: an error). A fresh `train` refuses a non-empty train.out_dir unless "
               "--overwrite (or --resume).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"mmembed {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    _data_commands(sub)
    _training_commands(sub)
    _retrieval_commands(sub)
    _prompting_commands(sub)
    _tool_commands(sub)
    return parser


def _data_commands(sub) -> None:
    """The built-in world, datasets and tokenizers."""
    p = _add(sub, "demo", "synthesise the built-in world, train the shared space, evaluate, write a report", _demo)
    p.add_argument("--config", default="demo", help="config name or YAML path (default: demo)")
    p.add_argument("--out", default=None, help="run directory (default: the config's train.out_dir)")
    _overrides(p)

    p = _add(sub, "data", "datasets: manifests from a folder, the built-in synthetic world", _data)
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser, required=True)
    s = data_sub.add_parser("synth", help="write the synthetic shapes world (images, audio, captions, QA)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--n", type=int, default=2000, help="number of scenes (default: 2000)")
    s.add_argument("--seed", type=int, default=0, help="world seed (default: 0)")
    s.add_argument("--image-size", type=int, default=64, help="picture side in pixels (default: 64)")
    s.add_argument("--workers", type=int, default=2, help="render processes; no output byte depends on it (default: 2)")
    s.add_argument("--overwrite", action="store_true",
                   help="regenerate even if the same world is there, and write into a non-empty folder that holds "
                        "no world made by mmembed (its images/, audio/ and manifests are replaced)")
    about = ("write a manifest from a folder of pictures, sounds and .txt captions (files of one name are one row), "
             "or train/val/test manifests with --split")
    s = data_sub.add_parser("manifest", help=about, description=about)
    s.add_argument("folder", help="the folder to scan (subfolders included)")
    s.add_argument("--split", default=None, metavar="TRAIN,VAL[,TEST]",
                   help="fractions, e.g. 0.8,0.1,0.1: writes train.jsonl, val.jsonl, test.jsonl, dealt per label "
                        "(default: one manifest.jsonl)")
    s.add_argument("--labels", choices=["none", "folder"], default="none",
                   help="folder: a row's label is its folder's path (ImageFolder's classes; default: none)")
    s.add_argument("--caption-lines", action="store_true",
                   help="each line of a .txt is a caption (the first is text, the others captions)")
    s.add_argument("--out", default=None, help="folder to write the manifests in (default: FOLDER)")
    s.add_argument("--seed", type=int, default=0, help="seed of the split (default: 0)")
    s.add_argument("--overwrite", action="store_true", help="replace manifests of the same names")
    s = data_sub.add_parser("lookups", help="write a world's training instructions plus more questions that find one "
                                            "of two objects by an attribute and ask another, for the decoder")
    s.add_argument("world", help="a synthetic world's folder (mmembed data synth --out)")
    s.add_argument("--per-item", type=int, default=8, help="questions per two-object scene and modality (default 8)")

    p = _add(sub, "tokenizer", "train a byte-level BPE tokenizer, or compare vocabulary sizes", _tokenizer)
    tok_sub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", parser_class=_Parser, required=True)
    t = tok_sub.add_parser("train", help="train on text files, write DIR/tokenizer.json")
    t.add_argument("--corpus", nargs="+", required=True, help="text files")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--overwrite", action="store_true", help="replace a tokenizer.json already in --out (never "
                                                            "a trained run's: its weights belong to it)")
    t = tok_sub.add_parser("stats", help="train at several vocabulary sizes; plot compression and embedding "
                                         "parameters against size (DIR/tokenizer_stats.png, .json, .csv)")
    t.add_argument("--corpus", nargs="+", required=True, help="text files, one caption per line")
    t.add_argument("--vocab-sizes", default="1k,4k,16k,64k",
                   help="comma-separated sizes; k = 1024, M = 1024^2 (default: 1k,4k,16k,64k)")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--embed-width", type=int, default=None,
                   help="token-embedding width for the parameter count (default: 128, the demo's text/decoder width)")
    t.add_argument("--holdout-every", type=int, default=10,
                   help="every Nth line is held out and compression measured on those only (default: 10)")


def _training_commands(sub) -> None:
    """Training and evaluation."""
    p = _add(sub, "train", "train a model from a config", _lazy("mmembed.train.commands:run_train"))
    p.add_argument("config", help="config name or YAML path")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in train.out_dir")
    mode.add_argument("--overwrite", action="store_true",
                      help="delete what train.out_dir holds and start over (without it, a fresh run refuses a "
                           "folder that holds files)")
    mode.add_argument("--find-lr", action="store_true",
                      help="instead of training: a learning-rate range test of the align stage (lr grows from "
                           "1e-6 to 1 over --find-lr-steps steps), its curve and a suggested train.lr written to "
                           "train.out_dir + '-find-lr'")
    p.add_argument("--find-lr-steps", type=int, default=None, help="steps of the range test (default: 100)")
    _overrides(p)

    p = _add(sub, "eval", "recall@K for every ordered modality pair, zero-shot classification, a linear probe; "
                          "the decoder's accuracy on an instruction manifest",
             _lazy("mmembed.evaluate:run_eval_command"))
    p.add_argument("run", help="run directory")
    p.add_argument("--manifest", help="JSONL/CSV manifest to evaluate retrieval on")
    p.add_argument("--labels", nargs="+", help="class names for zero-shot classification: the values of the "
                                               "manifest's label column to tell apart")
    p.add_argument("--template", default=None, action="append",
                   help="zero-shot prompt template (default: 'a photo of a {label}'); repeat it for an ensemble "
                        "(each class's prompts averaged, as CLIP's prompt ensembling)")
    p.add_argument("--all-captions", action="store_true",
                   help="every caption of a row (text and its captions list) is a text item, found as the row: "
                        "the COCO / Flickr30k protocol (default: text only)")
    p.add_argument("--linear-probe", default=None, metavar="TRAIN_MANIFEST",
                   help="fit a logistic regression on this manifest's embeddings by label (CLIP's linear probe; "
                        "the L2 penalty chosen on a held-out fifth) and score it on --manifest's items")
    p.add_argument("--instructions", help="instruction manifest (JSONL of prompt/answer rows): answer every row "
                                          "greedily with the run's decoder, accuracy per task")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest answer written (--instructions); a row whose reference answer is longer is not "
                        "scored (default: each row its reference answer's length and some slack, at least 48)")
    p.add_argument("--json", dest="json_out", help="also write the report (with --instructions: every answer) "
                                                   "to this JSON file")
    _outside_root_flag(p)


def _outside_root_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-outside-root", action="store_true",
                   help="read the manifests' absolute paths and paths with '..' (as data.allow_outside_root=true "
                        "does in training; default: the run's own setting)")


def _retrieval_commands(sub) -> None:
    """Indexes, search and maps."""
    p = _add(sub, "index", "embed a manifest into a searchable index", _index)
    p.add_argument("run", help="run directory")
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True, help="index folder")
    p.add_argument("--backend", default="exact", choices=["exact", "sq8", "faiss_flat", "faiss_ivf", "faiss_hnsw"])
    p.add_argument("--batch-size", type=int, default=64, help="items per forward pass (default 64)")
    _outside_root_flag(p)

    p = _add(sub, "search", "search an index with text, image and/or audio (composed) queries", _search)
    p.add_argument("index", help="index folder")
    p.add_argument("--run", help="run directory (default: the one the index was built with)")
    for modality, what in (("text", "query text"), ("image", "query image path"), ("audio", "query audio path")):
        p.add_argument(f"--{modality}", action=_QueryItem, const=modality, dest="items", default=[],
                       metavar=modality.upper(), help=f"{what} (repeatable)")
    p.add_argument("--weight", action="append", type=float, default=[],
                   help="one weight per query item, in the order the items are given on the command line "
                        "(negative = 'not like this')")
    p.add_argument("--target", choices=["text", "image", "audio"], help="restrict hits to one modality")
    p.add_argument("-k", "--k", type=int, default=5, help="hits to show (default: 5)")
    p.add_argument("--json", action="store_true", help="print hits as JSON")

    p = _add(sub, "map", "2-D map of an index (PCA, t-SNE or UMAP): colour = a metadata column, marker = modality",
             _lazy("mmembed.insight.commands:run_map"))
    p.add_argument("index", help="index folder")
    p.add_argument("--color-by", required=True, metavar="COLUMN",
                   help="metadata key, dotted path (objects.0.colour) or 'modality'; numbers get a colourbar")
    p.add_argument("--out", required=True, type=_png, metavar="OUT.png", help="PNG to write")
    p.add_argument("--method", default="pca", choices=["pca", "tsne", "umap"],
                   help="pca (default); tsne needs scikit-learn, umap needs umap-learn")
    p.add_argument("--max-points", type=int, default=5000,
                   help="draw a seeded random subset above this many (default: 5000)")
    p.add_argument("--seed", type=int, default=0, help="for the subset and for t-SNE/UMAP")


def _prompting_commands(sub) -> None:
    """Prompting and conversations with memory."""
    p = _add(sub, "generate", "answer a prompt that mixes text, images and sounds",
             _lazy("mmembed.decoder.commands:run_generate"))
    p.add_argument("run", help="run directory with a decoder stage")
    p.add_argument("--prompt", required=True,
                   help='text with inline media, e.g. "Describe <image:a.png> and <audio:b.wav>"')
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest answer (default: 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="seed the sampling")
    p.add_argument("--best-of", type=int, default=1, metavar="N",
                   help="answer with the best of N candidates (the greedy one and N-1 sampled at --temperature, "
                        "which must be > 0), ranked by mean log-probability per token plus --rerank-weight x the "
                        "shared space's logit scale x the cosine of the answer to the prompt's media")
    p.add_argument("--rerank-weight", type=float, default=1.0,
                   help="weight of the shared space in --best-of (default 1; 0 = log-probability alone)")
    p.add_argument("--stream", action="store_true", help="print the answer as it is decoded")
    p.add_argument("--json", action="store_true", help="print text, token ids, log-probs and entropies as JSON")
    p.add_argument("--attention-png", type=_png, metavar="OUT.png",
                   help="also draw the decoder's attention over the prompt: a row per layer (4 spread layers of a "
                        "deeper decoder), the mean over heads and, when there are at most 4, each head")
    p.add_argument("--temperature-sweep", type=_temperatures, metavar="T,T,...",
                   help="instead of one answer, sample --samples answers at each temperature (e.g. 0.1,0.5,1,1.5; "
                        "0 = greedy) and print per temperature the mean entropy (of the distribution drawn from, "
                        "and the model's own at T=1) and distinct-1/2 (as JSON with --json); seeded by --seed "
                        "(default 0); excludes --temperature and --stream")
    p.add_argument("--samples", type=int, default=None,
                   help="answers per temperature of --temperature-sweep (default: 8)")
    p.add_argument("--plot", type=_png, metavar="OUT.png",
                   help="with --temperature-sweep: entropy and distinct-n against temperature; otherwise the "
                        "entropy of each token of the answer (excludes --stream)")

    p = _add(sub, "chat", "a conversation with persistent multimodal memory",
             _lazy("mmembed.memory.commands:run_chat_command"))
    p.add_argument("run", help="run directory with a decoder stage")
    p.add_argument("--memory", required=True, help="the memory file (SQLite; created when absent)")
    p.add_argument("--user", required=True, help="whose memory: recall never reads another user's items")
    p.add_argument("--session", default=None, help="conversation to continue or start (default: the latest)")
    p.add_argument("--new", action="store_true", help="start a new conversation")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest answer per turn (default: 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")


def _tool_commands(sub) -> None:
    """The query tower, the web app and scaling studies."""
    p = _add(sub, "train-queries", "train a query tower: questions land on the item they name (memory recall)",
             _lazy("mmembed.memory.commands:run_train_queries"))
    p.add_argument("run", help="run directory (the space stays as it is; query_tower.safetensors is added, or "
                               "replaced with --overwrite)")
    p.add_argument("--episodes", help="JSONL of episodes (items shown + questions naming one of them; README, "
                                      "'Data format'); default: built from the synthetic world of the run's data.root")
    p.add_argument("--val-episodes", help="JSONL of validation episodes (default: the world's val split, or a "
                                          "tenth of --episodes)")
    p.add_argument("--steps", type=int, default=1500, help="training steps (default: 1500)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: 1e-3)")
    p.add_argument("--episode-size", type=int, default=32, help="items per world episode (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    p.add_argument("--overwrite", action="store_true", help="replace the run's query tower if it has one")

    p = _add(sub, "serve", "a local web app: search, prompt and memory views, and a JSON API (/api/search, "
             "/api/generate)", _serve)
    p.add_argument("run", help="run directory")
    p.add_argument("--index", help="index folder (`mmembed index`); default: embed the run's test manifest on start")
    p.add_argument("--memory", help="memory file (SQLite; created when absent): enables the memory view")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the "
                        "network)")
    p.add_argument("--port", type=_port, default=8000, help="port (default: 8000; 0 = any free one)")

    p = _add(sub, "scale", "scaling-law sweep: train a ladder of models, fit L = E + A·x^(-α), predict the next "
             "size; or --study regularisation: dropout × weight decay on a small subset",
             _lazy("mmembed.insight.commands:run_scale"))
    p.add_argument("config", nargs="?", default="scaling", help="scaling config name or YAML (default: scaling)")
    p.add_argument("--verify", action="store_true", help="also train the predicted next size and report the error")
    p.add_argument("--axis", choices=["params", "data"], help="vary model size (params) or training tokens (data)")
    p.add_argument("--study", choices=["regularisation"], help="run this study instead of the sweep")
    p.add_argument("--out", help="output folder (default: the config's out_dir)")
    _overrides(p, "recipe.lr=3e-3")


_ACROSS_PROCESSES = ("train", "index")  # the commands that split their work among torchrun's processes


def _check_launcher(command: str) -> None:
    """UserError for a command started by torchrun that does not share its work: each process ran it
    whole (`eval` printed its table and wrote its JSON once per process, `train-queries` found its own
    sibling holding the run's lock)."""
    processes = os.environ.get("WORLD_SIZE", "")
    if command not in _ACROSS_PROCESSES and processes.isdigit() and int(processes) > 1:
        raise UserError(f"mmembed {command} runs in one process: start it without torchrun "
                        f"(only {' and '.join(_ACROSS_PROCESSES)} share their work among its processes)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = _parse(parser, argv)
        configure_logging(args.verbose)
        keep_freed_memory()  # a step's freed memory kept for the next, not faulted back in page by page
        if hasattr(sys.stdout, "reconfigure"):  # a "→" or a caption's "☕" on a cp1252/ASCII stdout: a traceback
            sys.stdout.reconfigure(errors="backslashreplace")  # after the work (an index saved, a report lost)
        if args.command is None:
            _say(parser.format_usage() + "mmembed: error: give a command (mmembed --help lists them)")
            return EXIT_USAGE
        _check_launcher(args.command)
        code = int(args.handler(args) or 0)
        if sys.stdout is not None:  # None: started with stdout closed (`>&-`)
            sys.stdout.flush()  # a pipe's reader gone (`| head`): the flush at exit raised outside this try
        return code
    except PeerLostError as e:  # not the user's mistake: a run-time failure
        _say(f"mmembed: error: {e}")
        return 1
    except UserError as e:
        _say(f"mmembed: error: {_one_line(e)}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _say("mmembed: interrupted")
        return 130
    except BrokenPipeError:  # the reader left (`| head`): nothing more to tell it, and no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush must not fail again
        return 1
    except OSError as e:  # a path the command cannot write or read (a file where a folder goes, ...)
        logging.getLogger(__name__).debug("the failure", exc_info=True)  # the traceback, with --verbose
        where = f"{e.filename}: " if e.filename else ""
        # mkdir(parents=True) under a file says "File exists" (or "Not a directory"): say what is wrong
        reason = ("a file stands where a folder must go" if isinstance(e, (FileExistsError, NotADirectoryError))
                  else e.strerror or e)
        _say(f"mmembed: error: {where}{reason}")
        return 1


def _say(text: str) -> None:
    """`text` and its newline to stderr in one write: `print` writes them apart, and with an
    unbuffered stderr (PYTHONUNBUFFERED, as many containers set) the error lines of a torchrun
    job's processes, which share one stderr, ran together on one line."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


# the packages whose INFO lines (training progress, the demo's steps) a command shows
_OWN_LOGGERS = frozenset({"mmembed", "encoders"})


def configure_logging(verbose: bool) -> None:
    """INFO (DEBUG with -v) from this project's loggers, WARNING and above from any. A filter on
    the handler rather than levels on loggers: a torchrun rank > 0 quiets itself by setting the
    root logger to WARNING (`distributed_command`), which a level on "mmembed" would override."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_shown)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


def _shown(record: logging.LogRecord) -> bool:
    """Another library's INFO is noise on a command that worked (faiss logs its import probes:
    "Could not load library with AVX512 support due to: ModuleNotFoundError(...)")."""
    return record.levelno >= logging.WARNING or record.name.partition(".")[0] in _OWN_LOGGERS


def _one_line(e: UserError) -> str:
    """The error's message; raised in a DataLoader worker, torch re-raises it with the worker's
    traceback as its text ("Caught BadInput in DataLoader worker process 0. Original Traceback
    ..."), whose last line is the message."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if last.startswith(f"{type(e).__module__}.{type(e).__name__}: ") else last


class _QueryItem(argparse.Action):
    """`--text/--image/--audio X` → one list of (modality, X) in command-line order, which `--weight` follows."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.items = [*namespace.items, (self.const, value)]


def _temperatures(text: str) -> list[float]:
    """`--temperature-sweep` "0.1,0.5,1" → [0.1, 0.5, 1.0]: finite numbers >= 0."""
    values = []
    for item in text.split(","):
        try:
            t = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item.strip()!r} is not a number (give temperatures >= 0 "
                                             "separated by commas, e.g. 0.1,0.5,1,1.5)") from None
        if not math.isfinite(t) or t < 0:
            raise argparse.ArgumentTypeError(f"temperatures must be finite numbers >= 0, got {item.strip()}")
        values.append(t)
    return values


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535; 0 = any free one)")
    return port


def _png(text: str) -> Path:
    if not text.lower().endswith(".png"):
        raise argparse.ArgumentTypeError(f"{text!r} must name a .png file")
    return Path(text)


if __name__ == "__main__":
    sys.exit(main())
