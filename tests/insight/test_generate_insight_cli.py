"""`mmembed generate` with --attention-png, --temperature-sweep and --plot, and `Model`'s insight methods,
on a tiny saved run whose decoder is untrained but lively (seeded, CPU, seconds)."""

from __future__ import annotations

import json

import pytest
import torch

import mmembed as mm
from mmembed.cli import main
from mmembed.config_decoder import DecoderConfig
from mmembed.decoder import build_prompt_model
from mmembed.errors import UserError
from tests.decoder.helpers import lively
from tests.conftest import tiny_model
from tests.memory.conftest import picture

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    model = tiny_model(0)
    torch.manual_seed(0)
    model.config.decoder = DecoderConfig(width=32, layers=2, heads=4, context=64, dropout=0.0, soft_tokens=2)
    model.prompt_model = lively(build_prompt_model(model.config.decoder, model.tokenizer, model.embed_dim), std=0.5)
    folder = tmp_path_factory.mktemp("run")
    model.save(folder)
    picture(0).save(folder / "a.png")
    return folder


def one_line_error(capsys, argv: list[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("mmembed: error:") and match in err, err


def test_help_lists_the_insight_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--attention-png", "--temperature-sweep", "--samples", "--plot"))


@pytest.mark.parametrize("value, match", [("abc", "'abc' is not a number"), ("0.5,,1", "'' is not a number"),
                                          ("=-1", ">= 0"), ("=0.5,nan", ">= 0"), ("=inf", ">= 0")])
def test_bad_temperature_sweep_is_one_line(capsys, tmp_path, value, match):
    flag = "--temperature-sweep" + value if value.startswith("=") else "--temperature-sweep"
    argv = ["generate", str(tmp_path), "--prompt", "hi", flag] + ([] if value.startswith("=") else [value])
    one_line_error(capsys, argv, match)


@pytest.mark.parametrize("extra, match", [
    (["--temperature-sweep", "0,1", "--stream"], "--stream excludes"),
    (["--plot", "x.png", "--stream"], "--stream excludes"),
    (["--temperature-sweep", "0,1", "--temperature", "0.7"], "drop --temperature"),
    (["--samples", "4"], "--samples counts"),
    (["--plot", "x.jpg"], "must name a .png file"),
    (["--attention-png", "maps"], "must name a .png file"),
    (["--samples", "many", "--temperature-sweep", "1"], "invalid int value"),
])
def test_option_rules_are_one_line(capsys, tmp_path, extra, match):
    one_line_error(capsys, ["generate", str(tmp_path), "--prompt", "hi", *extra], match)


def test_sweep_prints_a_table_and_draws_it_and_the_attention(run, tmp_path, capsys):
    argv = ["generate", str(run), "--prompt", f"describe <image:{run / 'a.png'}> please", "--temperature-sweep",
            "0,0.5,2", "--samples", "3", "--max-new-tokens", "5", "--plot", str(tmp_path / "sweep.png"),
            "--attention-png", str(tmp_path / "att.png")]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    table = out.strip().splitlines()
    assert len(table) == 5 and table[2].startswith("| 0 | 0.000 |") and table[4].startswith("| 2 |")
    for name in ("sweep.png", "att.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG and f"wrote {tmp_path / name}" in err
    assert main([*argv[:-4], "--json"]) == 0  # the same sweep as JSON: same numbers (seed 0 by default)
    rows = json.loads(capsys.readouterr().out)
    assert [r["temperature"] for r in rows] == [0.0, 0.5, 2.0] and all(r["samples"] == 3 for r in rows)
    assert [f"{r['drawn_entropy']:.3f}" for r in rows] == [line.split("|")[2].strip() for line in table[2:]]
    assert rows[0]["drawn_entropy"] == 0.0 < rows[1]["drawn_entropy"] < rows[2]["drawn_entropy"]


def test_a_temperature_of_minus_zero_is_zero(run, capsys):
    """--temperature-sweep=-0 printed a row labelled "-0" (and -0.0 in --json)."""
    argv = ["generate", str(run), "--prompt", "describe", "--temperature-sweep=-0", "--samples", "2",
            "--max-new-tokens", "3"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().splitlines()[2].startswith("| 0 | 0.000 |")
    assert main([*argv, "--json"]) == 0
    assert str(json.loads(capsys.readouterr().out)[0]["temperature"]) == "0.0"  # -0.0 == 0.0: compare the text


def test_a_plot_never_replaces_a_file_of_the_prompt(run, tmp_path, capsys):
    """--attention-png a.png over the prompt's own a.png wrote the heatmap into it."""
    image = tmp_path / "a.png"
    image.write_bytes((run / "a.png").read_bytes())
    before = image.read_bytes()
    prompt = ["--prompt", f"describe <image:{image}>"]
    for flag in ("--attention-png", "--plot"):
        one_line_error(capsys, ["generate", str(run), *prompt, flag, str(image)], "is a file of the prompt")
    assert image.read_bytes() == before
    one_line_error(capsys, ["generate", str(run), *prompt, "--plot", str(tmp_path / "x.png"), "--attention-png",
                            str(tmp_path / "x.png")], "give each its own file")


def test_plot_without_sweep_draws_the_answer_tokens(run, tmp_path, capsys):
    argv = ["generate", str(run), "--prompt", "describe", "--temperature", "1", "--seed", "0", "--json",
            "--max-new-tokens", "6", "--plot", str(tmp_path / "tokens.png")]
    assert main(argv) == 0
    answer = json.loads(capsys.readouterr().out)  # stdout stays pure JSON: "wrote" goes to stderr
    assert len(answer["entropy"]) == len(answer["token_ids"]) > 0
    assert (tmp_path / "tokens.png").read_bytes()[:8] == PNG
    # the plain paths are unchanged: a streamed answer, and one with only an attention map beside it
    argv = ["generate", str(run), "--prompt", "describe", "--temperature", "1", "--seed", "0", "--max-new-tokens", "6"]
    assert main([*argv, "--stream"]) == 0
    streamed = capsys.readouterr().out
    assert main([*argv, "--attention-png", str(tmp_path / "att.png")]) == 0
    out, err = capsys.readouterr()
    assert out == streamed and out.strip() == answer["text"].strip() and err.strip() == f"wrote {tmp_path / 'att.png'}"


def test_model_methods(run):
    model = mm.load(run)
    maps = model.attention_maps(["describe", mm.Image(run / "a.png"), mm.Audio((torch.zeros(8000).numpy(), 16000))])
    assert maps.weights.shape[:2] == (2, 4) and maps.labels.count("<image 1>") == 2
    assert maps.labels.count("<audio 1>") == 2
    rows = model.temperature_sweep("describe", [0.0, 1.0], samples=2, max_new_tokens=3)
    assert [r.temperature for r in rows] == [0.0, 1.0]
    gen = model.generate("describe", max_new_tokens=3, temperature=1.0, seed=0)
    assert model.token_entropy("describe", gen).drawn == gen.entropy
    with pytest.raises(UserError, match="one prompt"):
        model.attention_maps([["a"], ["b"]])


def test_a_run_without_decoder_says_so(run):
    model = mm.load(run)
    model.prompt_model = None
    for call in (lambda: model.attention_maps("hi"), lambda: model.temperature_sweep("hi", [1.0])):
        with pytest.raises(UserError, match="no decoder"):
            call()


def test_an_answer_printed_on_a_terminal_has_its_escape_codes_escaped(run, capsys, monkeypatch):
    """`mmembed generate` printed the decoder's text raw: a sampled escape code (byte tokens can
    spell any) retitled the terminal or worse. A terminal gets it escaped, lines kept; a pipe the
    exact text (its reader wants the answer, not our rendering of it)."""
    import sys
    import types

    from mmembed.model import Model
    from mmembed.terminal import for_terminal, printable

    text = "red\x1b]0;owned\x07 circle\nsecond\tline \u202eevil"
    monkeypatch.setattr(Model, "generate", lambda self, prompt, **kw: types.SimpleNamespace(text=text))
    monkeypatch.setattr(Model, "stream", lambda self, prompt, **kw: iter([text[:5], text[5:]]))
    escaped = "red\\x1b]0;owned\\x07 circle\nsecond\tline \\u202eevil"
    assert printable(text, keep="\n\t") == escaped
    for extra in ([], ["--stream"]):
        assert main(["generate", str(run), "--prompt", "describe", *extra]) == 0
        assert capsys.readouterr().out == text + "\n"  # captured: not a terminal
        monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
        assert main(["generate", str(run), "--prompt", "describe", *extra]) == 0
        assert capsys.readouterr().out == escaped + "\n"
        monkeypatch.undo()
        monkeypatch.setattr(Model, "generate", lambda self, prompt, **kw: types.SimpleNamespace(text=text))
        monkeypatch.setattr(Model, "stream", lambda self, prompt, **kw: iter([text[:5], text[5:]]))
    assert for_terminal("a\x1bb", types.SimpleNamespace()) == "a\x1bb"  # no isatty: as it is
