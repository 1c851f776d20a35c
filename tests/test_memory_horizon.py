"""benchmarks/memory_horizon: what it shows and what it asks (the measurement itself is a
benchmark, run by hand; docs/memory.md)."""

import re

import pytest

from benchmarks.memory_horizon import asked_item_recalled, plan, turns_back


def test_plan_shows_every_item_once_over_three_processes_and_asks_unique_old_objects(tiny_world):
    users, items = 2, 9
    shown, asked = plan(tiny_world, users, items, questions=8, split="train")
    assert [len(part) for part in shown] == [users * items // 3] * 3
    paths = [s["path"] for part in shown for s in part]
    assert len(set(paths)) == users * items  # one scene per turn, none shown twice
    for u in range(users):
        mine = [s for part in shown for s in part if s["user"] == f"horizon-{u}"]
        assert len(mine) == items and all(s["show"] and s["modality"] in ("image", "audio") for s in mine)
    assert 0 < len(asked) <= 8
    assert [q["user"] for q in asked] == sorted(q["user"] for q in asked)
    for q in asked:
        assert 0 <= q["item"] < items - 3  # never one of the turns still in the decoder's context
        words = set(re.findall(r"[a-z]+", q["question"].lower()))
        assert q["answer"] not in words  # the question names the object by its other attributes


def test_plan_refuses_a_world_too_small(tiny_world):
    with pytest.raises(SystemExit, match="fewer than users × items"):
        plan(tiny_world, users=100, items=30, questions=5, split="train")


def test_an_item_counts_as_recalled_by_its_media_or_its_description_not_the_users_words():
    question = {"item": 4}  # shown at turn 5
    assert asked_item_recalled(question, [[2, "user", "image"], [5, "user", "audio"]])
    assert asked_item_recalled(question, [[5, "assistant", "text"]])
    assert not asked_item_recalled(question, [[5, "user", "text"], [4, "user", "image"], [6, "assistant", "text"]])
    assert not asked_item_recalled(question, [])


def test_turns_back_counts_the_users_earlier_questions_too():
    """Each question is a turn the store keeps: the k-th question of a user has k more turns between it
    and the item than the items shown after it (the median read 15.5 for 22)."""
    asked = [{"user": "a", "item": 9}, {"user": "a", "item": 9}, {"user": "b", "item": 0}, {"user": "a", "item": 0}]
    assert turns_back(asked, 10) == [0, 1, 9, 11]
