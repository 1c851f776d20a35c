"""Query tower: recall episodes from the world, training lifts recall of the asked item, the space is
untouched, save → load equality, and every bad input is one clear error."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

import mmembed as mm
from mmembed.cli import main
from mmembed.config import ModelConfig, from_dict
from mmembed.data.episodes import parse_episodes, read_episodes
from mmembed.data.synth.episodes import recall_episodes, world_episodes
from mmembed.errors import CheckpointError, UserError
from mmembed.model import build_model
from mmembed.train.queries import QUERY_INFO, QUERY_WEIGHTS, asked_ranks, item_vectors, recall_at, train_query_tower
from tests.conftest import TINY_MODEL
from tests.conftest import tiny_model


def rows_of(world, split="train"):
    return [json.loads(line) for line in (world / f"{split}.jsonl").read_text().splitlines()]


def test_world_episodes_ask_about_one_shown_object_each(tiny_world):
    rows = rows_of(tiny_world)
    episodes = recall_episodes(rows, size=8, n=6, seed=3)
    by_path = {r[m]: r for r in rows for m in ("image", "audio")}
    asked = 0
    for ep in episodes:
        scenes = [by_path[next(iter(item.values()))] for item in ep["items"]]
        assert len({s["id"] for s in scenes}) == 8  # distinct scenes, one medium each
        for q in ep["questions"]:
            objects = scenes[q["item"]]["objects"]
            assert any(q["answer"] in (o["colour"], o["shape"]) for o in objects)
            assert q["answer"] not in set(re.findall(r"[a-z]+", q["text"].lower()))  # named by other attributes
            asked += 1
    assert asked > 0
    assert recall_episodes(rows, size=8, n=6, seed=3) == episodes  # seeded
    parsed = world_episodes(tiny_world, "train", size=8, n=6, seed=3)
    assert all(path.startswith(str(tiny_world)) for ep in parsed for _, path in ep.items)


def test_world_episodes_from_a_small_or_hand_edited_manifest(tiny_world, tmp_path):
    """One scene gave a ValueError traceback ("an episode needs 2 to 1 scenes"), a byte-order mark
    a JSONDecodeError, a row without objects a KeyError."""
    rows = (tiny_world / "val.jsonl").read_text(encoding="utf-8").splitlines()
    (tmp_path / "val.jsonl").write_text(rows[0] + "\n")
    with pytest.raises(UserError, match=r"holds 1 scene\(s\) with their objects; a recall episode needs 2"):
        world_episodes(tmp_path, "val", size=8, n=2)
    edited = [json.dumps({k: v for k, v in json.loads(rows[0]).items() if k != "objects"}), *rows]
    (tmp_path / "val.jsonl").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(edited).encode())
    assert len(world_episodes(tmp_path, "val", size=2, n=3)) == 3
    first = json.loads(rows[0])  # an object without its colour, or of a colour the world has not: a KeyError
    for bad in ({k: v for k, v in first["objects"][0].items() if k != "colour"}, {**first["objects"][0], "colour": "teal"}):
        edited = [json.dumps({**first, "objects": [bad]}), *rows[1:]]
        (tmp_path / "val.jsonl").write_text("\n".join(edited) + "\n")
        assert len(world_episodes(tmp_path, "val", size=100, n=3)) == 3  # every scene in each: the bad one too


def test_bad_episodes_are_one_clear_error(tmp_path):
    good = {"items": [{"image": "a.png"}, {"audio": "b.wav"}], "questions": [{"text": "the red one?", "item": 1}]}
    with pytest.raises(UserError, match="record 2 is not an episode"):
        parse_episodes([good, {"items": [{"image": "a.png"}]}])
    with pytest.raises(UserError, match="record 1 asks about an item it does not have"):
        parse_episodes([{**good, "questions": [{"text": "?", "item": 2}]}])
    with pytest.raises(UserError, match="no episode with two or more items"):
        parse_episodes([{"items": [{"image": "a.png"}], "questions": [{"text": "?", "item": 0}]}])
    # each was read as something else (1.7 and true as item 1, None as the question "None") or,
    # Infinity, stopped the run with an OverflowError traceback
    for question, message in (({"text": "?", "item": 1.7}, "item must be an integer index"),
                              ({"text": "?", "item": True}, "item must be an integer index"),
                              ({"text": "?", "item": float("inf")}, "item must be an integer index"),
                              ({"text": None, "item": 0}, "text must be a non-empty string"),
                              ({"text": " ", "item": 0}, "text must be a non-empty string")):
        with pytest.raises(UserError, match=f"record 1: a question's {message}"):
            parse_episodes([{**good, "questions": [question]}])
    with pytest.raises(UserError, match="record 1: an item's image must be a non-empty string"):
        parse_episodes([{**good, "items": [{"image": 5}, {"audio": "b.wav"}]}])
    # a lone surrogate failed later, inside the tokenizer, naming neither the file nor the line
    with pytest.raises(UserError, match=r"record 1: a question's text is not valid Unicode \(lone surrogate U\+DFFF"):
        parse_episodes([{**good, "questions": [{"text": "\udfff", "item": 0}]}])
    with pytest.raises(UserError, match="record 1: an item's text is not valid Unicode"):
        parse_episodes([{**good, "items": [{"text": "a \ud800 cat"}, {"audio": "b.wav"}]}])
    path = tmp_path / "episodes.jsonl"
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(UserError, match="episodes.jsonl:2: invalid JSON"):
        read_episodes(path)
    with pytest.raises(UserError, match="not found"):
        read_episodes(tmp_path / "missing.jsonl")
    path.write_text(json.dumps(good) + "\n")
    (ep,) = read_episodes(path)
    assert ep.items[0] == (mm.Modality.IMAGE, str(tmp_path / "a.png")) and ep.questions == (("the red one?", 1),)


def test_episodes_are_read_as_manifests_are(tmp_path):
    """Media paths kept the data-root rule out (an absolute or ../ path was read anywhere), a
    byte-order mark or a caption holding U+2028 was "not JSON", and errors named a record, not a line."""
    good = {"items": [{"image": "a.png"}, {"text": "a red star\u2028on the left"}],
            "questions": [{"text": "the star?", "item": 0}]}
    path = tmp_path / "episodes.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(good, ensure_ascii=False) + "\n").encode())
    (ep,) = read_episodes(path)
    assert ep.items[1] == (mm.Modality.TEXT, "a red star\u2028on the left")
    for escaping in ("../../etc/passwd", "/etc/shadow"):
        bad = {**good, "items": [{"image": escaping}, {"audio": "b.wav"}]}
        path.write_text("\n\n" + json.dumps(bad) + "\n")
        with pytest.raises(UserError, match=r"episodes.jsonl:3: .*(escapes the data root|absolute path)"):
            read_episodes(path)
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "questions": [{"text": "?", "item": 5}]}) + "\n")
    with pytest.raises(UserError, match="episodes.jsonl:3 asks about an item it does not have"):
        read_episodes(path)


def test_without_a_query_tower_questions_are_embedded_by_the_text_tower():
    model = tiny_model(0)
    texts = ["What colour was the star?", "a small blue star"]
    assert model.query_tower is None
    assert torch.equal(model.embed_query(texts), model.embed("text", texts))


def test_training_lifts_recall_leaves_the_space_alone_and_round_trips(tiny_world, tmp_path):
    model = tiny_model(0)
    model.config.data.root = str(tiny_world)
    space_before = copy.deepcopy(model.space.state_dict())
    episodes = world_episodes(tiny_world, "train", size=8, n=40, seed=0)
    report = train_query_tower(model, episodes, episodes, steps=400, episodes_per_step=4, lr=3e-3, seed=0)
    # trained and scored on the same episodes: the tower must at least fit them
    assert report.after["recall@1"] >= report.before["recall@1"] + 0.25, report
    assert report.after["recall@3"] >= report.after["recall@1"]
    ranks, _ = asked_ranks(model.embed_query, episodes, item_vectors(model, episodes))
    assert recall_at(ranks) == report.after  # the report is what the saved tower gives
    assert all(torch.equal(v, space_before[k]) for k, v in model.space.state_dict().items())  # space frozen
    assert report.threshold == model.query_threshold and -1 <= report.threshold <= 1

    model.save(tmp_path / "run")
    loaded = mm.load(tmp_path / "run")
    texts = ["What colour was the large star?", "Recall the circle. What shape was it?"]
    assert torch.allclose(loaded.embed_query(texts), model.embed_query(texts), atol=1e-6)
    assert not torch.allclose(loaded.embed_query(texts), loaded.embed("text", texts), atol=1e-3)
    assert loaded.query_threshold == pytest.approx(model.query_threshold)


def test_a_frozen_text_tower_still_gives_a_trainable_query_tower(tiny_world):
    """A bound run (ImageBind recipe) freezes its text tower; the query tower is a copy that trains
    (it used to fail: "element 0 of tensors does not require grad"), and the text tower stays frozen."""
    model = tiny_model(0)
    model.config.data.root = str(tiny_world)
    text = model.space.towers["text"].requires_grad_(False)
    episodes = world_episodes(tiny_world, "train", size=8, n=8, seed=0)
    train_query_tower(model, episodes, episodes, steps=2, episodes_per_step=1, seed=0)
    assert not any(p.requires_grad for p in text.parameters())
    assert not torch.allclose(model.embed_query(["What colour was the star?"]),
                              model.embed("text", ["What colour was the star?"]), atol=1e-6)


def test_a_model_without_text_tower_has_no_query_tower():
    cfg = mm.load_config("demo")
    cfg.model = from_dict(ModelConfig, {**TINY_MODEL, "towers": {k: v for k, v in TINY_MODEL["towers"].items()
                                                                 if k != "text"}}, "model", "test")
    model = build_model(cfg, None)
    with pytest.raises(UserError, match="no text tower"):
        model.embed_query(["a question"])
    with pytest.raises(UserError, match="text tower"):
        train_query_tower(model, [], [], steps=1)


def test_cli_trains_on_the_runs_world_and_reports_recall(tiny_world, tmp_path, capsys):
    model = tiny_model(0)
    model.config.data.root = str(tiny_world)
    model.save(tmp_path / "run")
    assert main(["train-queries", str(tmp_path / "run"), "--steps", "3", "--episode-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "query tower: 3 steps" in out and "validation questions" in out
    assert (tmp_path / "run" / QUERY_WEIGHTS).is_file()
    assert mm.load(tmp_path / "run").query_tower is not None
    before = (tmp_path / "run" / QUERY_WEIGHTS).read_bytes()
    # a second run replaced the trained tower without a word ("is added", said the help)
    assert main(["train-queries", str(tmp_path / "run"), "--steps", "3", "--episode-size", "8"]) == 2
    assert "already exists: pass --overwrite" in capsys.readouterr().err
    assert main(["train-queries", str(tmp_path / "run"), "--seed", str(2**32)]) == 2  # was numpy's traceback
    assert "--seed in [0, 4294967294]" in capsys.readouterr().err
    assert (tmp_path / "run" / QUERY_WEIGHTS).read_bytes() == before
    again = ["train-queries", str(tmp_path / "run"), "--overwrite"]
    assert main([*again, "--episodes", str(tmp_path / "none.jsonl")]) == 2
    assert "episodes file not found" in capsys.readouterr().err
    assert main([*again, "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "--steps must be >= 1" in err and len(err.strip().splitlines()) == 1
    for lr in ("inf", "1e6"):  # inf, or a rate that diverges: NaN weights were saved over the good tower
        assert main([*again, "--steps", "3", "--episode-size", "8", "--lr", lr]) == 2
        err = capsys.readouterr().err
        named = "lr must be > 0 and finite, got inf" in err or "diverged" in err  # not episodes_per_step
        assert named and "episodes_per_step" not in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "run" / QUERY_WEIGHTS).read_bytes() == before
    # one episode: nothing left to validate on but the training episode itself (it validated on it)
    one = {"items": [{"image": "a.png"}, {"audio": "b.wav"}], "questions": [{"text": "the red one?", "item": 1}]}
    (tmp_path / "one.jsonl").write_text(json.dumps(one) + "\n")
    assert main([*again, "--episodes", str(tmp_path / "one.jsonl")]) == 2
    assert "1 episode(s): give at least 2" in capsys.readouterr().err


def test_a_query_tower_of_another_space_is_refused(tmp_path):
    model = tiny_model(0)
    model.query_tower, model.query_threshold = copy.deepcopy(model.space.towers["text"]), 0.1
    model.save(tmp_path / "run")
    assert mm.load(tmp_path / "run").query_threshold == pytest.approx(0.1)
    tiny_model(1).save(tmp_path / "other")  # another space written over the run: the tower is stale
    (tmp_path / "other" / QUERY_WEIGHTS).write_bytes((tmp_path / "run" / QUERY_WEIGHTS).read_bytes())
    (tmp_path / "other" / QUERY_INFO).write_bytes((tmp_path / "run" / QUERY_INFO).read_bytes())
    with pytest.raises(CheckpointError, match="trained for another space.*train-queries"):
        mm.load(tmp_path / "other")
    for broken in (b"", b"{trunc", b"\xff\xfe", b"[1, 2]"):  # were raw JSONDecodeError / UnicodeDecodeError
        (tmp_path / "run" / QUERY_INFO).write_bytes(broken)
        with pytest.raises(CheckpointError):
            mm.load(tmp_path / "run")
    # a threshold of "0.06" crashed recall at the second turn, NaN recalled every item; without its
    # record (a kill between the two writes) the tower loaded unchecked against the space
    fingerprint = tiny_model(0).fingerprint
    for threshold in ('"0.06"', "[0.1]", "NaN"):
        (tmp_path / "run" / QUERY_INFO).write_text(f'{{"fingerprint": "{fingerprint}", "threshold": {threshold}}}')
        with pytest.raises(CheckpointError, match="threshold must be a finite number"):
            mm.load(tmp_path / "run")
    (tmp_path / "run" / QUERY_INFO).write_text(f'{{"fingerprint": "{fingerprint}", "threshold": 1{"0" * 400}}}')
    assert mm.load(tmp_path / "run").query_threshold == 10**400  # finite, if unreachable (an OverflowError before)
    (tmp_path / "run" / QUERY_INFO).unlink()
    with pytest.raises(CheckpointError, match="has no query_tower.json"):
        mm.load(tmp_path / "run")


def test_a_query_tower_holding_nan_is_refused_at_load_naming_its_file(tmp_path):
    """It loaded, and every worded turn of a Session then failed with "query vector: row 0 contains NaN"."""
    from mmembed.checkpoint import load_tensors, save_tensors

    model = tiny_model(0)
    model.query_tower, model.query_threshold = copy.deepcopy(model.space.towers["text"]), 0.1
    model.save(tmp_path / "run")
    state = load_tensors(tmp_path / "run" / QUERY_WEIGHTS)
    name = sorted(k for k, v in state.items() if v.is_floating_point())[0]
    state[name].view(-1)[0] = float("nan")
    save_tensors(tmp_path / "run" / QUERY_WEIGHTS, state)
    with pytest.raises(CheckpointError, match=rf"{QUERY_WEIGHTS}: {re.escape(name)} holds .*train-queries"):
        mm.load(tmp_path / "run")


def test_a_tower_saved_over_another_is_never_paired_with_the_old_record(tmp_path, monkeypatch):
    """A kill between the new weights and the new record left the new tower beside the old
    tower's threshold, and it loaded without a word."""
    import mmembed.train.queries as queries

    model = tiny_model(0)
    model.query_tower, model.query_threshold = copy.deepcopy(model.space.towers["text"]), 0.1
    model.save(tmp_path / "run")

    def killed(path, tensors, metadata=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(queries, "save_tensors", killed)
    with pytest.raises(KeyboardInterrupt):
        queries.save_query_tower(model, tmp_path / "run", None)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="has no query_tower.json"):
        mm.load(tmp_path / "run")


