"""What a loaded `tokenizer.json` may hold (tokenizer_file.py), and which folders
`train_tokenizer` never writes a new tokenizer into."""

from __future__ import annotations

import json
import re
import resource
from pathlib import Path

import pytest

from mmembed.errors import CheckpointError, UserError
from mmembed.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from mmembed.tokenizer_file import check_tokenizer_json

CORPUS = ["a red star and a blue triangle beside a green circle"] * 50
TEXTS = ["a red star", "", "  blue  triangles\n", "<bos> typed text", "naïve café 👍🏽", "circle " * 40]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(CORPUS, vocab_size=300)


def _write(spec: dict, path: Path) -> Path:
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


@pytest.mark.parametrize("where", ["vocab", "added"])
@pytest.mark.parametrize("bad", [10**8, 2**32 - 2, -1, 1.5, True, "7"])
def test_an_id_out_of_range_is_refused_before_anything_is_sized_by_it(tok, tmp_path, where, bad):
    """One vocab id of 10**8 took 14 s and 1.3 GB to load, then failed as "ids are not contiguous";
    2**32 - 2 grew the process to 20 GB until it was killed."""
    spec = json.loads(tok.to_hf().to_str())
    if where == "vocab":
        assert "Ġred" in spec["model"]["vocab"]
        spec["model"]["vocab"]["Ġred"] = bad
        token = "Ġred"
    else:
        spec["added_tokens"][3]["id"] = bad
        token = spec["added_tokens"][3]["content"]
    path = _write(spec, tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match=re.escape(f"its token {token!r} has id {bad!r}")):
        check_tokenizer_json(spec)  # the file check, before the Rust library reads the file
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(CheckpointError, match=re.escape(f"its token {token!r} has id {bad!r}")) as e:
        load_tokenizer(path)
    assert "\n" not in str(e.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 200_000  # nothing sized by the id


def test_the_id_range_counts_a_special_once(tok):
    """Specials are in both model.vocab and added_tokens: the message said "0 to 306" of a
    300-token file, and ids up to 306 passed the check."""
    spec = json.loads(tok.to_hf().to_str())
    size = tok.vocab_size
    assert all(t["content"] in spec["model"]["vocab"] for t in spec["added_tokens"])
    spec["model"]["vocab"]["Ġred"] = size
    with pytest.raises(ValueError, match=rf"has id {size}; ids are integers from 0 to {size - 1}, one per token"):
        check_tokenizer_json(spec)


def test_a_special_holding_whitespace_is_refused_on_load(tok, tmp_path):
    """A file whose special was "<big star>" loaded, and a max_length truncation (which cuts at
    spaces) split it: the cut text's ids were not the full encoding's first ids."""
    spec = json.loads(tok.to_hf().to_str())
    for i, content in enumerate(("<big star>", "<big\tstar>", "<big\u00a0star>")):
        changed = json.loads(json.dumps(spec))
        changed["added_tokens"].append({**spec["added_tokens"][3], "id": len(spec["model"]["vocab"]),
                                        "content": content})
        with pytest.raises(CheckpointError, match=re.escape(f"special token {content!r} holds whitespace")) as e:
            load_tokenizer(_write(changed, tmp_path / f"{i}.json"))
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="must hold no whitespace"):  # the same rule as in training
        Tokenizer.train(CORPUS, vocab_size=300, special_tokens=["<big\u00a0star>"])


