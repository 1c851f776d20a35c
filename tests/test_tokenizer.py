"""Byte-level BPE and the CLIP tokenizer: round trips, special-token safety, truncation,
batching, persistence, compression on held-out English, and parity with open_clip."""

from __future__ import annotations

import copy
import json
import pickle
import random
import re
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydoc_data.topics import topics

from mmembed.errors import BadInput, CheckpointError, UserError
from mmembed.tokenizer import (
    DEFAULT_SPECIAL_TOKENS,
    Tokenizer,
    byte_to_unicode,
    load_tokenizer,
    train_tokenizer,
)
from mmembed.text_encoding import prefix_cut

# Python's own documentation (~465 KB of English): train on 85% of the topics, hold out the rest.
_KEYS = sorted(topics)
_CUT = int(0.85 * len(_KEYS))
TRAIN_TEXT = [topics[k] for k in _KEYS[:_CUT]]
HELD_OUT = "".join(topics[k] for k in _KEYS[_CUT:])

SAMPLES = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "",
    " ",
    "   leading and trailing   ",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF\r\n",
    "日本語のテキストと中文文本，还有한국어.",
    "emoji 👍🏽 family 👩‍👩‍👧‍👦 flag 🇫🇷 keycap 1️⃣",
    "e\u0301 vs \u00e9, a\u0308\u0304",
    "Zalgo: Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319a\u0300\u0301l\u0336go",
    "mixed: naïve café Straße İstanbul ǅ",
    "RTL: שלום עולם مرحبا بالعالم",
    "\x00\x01\x7f control \u200b zero-width \ufeff BOM",
    "<image> <bos></image><audio></audio><eos><pad> <imag <image",
    "def f(x):\n    return x ** 2  # code\n",
    "a" * 5000,
    "\U0010ffff\U0001f600\uffff",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TRAIN_TEXT, vocab_size=8000)


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert all(i not in tok.special_tokens.values() for i in ids)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.text(max_size=80))
def test_round_trip_random_unicode(tok, text):
    # Any str without lone surrogates (hypothesis excludes them) comes back unchanged.
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_random_bytes_including_invalid_utf8(tok):
    rng = random.Random(0)
    cases = [bytes(range(256)), b"\xff\xfe\x00", b"\xed\xa0\x80 encoded surrogate", b"cut \xe4\xb8", b"\x80"]
    cases += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))) for _ in range(50)]
    for data in cases:
        assert tok.decode_bytes(tok.encode_bytes(data)) == data
    # Valid UTF-8 through the bytes API tokenizes exactly like the string.
    assert tok.encode_bytes(SAMPLES[5].encode()) == tok.encode(SAMPLES[5])


def test_lone_surrogate_is_bad_input_not_a_crash(tok):
    for call in (lambda: tok.encode("ok \ud800 no"), lambda: tok.encode_batch(["fine", "x\udfff"]),
                 lambda: tok.encode("a \ud800", allowed_special="all")):
        with pytest.raises(BadInput, match="U\\+D[8F]"):
            call()
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")
    # past the prefix a max_length encodes, too (it was encoded as the first 16 ids, no error)
    for call in (lambda: tok.encode("word " * 200 + "\ud800", max_length=16),
                 lambda: tok.encode_batch(["word " * 200 + "\ud800"], max_length=16)):
        with pytest.raises(BadInput, match="U\\+D800 at index 1000"):
            call()
    with pytest.raises(TypeError, match="one str"):  # it was encoded as five rows of one letter
        tok.encode_batch("a cat")


def test_decode_matches_hf_and_checks_ids(tok):
    assert set(byte_to_unicode().values()) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    hf = tok.to_hf()
    for text in SAMPLES:
        ids = tok.encode(text)
        assert tok.decode(ids) == hf.decode(ids)
    ids = tok.encode("<image> x", allowed_special="all")
    assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids)) == "<image> x"
    assert tok.decode(ids, skip_special=True) == " x"
    for bad in ([-1], [tok.vocab_size]):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.decode(bad)
    for bad in (torch.tensor([1.0, 2.0]), torch.tensor([[1, 2]]), torch.tensor(5), [True, False], [1, "a"]):
        with pytest.raises(TypeError, match="token ids must be"):  # [True, False] decoded as ids 1, 0
            tok.decode(bad)


