"""The demo's memory section: something is shown in one process and asked about in the next.

    process 1: for each probe (its own user): Session.ask([words, picture or sound]) — exits
    process 2: reopens the memory file: Session.ask("What colour was the star?") — scored
    process 3: the same questions with memory off (no earlier turns, nothing recalled)

Each phase is a separate Python process (`python -m mmembed.demo_memory PHASE ...`), so what
the second one knows it can only have read from the file.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mmembed.data.synth.dialogues import memory_probe
from mmembed.data.synth.instructions import normalise
from mmembed.data.synth.world import SceneObject
from mmembed.errors import UserError

PHASES = ("show", "ask", "ask-without-memory")
RECALL_GOAL = (0.85, 0.30)  # correct with memory on (at least) and off (at most)


def probes(world: Path, split: str = "test", n: int = 100, seed: int = 0) -> list[dict[str, Any]]:
    """`n` show-then-ask probes over the first scenes of `split` (media paths absolute)."""
    rng = np.random.default_rng(seed)
    out = []
    for line in (world / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        objects = tuple(SceneObject.from_dict(o) for o in row["objects"])
        probe = memory_probe(objects, {m: str(world / row[m]) for m in ("image", "audio")}, rng)
        if probe is not None:
            out.append({"user": f"probe-{row['id']}", **probe})
        if len(out) == n:
            break
    return out


def run_phase(phase: str, run_dir: Path, memory: Path, items: list[dict[str, Any]], history_turns: int = 3,
              recall_k: int = 3) -> dict[str, list]:
    """One process's work: {"answers": one per probe, "recalled": per probe, the memories the
    session recalled for it, each as [turn, role, modality]}. `history_turns` and `recall_k` are the
    asking Session's (memory on; a show turn uses the defaults)."""
    import mmembed as mm

    model = mm.load(run_dir)
    on = phase != "ask-without-memory"
    answers, recalled = [], []
    with mm.Memory(memory, model=model) as store:  # one connection for every probe's session
        for p in items:
            asking = phase != "show"
            chat = mm.Session(model, memory=store, user=p["user"],
                              history_turns=0 if not on else history_turns if asking else 3,
                              recall_k=0 if not on else recall_k if asking else 3)
            if phase == "show":
                prompt = [p["show"], mm.Image(p["path"]) if p["modality"] == "image" else mm.Audio(p["path"])]
                out = chat.ask(prompt, max_new_tokens=32)
            else:
                out = chat.ask(p["question"], max_new_tokens=8)
            answers.append(out.text)
            recalled.append([[hit.turn, hit.role, str(hit.modality)] for hit in out.recalled])
    return {"answers": answers, "recalled": recalled}


def cross_process_recall(run_dir: Path, world: Path, n: int = 100, split: str = "test") -> dict[str, Any]:
    """Show, ask and ask without memory, each in its own process; accuracy of both askings."""
    items = probes(world, split, n)
    with tempfile.TemporaryDirectory() as tmp:
        spec, memory = Path(tmp) / "probes.json", Path(tmp) / "memory.db"
        spec.write_text(json.dumps(items), encoding="utf-8")
        answers = {}
        for phase in PHASES:
            out = Path(tmp) / f"{phase}.json"
            # a session of its own: Ctrl-C interrupts this process, which kills the child (subprocess.run
            # does), instead of also reaching the child mid-import with a traceback of its own
            done = subprocess.run([sys.executable, "-m", "mmembed.demo_memory", phase, str(run_dir), str(memory),
                                   str(spec), str(out)], start_new_session=True)
            if done.returncode != 0:  # it printed its one line (or, for a crash, its traceback) above
                raise UserError(f"the memory section's {phase!r} process ended with exit status {done.returncode} "
                                "(its error is above)")
            answers[phase] = json.loads(out.read_text(encoding="utf-8"))["answers"]
    score = {ph: sum(normalise(a) == p["answer"] for a, p in zip(answers[ph], items)) / len(items)
             for ph in PHASES[1:]}
    samples = [{"show": f"{p['show']} [{p['modality']} {Path(p['path']).name}]", "said": answers["show"][i],
                "question": p["question"], "answer": answers["ask"][i], "without memory": answers[PHASES[2]][i],
                "truth": p["answer"]} for i, p in enumerate(items[:4])]
    return {"n": len(items), "memory on": score["ask"], "memory off": score["ask-without-memory"], "samples": samples}


def memory_lines(result: dict[str, Any]) -> list[str]:
    """The report's memory section."""
    lines = ["## Memory across processes", "",
             f"{result['n']} test scenes, each its own user. Process 1 shows the picture or the sound and exits; "
             "process 2 opens the same memory file and asks about one object, named by another attribute; "
             "process 3 asks the same with memory off (no earlier turns, nothing recalled).", "",
             "| asked | correct | goal |", "|---|---:|---|",
             f"| memory on | {result['memory on']:.3f} | ≥ {RECALL_GOAL[0]:.2f} |",
             f"| memory off | {result['memory off']:.3f} | ≤ {RECALL_GOAL[1]:.2f} |", "",
             "| shown (process 1) | its answer | question (process 2) | answer | without memory | truth |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {s['show']} | {s['said']} | {s['question']} | {s['answer']} | {s['without memory']} | "
              f"{s['truth']} |" for s in result["samples"]]
    return lines + ["", "Many turns later the item must come back by recall: `mmembed train-queries RUN` adds a query "
                        "tower (a question lands near the item it names), and `python -m benchmarks.memory_horizon RUN` "
                        "asks about items 3 to 38 of the user's turns back (docs/memory.md).", ""]


def _main(argv: list[str]) -> int:
    """One phase in its own process (`cross_process_recall` runs three): a user error is one line, exit 2; Ctrl-C
    exit 130, quietly (a second demo into the same folder made this a traceback in the parent and the child)."""
    phase, run_dir, memory, spec, out = argv[:5]
    history_turns, recall_k = (int(a) for a in argv[5:7]) if len(argv) >= 7 else (3, 3)
    try:
        result = run_phase(phase, Path(run_dir), Path(memory), json.loads(Path(spec).read_text(encoding="utf-8")),
                           history_turns, recall_k)
    except UserError as e:
        print(f"mmembed: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    Path(out).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
