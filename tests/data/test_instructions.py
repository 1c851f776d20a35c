"""Instruction manifests of the synthetic world: files, determinism, prompts that point at the
right media, answers recomputed here from the objects (not by re-running the generator),
templates that never give the answer away, and scoring."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mmembed.data.instructions import InstructionRow
from mmembed.data.synth import (TASK_GROUPS, TASKS, generate_world, mentions, parse_caption, score, task_group,
                                 write_lookup_rows)
from mmembed.data.synth.dialogues import ASK, SHOW, TELL
from mmembed.data.synth.generate import manifest_row
from mmembed.data.synth.instructions import (LOOKUP_TASKS, MEMORY_ROWS, SHOWN_DESCRIBED,
                                             instruction_rows)
from mmembed.data.synth.phrasings import TEMPLATES, TEXT_TEMPLATES
from mmembed.data.synth.rules import COLOURS
from mmembed.data.synth.world import SceneObject, sample_world
from mmembed.errors import UserError
from mmembed.evaluate_instructions import exact_match, world_score

SPLITS = ("train", "val", "test", "heldout")
N, SEED = 60, 0
MEDIA = {"image", "audio", "text"}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("instruct") / "world"
    summary = generate_world(root, n=N, seed=SEED, workers=1)
    assert summary.instructions == {s: root / f"instruct-{s}.jsonl" for s in SPLITS}
    return root


@pytest.fixture(scope="module")
def rows(world) -> dict[str, list[dict]]:
    return {split: _jsonl(world / f"instruct-{split}.jsonl") for split in SPLITS}


@pytest.fixture(scope="module")
def scenes(world) -> dict[str, dict]:
    """Manifest row of every scene, by id."""
    return {r["id"]: r for split in SPLITS for r in _jsonl(world / f"{split}.jsonl")}


def _all(rows: dict[str, list[dict]]) -> list[dict]:
    return [r for split in SPLITS for r in rows[split]]


def _media(row: dict) -> list[tuple[str, str]]:
    return [next(iter(seg.items())) for seg in row["prompt"] if isinstance(seg, dict)]


def _text(row: dict) -> str:
    return " ".join(seg for seg in row["prompt"] if isinstance(seg, str))


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


# ---------------------------------------------------------------- files and format
def test_every_split_has_rows_in_the_documented_format(world, rows, scenes):
    for split in SPLITS:
        members = {r["id"] for r in _jsonl(world / f"{split}.jsonl")}
        assert rows[split] and len({r["id"] for r in rows[split]}) == len(rows[split])
        for r in rows[split]:
            assert set(r) == {"id", "task", "prompt", "answer", "scenes", "objects"} and r["task"] in TASKS
            told = r["task"] == "recall"  # a dialogue's scenes may all have been told in words, none shown
            assert told or r["id"].split("/")[0] in r["scenes"]
            assert all(isinstance(seg, str) or (len(seg) == 1 and set(seg) <= MEDIA) for seg in r["prompt"])
            assert len(_media(r)) == len(r["scenes"]) == len(r["objects"]) >= (0 if told else 1)
            assert set(r["scenes"]) <= members  # comparison partners come from the same split
            assert r["objects"] == [scenes[s]["objects"] for s in r["scenes"]]
    meta = json.loads((world / "world.json").read_text())
    assert meta["instructions"] == {s: f"instruct-{s}.jsonl" for s in SPLITS}


def test_text_segments_carry_the_spaces_around_media(rows):
    for r in _all(rows):
        if r["task"] == "recall":  # a dialogue keeps each turn's words, items and answers apart, as a Session does
            continue
        prompt = r["prompt"]
        assert isinstance(prompt[0], dict) or not prompt[0][0].isspace()
        assert isinstance(prompt[-1], dict) or not prompt[-1][-1].isspace()
        for before, after in zip(prompt, prompt[1:]):
            assert not (isinstance(before, dict) and isinstance(after, dict)), r["id"]  # a space between
            if isinstance(after, dict):
                assert before.endswith(" "), r["id"]
            if isinstance(before, dict):
                assert after[0] in " .,:;?!", r["id"]
        assert "  " not in "".join(seg if isinstance(seg, str) else "M" for seg in prompt)


def test_same_seed_gives_identical_bytes_with_any_worker_count(world, tmp_path, monkeypatch):
    import mmembed.data.synth.generate as gen

    monkeypatch.setattr(gen, "CHUNK", 16)  # several chunks, so the 2-process pool really runs
    generate_world(tmp_path / "again", n=N, seed=SEED, workers=2)
    for split in SPLITS:
        name = f"instruct-{split}.jsonl"
        assert (world / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_no_text_outside_the_heldout_split_names_a_heldout_pair(world, rows):
    """Not even as an absent thing ("is there an orange cross?" → "no"), which taught the decoder that
    a held-out pair's answer is "no" before the held-out split asked it."""
    from mmembed.data.synth.captions import SHAPE_WORDS

    heldout = [tuple(c) for c in json.loads((world / "world.json").read_text())["heldout_combos"]]
    names = [f"{colour} {noun}" for shape, colour in heldout for noun in SHAPE_WORDS[shape]]
    for split in ("train", "val", "test"):
        manifest = _jsonl(world / f"{split}.jsonl")
        texts = [json.dumps(r["prompt"]) + " " + r["answer"] for r in rows[split]]
        texts += [" ".join(r["captions"]) + " " + " ".join(q["question"] for q in r["qa"]) for r in manifest]
        named = [name for text in texts for name in names if name in text.lower()]
        assert named == [], (split, named[:5])
    asked = [r for r in rows["heldout"] if r["task"] == "exists"]
    assert any(any(name in json.dumps(r["prompt"]) for name in names) for r in asked)  # the held-out split may