# ------------------------------------------------------------------------------ special tokens


def test_special_ids_are_stable_first_and_extensible(tok):
    assert list(tok.special_tokens) == list(DEFAULT_SPECIAL_TOKENS)
    assert list(tok.special_tokens.values()) == list(range(7))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.vocab_size == 8000
    ext = Tokenizer.train(TRAIN_TEXT[:5], vocab_size=400, special_tokens=["<video>", "<bos>"])
    assert ext.token_id("<video>") == 7 and ext.token_id("<image>") == 3
    with pytest.raises(UserError, match="<video>"):
        tok.token_id("<video>")  # the message lists the known tokens too
    with pytest.raises(UserError, match="unknown"):
        tok.encode("x", allowed_special={"<nope>"})
    for word_like in ("hello", "<<>>"):  # BPE could build these from plain text: refused
        with pytest.raises(UserError, match="plain text"):
            Tokenizer.train(TRAIN_TEXT[:2], vocab_size=400, special_tokens=[word_like])


def test_special_text_stays_plain_unless_allowed(tok):
    text = "look: <image> here <bos> and </image>"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == text
    img = tok.token_id("<image>")
    only_image = tok.encode(text, allowed_special={"<image>"})
    assert only_image.count(img) == 1 and tok.bos_id not in only_image
    assert only_image == tok.encode("look: ") + [img] + tok.encode(" here <bos> and </image>")
    every = tok.encode(text, allowed_special="all")
    assert {img, tok.bos_id, tok.token_id("</image>")} <= set(every)
    assert tok.decode(every) == text


# ------------------------------------------------------------------------------ length, batches


def test_bos_eos_and_truncation(tok):
    body = tok.encode(SAMPLES[0])
    assert tok.encode(SAMPLES[0], add_bos=True, add_eos=True) == [0, *body, 1]
    cut = tok.encode(SAMPLES[0], add_bos=True, add_eos=True, max_length=5)
    assert cut == [0, *body[:3], 1]
    # The bounded path encodes only a prefix, yet yields exactly the full encoding's prefix.
    long = HELD_OUT[:200_000]
    assert tok.encode(long, max_length=64) == tok.encode(long)[:64]
    assert tok.encode(long, max_length=64, allowed_special="all") == tok.encode(long)[:64]
    with pytest.raises(ValueError, match="max_length"):
        tok.encode("x", add_bos=True, add_eos=True, max_length=1)


HOSTILE = {"one-word": "a" * 1_000_000, "words": "word " * 200_000, "cjk": "中" * 1_000_000,
           "zwj-emoji": "👩‍👩‍👧" * 200_000, "spaces": " " * 1_000_000,
           "specials": "<image>" * 150_000}


@pytest.mark.parametrize("kind", HOSTILE)
def test_one_megabyte_caption_truncates(tok, kind, monkeypatch):
    hostile = HOSTILE[kind]
    seen: list[int] = []  # how many characters BPE was actually given: bounded, not 1 MB
    plain, batch = tok._encode_plain, tok._batch_plain
    monkeypatch.setattr(tok, "_encode_plain", lambda t: seen.append(len(t)) or plain(t))
    monkeypatch.setattr(tok, "_batch_plain", lambda ts: seen.extend(map(len, ts)) or batch(ts))
    assert len(tok.encode(hostile, max_length=64)) == 64
    ids, mask = tok.encode_batch([hostile, "short"], max_length=64, add_eos=True)
    assert ids.shape == (2, 64) and ids[0, -1] == tok.eos_id and mask[1].sum() == len(tok.encode("short")) + 1
    # O(budget), not 1 MB: a run with no word boundary (all spaces) is encoded until it gives twice
    # the budget's ids, up to 4x more characters at a time, then once more at twice its length, to
    # check that its first ids hold
    assert max(seen) <= 64 * 512


