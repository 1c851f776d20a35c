"""Evaluation of a run's decoder on an instruction manifest: accuracy per task, and every answer.

    manifest ─► rows (bad rows skipped and counted) ─► rows that fit the decoder's context
             ─► greedy answers, batched as each row would be answered alone (`answer_rows`;
                a row whose media cannot be read is skipped and counted too; none readable: an error
                saying where the paths were looked for), each row writing up to its reference
                answer's length and some slack (at least 48 tokens), or up to max_new_tokens
             ─► score(row, answer) ─► accuracy per task and overall, and the answers (JSON)

Scoring: an answer is right when it equals the row's answer after both are normalised
(compatibility forms, spaces and case, trailing punctuation: "Red." = "Ｒｅｄ…" = "red") — exact
match of short answers (VQA's scorer also drops articles and inner punctuation and spells numbers
as digits; this one does not). Rows of the built-in world (`mmembed data synth`; every task one of the world's,
with its `objects`) are scored by the world's own reader instead, as the demo scores them: a
description is right when it reads as one of the world's captions and names exactly the shape
and colour of every object (its sizes and positions stated, their values not checked).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mmembed.checkpoint import atomic_write_json
from mmembed.data.instructions import InstructionRow, read_instructions
from mmembed.data.manifest import INLINE_MODALITIES
from mmembed.data.synth import TASK_GROUPS, TASKS, score
from mmembed.data.synth.instructions import normalise, objects_problem, same_answer
from mmembed.decoder.evaluate import accuracy_by_group, answer_rows, fitting
from mmembed.decoder.generate import check_max_new_tokens
from mmembed.errors import UserError
from mmembed.retrieval.embed import media_root_hint, outside_root_allowed

log = logging.getLogger(__name__)

OVERALL, UNTASKED = "(all tasks)", "(no task)"


def exact_match(row: InstructionRow, text: str) -> bool:
    return same_answer(text, row.answer)


def world_score(row: InstructionRow, text: str) -> bool:
    return score({"task": row.task, "answer": row.answer, **row.meta}, text)


def scorer(rows: Sequence[InstructionRow]) -> tuple[str, Callable[[InstructionRow, str], bool]]:
    """(name, score function): the built-in world's reader when every row is one of its own.
    UserError, before any answer is generated, for a description whose `objects` it cannot read
    (a flat list, [] or null: a traceback once every answer had been generated)."""
    if rows and all(r.task in TASKS and "objects" in r.meta for r in rows):
        for r in rows:  # a description is scored by its objects
            if r.task in TASK_GROUPS["describe"] and (problem := objects_problem(r.meta["objects"])) is not None:
                raise UserError(f"line {r.line}: {problem}")
        return "built-in world (descriptions by shapes and colours, other answers exact)", world_score
    return "exact match (normalised)", exact_match


def instruction_report(model: Any, manifest: str | Path, *, max_new_tokens: int | None = None,
                       batch_size: int = 64) -> dict[str, Any]:
    """Answer every row of `manifest` greedily and score the answers.

    Args:
        max_new_tokens: the most tokens an answer may take; a row whose reference answer takes
            more is not scored, as it could not be right. None: each row may write its reference
            answer, its end token and some slack, at least 48 tokens (`answer_budget`).

    Returns:
        {"manifest", "scoring", "rows" (scored), "skipped" (bad rows), "skipped_rows" ([{"line",
         "reason"}] of those, in line order), "too_long" (rows whose
         prompt and answer do not fit the decoder's context: not scored, as training skips them),
         "max_new_tokens" (None: each row its own), "cut_short" (rows whose reference answer takes
         more than max_new_tokens: not scored),
         "tasks": {task: {"n", "correct", "accuracy"}} with OVERALL last,
         "answers": [{"line", "task", "answer", "reference", "correct"}] in manifest order}.
    """
    from mmembed.data.synth.world_folder import check_complete

    check_complete(Path(manifest).parent)  # a world cut short: its rows name media never rendered
    _check_arguments(model, max_new_tokens, batch_size)
    instructions = read_instructions(manifest, allow_outside_root=outside_root_allowed(model))
    rows = fitting(model, instructions.rows)
    too_long = len(instructions.rows) - len(rows)  # before unreadable rows go: they are counted as skipped
    if not rows:
        raise UserError(f"{manifest}: no row fits the decoder's context of {model.prompt_model.lm.decoder.max_len} "
                        f"tokens with its answer")
    rows, cut_short = _within(model, manifest, rows, max_new_tokens)
    name, score_fn = scorer(rows)
    unreadable: list[tuple[int, str]] = []  # rows whose media cannot be read: skipped and counted, as bad rows
    answers = answer_rows(model, rows, max_new_tokens=max_new_tokens, batch_size=batch_size, bad=unreadable)
    _check_media_read(model, manifest, rows, unreadable)
    rows, answers = [r for r, a in zip(rows, answers) if a is not None], [a for a in answers if a is not None]
    for skipped, what in ((instructions.skipped, "bad"), (unreadable, "with unreadable media"),
                          (cut_short, f"whose reference answer is longer than max_new_tokens={max_new_tokens}")):
        if skipped:  # a file of mostly bad rows must not pass for a small accurate one
            log.warning("%s: %d row(s) skipped, %s (first, line %d: %s)", manifest, len(skipped), what, *skipped[0])
    tasks = accuracy_by_group(rows, answers, score_fn, lambda r: r.task or UNTASKED)
    correct = [bool(score_fn(r, a.text)) for r, a in zip(rows, answers)]
    tasks[OVERALL] = {"n": len(rows), "correct": sum(correct), "accuracy": sum(correct) / len(rows)}
    return {
        "manifest": str(manifest), "scoring": name, "rows": len(rows),
        "skipped": len(instructions.skipped) + len(unreadable),
        "skipped_rows": [{"line": line, "reason": why} for line, why in sorted([*instructions.skipped, *unreadable])],
        "too_long": too_long, "max_new_tokens": max_new_tokens, "cut_short": len(cut_short), "tasks": tasks,
        "answers": [{"line": r.line, "task": r.task, "answer": a.text, "reference": r.answer, "correct": c}
                    for r, a, c in zip(rows, answers, correct)],
    }


def _check_arguments(model: Any, max_new_tokens: int | None, batch_size: int) -> None:
    if getattr(model, "prompt_model", None) is None:
        from mmembed.model_load import no_decoder

        raise UserError(no_decoder(model, "answer prompts"))
    if max_new_tokens is not None:  # -3 answered one token a row (a wrong accuracy), "8" a TypeError
        check_max_new_tokens(max_new_tokens)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def _within(model: Any, manifest: str | Path, rows: list[InstructionRow], max_new_tokens: int | None
            ) -> tuple[list[InstructionRow], list[tuple[int, str]]]:
    """The rows whose reference answer max_new_tokens leaves room for, and the (line, reason) of the
    others: cut short, they were scored wrong without a word."""
    if max_new_tokens is None:
        return rows, []
    need = [_answer_tokens(model, r.answer) for r in rows]
    kept = [r for r, n in zip(rows, need) if n <= max_new_tokens]
    cut = [(r.line, f"its reference answer takes {n} tokens") for r, n in zip(rows, need) if n > max_new_tokens]
    if not kept:
        raise UserError(f"{manifest}: every row's reference answer takes more than max_new_tokens={max_new_tokens} "
                        f"tokens (the shortest, {min(need)}): raise --max-new-tokens, or leave it out to let each "
                        "row write its own")
    return kept, cut


def _answer_tokens(model: Any, answer: str) -> int:
    """Tokens of the shortest answer scored right, its end token not needed: scoring normalises case,
    spaces and final punctuation (a reference "  RED. " is right as "red")."""
    forms = [answer, normalise(answer)] if normalise(answer) else [answer]
    return min(len(model.prompt_model.fmt.encode_answer(form)) - 1 for form in forms)  # - its end token


def _check_media_read(model: Any, manifest: str | Path, rows: list[InstructionRow],
                      unreadable: list[tuple[int, str]]) -> None:
    """UserError, saying where the media paths were looked for, when no row with media could be read:
    the rows left (text only, or none) would report an accuracy that measures nothing of the media."""
    # files only: a row whose one item is a caption (`{"text": ...}`) is always read, and counting it
    # let 12 caption rows score 1.000 with rc 0 while all 44 rows with pictures were looked for elsewhere
    with_media = [r for r in rows if any(m not in INLINE_MODALITIES for m, _ in r.media)]
    if not with_media or len(unreadable) < len(with_media):
        return
    where = SimpleNamespace(root=os.path.abspath(Path(manifest).parent),  # where read_instructions resolved them
                            rows=[SimpleNamespace(items=dict(r.media)) for r in with_media])
    hint = media_root_hint(model, where)
    text_only = len(rows) - len(with_media)
    rest = f"; its {text_only} row(s) without a media file were not scored alone" if text_only else ""
    raise UserError(f"{manifest}: no row's media could be read ({len(with_media)} row(s) with media files; first, line "
                    f"{min(unreadable)[0]}: {min(unreadable)[1]}){'; ' + hint if hint else ''}{rest}")


def format_instruction_table(report: dict[str, Any]) -> str:
    """Markdown: one line per task (and all of them), with the rows left out below."""
    lines = ["| task | accuracy | correct / rows |", "|---|---:|---:|"]
    lines += [f"| {task} | {t['accuracy']:.3f} | {t['correct']} / {t['n']} |" for task, t in report["tasks"].items()]
    cut = (f", {report['cut_short']} row(s) whose reference answer is longer than max_new_tokens="
           f"{report['max_new_tokens']}" if report.get("cut_short") else "")
    lines.append(f"\nscoring: {report['scoring']}; not scored: {report['too_long']} row(s) longer than the "
                 f"context{cut}, {report['skipped']} bad row(s)")
    if first := report.get("skipped_rows"):
        lines[-1] += f" (first, line {first[0]['line']}: {first[0]['reason']})"
    return "\n".join(lines)


def run_instruction_eval(run: str | Path | Any, manifest: str | Path, *, out: str | Path | None = None,
                         max_new_tokens: int | None = None) -> tuple[str, dict[str, Any]]:
    """What `mmembed eval RUN --instructions M` runs: (markdown table, report); the report, every
    answer included, is also written to `out` as JSON. `max_new_tokens` None: each row its own
    budget (`instruction_report`)."""
    if isinstance(run, (str, Path)):
        from mmembed.model import load

        run = load(run)
    report = instruction_report(run, manifest, max_new_tokens=max_new_tokens)
    if out is not None:
        atomic_write_json(Path(out), report)
    return format_instruction_table(report), report