def _instructions(n: int, split: str = "train") -> dict[str, list[dict]]:
    """Rows per scene of one split of a world of `n` scenes, built without rendering any media."""
    members = [s for s in sample_world(SEED, n, 0, (0.8, 0.1, 0.1), []) if s.split == split]
    manifest = [manifest_row(s, SEED, pairs=[]) for s in members]
    by_scene: dict[str, list[dict]] = {}
    for r in instruction_rows(members, manifest, SEED):
        by_scene.setdefault(r["id"].split("/")[0], []).append(r)
    return by_scene


def test_a_scenes_own_rows_do_not_depend_on_n():
    small, large = _instructions(40), _instructions(80)
    assert len(small) == 32 and set(small) <= set(large)
    for sid, got in small.items():
        own = [r for r in got if task_group(r["task"]) not in ("compare", "memory")]  # partners depend on n
        assert own == [r for r in large[sid] if task_group(r["task"]) not in ("compare", "memory")], sid
    # and so do memory dialogues, as the module docstring says (it said only comparisons did)
    memory = {sid: [r for r in rows if r["task"] == "recall"] for sid, rows in small.items()}
    assert any(memory[sid] != [r for r in large[sid] if r["task"] == "recall"] for sid in small)


# ---------------------------------------------------------------- what the rows hold
def test_every_task_appears_and_rows_per_scene_follow_the_recipe(rows):
    assert set(r["task"] for r in rows["train"]) == set(TASKS)
    per_scene: dict[str, Counter] = {}
    for r in _all(rows):  # counted by (task, or group for questions) and the first media item
        group = task_group(r["task"])
        key = (r["task"] if group == "describe" else group, _media(r)[0][0] if _media(r) else "words")
        per_scene.setdefault(r["id"].split("/")[0], Counter())[key] += 1
    for counts in per_scene.values():
        assert counts[("describe", "image")] == counts[("describe", "audio")] == 1
        assert counts[("attribute", "image")] == counts[("attribute", "audio")] == 2
        assert counts[("compare", "image")] + counts[("compare", "audio")] == 2
        assert sum(n for (group, _), n in counts.items() if group == "memory") <= MEMORY_ROWS
    mean = np.mean([sum(c.values()) for c in per_scene.values()])
    texts = np.mean([c[("describe", "text")] for c in per_scene.values()])
    memory = np.mean([sum(n for (group, _), n in c.items() if group == "memory") for c in per_scene.values()])
    assert 9.5 < mean < 12.0 and 0.3 < texts < 0.7 and memory > 0.7 * MEMORY_ROWS


