import os
import shutil
import subprocess
import sys

import pytest

from mmembed.cli import build_parser, main
from mmembed.tokenizer import load_tokenizer

SUBCOMMANDS = ["demo", "data", "tokenizer", "train", "eval", "index", "search", "map", "generate", "chat", "scale", "serve",
               "train-queries"]


def test_parser_has_every_subcommand():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(SUBCOMMANDS)


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mmembed {name}")


def test_version_is_the_installed_package_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"mmembed {version('mmembed')}"


def _one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert err.startswith("mmembed: error:") and match in err, err


def test_bad_config_path(capsys):
    _one_line_error(capsys, ["train", "no/such/config.yaml"], "config file not found")


def test_bad_option(capsys):
    _one_line_error(capsys, ["data", "synth", "--out", "x", "--n", "many"], "invalid int value")


def test_bad_override(capsys):
    _one_line_error(capsys, ["train", "demo", "train.lr=fast"], "train.lr must be float")


def test_bad_run_dir(capsys, tmp_path):
    _one_line_error(capsys, ["index", str(tmp_path / "nope"), "--manifest", "m.jsonl", "--out", "o"], "not found")


class _Writes:
    """A stderr that records each write call, as an unbuffered stderr hands each to the OS."""

    def __init__(self):
        self.calls = []

    def write(self, text):
        self.calls.append(text)
        return len(text)

    def flush(self):
        pass


def test_each_error_line_is_one_write(monkeypatch, tmp_path):
    """With PYTHONUNBUFFERED (this machine's environment), `print` wrote the message and its newline
    apart, and the two processes of a torchrun job, sharing one stderr, glued their error lines into
    one ("...its foldermmembed: error: ...")."""
    for argv in (["index", str(tmp_path / "nope"), "--manifest", "m.jsonl", "--out", "o"], []):
        monkeypatch.setattr(sys, "stderr", err := _Writes())
        assert main(argv) == 2
        errors = [c for c in err.calls if "mmembed: error:" in c]
        assert len(errors) == 1 and errors[0].endswith("\n") and errors[0].count("\n") == (1 if argv else 2), err.calls


def test_a_command_started_with_stdout_closed_ends_as_before(monkeypatch, capsys, tmp_path):
    """With `>&-` sys.stdout is None: the flush added for closed pipes raised AttributeError."""
    monkeypatch.setattr(sys, "stdout", None)
    assert main(["tokenizer", "train", "--corpus", str(tmp_path / "none.txt"), "--vocab-size", "300",
                 "--out", str(tmp_path / "t")]) == 2  # the error path
    assert main(["data", "synth", "--n", "2", "--image-size", "16", "--out", str(tmp_path / "w")]) == 0, \
        capsys.readouterr().err  # a command that prints its result


def test_missing_corpus(capsys, tmp_path):
    _one_line_error(capsys, ["tokenizer", "train", "--corpus", str(tmp_path / "none.txt"), "--vocab-size", "300",
                             "--out", str(tmp_path)], "none.txt")