def test_cli_episodes_are_read_with_the_runs_allow_outside_root(tiny_world, tmp_path, capsys):
    """Its refusal said "set allow_outside_root to accept it", and the run's data.allow_outside_root,
    which eval and index read, was ignored: nothing could accept the file."""
    images, sounds = sorted((tiny_world / "images").iterdir()), sorted((tiny_world / "audio").iterdir())
    episodes = [{"items": [{"image": str(images[i])}, {"audio": str(sounds[i + 1])}],
                 "questions": [{"text": "the picture?", "item": 0}]} for i in range(4)]
    (tmp_path / "eps.jsonl").write_text("".join(json.dumps(e) + "\n" for e in episodes))
    model = tiny_model(0)
    model.save(tmp_path / "run")
    command = ["train-queries", str(tmp_path / "run"), "--episodes", str(tmp_path / "eps.jsonl"), "--steps", "2"]
    assert main(command) == 2
    assert "absolute path" in capsys.readouterr().err
    model.config.data.allow_outside_root = True
    model.save(tmp_path / "run2")
    assert main([*command[:1], str(tmp_path / "run2"), *command[2:]]) == 0
    assert "query tower: 2 steps" in capsys.readouterr().out


def test_a_relative_data_root_read_from_another_folder_says_so(tmp_path, capsys, monkeypatch):
    """From another folder the run's relative data.root gave "data/shapes/train.jsonl not found", naming
    neither the run's data.root nor --episodes."""
    model = tiny_model(0)
    model.config.data.root = "data/shapes"
    model.save(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    assert main(["train-queries", str(tmp_path / "run"), "--steps", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"mmembed: error: the run's data.root data/shapes is relative to the folder it was trained in, "
                   f"and {tmp_path} holds no data/shapes/train.jsonl: run this from that folder, or give --episodes")