def test_media_belong_to_the_scenes_listed(world, rows, scenes):
    for r in _all(rows):
        for (modality, value), sid in zip(_media(r), r["scenes"]):
            if modality == "text":  # an alternative caption of the scene, never the canonical one
                assert r["task"] == "describe" and value in scenes[sid]["captions"][1:]
            else:
                assert value == scenes[sid][modality] and (world / value).is_file()
                assert value == (f"images/{sid}.png" if modality == "image" else f"audio/{sid}.wav")


def _told(segment) -> list[SceneObject]:
    """The objects of a scene told in words ("Remember this: <caption>."); none for any other segment."""
    for template in TELL:
        head, tail = template.split("{caption}")
        if isinstance(segment, str) and segment.startswith(head) and segment.endswith(tail):
            return parse_caption(segment[len(head): len(segment) - len(tail)])
    return []


def _objects(r: dict, k: int = 0) -> list[SceneObject]:
    return [SceneObject.from_dict(o) for o in r["objects"][k]]


def _expected(r: dict, scenes: dict) -> str:
    """The answer recomputed from the row's objects and prompt."""
    task, objects = r["task"], (_objects(r) if r["objects"] else [])
    if task in ("describe", "describe_both"):
        assert sorted(parse_caption(r["answer"])) == sorted(objects)
        return scenes[r["scenes"][0]]["text"]  # the canonical caption
    if task == "count":
        return {1: "one", 2: "two"}[len(objects)]
    if task == "exists":
        wanted = dict(mentions(_text(r)))
        assert set(wanted) == {"shape", "colour"}
        return "yes" if any(o.shape == wanted["shape"] and o.colour == wanted["colour"] for o in objects) else "no"
    if task in ("same_colour", "same_shape"):
        attr = task.removeprefix("same_")
        return "yes" if {getattr(o, attr) for o in objects} == {getattr(o, attr) for o in _objects(r, 1)} else "no"
    if task == "larger":
        by_modality = {m: _objects(r, k) for k, (m, _) in enumerate(_media(r))}
        (image,), (audio,) = by_modality["image"], by_modality["audio"]
        if image.size == audio.size:
            return "equal"
        return "the picture" if image.size == "large" else "the sound"
    if task == "recall":  # the question names one object among everything shown, and asks another attribute
        question = r["prompt"][-1]
        task = "colour" if "colour" in question else "shape"
        ref = dict(mentions(question))
        assert task not in ref, r
        shown = [o for k in range(len(r["objects"])) for o in _objects(r, k)] + [o for s in r["prompt"] for o in _told(s)]
        matches = [o for o in shown if all(getattr(o, a) == v for a, v in ref.items())]
        assert len(matches) == 1, r
        return getattr(matches[0], task)
    ref = dict(mentions(_text(r)))
    assert task not in ref, r  # the reference never names the asked attribute
    matches = [o for o in objects if all(getattr(o, a) == v for a, v in ref.items())]
    assert len(matches) == 1, r
    return getattr(matches[0], task)


def test_answers_match_the_objects(rows, scenes):
    for r in _all(rows):
        assert r["answer"] == _expected(r, scenes), r
        modalities = [m for m, _ in _media(r)]
        if task_group(r["task"]) == "compare":
            assert sorted(modalities) == ["audio", "image"] and r["scenes"][0] != r["scenes"][1]
        if r["task"] == "describe_both":
            assert sorted(modalities) == ["audio", "image"] and r["scenes"][0] == r["scenes"][1]
        if task_group(r["task"]) == "attribute":
            assert modalities in (["image"], ["audio"])


def test_yes_and_no_are_both_common(rows):
    answers = {t: Counter(r["answer"] for r in _all(rows) if r["task"] == t) for t in ("exists", "same_colour")}
    assert 0.3 < answers["exists"]["yes"] / answers["exists"].total() < 0.75
    assert 0.2 < answers["same_colour"]["yes"] / answers["same_colour"].total() < 0.8


def test_questions_never_contain_their_answer(rows):
    for r in _all(rows):
        if r["task"] in ("colour", "shape", "size", "position"):
            assert r["task"] not in {a for a, _ in mentions(_text(r))}, r["prompt"]
        if task_group(r["task"]) == "attribute":
            assert r["answer"] not in _words(_text(r)), r["prompt"]
        if r["task"] == "recall":  # the question itself; earlier answers in the dialogue may say it
            assert r["answer"] not in _words(r["prompt"][-1]), r["prompt"]


