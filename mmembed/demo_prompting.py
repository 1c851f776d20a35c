"""The demo's prompting section: the decoder answers the world's test and held-out prompts.

    instruct-test.jsonl / instruct-heldout.jsonl ─► Model.generate (greedy) ─► score ─► accuracy
    a decoder trained on image prompts only ─► the same audio prompts ─► cross-modal transfer

Descriptions count as correct when they read as the world's captions (sizes and positions stated,
not checked) and name the shape and colour of every object (no more, no
fewer); every other answer must match exactly (`mmembed.data.synth.score`).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from mmembed.data.instructions import InstructionRow, read_instructions
from mmembed.data.synth import task_group
from mmembed.decoder.evaluate import accuracy_by_group, answer_rows, fitting, row_prompt
from mmembed.decoder.answer import Generation
from mmembed.evaluate_instructions import world_score

NOUN = {"image": "image", "audio": "sound", "text": "caption"}
POOLED = "attribute question (image or sound)"  # the image and the sound attribute questions together
# The headline rows (issue goals: test / held-out combinations)
HEADLINE = {
    "description from an image": (0.90, 0.75),
    "description from a sound": (0.85, 0.75),
    POOLED: (0.90, 0.75),
    "two-item comparison (image + sound)": (0.85, 0.75),
}
TRANSFER_GOAL = 0.6
# The best-of checks: the first BEST_OF_ROWS held-out picture descriptions (joint decoder) and test
# sound descriptions (image-only decoder), one batch each (about a second), answered greedily and with
# the best of BEST_OF candidates ranked by the decoder and the space (decoder/score.py)
BEST_OF, BEST_OF_ROWS = 16, 64


def row_group(row: InstructionRow) -> str:
    """Which line of the report a row counts toward."""
    mods = [NOUN[m.value] for m, _ in row.media]
    group = task_group(row.task)
    if row.task == "describe":
        return f"description from a{'n' if mods[0][0] in 'aeiou' else ''} {mods[0]}"
    if group == "describe":
        return "description from an image and its sound"
    if group == "attribute":
        return f"attribute question ({mods[0]})"
    if group == "memory":
        return "question about an earlier turn (memory dialogue)"
    return "two-item comparison (image + sound)"


def evaluate_split(model: Any, rows: list[InstructionRow]) -> tuple[dict, list[Generation]]:
    """Per-group accuracy (with the attribute questions pooled over modalities) and the answers."""
    answers = answer_rows(model, rows)
    table = accuracy_by_group(rows, answers, world_score, row_group)
    pooled = [g for g in table if g.startswith("attribute question (")]
    n = sum(table[g]["n"] for g in pooled)
    correct = sum(table[g]["correct"] for g in pooled)
    if n:  # a split without attribute questions has no such line (it would read 0.000)
        table[POOLED] = {"n": n, "correct": correct, "accuracy": correct / n}
    return table, answers


def with_pooled(counts: dict[str, int]) -> dict[str, int]:
    """Rows per line, with the pooled attribute line's (image and sound): its "(n of m)" counts both."""
    pooled = sum(n for group, n in counts.items() if group.startswith("attribute question ("))
    return {**counts, POOLED: pooled} if pooled else counts


def by_objects(rows: list[InstructionRow], answers: list[Generation]) -> dict[str, dict[str, dict]]:
    """Attribute questions by question and by the objects in the item: {task: {"1": {"n", "correct",
    "accuracy"}, "2": {..., "either object": what answering about one of the two at random scores}}}.
    With two objects, "what colour is the star?" must first find the star."""
    asked = [(r, a) for r, a in zip(rows, answers) if task_group(r.task) == "attribute"]
    table = accuracy_by_group([r for r, _ in asked], [a for _, a in asked], world_score,
                              lambda r: f"{r.task}|{len(r.meta['objects'][0])}")
    out: dict[str, dict[str, dict]] = {}
    for key in sorted(table):
        task, objects = key.split("|")
        out.setdefault(task, {})[objects] = table[key]
        if objects == "2" and task in ("colour", "shape", "size", "position"):  # a guess between the two objects
            pairs = [r.meta["objects"][0] for r, _ in asked if r.task == task and len(r.meta["objects"][0]) == 2]
            table[key]["either object"] = sum(1.0 if a[task] == b[task] else 0.5 for a, b in pairs) / len(pairs)
    return out