def test_tokenizer_train_says_when_the_corpus_gave_fewer_tokens_than_asked(capsys, tmp_path):
    """It printed "wrote .../tokenizer.json" alone: an embedding table sized by --vocab-size was wrong."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("a red star\n" * 50)
    assert main(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "a")]) == 0
    said = capsys.readouterr().out.strip()
    size = load_tokenizer(tmp_path / "a" / "tokenizer.json").vocab_size
    assert size < 300 and said.endswith(f"({size} tokens: the corpus ran out of merges before 300)")
    corpus.write_text(" ".join(f"w{i}x{i * 7}" for i in range(3000)))  # merges to spare
    assert main(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'b' / 'tokenizer.json'}"


def test_an_output_that_names_a_file_where_a_folder_goes_is_one_line(capsys, tmp_path):
    """Refused before any work (a tokenizer trained, every size of the stats, a whole evaluation)."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("a red star\n" * 50)
    taken = tmp_path / "taken.json"
    taken.write_text("{}")
    _one_line_error(capsys, ["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300",
                             "--out", str(taken)], "is a file; give the folder")
    _one_line_error(capsys, ["tokenizer", "stats", "--corpus", str(corpus), "--vocab-sizes", "300",
                             "--out", str(taken)], "is a file; give the folder")
    for under in ("tokenizer train", "tokenizer stats"):  # a folder under a file: a traceback after the training
        size = "--vocab-size" if under.endswith("train") else "--vocab-sizes"
        _one_line_error(capsys, [*under.split(), "--corpus", str(corpus), size, "300", "--out", str(taken / "sub")],
                        "cannot create the folder")
    _one_line_error(capsys, ["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", str(10**20),
                             "--out", str(tmp_path / "tok")], "is above")  # was an OverflowError
    _one_line_error(capsys, ["eval", str(tmp_path), "--manifest", "m.jsonl", "--json", str(tmp_path)], "is a folder")
    # the report over its own manifest, or over the run's weights: both were overwritten after the work
    (tmp_path / "m.jsonl").write_text("{}\n")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    for out in (tmp_path / "m.jsonl", tmp_path / "model.safetensors"):
        _one_line_error(capsys, ["eval", str(tmp_path), "--manifest", str(tmp_path / "m.jsonl"), "--json", str(out)],
                        "would overwrite an input of this evaluation")
    _one_line_error(capsys, ["eval", str(tmp_path), "--manifest", "m.jsonl", "--json", str(taken / "r.json")],
                    "is a file, not a folder")
    _one_line_error(capsys, ["eval", str(tmp_path), "--manifest", "m.jsonl", "--json", ""], "--json is empty")
    _one_line_error(capsys, ["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300", "--out", ""],
                    "--out is empty")  # it wrote tokenizer.json into the working directory
    _one_line_error(capsys, ["map", str(tmp_path), "--color-by", "modality", "--out", str(tmp_path / "m.jpg")],
                    "must name a .png file")


def test_console_script_prints_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mmembed.cli", "train", str(tmp_path / "missing.yaml")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1


def test_overrides_may_follow_options_and_unknown_arguments_are_still_refused():
    from mmembed.cli import _parse, build_parser
    from mmembed.errors import UserError

    args = _parse(build_parser(), ["train", "demo", "train.lr=1e-3", "--resume", "train.epochs=2"])
    assert args.resume and args.overrides == ["train.lr=1e-3", "train.epochs=2"]
    with pytest.raises(UserError, match="unrecognized arguments: --bogus"):
        _parse(build_parser(), ["train", "demo", "--resume", "--bogus"])
    with pytest.raises(UserError, match="unrecognized arguments: stray"):
        _parse(build_parser(), ["index", "run", "--manifest", "m", "--out", "o", "stray"])