def test_a_tokenizer_resaved_by_transformers_loads_with_the_same_ids(tok, tmp_path):
    """transformers' save_pretrained writes a post_processor (and the truncation and padding of its
    last call), and such a file was refused: "it sets post_processor, which an mmembed tokenizer
    leaves off"."""
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.to_hf(), bos_token="<bos>",
                                                eos_token="<eos>", pad_token="<pad>")
    fast(["a red star", "a"], truncation=True, max_length=2, padding="max_length")  # saved with the file
    fast.save_pretrained(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert spec["post_processor"] and spec["truncation"] and spec["padding"]
    loaded = load_tokenizer(tmp_path)
    assert [loaded.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]
    ids, mask = loaded.encode_batch(TEXTS)
    want, want_mask = tok.encode_batch(TEXTS)
    assert ids.tolist() == want.tolist() and mask.tolist() == want_mask.tolist()
    again = Tokenizer.load(loaded.save(tmp_path / "again"))  # saved without truncation or padding
    assert [again.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]


def _run_folder(root: Path, tok: Tokenizer, mark: str) -> Path:
    """A run's folder as training leaves it before its weights: config, tokenizer and `mark`."""
    root.mkdir()
    (root / "config.yaml").write_text("seed: 0\n", encoding="utf-8")
    tok.save(root)
    if mark == "checkpoint":
        ckpt = root / "checkpoints" / "step_0000588"
        ckpt.mkdir(parents=True)
        for name in ("model.safetensors", "trainer.safetensors", "trainer.json"):
            (ckpt / name).write_bytes(b"")
    else:
        (root / mark).write_text("123\n", encoding="utf-8")
    return root


@pytest.mark.parametrize("mark, why", [("checkpoint", "checkpoints/step_0000588"), (".lock", "a trainer has used it"),
                                       (".unstarted", "a run is starting in it")])
def test_overwrite_never_replaces_the_tokenizer_of_a_run_before_its_weights(tok, tmp_path, mark, why):
    """`tokenizer train --overwrite` replaced the tokenizer of an interrupted or running run (only
    model.safetensors, written when training ends, was checked): --resume then read the old
    weights through the new tokenizer."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("a red star\n" * 20, encoding="utf-8")
    run = _run_folder(tmp_path / "run", tok, mark)
    before = (run / "tokenizer.json").read_bytes()
    with pytest.raises(UserError, match=f"is a training run's folder \\(.*{re.escape(why)}.*\\): its weights belong"):
        train_tokenizer([corpus], 280, run, overwrite=True)
    assert (run / "tokenizer.json").read_bytes() == before
    assert load_tokenizer(train_tokenizer([corpus], 280, tmp_path / "other")).vocab_size <= 280


@pytest.mark.parametrize("edit", ["reverse", "swap"])
def test_a_file_with_its_merges_reordered_is_refused(tok, tmp_path, edit):
    """Merges were compared as a set: a file with them reordered loaded and encoded into other ids."""
    spec = json.loads(tok._hf.to_str())
    merges = spec["model"]["merges"]
    if edit == "reverse":
        merges.reverse()
    else:
        merges[3], merges[4] = merges[4], merges[3]
    with pytest.raises(CheckpointError, match="its merges are out of order: merge"):
        Tokenizer.load(_write(spec, tmp_path / "tokenizer.json"))


@pytest.mark.parametrize("vocab_size", [270, 300, 600])
@pytest.mark.parametrize("specials", [None, ["<sep>", "<cls>"]])
def test_trained_tokenizers_load_with_the_same_ids(tmp_path, vocab_size, specials):
    corpus = [*CORPUS, "naïve café 👍🏽 日本語 " * 3, "x y z " * 10]
    trained = Tokenizer.train(corpus, vocab_size, specials)
    loaded = Tokenizer.load(trained.save(tmp_path))
    assert [loaded.encode(t) for t in TEXTS] == [trained.encode(t) for t in TEXTS]


def _trained_then(monkeypatch, meanwhile):
    """Tokenizer.train that calls `meanwhile()` once it has trained: what another process did then."""
    real = Tokenizer.train.__func__

    def train(cls, *args, **kwargs):
        tok = real(cls, *args, **kwargs)
        meanwhile()
        return tok
    monkeypatch.setattr(Tokenizer, "train", classmethod(train))


@pytest.mark.parametrize("left", ["weights", "checkpoint"])
def test_a_run_made_in_the_folder_while_the_tokenizer_trained_keeps_its_tokenizer(tok, tmp_path, monkeypatch, left):
    """The folder was checked only before training: a run trained there meanwhile had its tokenizer.json
    replaced, and loaded without a word with another tokenizer's ids."""
    corpus, out = tmp_path / "c.txt", tmp_path / "out"
    corpus.write_text("a red star\n" * 20, encoding="utf-8")

    def run_trains_there():  # finished (its weights and the .lock its trainer held), or stopped
        tok.save(out)
        names = ("model.safetensors", ".lock") if left == "weights" else ("checkpoints/step_0000004/trainer.json",
                                                                         "checkpoints/step_0000004/model.safetensors",
                                                                         "checkpoints/step_0000004/trainer.safetensors")
        for name in names:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(b"")
    _trained_then(monkeypatch, run_trains_there)
    with pytest.raises(UserError, match=r"out is a training run's folder \(.*\): its weights belong"):
        train_tokenizer([corpus], 280, out, overwrite=True)
    assert (out / "tokenizer.json").read_bytes() == tok.save(tmp_path / "own.json").read_bytes()


@pytest.mark.parametrize("when", ["while it trained", "while it saved"])
def test_a_tokenizer_another_process_wrote_meanwhile_is_kept_without_overwrite(tok, tmp_path, monkeypatch, when):
    """Two `tokenizer train --out D` at once both said "wrote D/tokenizer.json": the second replaced the first."""
    corpus, out = tmp_path / "c.txt", tmp_path / "out"
    corpus.write_text("a red star\n" * 20, encoding="utf-8")
    theirs = tok.save(tmp_path / "theirs.json").read_bytes()
    if when == "while it trained":
        _trained_then(monkeypatch, lambda: (out / "tokenizer.json").write_bytes(theirs))
    else:  # after the check under the lock, before the file lands: only an exclusive link keeps theirs
        real_save = Tokenizer.save

        def save(self, path):
            written = real_save(self, path)
            (out / "tokenizer.json").write_bytes(theirs)
            return written
        monkeypatch.setattr(Tokenizer, "save", save)
    with pytest.raises(UserError, match=r"out/tokenizer\.json already exists .*pass --overwrite"):
        train_tokenizer([corpus], 280, out)
    assert (out / "tokenizer.json").read_bytes() == theirs
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json"]  # no temporary file, no .lock


def test_writing_a_tokenizer_takes_no_lock_a_killed_save_could_leave(tmp_path, monkeypatch):
    """Its save held the folder's .lock: killed then, the .lock stayed and every later tokenizer (and a
    second one saving at the same time) was told the folder was a training run's."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("a red star\n" * 20, encoding="utf-8")
    seen, real_save = [], Tokenizer.save

    def save(self, path):
        seen.append(sorted(p.name for p in Path(path).parent.iterdir()))
        return real_save(self, path)
    monkeypatch.setattr(Tokenizer, "save", save)
    for overwrite in (False, True, True):
        train_tokenizer([corpus], 280, tmp_path / "out", overwrite=overwrite)
    assert seen and not any(".lock" in names for names in seen)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tokenizer.json"]


def test_a_dangling_tokenizer_link_is_refused_or_replaced(tmp_path):
    """A dangling tokenizer.json link passed the exists() check and the exclusive link raised FileExistsError."""
    corpus, out = tmp_path / "c.txt", tmp_path / "out"
    corpus.write_text("a red star\n" * 20, encoding="utf-8")
    out.mkdir()
    (out / "tokenizer.json").symlink_to(tmp_path / "gone.json")
    with pytest.raises(UserError, match=r"out/tokenizer\.json already exists .*pass --overwrite"):
        train_tokenizer([corpus], 280, out)
    train_tokenizer([corpus], 280, out, overwrite=True)
    assert (out / "tokenizer.json").is_file() and not (out / "tokenizer.json").is_symlink()


def test_the_lock_taken_to_write_a_tokenizer_leaves_no_trace(tmp_path):
    """Its .lock, left behind, would mark the folder as a training run's: the next --overwrite refused."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("a red star\n" * 20, encoding="utf-8")
    for overwrite in (False, True, True):
        train_tokenizer([corpus], 280, tmp_path / "out", overwrite=overwrite)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tokenizer.json"]