def test_memory_dialogues_tell_some_scenes_in_words_and_answer_each_turn_with_its_description(rows, scenes):
    """A told scene is one of its captions in a TELL sentence; every turn (shown or told) is followed by
    the canonical description, which is what a Session's decoder says to it; recalled ones are bare."""
    captions = {c for sc in scenes.values() for c in sc["captions"]}
    told = shown = told_asked = 0
    for r in _all(rows):
        if r["task"] != "recall":
            continue
        prompt, listed = r["prompt"], iter(r["scenes"])
        for k, seg in enumerate(prompt[:-1]):
            objects = _told(seg)
            if objects:
                told += 1
                head, tail = next((t.split("{caption}") for t in TELL if seg.startswith(t.split("{caption}")[0])))
                assert seg[len(head): len(seg) - len(tail)] in captions
            if isinstance(seg, dict):
                shown += 1
                objects = [SceneObject.from_dict(o) for o in scenes[next(listed)]["objects"]]
            after = prompt[k + 1] if k + 1 < len(prompt) - 1 else None
            if objects and isinstance(after, str) and not _told(after) and after not in SHOW["image"] + SHOW["audio"]:
                assert sorted(parse_caption(after)) == sorted(objects), r["id"]  # the turn's answer
        told_asked += not r["scenes"]
    assert 0.3 < told / (told + shown) < 0.7 and told_asked > 0


def test_some_descriptions_are_asked_as_a_conversations_show_turn(rows, scenes):
    described = [r for r in _all(rows) if r["task"] == "describe" and _media(r)[0][0] != "text"]
    turns = [r for r in described if len(r["prompt"]) == 2 and isinstance(r["prompt"][1], dict)
             and r["prompt"][0].strip() in SHOW[_media(r)[0][0]]]
    assert abs(len(turns) / len(described) - SHOWN_DESCRIBED) < 0.1
    assert all(r["answer"] == scenes[r["scenes"][0]]["text"] for r in turns)


def test_at_least_ten_phrasings_per_task():
    assert set(TEMPLATES) == set(TASKS) - {"recall"}
    for task, templates in [*TEMPLATES.items(), *SHOW.items(), *ASK.items()]:
        assert len(set(templates)) >= 10, task
    assert len(set(TEXT_TEMPLATES)) >= 10


def test_phrasings_vary_in_the_written_world(rows):
    for modality in ("image", "audio"):
        shapes = {
            "".join(seg if isinstance(seg, str) else "<M>" for seg in r["prompt"])
            for r in _all(rows)
            if r["task"] == "describe" and _media(r)[0][0] == modality
        }
        assert len(shapes) >= 10, modality


# ---------------------------------------------------------------- scoring
def _recolour(caption: str) -> str:
    colour = next(c for c in COLOURS if re.search(rf"\b{c}\b", caption))
    other = COLOURS[(COLOURS.index(colour) + 1) % len(COLOURS)]
    return re.sub(rf"\b{colour}\b", other, caption, count=1)


def test_score_accepts_any_correct_caption_and_rejects_a_wrong_colour(rows, scenes):
    rng = np.random.default_rng(0)
    described = [r for r in _all(rows) if task_group(r["task"]) == "describe"]
    assert {r["task"] for r in described} == {"describe", "describe_both"}
    for r in described:
        captions = scenes[r["scenes"][0]]["captions"]
        assert score(r, r["answer"]) and score(r, captions[int(rng.integers(1, len(captions)))])
        assert not score(r, _recolour(r["answer"]))
        assert not score(r, r["answer"] + " and a small red star on the right")
        assert not score(r, "I cannot tell.")


def test_score_normalises_short_answers():
    row = {"task": "colour", "answer": "red", "objects": [[]]}
    assert score(row, "Red.") and score(row, "  red ") and score(row, "RED!")
    assert not score(row, "blue") and not score(row, "dark red")
    assert score({"task": "larger", "answer": "the picture"}, "The picture.")
    assert score({"task": "larger", "answer": "the picture"}, " the  picture ")  # as `mmembed eval` reads it
    # every trailing run of punctuation, and compatibility forms (it kept "red. ." and full-width letters)
    assert score(row, "red. .") and score(row, "Ｒｅｄ") and score(row, "red…") and score(row, "red!?")
    assert score({"task": "larger", "answer": "a (b)"}, "A (b).") and not score({"task": "larger", "answer": "a (b)"}, "a (b")