def test_an_os_error_at_any_path_is_one_line_and_a_closed_pipe_is_quiet(capsys, tmp_path):
    """A path the command cannot use that no early check caught (the world's folder under a file)
    was an OSError traceback; a reader that closed the pipe (`| head`) gave a BrokenPipeError one."""
    from unittest import mock

    import mmembed.data.synth as synth

    (tmp_path / "file").write_text("x")
    unforeseen = NotADirectoryError(20, "Not a directory", str(tmp_path / "file" / "world" / "images"))
    with mock.patch.object(synth, "generate_world", side_effect=unforeseen):
        assert main(["data", "synth", "--n", "4", "--out", str(tmp_path / "w2")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mmembed: error: ") and "a file stands where a folder must go" in err
    assert len(err.strip().splitlines()) == 1
    # a buffered stdout (no PYTHONUNBUFFERED, as in a plain shell) failed at exit, outside main: exit 120
    for unbuffered in ("", "1"):
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | (
            {"PYTHONUNBUFFERED": unbuffered} if unbuffered else {})
        reader = subprocess.Popen([sys.executable, "-m", "mmembed", "data", "synth", "--n", "4", "--image-size", "16",
                                   "--out", str(tmp_path / f"w{unbuffered}")], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=env)
        reader.stdout.close()  # nobody reads what it prints
        _, err = reader.communicate(timeout=180)
        assert "Traceback" not in err.decode() and "BrokenPipeError" not in err.decode(), err.decode()
        assert reader.returncode in (0, 1), (unbuffered, reader.returncode)


def test_an_error_raised_in_a_data_loader_worker_is_still_one_line(capsys):
    """torch re-raises a worker's BadInput with the worker's traceback as its text: data.strict with
    num_workers > 0 printed some 20 lines before the one that matters."""
    from unittest import mock

    from torch.utils.data import DataLoader, Dataset

    from mmembed.errors import BadInput

    class Bad(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise BadInput("train.jsonl:1: image: corrupt or truncated image")

    def handler(args):
        list(DataLoader(Bad(), num_workers=1))

    with mock.patch("mmembed.cli._data", handler):
        _one_line_error(capsys, ["data", "synth", "--out", "x"], "train.jsonl:1: image: corrupt or truncated image")


def test_demo_replaces_only_its_own_folder(tmp_path, capsys):
    """`demo --out DIR` emptied DIR (a user's notes, an index) before it checked anything."""
    victim = tmp_path / "victim"
    (victim / "index").mkdir(parents=True)
    (victim / "notes.txt").write_text("mine")
    argv = ["demo", "--out", str(victim), f"data.root={tmp_path / 'nodata'}", "data.synth=null"]
    _one_line_error(capsys, argv, "holds files that are not a demo run")
    assert (victim / "notes.txt").read_text() == "mine" and (victim / "index").is_dir()
    assert not (victim / ".lock").exists()  # a refused demo leaves no lock file in a user's folder
    (victim / "notes.txt").unlink()
    (victim / "demo.json").write_text("{}")  # a demo.json of one's own: no demo
    _one_line_error(capsys, argv, "holds files that are not a demo run")
    _finished_demo_in(victim, argv)
    # a finished demo, with what a user added to it (an index; a memory.db, a query tower): kept
    _one_line_error(capsys, argv, "earlier demo run that also holds index, which a rerun would delete")
    assert (victim / "index").is_dir()
    (victim / "index").rmdir()
    for mine in ("bind-audio/notes.txt", "checkpoints/best", "decoder-image-only/decoder/mine.pt",  # in its folders
                 ".env", ".git/config", "bind-audio/.my-notes"):  # hidden ones too (not a lock's or a temporary's)
        (victim / mine).parent.mkdir(parents=True, exist_ok=True)
        (victim / mine).write_text("mine")
        _one_line_error(capsys, argv, f"earlier demo run that also holds {mine.split('/config')[0]}, which a rerun "
                                      "would delete")
        (victim / mine).unlink()
        if mine == ".git/config":
            (victim / ".git").rmdir()
    (victim / "checkpoints" / "step_0000010").mkdir(parents=True)
    (victim / "checkpoints" / ".step_0000012.tmp77").mkdir()
    (victim / "bind-audio" / "config.yaml").write_text("x")
    (victim / "report.md").write_text("x")  # the demo's own outputs only: accepted, and the missing data stops it
    _one_line_error(capsys, argv, "instruction manifest not found")  # in the preflight, so nothing was replaced yet
    assert (victim / "checkpoints").is_dir()
    for entry in victim.iterdir():  # what an --overwrite killed mid-delete leaves: still the demo's own folder
        entry.unlink() if entry.is_file() else shutil.rmtree(entry)
    (victim / ".overwritten-123" / "checkpoints").mkdir(parents=True)
    _one_line_error(capsys, argv, "instruction manifest not found")
    shutil.rmtree(victim)
    _one_line_error(capsys, argv, "instruction manifest not found")
    assert not victim.exists()  # a refused demo leaves no empty folder either


def _finished_demo_in(folder, argv):
    """What a finished demo leaves that `_check_replaceable` reads: its config.yaml and demo.json."""
    import json

    from mmembed.config import load_config, save_config

    overrides = [a for a in argv[3:] if "=" in a]
    save_config(load_config("demo", [f"train.out_dir={folder}", *overrides]), folder / "config.yaml")
    (folder / "demo.json").write_text(json.dumps({"timings_s": {"total": 1.0}, "test": {}}))


def test_a_finished_demo_of_other_settings_is_replaced_with_a_word(tmp_path, caplog):
    """A finished demo made with other options was replaced silently (and an interrupted one too)."""
    from mmembed.config import load_config
    from mmembed.demo import _check_replaceable

    run = tmp_path / "done"
    run.mkdir()
    _finished_demo_in(run, ["demo", "--out", str(run)])
    with caplog.at_level("WARNING", logger="mmembed.demo"):
        _check_replaceable(run, load_config("demo", [f"train.out_dir={run}", "train.seed=1"]))
    assert "replacing the earlier demo run in" in caplog.text and "train.seed 0 -> 1" in caplog.text


def test_an_interrupted_demo_is_replaced_and_a_training_run_is_not(tmp_path, caplog):
    """A training run in --out (a finished one, or a user's notes beside it) with the demo's config was
    taken for an interrupted demo and deleted; and a demo that failed on a setting could not be rerun
    with that setting changed ("its config.yaml differs"). The demo marks its folder (.demo) before
    its first stage: a marked folder holding only a demo's files is replaced, whatever the settings."""
    from mmembed.config import load_config, save_config
    from mmembed.demo import _check_replaceable
    from mmembed.errors import UserError

    run = tmp_path / "int"
    run.mkdir()
    config = load_config("demo", [f"train.out_dir={run}"])
    save_config(config, run / "config.yaml")
    (run / "model.safetensors").write_bytes(b"a trained run")
    with pytest.raises(UserError, match=r"holds files that are not a demo run \(no demo\.json, no \.demo mark\)"):
        _check_replaceable(run, load_config("demo", [f"train.out_dir={run}/"]))
    (run / ".demo").write_text("")
    with caplog.at_level("WARNING", logger="mmembed.demo"):
        _check_replaceable(run, load_config("demo", [f"train.out_dir={run}", "decoder.train.batch_size=8"]))
    assert "replacing the interrupted demo run in" in caplog.text
    (run / "notes.md").write_text("mine")
    with pytest.raises(UserError, match="earlier demo run that also holds notes.md"):
        _check_replaceable(run, config)


def test_a_demo_whose_world_is_inside_its_folder_is_refused_before_the_world_is_made(tmp_path, capsys):
    """data.root inside --out: the world was generated (minutes with the default one), then the align
    stage's overwrite refused to delete it, naming an --overwrite the user never gave."""
    out = tmp_path / "d"
    _one_line_error(capsys, ["demo", "--out", str(out), f"data.root={out / 'world'}"],
                    "is inside --out")
    assert not out.exists()


def test_an_output_under_a_file_is_a_usage_error_in_every_command(tmp_path, capsys):
    """Caught before any work, it exited 2 in some commands and 1 in others ("a file stands where a
    folder must go", from the OSError handler after the work had begun)."""
    (tmp_path / "caps.txt").write_text("x")
    under = str(tmp_path / "caps.txt" / "sub")
    for argv in (["data", "synth", "--out", under, "--n", "4"],
                 ["train", "demo", f"train.out_dir={under}", "data.synth=null", f"data.root={tmp_path}", "decoder=null"],
                 ["scale", "--out", str(tmp_path / "caps.txt" / "sweep")]):
        _one_line_error(capsys, argv, "cannot create the folder")


def test_a_missing_config_names_only_the_config(capsys):
    """It said "the following arguments are required: config, key.sub=value" (the optional overrides)."""
    _one_line_error(capsys, ["train"], "the following arguments are required: config (see --help)")


def test_an_option_that_would_be_ignored_is_refused(capsys, tmp_path):
    """Each was silently ignored: training started without the range test, a template or labels
    without the manifest they classify, a rerank weight without candidates to rerank."""
    run = str(tmp_path / "run")
    _one_line_error(capsys, ["train", "demo", "--find-lr-steps", "20"], "give --find-lr too")
    _one_line_error(capsys, ["eval", run, "--instructions", "i.jsonl", "--labels", "a", "b"], "give --manifest too")
    _one_line_error(capsys, ["eval", run, "--manifest", "m.jsonl", "--template", "a {label}"], "give --labels too")
    _one_line_error(capsys, ["generate", run, "--prompt", "hi", "--rerank-weight", "2"], "give --best-of too")


def test_a_plot_path_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, capsys):
    """--plot dir.png (a folder) decoded everything, then failed with "Is a directory", exit 1."""
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "file").write_text("x")
    for flag, out, message in (("--plot", tmp_path / "dir.png", "is a folder"),
                               ("--attention-png", tmp_path / "file" / "a.png", "is a file, not a folder")):
        assert main(["generate", str(tmp_path / "no-run"), "--prompt", "describe", flag, str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"mmembed: error: {flag} {out}") and message in err and "\n" not in err


def test_an_interrupted_tokenizer_train_removes_only_the_folders_it_made(capsys, tmp_path, monkeypatch):
    """Ctrl-C during `tokenizer train` left its --out folder and the parents it made, empty."""
    from mmembed.tokenizer import Tokenizer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Tokenizer, "train", interrupted)
    corpus = tmp_path / "c.txt"
    corpus.write_text("a red star\n" * 50)
    argv = ["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300", "--out"]
    assert main([*argv, str(tmp_path / "new" / "sub")]) == 130
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()  # a folder that was there stays
    assert main([*argv, str(tmp_path / "kept" / "sub")]) == 130
    assert (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "sub").exists()
    assert "interrupted" in capsys.readouterr().err


def test_eval_template_empty_is_refused_not_replaced(capsys, tmp_path, monkeypatch):
    """`mmembed eval --template ""` silently used the default template; the Python API refuses ""."""
    import mmembed
    from tests.retrieval.fakes import FakeModel

    monkeypatch.setattr(mmembed, "load", lambda run, *args, **kwargs: FakeModel())
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(f'{{"text": "a c{i}", "image": "img/c{i}.png", "label": "c{i}"}}\n' for i in range(3)))
    argv = ["eval", str(tmp_path), "--manifest", str(manifest), "--labels", "c0", "c1", "c2", "--template"]
    _one_line_error(capsys, [*argv, ""], "every template must contain '{label}', got ''")
    assert main([*argv, "{label}"]) == 0 and "| image | 100.0 | 3 |" in capsys.readouterr().out