def test_prefix_cut_keeps_ids_a_prefix(tok):
    # The bounded path relies on this: cutting where prefix_cut says never changes earlier ids.
    rng = random.Random(0)
    text = HELD_OUT[:20_000] + " tail\r\n\n  words"
    full = tok.encode(text)
    at_boundary = 0
    for n in [rng.randrange(200, len(text)) for _ in range(60)] + [len(text) - 3]:
        cut = prefix_cut(text, n)
        assert n // 2 < cut <= n
        if cut == n and not text[n].isspace():
            continue  # no word boundary near n: a hard cut, exactness not promised
        at_boundary += 1
        ids = tok.encode(text[:cut])
        assert ids == full[: len(ids)], f"cut at {cut} changed the ids"
    assert at_boundary >= 55  # English has whitespace every few characters


def test_a_run_without_whitespace_cut_for_a_budget_keeps_the_full_texts_first_ids():
    """Cut mid-word, a prefix's last tokens can differ from the full text's (a vocabulary with long
    runs of one letter): the bounded paths ask for more than twice the budget there."""
    runs = Tokenizer.train(["a" * k for k in range(1, 200)] * 2 + ["b" * 30], vocab_size=600)
    for budget in (1, 2, 5):
        for k in range(60, 600, 37):
            for text in ("a" * k, "a" * k + " b"):
                full = runs.encode(text)[:budget]
                assert runs.encode(text, max_length=budget) == full, (budget, k)
                ids, mask = runs.encode_batch([text], max_length=budget)
                assert ids[0][mask[0]].tolist() == full, (budget, k)


def test_encode_batch_shapes_padding_and_mask(tok):
    texts = ["a", "a much longer caption with several words", "", "日本語"]
    ids, mask = tok.encode_batch(texts, add_bos=True, add_eos=True)
    rows = [tok.encode(t, add_bos=True, add_eos=True) for t in texts]
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids.shape == mask.shape == (4, max(map(len, rows)))
    for i, row in enumerate(rows):
        assert ids[i, : len(row)].tolist() == row and mask[i].sum() == len(row)
        assert (ids[i, len(row):] == tok.pad_id).all() and not mask[i, len(row):].any()
    ids, mask = tok.encode_batch(texts, max_length=6, padding="max_length", allowed_special="all")
    assert ids.shape == (4, 6)
    assert [ids[i][mask[i]].tolist() for i in range(4)] == [tok.encode(t, max_length=6) for t in texts]
    assert tok.encode_batch([])[0].shape == (0, 0)
    with pytest.raises(ValueError, match="different lengths"):
        tok.encode_batch(texts, padding=False)


# ------------------------------------------------------------------------------ persistence, training


VARIED = SAMPLES + [HELD_OUT[:3000], "<image> kept plain"]


def test_save_load_gives_identical_ids(tok, tmp_path):
    file = tok.save(tmp_path / "run")
    assert file == tmp_path / "run" / "tokenizer.json"
    for loaded in (Tokenizer.load(tmp_path / "run"), Tokenizer.load(file), load_tokenizer(file)):
        assert isinstance(loaded, Tokenizer)
        assert [loaded.encode(t) for t in VARIED] == [tok.encode(t) for t in VARIED]
        assert loaded.special_tokens == tok.special_tokens
    hf = tokenizers.Tokenizer.from_file(str(file))  # the ecosystem's reader accepts our file
    assert [hf.encode(t).ids for t in SAMPLES[:10]] == [tok.encode(t) for t in SAMPLES[:10]]
    clone = pickle.loads(pickle.dumps(tok))  # DataLoader workers: specials must stay plain text
    assert [clone.encode(t) for t in VARIED] == [tok.encode(t) for t in VARIED]


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        Tokenizer.load(tmp_path / "missing")
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": {')
    with pytest.raises(CheckpointError, match="not a valid tokenizer.json") as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)
    word = tokenizers.Tokenizer(tokenizers.models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]"))
    word.save(str(bad))
    with pytest.raises(CheckpointError, match="not an mmembed byte-level BPE tokenizer"):
        Tokenizer.load(bad)


