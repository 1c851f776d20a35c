"""Task weights for the decoder stage: rows repeated by their task's weight, seeded, validated."""

import json
from collections import Counter

import pytest

from mmembed.data.instructions import read_instructions
from mmembed.errors import UserError

TASKS = {"exists": 40, "colour": 30, "larger": 20, None: 10}


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "instruct.jsonl"
    lines = []
    for task, n in TASKS.items():
        for i in range(n):
            row = {"prompt": [f"question {i}"], "answer": "yes"}
            if task is not None:
                row["task"] = task
            lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return read_instructions(path)


def test_rows_repeat_by_their_tasks_weight(data):
    out = data.weighted({"exists": 3, "colour": 0, "larger": 2.5}, seed=0)
    counts = Counter(r.task for r in out.rows)
    assert counts["exists"] == 120 and "colour" not in counts and counts[None] == 10  # unnamed tasks keep 1
    assert 40 <= counts["larger"] <= 60 and counts["larger"] not in (40, 60)  # every row twice, about half thrice
    larger = Counter(r.line for r in out.rows if r.task == "larger")
    assert set(larger.values()) == {2, 3}
    assert [r.line for r in data.weighted({"larger": 2.5}, seed=0).rows if r.task == "larger"] == \
           [r.line for r in out.rows if r.task == "larger"]  # seeded: the same rows get the third copy
    assert data.weighted({}, seed=0).rows == data.rows


@pytest.mark.parametrize("seed", range(6))
def test_a_fraction_of_a_task_is_its_share_exactly(data, seed):
    """A coin flip per row drew 0 to 3 of 7 rows at weight 0.3 (none for 2 seeds of 10): the task
    vanished although only weight 0 drops one."""
    counts = Counter(r.task for r in data.weighted({"larger": 2.5, "colour": 0.3, "exists": 0.01}, seed=seed).rows)
    assert counts["larger"] == 50 and counts["colour"] == 9 and counts["exists"] == 1  # round(0.3·30); at least one


def test_bad_weights_are_one_clear_error(data):
    with pytest.raises(UserError, match="none of the rows has: counting"):
        data.weighted({"counting": 2})
    with pytest.raises(UserError, match=r"none of the rows has: larger .*after any selection by task or modality"):
        data.select(["exists"]).weighted({"larger": 2})  # the file has "larger" rows; the selection has none
    with pytest.raises(UserError, match="finite and >= 0: exists=-1"):
        data.weighted({"exists": -1})
    with pytest.raises(UserError, match="exists=nan"):
        data.weighted({"exists": float("nan")})