def test_a_reference_answer_is_normalised_as_the_generated_one_is():
    """A hand-written "Red" (or "Yes.") was compared with the normalised generated text: the
    reference answer itself scored wrong."""
    for answer in ("Red", "red.", "Yes.", " the  Picture "):
        assert score({"task": "colour", "answer": answer, "objects": [[]]}, answer)
    assert not score({"task": "colour", "answer": "Red", "objects": [[]]}, "blue")
    assert not score({"task": "colour", "answer": "...", "objects": [[]]}, "")  # "..." is no empty answer
    assert score({"task": "colour", "answer": "...", "objects": [[]]}, "...")
    star = {"task": "describe", "answer": "", "objects": [[{"shape": "cross", "colour": "orange"}]]}
    assert score(star, "a small orange plus  sign in the\nmiddle")  # spaces collapsed, as on the exact path


@pytest.mark.parametrize("objects", [[{"shape": "star", "colour": "red"}], [], None, [[]], [["star"]],
                                     [[{"shape": "Star", "colour": "red"}]], [[{"shape": "box", "colour": "red"}]]])
def test_a_description_whose_objects_the_reader_cannot_read_is_one_line_before_any_answer(objects):
    """A flat `objects` list, [] or null crashed `mmembed eval --instructions` with a traceback,
    once every answer had been generated."""
    from mmembed.errors import UserError
    from mmembed.evaluate_instructions import scorer

    good = InstructionRow(line=1, prompt=(), answer="a red star", task="describe",
                          meta={"objects": [[{"shape": "star", "colour": "red"}]]})
    assert scorer([good])[1] is world_score
    bad = InstructionRow(line=2, prompt=(), answer="a red star", task="describe", meta={"objects": objects})
    with pytest.raises(UserError, match=r"^line 2: (objects must be a list of scenes|an object's shape '(Star|box)' "
                                        r"is not one of the world's \(circle, square)"):
        scorer([good, bad])
    colour = InstructionRow(line=3, prompt=(), answer="red", task="colour", meta={"objects": objects})
    assert scorer([good, colour])[1] is world_score  # a colour answer is read without its objects


def test_the_world_and_eval_read_answers_alike():
    """`mmembed eval` on any manifest and the world's own reader normalise an answer the same way."""
    row = InstructionRow(line=1, prompt=(), answer="the picture", task="larger")
    for text in ("The  picture.", "\tthe picture\n", "THE PICTURE!", "the pictures"):
        assert exact_match(row, text) == score({"task": "larger", "answer": "the picture"}, text)
    assert exact_match(row, "the  picture")
    dots = InstructionRow(line=2, prompt=(), answer="...", task="larger")  # normalises to nothing
    assert not exact_match(dots, "") and exact_match(dots, " ... ")


def test_task_groups():
    assert TASK_GROUPS["compare"] == ("same_colour", "same_shape", "larger")
    assert [task_group(t) for t in ("describe_both", "position", "larger")] == ["describe", "attribute", "compare"]
    with pytest.raises(ValueError, match="valid: describe"):
        task_group("caption")


# ---------------------------------------------------------------- caching
def test_a_missing_instruction_file_makes_the_world_regenerate(tmp_path):
    root = tmp_path / "w"
    generate_world(root, n=8, seed=1, workers=1)
    before = (root / "instruct-val.jsonl").read_bytes()
    (root / "instruct-val.jsonl").unlink()
    again = generate_world(root, n=8, seed=1, workers=1)
    assert not again.reused and (root / "instruct-val.jsonl").read_bytes() == before


