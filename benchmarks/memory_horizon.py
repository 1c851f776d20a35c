"""Long-horizon memory (#16): many items shown across processes, then questions about old ones.

    processes 1–3: each user is shown `items` / 3 pictures or sounds of the test split (one turn each)
    process 4:     reopens the file; per user, questions that name one shown object by other
                   attributes, unique among everything that user was shown ("What colour was the
                   large star on the left?"), asked with memory on
    process 5:     the same questions with memory off (no earlier turns, nothing recalled)

Every process is `python -m mmembed.demo_memory PHASE …` (the demo's memory section), so what
process 4 knows it can only have read from the file. The decoder's context holds a few turns;
the rest must come back through recall. Besides accuracy it reports how often the asked item was
among the memories recalled for its question (its picture or sound, or the decoder's description
of it), and accuracy with and without it: whether recall or reading is what fails.

    python -m benchmarks.memory_horizon runs/demo [--world data/shapes] [--users 5]
           [--items 30] [--questions 50] [--history-turns 3] [--recall-k 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import require_run, require_world
from mmembed.data.synth.dialogues import SHOW, question_about
from mmembed.data.synth.instructions import normalise
from mmembed.data.synth.world import SceneObject
from mmembed.demo_memory import PHASES

GOAL = 0.80


def plan(world: Path, users: int, items: int, questions: int, seed: int = 0,
         split: str = "test", history_turns: int = 3) -> tuple[list[list[dict[str, Any]]], list[dict[str, Any]]]:
    """(the items each show process gives, in order; the questions), drawn from `split`'s scenes:
    user u is shown scenes u·items … (u+1)·items − 1. No question asks about one of the last
    `history_turns` items, which the asking Session still shows as history."""
    rng = np.random.default_rng(seed)
    rows = [json.loads(line) for line in (world / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]
    if len(rows) < users * items:
        raise SystemExit(f"{world / f'{split}.jsonl'} has {len(rows)} scenes, fewer than users × items")
    shown: list[list[dict[str, Any]]] = [[] for _ in range(3)]
    candidates: list[list[dict[str, Any]]] = []  # per user, in a random order of its items
    for u in range(users):
        user = f"horizon-{u}"
        scenes = rows[u * items:(u + 1) * items]
        objects = [tuple(SceneObject.from_dict(o) for o in r["objects"]) for r in scenes]
        everything = tuple(o for scene in objects for o in scene)  # `reference` tells objects apart by identity
        for i, row in enumerate(scenes):
            modality = ("image", "audio")[int(rng.integers(2))]
            shown[i * 3 // items].append({"user": user, "modality": modality, "path": str(world / row[modality]),
                                          "show": SHOW[modality][int(rng.integers(len(SHOW[modality])))],
                                          "question": ""})
        mine = []
        for i in rng.permutation(max(0, items - history_turns)):  # never one still in the history shown
            asked = question_about(objects[i], everything, rng)
            if asked is not None:
                mine.append({"user": user, "question": asked[0], "answer": asked[1], "item": int(i),
                             "show": "", "modality": "", "path": ""})
        candidates.append(mine)
    # round robin over the users, so each gets an equal share of the questions where it can
    asked = [q for turn in itertools.zip_longest(*candidates) for q in turn if q is not None][:questions]
    asked.sort(key=lambda q: q["user"])  # each user's questions asked in a row
    if not asked:
        raise SystemExit("no shown object can be named uniquely among what its user saw: show fewer items")
    return shown, asked


def turns_back(asked: list[dict[str, Any]], items: int) -> list[int]:
    """How many of its user's turns came between each asked item and its question: the items shown after
    it, and the user's earlier questions, each a turn the store keeps (counting the items alone
    gave a median of 15.5 for 22)."""
    earlier: dict[Any, int] = {}
    back = []
    for q in asked:  # in the order they are asked
        back.append(items - 1 - q["item"] + earlier.get(q["user"], 0))
        earlier[q["user"]] = earlier.get(q["user"], 0) + 1
    return back


def run(run_dir: Path, world: Path, users: int, items: int, questions: int, history_turns: int = 3,
        recall_k: int = 3) -> dict[str, Any]:
    shown, asked = plan(world, users, items, questions, history_turns=history_turns)
    answers: dict[str, list[str]] = {}
    recalled: list[list[list]] = []
    with tempfile.TemporaryDirectory() as tmp:
        memory = Path(tmp) / "memory.db"
        steps = [("show", part) for part in shown] + [(phase, asked) for phase in PHASES[1:]]
        for n, (phase, batch) in enumerate(steps):
            spec, out = Path(tmp) / f"spec{n}.json", Path(tmp) / f"out{n}.json"
            spec.write_text(json.dumps(batch), encoding="utf-8")
            _phase(phase, n, len(steps), [str(run_dir), str(memory), str(spec), str(out), str(history_turns),
                                          str(recall_k)])
            got = json.loads(out.read_text(encoding="utf-8"))
            answers[phase] = got["answers"]
            if phase == PHASES[1]:
                recalled = got["recalled"]
    right = {phase: [normalise(a) == q["answer"] for a, q in zip(answers[phase], asked)] for phase in PHASES[1:]}
    score = {phase: sum(r) / len(asked) for phase, r in right.items()}
    back = turns_back(asked, items)
    found = [asked_item_recalled(q, hits) for q, hits in zip(asked, recalled)]
    return {"users": users, "items per user": items, "questions": len(asked), "history turns": history_turns,
            "recall k": recall_k, "memory on": score[PHASES[1]],
            "memory off": score[PHASES[2]], "turns back (median)": float(np.median(back)), "goal": GOAL,
            "asked item recalled": sum(found) / len(asked),
            "correct when recalled": _share(right[PHASES[1]], found),
            "correct when not recalled": _share(right[PHASES[1]], [not f for f in found]),
            "samples": [{"question": q["question"], "answer": a, "truth": q["answer"]}
                        for q, a in list(zip(asked, answers[PHASES[1]]))[:5]]}


def _phase(phase: str, n: int, steps: int, args: list[str]) -> None:
    """Process n of `steps`: `python -m mmembed.demo_memory PHASE ARGS`. A failed one ends the run in
    one line naming the phase and the child's last error line (it was the child's traceback, then a
    CalledProcessError one); a finished one's stderr (warnings) is passed on."""
    done = subprocess.run([sys.executable, "-m", "mmembed.demo_memory", phase, *args], stderr=subprocess.PIPE,
                          text=True, check=False)
    if done.returncode != 0:
        last = next((line.strip() for line in reversed(done.stderr.splitlines()) if line.strip()), "no message")
        raise SystemExit(f"the {phase!r} process ({n + 1} of {steps}) failed with exit status {done.returncode}: "
                         f"{last}")
    sys.stderr.write(done.stderr)


