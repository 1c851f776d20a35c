"""Answer instruction rows with a model and score the answers, per group of rows.

    rows ─► prompts (text + mm.Image / mm.Audio / mm.Text) ─► Model.generate (greedy, batched;
            each row may write its reference answer and a little more, at least 48 tokens)
         ─► score(row, answer) ─► accuracy per group

Prompts go through the public `generate`, the same path users take; scoring is the caller's
(exact match, or a world-specific reader such as the synthetic world's caption parser).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from mmembed.data.instructions import InstructionRow
from mmembed.decoder.answer import Generation
from mmembed.decoder.generate import answer_room, room_batches
from mmembed.decoder.prompt import MEDIA, Segment
from mmembed.errors import BadInput


def row_prompt(row: InstructionRow) -> list[Segment]:
    """An instruction row's prompt as `generate` takes it."""
    return [seg if isinstance(seg, str) else MEDIA[seg[0]](seg[1]) for seg in row.prompt]


ANSWER_FLOOR = 48  # tokens every row may write at least (the built-in world's answers take at most 16)
ANSWER_SLACK = 8  # tokens past its reference (and end token) a row may write: a longer wrong answer shows more


def answer_budget(model: Any, row: InstructionRow) -> int:
    """The new tokens a row may write by default: its reference answer with its end token, plus
    slack, and never fewer than ANSWER_FLOOR (a fixed 48 scored every longer answer cut short)."""
    return max(ANSWER_FLOOR, len(model.prompt_model.fmt.encode_answer(row.answer)) + ANSWER_SLACK)


def answer_rows(model: Any, rows: Sequence[InstructionRow], max_new_tokens: int | None = None,
                batch_size: int = 64, bad: list[tuple[int, str]] | None = None) -> list[Generation | None]:
    """Greedy answers to every row, returned in the order of `rows`, each as it would be alone: in
    batches of up to `batch_size` prompts of similar length, none long enough to cut another's
    answer short (`room_batches`); a batch of long prompts asks for the room it has.

    `max_new_tokens`: the most tokens any row writes; None: each row its `answer_budget`. Either
    way the context caps it (`answer_room`).

    A row whose media cannot be read (a missing or broken file) raises BadInput, or with a `bad`
    list is answered None and recorded there as (its line, the reason): skipped and counted."""
    by_budget: dict[int, list[int]] = defaultdict(list)  # rows of one budget share batches
    for i, row in enumerate(rows):
        by_budget[max_new_tokens if max_new_tokens is not None else answer_budget(model, row)].append(i)
    out: list[Generation | None] = [None] * len(rows)
    for budget, indices in by_budget.items():
        answers = _answer_batches(model, [rows[i] for i in indices], budget, batch_size, bad)
        for i, answer in zip(indices, answers):
            out[i] = answer
    return out


def _answer_batches(model: Any, rows: list[InstructionRow], max_new_tokens: int, batch_size: int,
                    bad: list[tuple[int, str]] | None) -> list[Generation | None]:
    pm = model.prompt_model
    # a decoder that slides (a window, positions past the table) writes on past its context: no
    # batch cuts an answer there; learned positions stop at the context, window or not
    context = math.inf if pm.lm.decoder.slides else pm.lm.decoder.max_len
    lengths = [pm.fmt.length(row_prompt(r)) for r in rows]
    out: list[Generation | None] = [None] * len(rows)
    for batch in room_batches(lengths, context, max_new_tokens, batch_size):
        steps = max(1, min(max_new_tokens, answer_room(context, max(lengths[i] for i in batch))))
        try:
            answers = model.generate([row_prompt(rows[i]) for i in batch], max_new_tokens=steps)
        except BadInput:
            if bad is None:
                raise
            answers = [_alone(model, rows[i], steps, bad) for i in batch]  # which row it was
        for i, answer in zip(batch, answers):
            out[i] = answer
    return out


def _alone(model: Any, row: InstructionRow, steps: int, bad: list[tuple[int, str]]) -> Generation | None:
    try:
        return model.generate(row_prompt(row), max_new_tokens=steps)
    except BadInput as e:
        bad.append((row.line, str(e)))
        return None


def fitting(model: Any, rows: Sequence[InstructionRow]) -> list[InstructionRow]:
    """The rows whose prompt and reference answer (with its end token) fit the decoder's context:
    the rows training and validation keep, so none is scored on an answer cut short for room. A
    decoder that slides (`decoder.window`) could answer a longer one, but it never trained on such
    a row: kept, it was scored where validation had left it out."""
    pm = model.prompt_model
    return [r for r in rows
            if pm.fmt.length(row_prompt(r)) + len(pm.fmt.encode_answer(r.answer)) <= pm.lm.decoder.max_len]


def accuracy_by_group(rows: Sequence[InstructionRow], answers: Sequence[Generation],
                      score: Callable[[InstructionRow, str], bool],
                      group: Callable[[InstructionRow], str]) -> dict[str, dict[str, float]]:
    """{group: {"n": rows, "correct": …, "accuracy": …}}, groups in first-seen order."""
    n: dict[str, int] = defaultdict(int)
    correct: dict[str, int] = defaultdict(int)
    for row, answer in zip(rows, answers, strict=True):
        g = group(row)
        n[g] += 1
        correct[g] += bool(score(row, answer.text))
    return {g: {"n": n[g], "correct": correct[g], "accuracy": correct[g] / n[g]} for g in n}