def audio_descriptions(rows: list[InstructionRow]) -> list[InstructionRow]:
    return [r for r in rows if r.task == "describe" and all(m.value == "audio" for m, _ in r.media)]


def has_rows(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def prompting(model: Any, transfer: Any | None, root: Path) -> dict[str, Any]:
    """Accuracy tables on the test and held-out splits, the transfer check, the best-of checks and sample
    answers."""
    read = {"test": read_instructions(root / "instruct-test.jsonl")}
    if has_rows(root / "instruct-heldout.jsonl"):  # a world made with n_heldout=0 writes it empty
        read["held-out"] = read_instructions(root / "instruct-heldout.jsonl")
    splits, skipped, too_long, unreadable = {}, {}, {}, {}
    for name, data in read.items():  # rows too long for the context are skipped (and counted), as in training
        splits[name] = fitting(model, data.rows)
        kept = {id(r) for r in splits[name]}
        skipped[name] = len(data.rows) - len(splits[name])
        too_long[name] = with_pooled(dict(Counter(row_group(r) for r in data.rows if id(r) not in kept)))
        unreadable[name] = len(data.skipped)
    tables, answers = {}, {}
    for name, rows in splits.items():
        tables[name], answers[name] = evaluate_split(model, rows)
    result: dict[str, Any] = {"accuracy": tables, "rows": {n: len(r) for n, r in splits.items()},
                              "by task": {n: accuracy_by_group(splits[n], answers[n], world_score, lambda r: r.task)
                                          for n in splits},
                              "attribute questions by objects": {n: by_objects(splits[n], answers[n]) for n in splits},
                              "skipped (longer than the context)": skipped,
                              "skipped by line (longer than the context)": too_long,
                              "unreadable rows": unreadable,
                              "samples": _samples(splits["test"], answers["test"]),
                              "temperature": _temperatures(model, splits["test"])}
    checked = "held-out" if "held-out" in splits else "test"
    result["best of"] = [_best_of(model, "joint", splits[checked], answers[checked], checked,
                                  "description from an image")]
    if transfer is not None:
        result["transfer"] = {}
        result["whitened"] = {"joint decoder": _whitens(model), "image-only decoder": _whitens(transfer)}
        for name, rows in splits.items():
            audio = audio_descriptions(rows)
            said = answer_rows(transfer, audio)
            if not audio:  # no sound descriptions in this split: nothing to transfer to
                continue
            table = accuracy_by_group(audio, said, world_score, row_group)
            result["transfer"][name] = {"image-only decoder": table["description from a sound"]["accuracy"],
                                        "joint decoder": tables[name]["description from a sound"]["accuracy"],
                                        "n": len(audio)}
            if name == "test":
                result["best of"].append(_best_of(transfer, "image-only", audio, said, name,
                                                  "description from a sound"))
    result["best of"] = [b for b in result["best of"] if b]
    return result


def _best_of(model: Any, decoder: str, rows: list[InstructionRow], answers: list[Generation], split: str,
             group: str) -> dict[str, Any]:
    """Greedy against best of BEST_OF on the first BEST_OF_ROWS rows of `group`, and the first one's
    candidates (whatever its outcome)."""
    picked = [(r, a) for r, a in zip(rows, answers) if row_group(r) == group][:BEST_OF_ROWS]
    if not picked:
        return {}
    best = model.generate([row_prompt(r) for r, _ in picked], max_new_tokens=48, temperature=1.0, best_of=BEST_OF,
                          seed=0)
    row, greedy = picked[0]
    return {"decoder": decoder, "split": split, "group": group, "n": len(picked), "best_of": BEST_OF,
            "greedy": sum(world_score(r, a.text) for r, a in picked) / len(picked),
            "best": sum(world_score(r, b.text) for (r, _), b in zip(picked, best)) / len(picked),
            "sample": {"prompt": _show(row), "truth": row.answer, "greedy": greedy.text,
                       "candidates": [{"text": c.text, "logprob": c.logprob, "similarity": c.similarity,
                                       "score": c.score, "correct": bool(world_score(row, c.text))}
                                      for c in best[0].candidates[:4]]}}


def _reads(whitened: dict[str, bool] | None) -> str:
    """'. The image-only decoder reads the raw vectors, the joint one whitens them', or ''."""
    if not whitened or whitened["image-only decoder"] == whitened["joint decoder"]:
        return ""
    how = {True: "whitens them", False: "reads the raw vectors"}
    return f". The image-only decoder {how[whitened['image-only decoder']]}, the joint one {how[whitened['joint decoder']]}"


def _whitens(model: Any) -> bool:
    return model.prompt_model.lm.whitening is not None


def _show(row: InstructionRow) -> str:
    parts = [s.strip() if isinstance(s, str) else f"[{NOUN[s[0].value]} {Path(str(s[1])).name}]" for s in row.prompt]
    return " ".join(p for p in parts if p)


def _samples(rows: list[InstructionRow], answers: list[Generation]) -> list[dict[str, str]]:
    """One example of each kind of prompt from the test split: prompt, answer, ground truth."""
    kinds = ["description from an image", "description from a sound", "description from an image and its sound",
             "two-item comparison (image + sound)", "attribute question (sound)"]
    out = []
    for kind in kinds:
        for row, answer in zip(rows, answers):
            if row_group(row) == kind:
                out.append({"kind": kind, "prompt": _show(row), "answer": answer.text, "truth": row.answer,
                            "correct": bool(world_score(row, answer.text))})
                break
    return out


def _temperatures(model: Any, rows: list[InstructionRow]) -> list[dict[str, Any]]:
    """One description prompt sampled at a low and a high temperature, with its mean entropy."""
    row = next((r for r in rows if row_group(r) == "description from an image"), None)
    out: list[dict[str, Any]] = []
    if row is None:
        return out
    for t in (0.2, 1.5):
        g = model.generate(row_prompt(row), max_new_tokens=48, temperature=t, seed=0)
        out.append({"temperature": t, "prompt": _show(row), "answer": g.text, "mean_entropy": g.mean_entropy})
    return out


def report_lines(result: dict[str, Any]) -> list[str]:
    """The report's "Prompting" section in markdown."""
    tables = result["accuracy"]
    names = list(tables)
    lines = ["## Prompting", "",
             "The decoder reads prompts that interleave text with images, sounds and captions (each one a "
             "shared-space vector turned into soft tokens) and answers in text. Greedy answers to every prompt "
             "of the test split and of the held-out combinations; a description is correct when it names the "
             "shape and colour of every object (written as the world's captions are, sizes and positions not "
             "checked), any other answer must match exactly.", "",
             "| prompt | " + " | ".join(f"{n} (goal)" for n in names) + " |", "|---|" + "---:|" * len(names)]
    too_long = result.get("skipped by line (longer than the context)", {})

    def cell(name: str, group: str) -> str:
        """A line's accuracy, and how many of its rows outgrew the context when some did."""
        if group not in tables[name]:
            return "–"
        cut = too_long.get(name, {}).get(group, 0)
        n = tables[name][group]["n"]
        return f"{tables[name][group]['accuracy']:.3f}" + (f" ({n} of {n + cut})" if cut else "")

    for group, goals in HEADLINE.items():
        cells = [f"{cell(n, group)} (≥ {goals[min(i, 1)]:.2f})" for i, n in enumerate(names)]
        lines.append(f"| **{group}** | " + " | ".join(cells) + " |")
    others = list(dict.fromkeys(g for n in names for g in tables[n] if g not in HEADLINE))
    for group in others:
        lines.append(f"| {group} | " + " | ".join(cell(n, group) for n in names) + " |")
    skipped = result.get("skipped (longer than the context)", {})
    unreadable = result.get("unreadable rows", {})
    lines += ["", "Prompts scored per split: " + ", ".join(
                  f"{n} {result['rows'][n]} of {result['rows'][n] + skipped.get(n, 0) + unreadable.get(n, 0)}"
                  for n in names)
              + "".join(f"; {n}: {k} skipped, prompt and answer longer than the context"
                        for n, k in skipped.items() if k)
              + "".join(f"; {n}: {k} unreadable row(s) skipped" for n, k in unreadable.items() if k) + ". "
              "\"(n of m)\": the line was scored on the n of its m rows that fit the context. A memory dialogue "
              "shows its earlier turns with the world's reference answers, as the decoder trains on them; a "
              "`Session` shows the decoder's own answers instead (the memory section measures that).", ""]
    lines += _by_task_lines(result.get("by task"))
    lines += _by_objects_lines(result.get("attribute questions by objects", {}).get("test"))
    if "transfer" in result:
        lines += ["### Cross-modal transfer", "",
                  "A second decoder trained on image prompts only — it never saw a sound — answers the same "
                  "audio description prompts through the shared space (goal: colour and shape right ≥ "
                  f"{TRANSFER_GOAL:.1f}){_reads(result.get('whitened'))}:", "",
                  "| split | image-only decoder | joint decoder | prompts |", "|---|---:|---:|---:|"]
        for name, t in result["transfer"].items():
            lines.append(f"| {name} | {t['image-only decoder']:.3f} | {t['joint decoder']:.3f} | {t['n']} |")
        lines.append("")
    lines += _best_of_lines(result.get("best of"))
    lines += ["### Sample answers (test split, greedy)", "", "| prompt | answer | ground truth |", "|---|---|---|"]
    for s in result["samples"]:
        mark = "✓" if s["correct"] else "✗"
        lines.append(f"| {s['prompt']} | {mark} {s['answer']} | {s['truth']} |")
    if not result["temperature"]:  # no picture description in the test split to sample
        return lines + [""]
    lines += ["", "### Temperature and entropy", "",
              "The same prompt sampled at two temperatures; entropy is that of the distribution each token was "
              "drawn from, in nats, averaged over the answer:", "",
              "| temperature | answer | mean entropy |", "|---:|---|---:|"]
    for t in result["temperature"]:
        lines.append(f"| {t['temperature']} | {t['answer']} | {t['mean_entropy']:.3f} |")
    lines.append(f"\nPrompt: {result['temperature'][0]['prompt']}\n")
    return lines


def _by_task_lines(tables: dict[str, dict[str, dict]] | None) -> list[str]:
    if not tables:
        return []
    names = list(tables)
    tasks = list(dict.fromkeys(t for n in names for t in tables[n]))
    lines = ["### Accuracy per task", "",
             "The rows above, split by the task of their prompt (`mmembed eval RUN --instructions M` prints the "
             "same for any instruction manifest):", "",
             "| task | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for task in tasks:
        cells = [f"{tables[n][task]['accuracy']:.3f} ({tables[n][task]['n']})" if task in tables[n] else "–"
                 for n in names]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return lines + [""]


def _by_objects_lines(table: dict[str, dict[str, dict]] | None) -> list[str]:
    if not table:
        return []
    lines = ["### Attribute questions by the objects in the item (test)", "",
             "About one of two objects, a question first has to find it by another attribute (\"the star\", "
             "\"the object on the left\"; \"is there a red star?\" asks for a colour and a shape together). "
             "The last column is what answering about one of the two objects at random would score:", "",
             "| question | one object | two objects | two objects, either one |", "|---|---:|---:|---:|"]
    for task, cells in table.items():
        shown = [f"{cells[k]['accuracy']:.3f} ({cells[k]['n']})" if k in cells else "–" for k in ("1", "2")]
        either = cells.get("2", {}).get("either object")
        lines.append(f"| {task} | " + " | ".join(shown) + f" | {'–' if either is None else f'{either:.3f}'} |")
    return lines + [""]


def _best_of_lines(checks: list[dict[str, Any]] | None) -> list[str]:
    if not checks:
        return []
    n = checks[0]["best_of"]
    lines = [f"### Best of {n}, judged by the shared space", "",
             f"`generate(..., best_of={n}, temperature=1)`: the greedy answer and {n - 1} samples, ranked by mean "
             "log-probability per token plus the space's logit scale × the cosine between the answer's text vector "
             "and the prompt's media. The decoder rarely writes a shape after a colour it never followed in "
             "training, and a decoder that never saw a sound reads one unsurely; the space places both kinds of "
             f"caption. On the first {BEST_OF_ROWS} prompts of each check (`python -m benchmarks.best_of RUN` runs "
             "every description):", "",
             "| check | decoder | prompts | greedy | best of " + str(n) + " |", "|---|---|---:|---:|---:|"]
    lines += [f"| {c['group']}, {c['split']} | {c['decoder']} | {c['n']} | {c['greedy']:.3f} | **{c['best']:.3f}** |"
              for c in checks]
    sample = checks[0]["sample"]
    lines += ["", f"The first prompt of the first check: {sample['prompt']} (truth: {sample['truth']}); greedy: "
              f"{sample['greedy']}", "", "| candidate | mean log-prob | cosine | score |", "|---|---:|---:|---:|"]
    for c in sample["candidates"]:
        mark = "✓" if c["correct"] else "✗"
        cos = "–" if c["similarity"] is None else f"{c['similarity']:.3f}"
        lines.append(f"| {mark} {c['text']} | {c['logprob']:.3f} | {cos} | {c['score']:.2f} |")
    return lines + [""]