def test_a_file_whose_pipeline_breaks_the_round_trip_is_refused(tok, tmp_path):
    """A lower-casing normalizer, a Whitespace pre-tokenizer or a prefix space loaded, and
    decode(encode("Hello  World")) came back "hello  world", "HelloWorld", " Hello  World"."""
    import json

    spec = json.loads(tok.to_hf().to_str())
    for change in ({"normalizer": {"type": "Lowercase"}}, {"pre_tokenizer": {"type": "Whitespace"}},
                   {"pre_tokenizer": {**spec["pre_tokenizer"], "add_prefix_space": True}}):
        path = tmp_path / "tokenizer.json"
        path.write_text(json.dumps({**spec, **change}))
        with pytest.raises(CheckpointError, match="not an mmembed byte-level BPE tokenizer"):
            Tokenizer.load(path)


def _edited(spec: dict, path: Path, edit) -> Path:
    changed = copy.deepcopy(spec)
    edit(changed)
    path.write_text(json.dumps(changed), encoding="utf-8")
    return path


def test_a_hand_edited_file_that_would_change_ids_or_text_is_refused(tok, tmp_path):
    """A truncation or padding in the file truncated every text to 3 ids and padded "a" to 40 ids
    that the mask counted as real: both are now turned off on load. Each other edit loaded before
    and then sampled other ids at every call (dropout), cut the last letter of
    every word (a word suffix), decoded an added "café" as "caf\ufffd", made user text "<image>"
    the image slot, or (half the merges gone) encoded into other ids that the run's embeddings
    then read; a continuing-subword prefix crashed inside the Rust library with a backtrace."""
    spec = json.loads(tok.to_hf().to_str())
    image = next(t for t in spec["added_tokens"] if t["content"] == "<image>")
    turned_off = {
        "truncation": lambda s: s.update(truncation={"direction": "Right", "max_length": 3, "strategy": "LongestFirst",
                                                     "stride": 0}),
        "padding": lambda s: s.update(padding={"strategy": {"Fixed": 40}, "direction": "Right", "pad_to_multiple_of": None,
                                               "pad_id": 2, "pad_type_id": 0, "pad_token": "<pad>"}),
    }
    for name, edit in turned_off.items():
        loaded = load_tokenizer(_edited(spec, tmp_path / f"{name}.json", edit))
        assert [loaded.encode(t) for t in VARIED] == [tok.encode(t) for t in VARIED]
        assert loaded.encode_batch(["a", "a red star"])[0].tolist() == tok.encode_batch(["a", "a red star"])[0].tolist()
    edits = {
        "model.dropout": lambda s: s["model"].update(dropout=0.9),
        "model.end_of_word_suffix": lambda s: s["model"].update(end_of_word_suffix="</w>"),
        "model.continuing_subword_prefix": lambda s: s["model"].update(continuing_subword_prefix="##"),
        "not a plain special token": lambda s: s["added_tokens"].append(
            {**image, "id": len(s["model"]["vocab"]), "content": "café", "special": False}),
        "'<image>' is not a plain special": lambda s: [t.update(special=False) for t in s["added_tokens"]
                                                       if t["content"] == "<image>"],
        "merges do not match": lambda s: s["model"].update(merges=s["model"]["merges"][: len(s["model"]["merges"]) // 2]),
    }
    for i, (message, edit) in enumerate(edits.items()):
        path = _edited(spec, tmp_path / f"{i}.json", edit)
        with pytest.raises(CheckpointError, match=re.escape(message)) as e:
            load_tokenizer(path)
        assert "\n" not in str(e.value)
    assert load_tokenizer(_edited(spec, tmp_path / "same.json", lambda s: None)).encode(HELD_OUT) == tok.encode(HELD_OUT)


def test_a_special_token_holding_whitespace_is_refused():
    """A truncation cuts at spaces, so it could cut "<my token>" in two."""
    with pytest.raises(UserError, match="must hold no whitespace"):
        Tokenizer.train(["a red star"] * 10, vocab_size=300, special_tokens=["<my token>"])


@pytest.mark.parametrize("options, message", [
    ({"special_tokens": "<sep>"}, r"special_tokens must be a list of strings, got '<sep>'; pass \['<sep>'\]"),
    ({"min_frequency": -1}, "min_frequency must be an integer >= 0"),
    ({"min_frequency": True}, "min_frequency must be an integer >= 0"),
    ({"min_frequency": 2**64}, "min_frequency must be an integer >= 0"),
    ({"special_tokens": {"<sep>"}}, r"special_tokens must be a list of strings \(in order: it numbers the tokens\), "
                                    r"got a set$"),
])
def test_train_refuses_a_string_of_specials_or_a_bad_min_frequency(options, message):
    """A str of specials was split into characters ("special token '<' could arise from plain text");
    min_frequency=-1 was a raw OverflowError from the Rust trainer."""
    with pytest.raises(UserError, match=message):
        Tokenizer.train(["hello world"] * 3, 300, **options)
    assert Tokenizer.train(["hello world"] * 3, 300, ["<sep>"], min_frequency=2).token_id("<sep>") == 7
    import numpy as np  # numpy's integers and a tuple of specials are taken, as before the check

    assert Tokenizer.train(["hello world"] * 3, 300, ("<sep>",), min_frequency=np.int64(2)).token_id("<sep>") == 7


def test_train_tokenizer_from_files(tmp_path):
    files = []
    for i, text in enumerate(TRAIN_TEXT[:6]):
        files.append(tmp_path / f"part{i}.txt")
        files[-1].write_text(text, encoding="utf-8")
    out = train_tokenizer(files, 600, tmp_path / "tok")
    tok = load_tokenizer(out)
    assert out.name == "tokenizer.json" and tok.vocab_size == 600
    assert tok.decode(tok.encode(TRAIN_TEXT[0])) == TRAIN_TEXT[0]
    with pytest.raises(UserError, match="nope.txt"):
        train_tokenizer([files[0], tmp_path / "nope.txt"], 600, tmp_path / "tok2")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match=r"the corpus is empty \(.*empty.txt;"):
        train_tokenizer([tmp_path / "empty.txt"], 600, tmp_path / "tok3")
    before = out.read_bytes()  # a tokenizer already there (a run's own) is kept unless told
    with pytest.raises(UserError, match="already exists .*--overwrite"):
        train_tokenizer(files, 300, tmp_path / "tok")
    assert out.read_bytes() == before
    assert load_tokenizer(train_tokenizer(files, 300, tmp_path / "tok", overwrite=True)).vocab_size == 300
    (tmp_path / "tok4" / "tokenizer.json").mkdir(parents=True)  # refused before training, not after it
    with pytest.raises(UserError, match="exists and is not a file"):
        train_tokenizer(files, 600, tmp_path / "tok4")
    (tmp_path / "tok" / "model.safetensors").write_bytes(b"")  # a trained run: a same-size tokenizer loaded
    with pytest.raises(UserError, match="is a training run's folder .*model.safetensors.*: its weights belong to its tokenizer.json"):
        train_tokenizer(files, 300, tmp_path / "tok", overwrite=True)
    with pytest.raises(UserError, match="vocab_size"):
        Tokenizer.train(["abc"], vocab_size=100)
    with pytest.raises(UserError, match="not one string"):
        Tokenizer.train("a corpus string", vocab_size=300)


def test_compression_on_held_out_english(tok):
    chars_per_token = len(HELD_OUT) / len(tok.encode(HELD_OUT))
    assert chars_per_token >= 3.2, f"held-out chars/token {chars_per_token:.2f} < 3.2"


def test_a_long_pre_token_is_cut_for_the_trainer():
    """The trainer's time grew with the square of a pre-token's length ('a' * 200,000 took 26 s, a
    million 11 min): training strings now hold no pre-token over 1,000 characters."""
    from mmembed.tokenizer_corpus import PRE_TOKENS, iter_corpus

    text = "x " + "a" * 5000 + " y" + " " * 2500 + "z"
    pieces = list(iter_corpus([text]))
    assert "".join(pieces) == text
    assert max(end - first for piece in pieces for _, (first, end) in PRE_TOKENS.pre_tokenize_str(piece)) <= 1000
    tok = Tokenizer.train(["a" * 200_000], vocab_size=300)
    assert tok.decode(tok.encode("a" * 3000)) == "a" * 3000 and len(tok.encode("a" * 3000)) < 300


def test_ordinary_text_trains_the_same_tokenizer_as_uncut(monkeypatch):
    """Cutting must leave ordinary text as it was (the demo's tokenizer, and every trained run's ids,
    would change otherwise) — long lines of short pre-tokens too: paragraphs of Chinese without
    spaces were cut every 1,000 characters, mid-word, and trained other merges."""
    import random

    import mmembed.tokenizer_corpus as module

    rng = random.Random(0)
    paragraphs = ["".join("".join(chr(0x4E00 + rng.randrange(300)) for _ in range(rng.randint(4, 20))) + "，"
                          for _ in range(rng.randint(100, 300))) for _ in range(60)]
    corpus = TRAIN_TEXT[:40] + paragraphs
    assert max(map(len, paragraphs)) > 2000
    cut = Tokenizer.train(corpus, vocab_size=1500).to_hf().to_str()
    monkeypatch.setattr(module, "cut_long_runs", lambda text: iter([text]))
    assert Tokenizer.train(corpus, vocab_size=1500).to_hf().to_str() == cut


def test_a_vocabulary_the_trainer_cannot_allocate_is_one_line(tmp_path):
    """vocab_size up to 2**31 - 1 was accepted, and 2,000,000,000 made the trainer allocate 141 GB
    and abort the process; a bad size left an empty --out folder behind."""
    from mmembed.tokenizer import MAX_VOCAB

    assert 262_144 <= MAX_VOCAB <= 2**24  # above every vocabulary in use, far below a u32
    corpus = tmp_path / "c.txt"
    corpus.write_text("a red star\n", encoding="utf-8")
    for size, message in ((MAX_VOCAB + 1, "is above"), (2_000_000_000, "is above"), (-5, "is below"),
                          (300.5, "must be an integer")):
        with pytest.raises(UserError, match=f"vocab_size.*{message}"):
            Tokenizer.train(["a red star"], vocab_size=size)
        with pytest.raises(UserError, match=f"vocab_size.*{message}"):
            train_tokenizer([corpus], size, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_a_whitespace_only_corpus_is_refused_as_an_empty_one(tmp_path):
    """A corpus of spaces, tabs and newlines 'trained' a tokenizer of no merges; an empty one was refused."""
    blank = tmp_path / "blank.txt"
    blank.write_text(" \t \n\n  \r\n", encoding="utf-8")
    with pytest.raises(UserError, match="the corpus is empty"):
        train_tokenizer([blank], 300, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "text.txt").write_text("a red star\n", encoding="utf-8")
    assert load_tokenizer(train_tokenizer([blank, tmp_path / "text.txt"], 300, tmp_path / "out")).vocab_size > 263


@pytest.mark.parametrize("special, text", [("Ã©", "café"), ("Ġ!", "wow !")])
def test_a_special_that_merges_make_from_plain_text_is_refused(special, text):
    """A special "Ã©" (the bytes of "é") was learnt as a merge: "café" encoded to the special's id
    and decoded as "cafÃ©"; the same for "Ġ!" and " !"."""
    with pytest.raises(UserError, match=f"special token {re.escape(repr(special))} is also the token of plain text"):
        Tokenizer.train([f"the {text} is here"] * 100, vocab_size=320, special_tokens=[special])
    tok = Tokenizer.train([f"the {text} is here"] * 100, vocab_size=320, special_tokens=["<my_token>"])
    assert tok.token_id("<my_token>") not in tok.encode(text) and tok.decode(tok.encode(text)) == text


def test_a_file_whose_special_is_a_plain_token_is_refused(tok, tmp_path):
    """A hand-edited file whose added special was "Ġthe" (a merge's result) or "!" (a byte) loaded,
    and " the" in user text became the special's id."""
    spec = json.loads(tok.to_hf().to_str())
    vocab = spec["model"]["vocab"]
    plain = {**next(t for t in spec["added_tokens"] if t["content"] == "<image>")}
    for i, content in enumerate(("Ġthe", "!")):
        path = _edited(spec, tmp_path / f"{i}.json",
                       lambda s: s["added_tokens"].append({**plain, "id": vocab[content], "content": content}))
        with pytest.raises(CheckpointError, match=f"special token {re.escape(repr(content))} is also the token"):
            load_tokenizer(path)


def test_a_deeply_nested_file_is_a_checkpoint_error(tmp_path):
    """JSON arrays nested 5,000 deep raised RecursionError with a traceback."""
    path = tmp_path / "tokenizer.json"
    path.write_text('{"model": ' + "[" * 5000 + "]" * 5000 + "}")
    for load in (Tokenizer.load, load_tokenizer):
        with pytest.raises(CheckpointError, match="not a valid tokenizer.json"):
            load(path)


# ------------------------------------------------------------------------------ CLIP


CLIP_TEXTS = ["a photo of a cat", "A  Dog!! running, FAST.", "naïve café 中文 👍🏽 &amp; e\u0301",
              "it's what they've done", "word " * 100, "", "  \n\t "]


@pytest.fixture(scope="module")
def clip():
    pytest.importorskip("open_clip")
    from open_clip.tokenizer import SimpleTokenizer

    from mmembed.clip_tokenizer import ClipTokenizer

    return ClipTokenizer(), SimpleTokenizer()


def test_clip_ids_equal_open_clip(clip):
    ours, ref = clip
    ids, mask = ours.encode_batch(CLIP_TEXTS, add_bos=True, add_eos=True, padding="max_length")
    assert torch.equal(ids, ref(CLIP_TEXTS))  # (B, 77), truncation keeps <end_of_text>
    assert mask.sum(1).tolist() == [min(77, len(ref.encode(t)) + 2) for t in CLIP_TEXTS]
    for t in CLIP_TEXTS:
        assert ours.encode(t) == ref.encode(t)
        assert ours.decode(ours.encode(t)) == ref.decode(ref.encode(t))  # cleaned, not exact
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.vocab_size) == (49406, 49407, 0, 49408)


def test_clip_special_text_and_bounds(clip):
    ours, ref = clip
    text = "before <end_of_text> after"
    assert ours.eos_id not in ours.encode(text)
    assert ours.encode(text, allowed_special="all") == ref.encode(text)  # open_clip always matches
    # punctuation right before a special is one run of it in open_clip's split, and a special in
    # another case is one ordinary word: ours split on the special first
    for tricky in ("a dog.<end_of_text>", "(<start_of_text>", "x!\"&()-./:;<end_of_text> y"):
        assert ours.encode(tricky, allowed_special="all") == ref.encode(tricky), tricky
    from open_clip.tokenizer import SimpleTokenizer

    from mmembed.clip_tokenizer import ClipTokenizer

    cased = "a <END_OF_TEXT> b <end_of_text>"  # case kept by this cleaning: only the exact spelling is special
    assert (ClipTokenizer(clean="whitespace").encode(cased, allowed_special="all")
            == SimpleTokenizer(clean="whitespace").encode(cased))
    assert ours.token_id("<bos>") == ours.bos_id
    assert len(ours.encode("word " * 200_000, max_length=77)) == 77
    assert len(ours.encode("a" * 1_000_000, max_length=77)) == 77
    long = " ".join(CLIP_TEXTS * 40)
    assert ours.encode(long, max_length=50) == ref.encode(long)[:50]
    with pytest.raises(BadInput, match="surrogate"):
        ours.encode("bad \udc80")


def test_clip_cleans_the_whole_caption_before_cutting_it(clip):
    """ftfy's cleaning is not local (HTML is unescaped only when the whole text holds no '<';
    mojibake is repaired across a space): cleaning the cut prefix gave other ids than open_clip."""
    from mmembed.preprocess.text import TextPreprocessor

    ours, ref = clip
    for text, n in (("&amp;amp;lt;3 " + "word " * 30 + "a<b", 5), (" " * 45 + "voil\u00c3\u00a0 " + "z" * 100, 5)):
        expected = ref([text], context_length=n)[0].tolist()
        assert ours.encode(text, add_bos=True, add_eos=True, max_length=n) == expected, text[:20]
        assert TextPreprocessor(ours, max_length=n)(text).tolist() == expected, text[:20]


def test_clip_save_load(clip, tmp_path):
    from mmembed.clip_tokenizer import ClipTokenizer

    ours, _ = clip
    small = ClipTokenizer(context_length=16)
    file = small.save(tmp_path)
    assert json.loads(file.read_text())["kind"] == "clip"
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, ClipTokenizer) and loaded.context_length == 16
    assert loaded.encode_batch(CLIP_TEXTS)[0].shape[1] == 16
    assert [loaded.encode(t) for t in CLIP_TEXTS] == [ours.encode(t) for t in CLIP_TEXTS]
    assert isinstance(load_tokenizer("clip"), ClipTokenizer)
    assert pickle.loads(pickle.dumps(small)).encode(CLIP_TEXTS[1]) == ours.encode(CLIP_TEXTS[1])
    with pytest.raises(CheckpointError, match="load_tokenizer"):
        Tokenizer.load(file)
    file.write_text('{"kind": "clip", "context_length": "big"}')
    with pytest.raises(CheckpointError, match="context_length"):
        load_tokenizer(file)