def test_eval_templates_repeated_are_one_ensemble(capsys, tmp_path, monkeypatch):
    import mmembed
    from mmembed import evaluate
    from tests.retrieval.fakes import FakeModel

    monkeypatch.setattr(mmembed, "load", lambda run, *args, **kwargs: FakeModel())
    seen = []
    monkeypatch.setattr(evaluate, "class_embeddings", lambda model, labels, template, modality: seen.append(template)
                        or FakeModel().embed("text", [f"a {label}" for label in labels]))
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(f'{{"text": "a c{i}", "image": "img/c{i}.png", "label": "c{i}"}}\n' for i in range(3)))
    assert main(["eval", str(tmp_path), "--manifest", str(manifest), "--labels", "c0", "c1", "c2",
                 "--template", "{label}", "--template", "a photo of {label}"]) == 0
    assert seen == [["{label}", "a photo of {label}"]] and "| image | 100.0 | 3 |" in capsys.readouterr().out


_LOGGING_PROBE = """
import logging, sys
from mmembed import cli

def handler(args):  # what a command's libraries log: ours, faiss's import probes, a warning
    if "--quiet-rank" in sys.argv:
        logging.getLogger().setLevel(logging.WARNING)  # as distributed_command does on a rank > 0
    logging.getLogger("faiss.loader").info("Could not load library with AVX512 support")
    logging.getLogger("PIL.PngImagePlugin").debug("STREAM b'IHDR'")
    logging.getLogger("mmembed.train.engine").info("step 1 progress")
    logging.getLogger("encoders.weights").info("weights loaded")
    logging.getLogger("mmembed.model").debug("a debug detail")
    logging.getLogger("faiss").warning("a warning of faiss")
    return 0

cli._data = handler
sys.exit(cli.main([*(a for a in sys.argv[1:] if a == "-v"), "data", "synth", "--out", "unused"]))
"""


