"""Tokenizer trade-off: compression grows with vocabulary, measured on held-out lines; exact parameter counts."""

import json
import random

import pytest

from mmembed.cli import main
from mmembed.errors import UserError
from mmembed.insight.tokenizer_stats import (DEFAULT_EMBED_WIDTH, count_tokens, format_stats_table, parse_vocab_sizes,
                                             read_corpus, split_corpus, tokenizer_stats)
from mmembed.tokenizer import MAX_VOCAB, Tokenizer

SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "vo", "pe", "du", "shi", "gra", "ton", "bel"]


def _corpus(path, n_lines: int = 1500, seed: int = 0, held_line: str | None = None):
    """Lines of pseudo-words drawn from a fixed 200-word lexicon (held-out lines share its words).
    With `held_line`, every 10th line is that line instead."""
    rng = random.Random(seed)
    lexicon = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(200)]
    weights = [1 / (i + 1) for i in range(len(lexicon))]  # Zipf-like, as in real text
    lines = []
    for i in range(n_lines):
        if held_line is not None and (i + 1) % 10 == 0:
            lines.append(held_line)
        else:
            lines.append(" ".join(rng.choices(lexicon, weights, k=rng.randint(4, 10))))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _corpus(tmp_path_factory.mktemp("corpus") / "captions.txt")


@pytest.fixture(scope="module")
def rows(corpus):
    return tokenizer_stats([corpus], [300, 450, 700], embed_width=7)


def test_compression_grows_with_vocabulary(rows):
    cpt = [r.chars_per_token for r in rows]
    tpl = [r.tokens_per_line for r in rows]
    assert cpt[0] < cpt[1] < cpt[2], cpt
    assert tpl[0] > tpl[1] > tpl[2], tpl
    assert [r.vocab for r in rows] == [300, 450, 700]  # this corpus has merges enough for all three
    assert cpt[0] > 1.0  # even 300 tokens merge something beyond single bytes


def test_embedding_params_are_vocab_times_width(rows):
    assert [r.embedding_params for r in rows] == [300 * 7, 450 * 7, 700 * 7]


def test_held_out_numbers_equal_a_tokenizer_trained_on_the_rest(corpus, rows):
    lines = corpus.read_text(encoding="utf-8").splitlines()
    train = [line for i, line in enumerate(lines) if (i + 1) % 10]
    held = [line for i, line in enumerate(lines) if (i + 1) % 10 == 0]
    assert rows[0].held_out_lines == len(held) == 150
    tok = Tokenizer.train([line + "\n" for line in train], 450)
    counts = [len(tok.encode(line)) for line in held]
    assert count_tokens(tok, held) == counts  # per line, in order (it batches by length)
    assert rows[1].chars_per_token == pytest.approx(sum(map(len, held)) / sum(counts), rel=1e-12)
    assert rows[1].tokens_per_line == pytest.approx(sum(counts) / len(held), rel=1e-12)
    assert rows[1].chars_per_token_train == pytest.approx(
        sum(map(len, train)) / sum(len(tok.encode(line)) for line in train), rel=1e-12)


def test_held_out_lines_are_never_trained_on(tmp_path):
    # Every 10th line is a word seen nowhere else. Trained on, BPE would merge it into one token;
    # held out, each of its letters stays a token of its own.
    path = _corpus(tmp_path / "c.txt", n_lines=600, held_line="zqxzqxzqxzqx")
    [row] = tokenizer_stats([path], [2000])
    assert row.chars_per_token == pytest.approx(1.0)
    assert row.tokens_per_line == pytest.approx(12.0)
    assert row.chars_per_token_train > 3.0


def test_a_small_corpus_stops_early_and_says_so(corpus):
    [row] = tokenizer_stats([corpus], [parse_vocab_sizes("64k")[0]], embed_width=3)
    assert 700 < row.vocab < 65536 and row.requested == 65536
    assert row.embedding_params == row.vocab * 3
    table = format_stats_table([row])
    assert "ran out of merges" in table and "Held-out: 150 lines (every 10th" in table


def test_parse_vocab_sizes():
    assert parse_vocab_sizes("1k,4k,16k,64k") == [1024, 4096, 16384, 65536]
    assert parse_vocab_sizes(" 2M, 300,1.5k,300 ") == [300, 1536, 2 * 1024 ** 2]
    for bad, match in [("abc", "'abc'"), ("1k,,2k", "''"), ("1.3", "not a positive whole"), ("0", "positive")]:
        with pytest.raises(UserError, match=match):
            parse_vocab_sizes(bad)


