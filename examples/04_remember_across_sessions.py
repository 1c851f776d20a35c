"""A conversation that outlives its process: show a picture and a sound, exit, ask about them later.

    python examples/04_remember_across_sessions.py [RUN_DIR]

RUN_DIR defaults to runs/demo (what `mmembed demo` writes); it needs a decoder stage (see
example 03, which trains a small one when there is none) trained on the built-in world (the
script shows a one-object star and circle of its test split). The script runs three processes on
one memory file: the first shows the memories, the second asks about them, the third reads the
file on its own (no model) and exports it as a manifest. The memory file and the export stay in
a new folder under the system's temporary folder, named at the end.

What it shows is the plumbing, not the accuracy: the demo's decoder is often wrong here. Its memory
section measures one item shown per user (0.77 across processes, README "Memory across
processes"); two items shown, then a question naming one by another attribute, is harder and not
measured: with `runs/demo-s54` both answers are wrong ("yellow" for the red star's colour, "red"
for the yellow object's shape).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import mmembed as mm

args = sys.argv[1:]
part = args[args.index("--part") + 1] if "--part" in args else None  # set in the child processes
args = args[: args.index("--part")] if part else args
run = Path(args[0] if args else "runs/demo")


def show(memory: str) -> None:
    """Process 1: show a picture and a sound, then exit."""
    model = mm.load(run)
    world = Path(model.config.data.root)
    scenes = [json.loads(line) for line in (world / "test.jsonl").read_text().splitlines()]
    star, bell = (next((s for s in scenes if len(s.get("objects", ())) == 1 and s["objects"][0]["shape"] == shape),
                       None) for shape in ("star", "circle"))
    if star is None or bell is None:
        sys.exit(f"{world / 'test.jsonl'} has no one-object star and circle: this example needs a run trained on "
                 "the built-in world (mmembed demo)")
    with mm.Session(model, memory=memory, user="ada", new=True) as chat:
        for words, item, truth in [("Remember this picture.", mm.Image(world / star["image"]), star["text"]),
                                   ("Listen to this.", mm.Audio(world / bell["audio"]), bell["text"])]:
            answer = chat.ask([words, item], max_new_tokens=24)
            print(f"[process 1] {words:24} (truth: {truth}) → {answer.text}")


def ask(memory: str) -> None:
    """Process 2: a new process, the same file: the conversation continues."""
    with mm.Session(mm.load(run), memory=memory, user="ada") as chat:
        for question in ["What colour was the star?", "What shape was the yellow object?"]:
            answer = chat.ask(question, max_new_tokens=8)
            recalled = ", ".join(f"#{h.id} {h.modality} {h.score:.2f}" for h in answer.recalled)
            print(f"[process 2] {question:36} → {answer.text:10} recalled: {recalled}")


def export(memory: str) -> None:
    """Process 3: the store on its own (no model): what it holds, exported as a manifest."""
    with mm.Memory(memory) as mem:
        for h in mem.recent("ada", limit=20):
            print(f"[process 3] turn {h.turn} {h.role:9} {h.modality:5} {h.text or ''}")
        manifest = mem.export(Path(memory).with_suffix(".export"), user="ada")
        print(f"[process 3] exported {mem.count('ada')} items to {manifest}")


if __name__ == "__main__":
    if part:
        name, memory = part.split(":", 1)
        {"show": show, "ask": ask, "export": export}[name](memory)
        sys.exit(0)
    if not (run / "decoder.safetensors").is_file():
        sys.exit(f"{run} holds no run with a decoder: run `mmembed demo` first (it writes runs/demo), "
                 "or pass such a run folder")
    world = Path(mm.load_config(run / "config.yaml").data.root)  # relative to where the run was trained
    if not (world / "test.jsonl").is_file():
        sys.exit(f"the run's world {world} (data.root) is not here: run this from the folder the run was trained in")
    memory = str(Path(tempfile.mkdtemp(prefix="mmembed-example-04-")) / "memory.db")  # kept: the export is there
    for part in ("show", "ask", "export"):  # three separate processes, one memory file
        done = subprocess.run([sys.executable, __file__, str(run), "--part", f"{part}:{memory}"])
        if done.returncode:
            sys.exit(f"process '{part}' failed (exit {done.returncode}): see its error above")
    print(f"the memory file and its export are in {Path(memory).parent} (delete the folder when done)")