@pytest.mark.parametrize("flags, shown, hidden", [
    ([], ["step 1 progress", "weights loaded", "a warning of faiss"], ["AVX512", "IHDR", "a debug detail"]),
    (["-v"], ["step 1 progress", "a debug detail", "a warning of faiss"], ["AVX512", "IHDR"]),
    (["--quiet-rank"], ["a warning of faiss"], ["step 1 progress", "AVX512"]),
], ids=["default", "verbose", "rank-1"])
def test_logging_shows_our_info_and_only_warnings_of_other_libraries(flags, shown, hidden):
    """The root logger at INFO printed faiss's "Could not load library ... ModuleNotFoundError" lines."""
    # a process of its own: under pytest the root logger already has handlers, so basicConfig does nothing
    done = subprocess.run([sys.executable, "-c", _LOGGING_PROBE, *flags], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for text in shown:
        assert text in done.stderr, done.stderr
    for text in hidden:
        assert text not in done.stderr, done.stderr


def test_no_command_is_a_usage_error_on_stderr(capsys):
    """`mmembed` alone printed 40 lines of help on stdout, exited 2 and said nothing on stderr."""
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines()[-1] == "mmembed: error: give a command (mmembed --help lists them)"


def test_output_a_cp1252_stdout_cannot_encode_is_escaped_not_a_traceback(tmp_path):
    """A "☕" in a printed path (or the tool's own "→") ended a finished command with a UnicodeEncodeError
    traceback and exit 1 (`mmembed index` had saved the index)."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("a red star\n" * 50)
    out = tmp_path / "tok ☕"
    r = subprocess.run([sys.executable, "-m", "mmembed.cli", "tokenizer", "train", "--corpus", str(corpus),
                        "--vocab-size", "300", "--out", str(out)], capture_output=True, timeout=120,
                       env={**os.environ, "PYTHONIOENCODING": "cp1252"})
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    assert b"tok \\u2615" in r.stdout and (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
def test_a_utf16_corpus_is_refused_in_one_line(capsys, tmp_path, encoding):
    """A spreadsheet's "Unicode text" corpus trained a vocabulary of NULs and U+FFFD, exit 0."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("a red star\nblue circle\n" * 50, encoding=encoding)
    _one_line_error(capsys, ["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300",
                             "--out", str(tmp_path / "t")], "corpus is UTF-")


def test_a_plot_never_replaces_a_file_of_the_run(tmp_path, capsys):
    """--plot RUN/curves.png replaced the training curves the run's report shows, without a word."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "curves.png").write_bytes(b"the run's own")
    for flag in ("--plot", "--attention-png"):
        assert main(["generate", str(run), "--prompt", "describe", flag, str(run / "curves.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"mmembed: error: {flag} {run / 'curves.png'} would overwrite one of the run's files: " \
                      "write the plot to another file"
    assert (run / "curves.png").read_bytes() == b"the run's own"


def test_a_usage_error_names_the_program_once(capsys):
    """`mmembed demo --overwrite` said "mmembed: error: mmembed: unrecognized arguments: --overwrite"."""
    assert main(["demo", "--overwrite"]) == 2
    assert capsys.readouterr().err.strip() == "mmembed: error: unrecognized arguments: --overwrite (see --help)"
    _one_line_error(capsys, ["train"], "mmembed: error: train: the following arguments are required: config")