def asked_item_recalled(question: dict[str, Any], hits: list[list]) -> bool:
    """Whether the item a question asks about came back among its recalled memories (`hits`:
    [turn, role, modality] each). A user's items were shown one a turn, in order, in one session:
    item i at turn i + 1. Its picture or sound counts, and so does the decoder's description of
    it; the user's words of that turn ("Remember this picture.") do not."""
    return any(turn == question["item"] + 1 and (role != "user" or modality != "text") for turn, role, modality in hits)


def _share(right: list[bool], where: list[bool]) -> float | None:
    """The fraction of `right` among the questions where `where` holds (None if none does)."""
    picked = [r for r, w in zip(right, where) if w]
    return sum(picked) / len(picked) if picked else None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="a run with a decoder stage")
    ap.add_argument("--world", type=Path, default=Path("data/shapes"))
    ap.add_argument("--users", type=int, default=5)
    ap.add_argument("--items", type=int, default=30, help="items shown to each user, over three processes")
    ap.add_argument("--questions", type=int, default=50, help="questions in all")
    ap.add_argument("--history-turns", type=int, default=3, help="the asking Session's history_turns (default 3)")
    ap.add_argument("--recall-k", type=int, default=3, help="the asking Session's recall_k (default 3)")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args(argv)
    if args.items < 6 or args.users < 1 or args.questions < 1 or args.history_turns < 0 or args.recall_k < 0:
        raise SystemExit("--items must be >= 6, --users and --questions >= 1, --history-turns and --recall-k >= 0")
    if args.history_turns >= args.items:  # every item would still be in the history shown: none to recall
        raise SystemExit(f"--history-turns ({args.history_turns}) must be below --items ({args.items}): questions "
                         "are about items shown before the history the asking session sees")
    require_world(args.world, ["test.jsonl"], "--world")
    require_run(args.run)
    result = run(args.run, args.world, args.users, args.items, args.questions, args.history_turns, args.recall_k)
    print(f"{result['questions']} questions, {result['users']} users × {result['items per user']} items shown over "
          f"3 processes; the item asked about was shown a median {result['turns back (median)']:.0f} turns back")
    print(f"memory on  {result['memory on']:.3f}  (goal ≥ {GOAL:.2f}; history_turns {args.history_turns}, "
          f"recall_k {args.recall_k})")
    print(f"memory off {result['memory off']:.3f}")
    print(f"the asked item was among the recalled memories for {result['asked item recalled']:.3f} of the questions; "
          f"correct then {_fmt(result['correct when recalled'])}, otherwise {_fmt(result['correct when not recalled'])}")
    for s in result["samples"]:
        print(f"  {s['question']!r} → {s['answer']!r} (truth {s['truth']!r})")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")


def _fmt(share: float | None) -> str:
    return "–" if share is None else f"{share:.3f}"


if __name__ == "__main__":
    main()