def test_bad_inputs_are_user_errors(tmp_path, corpus):
    few = tmp_path / "few.txt"
    few.write_text("one\ntwo\n\n\nthree\n")
    with pytest.raises(UserError, match="3 non-blank lines"):
        split_corpus(few.read_text().splitlines(), 10)
    with pytest.raises(UserError, match="below the 263"):
        tokenizer_stats([corpus], [100, 1000])
    with pytest.raises(UserError, match="not found"):
        tokenizer_stats([tmp_path / "none.txt"], [300])


def test_default_width_is_the_demo_width():
    from mmembed.config import load_config

    config = load_config("demo")
    assert DEFAULT_EMBED_WIDTH == config.decoder.width
    assert DEFAULT_EMBED_WIDTH in [t.encoder_args.get("width") for t in config.model.towers.values()]


def test_cli_help():
    with pytest.raises(SystemExit) as e:
        main(["tokenizer", "stats", "--help"])
    assert e.value.code == 0


def test_cli_bad_vocab_size_is_one_line(capsys, corpus, tmp_path):
    assert main(["tokenizer", "stats", "--corpus", str(corpus), "--vocab-sizes", "1k,abc", "--out",
                 str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("mmembed: error:") and "'abc'" in err
    # found before the first size trains, and before the output folder is made (it was left empty)
    for sizes, bad in (("300,3000000000", f"is above {MAX_VOCAB:,}"), ("300,500", "holdout_every must be at least 2")):
        extra = ["--holdout-every", "1"] if "holdout" in bad else []
        assert main(["tokenizer", "stats", "--corpus", str(corpus), "--vocab-sizes", sizes, *extra,
                     "--out", str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and bad in err and not (tmp_path / "never").exists(), err


def test_cli_writes_plot_and_numbers(capsys, corpus, tmp_path):
    out = tmp_path / "stats"
    assert main(["tokenizer", "stats", "--corpus", str(corpus), "--vocab-sizes", "300,500", "--out", str(out),
                 "--embed-width", "64"]) == 0
    printed = capsys.readouterr().out
    assert "held-out" in printed and "| 300 | 300 |" in printed
    assert (out / "tokenizer_stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "tokenizer_stats.json").read_text())
    assert [(r["vocab"], r["embedding_params"]) for r in saved] == [(300, 300 * 64), (500, 500 * 64)]
    csv = (out / "tokenizer_stats.csv").read_text().splitlines()
    assert csv[0].startswith("requested,vocab,chars_per_token") and len(csv) == 3


def test_lines_end_only_at_newlines(tmp_path):
    """A caption holding U+2028, a form feed or U+0085 is one line, as the tokenizer's training
    reads it (str.splitlines cut it in two and doubled the held-out lines)."""
    path = tmp_path / "c.txt"
    path.write_bytes("a red\u2028star\r\nb\x0cblue\u0085moon\rc\n".encode("utf-8"))
    assert read_corpus([path]) == ["a red\u2028star", "b\x0cblue\u0085moon", "c"]


def test_a_failed_or_interrupted_run_leaves_no_out_folder(capsys, corpus, tmp_path, monkeypatch):
    """A missing corpus, one too short for --holdout-every, or Ctrl-C left an empty --out folder."""
    import mmembed.insight.tokenizer_stats as stats

    few = tmp_path / "few.txt"
    few.write_text("one\ntwo\nthree\n")
    for corpus_file, match in ((tmp_path / "none.txt", "corpus file not found"), (few, "3 non-blank lines")):
        assert main(["tokenizer", "stats", "--corpus", str(corpus_file), "--vocab-sizes", "300", "--out",
                     str(tmp_path / "st")]) == 2
        assert match in capsys.readouterr().err and not (tmp_path / "st").exists()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stats.Tokenizer, "train", interrupted)
    argv = ["tokenizer", "stats", "--corpus", str(corpus), "--vocab-sizes", "300"]
    assert main([*argv, "--out", str(tmp_path / "new" / "st")]) == 130
    assert not (tmp_path / "new").exists()  # the parent it made too
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "mine.txt").write_text("a file of the user")
    assert main([*argv, "--out", str(tmp_path / "kept")]) == 130
    assert (tmp_path / "kept" / "mine.txt").read_text() == "a file of the user"  # a folder that was there stays


def test_a_folder_given_as_a_corpus_file_is_called_a_folder(capsys, tmp_path):
    """`tokenizer stats --corpus DIR` said "corpus file not found: DIR" of a folder that is there."""
    assert main(["tokenizer", "stats", "--corpus", str(tmp_path), "--vocab-sizes", "300",
                 "--out", str(tmp_path / "o")]) == 2
    assert f"corpus file {tmp_path} is a folder, not a file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
