"""Streaming one prompt's answer: text pieces (`stream`) or tokens with the text each releases
(`stream_tokens`, and `replay_tokens` for an answer already generated). Text is held back while it
ends in an incomplete UTF-8 character or could start a stop string. The rows come from `run`
(generate.py); an answer and its stops are answer.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from mmembed.decoder.answer import Generation, Stops, _Row
from mmembed.decoder.fusion import MultimodalLM
from mmembed.decoder.generate import run
from mmembed.decoder.prompt import PromptFormat, Resolved
from mmembed.decoder.sampling import Sampling


@dataclass(frozen=True)
class StreamedToken:
    """One generated token as `stream_tokens` reports it.

    `text` is the answer text this token releases: empty while it ends in an incomplete UTF-8
    character or could start a stop string (the next tokens release it); the last token, <eos> or
    a stop id included, carries whatever was held back. The texts of a stream join to the answer's
    `Generation.text`; `logprob` and `entropy`
    (nats) are those of `Generation.logprobs` / `Generation.entropy` at this step.
    """

    id: int
    text: str
    logprob: float
    entropy: float


def stream_tokens(lm: MultimodalLM, fmt: PromptFormat, prompt: Resolved, max_new_tokens: int, sampling: Sampling,
                  stop: Stops, seed: int | None, device: torch.device) -> Iterator[StreamedToken]:
    """Yield every generated token of one prompt's answer with the text it releases (see `stream`
    for what is held back). A token is yielded once the next one is decoded, so the last one can
    carry the text held back at the end."""
    steps = (row for (row,) in run(lm, fmt, [prompt], max_new_tokens, sampling, stop, seed, device))
    yield from _released(steps, stop)


def replay_tokens(fmt: PromptFormat, generation: Generation, stop: Stops) -> list[StreamedToken]:
    """The tokens `stream_tokens` yields for an answer already generated (one chosen by `best_of`)."""
    row = _Row(fmt, stop, generation.prompt_tokens)

    def steps() -> Iterator[_Row]:
        chosen = list(zip(generation.token_ids, generation.logprobs, generation.entropy))
        for i, (token, logprob, entropy) in enumerate(chosen):
            # as the run did: a stop on the final step cut a trailing U+FFFD that an earlier one kept
            row.add(token, logprob, entropy, last=i == len(chosen) - 1 and generation.final_step)
            yield row

    return list(_released(steps(), stop))


def token_texts(fmt: PromptFormat, token_ids: list[int], text: str) -> list[str]:
    """Each generated token's own part of an answer's `text` (its `Generation.text`, cut before a
    stop string): they join to `text`. Unlike a stream's, nothing is held back for a stop string that
    might begin, so a token's text is the one it wrote (only an incomplete UTF-8 character waits for
    the token that completes it); the token where a cut stop string begins and those after it have ""."""
    unstopped = replay_tokens(fmt, Generation("", list(token_ids), [0.0] * len(token_ids), [0.0] * len(token_ids)),
                              Stops())
    texts, used = [], 0
    for token in unstopped:
        texts.append(token.text[:max(len(text) - used, 0)])
        used += len(texts[-1])
    return texts


def _released(steps: Iterator[_Row], stop: Stops) -> Iterator[StreamedToken]:
    """One row after every decoding step → its tokens with the text each releases."""
    sent, pending, row = 0, None, None
    for row in steps:
        out = row.out
        if not out.token_ids:  # no room for a token: nothing was generated
            continue
        if pending is not None:
            yield pending
        safe = _releasable(out.text, sent, row.done, stop.holdback)
        pending = StreamedToken(out.token_ids[-1], out.text[sent:safe], out.logprobs[-1], out.entropy[-1])
        sent = safe
    if pending is not None:
        yield dataclasses.replace(pending, text=pending.text + row.out.text[sent:])


def stream(lm: MultimodalLM, fmt: PromptFormat, prompt: Resolved, max_new_tokens: int, sampling: Sampling,
           stop: Stops, seed: int | None, device: torch.device) -> Iterator[str]:
    """Yield text pieces of one prompt's answer as they are decoded; they join to its `text`.

    A piece is held back while it ends in an incomplete UTF-8 character or could be the start of
    a stop string.
    """
    sent = 0
    row = None
    for (row,) in run(lm, fmt, [prompt], max_new_tokens, sampling, stop, seed, device):
        safe = _releasable(row.out.text, sent, row.done, stop.holdback)
        if safe > sent:
            yield row.out.text[sent:safe]
            sent = safe
    if row is not None and len(row.out.text) > sent:
        yield row.out.text[sent:]


def _releasable(text: str, sent: int, done: bool, holdback: int) -> int:
    """How much of an answer's `text` a stream may have sent, `sent` of it already: all of it once
    the answer is done; before that, not the last `holdback` characters (they could start a stop
    string) nor an incomplete UTF-8 character at the end. Never less than `sent`."""
    if done:
        return len(text)
    end = len(text)
    while end > sent and text[end - 1] == "\ufffd":  # the incomplete character first: it is no
        end -= 1  # character of a stop string yet, so it must not count as one of the held back
    return max(end - holdback, sent)