# ---------------------------------------------------------------- more lookups for the decoder
def test_lookup_rows_find_one_of_two_objects_by_an_attribute_and_ask_another(world, rows, scenes):
    path = write_lookup_rows(world, 3)
    assert path == world / "instruct-train-lookups3.jsonl"
    lines = path.read_text().splitlines()
    base = (world / "instruct-train.jsonl").read_text().splitlines()
    assert lines[: len(base)] == base  # the world's own rows first, unchanged
    extra = [json.loads(line) for line in lines[len(base):]]
    two = [r["id"] for r in _jsonl(world / "train.jsonl") if len(r["objects"]) == 2]
    assert two and len(extra) == 2 * 3 * len(two)
    assert len({r["id"] for r in extra} | {r["id"] for r in rows["train"]}) == len(extra) + len(rows["train"])
    for r in extra:
        assert r["task"] in LOOKUP_TASKS and len(r["objects"][0]) == 2 and r["scenes"][0] in two
        # _expected: the reference names exactly one object and never the asked attribute
        assert r["answer"] == _expected(r, scenes), r
        assert r["answer"] not in _words(_text(r)), r["prompt"]
    assert Counter(m for r in extra for m, _ in _media(r)) == {"image": 3 * len(two), "audio": 3 * len(two)}
    assert write_lookup_rows(world, 3).read_bytes() == path.read_bytes()  # seeded


def test_lookup_rows_refuse_what_they_cannot_rebuild(world, tmp_path):
    for per_item in (0, 10**8):  # 10**8 filled the memory before a file was written
        with pytest.raises(UserError, match=r"an integer in \[1, 1000\]"):
            write_lookup_rows(world, per_item)
    with pytest.raises(UserError, match="no complete synthetic world"):
        write_lookup_rows(tmp_path, 2)
    for name in ("train.jsonl", "instruct-train.jsonl"):
        (tmp_path / name).write_bytes((world / name).read_bytes())
    meta = json.loads((world / "world.json").read_text())
    meta["params"]["version"] -= 1
    (tmp_path / "world.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="regenerate"):
        write_lookup_rows(tmp_path, 2)
    meta["params"]["version"] += 1
    meta["params"]["n"] = str(meta["params"]["n"])  # hand-edited: it was a TypeError traceback
    (tmp_path / "world.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="does not hold the scenes its world.json describes"):
        write_lookup_rows(tmp_path, 2)


def test_lookup_rows_refuse_a_world_without_training_scenes(tmp_path, capsys):
    """They wrote an empty file and recommended training a decoder on it."""
    from mmembed.cli import main

    root = tmp_path / "w"
    generate_world(root, n=20, split=(0, 0, 1), workers=1)
    with pytest.raises(UserError, match=r"has no training scenes \(split=\[0.0, 0.0, 1.0\]\)"):
        write_lookup_rows(root, 2)
    assert main(["data", "lookups", str(root)]) == 2
    assert "mmembed: error:" in capsys.readouterr().err
    assert not list(root.glob("instruct-train-lookups*"))


def test_the_cli_writes_lookup_rows(world, capsys):
    from mmembed.cli import main

    assert main(["data", "lookups", str(world), "--per-item", "1"]) == 0
    assert "decoder.data.train=instruct-train-lookups1.jsonl" in capsys.readouterr().out
    assert (world / "instruct-train-lookups1.jsonl").is_file()


def test_a_folder_given_as_the_instruction_manifest_is_called_a_folder(tmp_path):
    """`eval --instructions DIR` said "instruction manifest not found: DIR" of a folder that is there."""
    from mmembed.data.instructions import read_instructions

    with pytest.raises(UserError, match=f"instruction manifest {re.escape(str(tmp_path))} is a folder, not a file"):
        read_instructions(tmp_path)
    with pytest.raises(UserError, match="instruction manifest not found"):
        read_instructions(tmp_path / "none.jsonl")


def test_instruction_rows_come_a_scene_at_a_time(monkeypatch):
    """A split's rows (~11 a scene) were built as one list and written as one string: 25 GB at 1M scenes."""
    import mmembed.data.synth.instructions as ins

    members = [s for s in sample_world(SEED, 50, 0, (0.8, 0.1, 0.1), []) if s.split == "train"]
    manifest = [manifest_row(s, SEED, pairs=[]) for s in members]
    described, describe = [], ins._describe_items
    monkeypatch.setattr(ins, "_describe_items", lambda *a: described.append(1) or describe(*a))
    rows = instruction_rows(members, manifest, SEED)
    first = next(iter(rows))
    assert first["id"].startswith(f"{members[0].id}/") and len(described) == 1
    rest = list(rows)
    assert len(described) == len(members) and len(rest) > 10 * len(members)