def test_clip_a_deeply_nested_marker_is_a_checkpoint_error(tmp_path):
    """JSON arrays nested 5,000 deep raised RecursionError with a traceback."""
    pytest.importorskip("open_clip")
    from mmembed.clip_tokenizer import ClipTokenizer

    path = tmp_path / "tokenizer.json"
    path.write_text('{"kind": "clip", "x": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(CheckpointError, match="unreadable CLIP tokenizer marker"):
        ClipTokenizer.load(path)


def test_a_folder_given_as_a_corpus_file_is_called_a_folder(tmp_path):
    """`tokenizer train --corpus DIR` said "corpus file not found: DIR" of a folder that is there."""
    from mmembed.tokenizer_corpus import iter_corpus

    said = f"corpus file {re.escape(str(tmp_path))} is a folder, not a file"
    with pytest.raises(UserError, match=said):
        train_tokenizer([tmp_path], vocab_size=300, out_dir=tmp_path / "tok")
    with pytest.raises(UserError, match=said):
        Tokenizer.train([tmp_path], vocab_size=300)
    with pytest.raises(UserError, match=said):
        list(iter_corpus([tmp_path]))
    with pytest.raises(UserError, match="corpus file not found"):
        train_tokenizer([tmp_path / "none.txt"], vocab_size=300, out_dir=tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


def test_a_prefix_cut_before_a_separator_control_or_inside_a_run_keeps_the_full_texts_ids():
    """`encode(text, max_length=b)` gave other ids than `encode(text)[:b]`: Python's isspace counts
    U+001C..U+001F as blanks, which GPT-2's regex takes for punctuation, so a cut before one was
    called a word boundary; and a run's prefix with more than twice the budget was taken as it was,
    though a merge at its cut changed the run's ids from its second one."""
    from mmembed.text_encoding import at_word_boundary

    assert not at_word_boundary("a!\x1c", 2) and at_word_boundary("a! b", 2) and not at_word_boundary("a  b", 2)
    for corpus, text in ((["x" + "!\x1c" * 200] * 50, "x" + "!\x1c" * 500),
                         (["x" + "!?" * 200] * 50, "x" + "!?" * 2000), (["x" + "!?" * 200] * 50, "x" + "!?" * 2000 + " b")):
        tok = Tokenizer.train(corpus, vocab_size=300)
        full = tok.encode(text)
        for budget in range(1, 24):
            assert tok.encode(text, max_length=budget) == full[:budget], (text[:4], budget)
            ids, mask = tok.encode_batch([text, "a b"], max_length=budget)
            assert ids[0][mask[0]].tolist() == full[:budget], (text[:4], budget)
