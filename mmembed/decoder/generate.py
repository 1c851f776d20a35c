"""Autoregressive generation: prefill the prompt once, then one token per step from the KV cache.

    prompts ─► left-padded ids + media vectors ─► prefill (whole prompt, fills the caches)
            ─► logits of the last position ─► choose ─► feed the token back ─► … until every row
               has written <eos>, a stop token or string, or max_new_tokens

This file sizes the answers to the context (`answer_room`, `room_batches`), prepares the inputs and
runs batches (`run`, `generate`, seeding); the decoding loop itself is decode.py, an answer and its
stops answer.py, streaming stream.py.

A batch is left-padded so that every row's last prompt token sits in the last column: the next
token of every row is then predicted from the same column. Positions count real tokens only
(position = number of real tokens before), and padding is masked out of attention, so a row
gives the same greedy tokens alone or in any batch (its logits agree within float error; sampled
rows draw from one seeded stream for the batch, so their samples depend on the batch). A batch shares one context, so `generate` runs a
prompt apart from any prompt long enough to leave it less room for its answer than it has alone.

A decoder with a sliding window W keeps W keys per layer (rolling caches) and, with rotary or
sinusoidal positions, is not bounded by its context: prompts may be longer than it and
generation runs on past it, positions still growing. Without a window (or with learned
positions) the context bounds prompt + answer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from mmembed.decoder.answer import Generation, Stops, _Row
from mmembed.decoder.decode import decode_steps, pad_left
from mmembed.decoder.fusion import MultimodalLM
from mmembed.decoder.model import Decoder
from mmembed.decoder.prompt import PromptFormat, Resolved
from mmembed.decoder.sampling import Sampling
from mmembed.errors import BadInput
from mmembed.scalars import as_integer

log = logging.getLogger(__name__)


@torch.inference_mode()
def prepare_inputs(lm: MultimodalLM, fmt: PromptFormat, prompts: list[Resolved], max_new_tokens: int,
                   device: torch.device) -> tuple[Tensor, Tensor | None, list[int], int]:
    """Left-padded prompt embeddings (B, T, C) with soft tokens in place, the mask (None when no row
    is padded), each prompt's length and the steps to generate."""
    # each prompt encoded once, only as far as its refusal needs (a 5 MB line was encoded whole to be refused)
    counted = None if lm.decoder.slides else _COUNTED * lm.decoder.max_len
    rows = [fmt.encode(p.parts, at_most=counted) for p in prompts]
    longest = max(range(len(rows)), key=lambda i: len(rows[i]))
    _check_fits(lm.decoder, len(rows[longest]), longest if len(rows) > 1 else None, counted)
    steps = _steps(lm.decoder, len(rows[longest]), max_new_tokens)
    ids, mask = pad_left(fmt, rows, device)
    vectors = [p.vectors for p in prompts if p.vectors.shape[0]]
    embeds = lm.embed(ids, torch.cat(vectors) if vectors else None)  # (B, T, C)
    return embeds, mask, [len(r) for r in rows], steps


def answer_room(context: float, longest: int) -> float:
    """New tokens a decoder with `context` positions can write after a prompt of `longest` tokens:
    the last one is predicted from the last position and never fed back, so a prompt as long as
    the context still gets one."""
    return context + 1 - longest


def _steps(decoder: Decoder, longest: int, max_new_tokens: int) -> int:
    """New tokens to generate after a prompt of `longest` tokens: all of them past the context for
    a sliding decoder; otherwise the context caps prompt + answer (`answer_room`; a warning when it
    cuts), a window with learned positions too (it refused: "sliding past the context ...")."""
    context = decoder.max_len
    _check_fits(decoder, longest)
    check_max_new_tokens(max_new_tokens)
    if decoder.slides:
        return max_new_tokens
    steps = min(max_new_tokens, int(answer_room(context, longest)))
    if steps < max_new_tokens:
        log.warning("generation capped at %d new tokens by the %d-token context", steps, context)
    return steps


def check_prompts_fit(lm: MultimodalLM, fmt: PromptFormat, prompts: list[Resolved]) -> list[int] | None:
    """BadInput naming the longest prompt (its index in `prompts`) when it outgrows the context
    of a decoder that does not slide; the prompts' lengths in tokens, or None for one that slides."""
    if lm.decoder.slides:
        return None
    counted = _COUNTED * lm.decoder.max_len  # exact up to this many; past it, "more than"
    lengths = [fmt.length(p.parts, at_most=counted) for p in prompts]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    _check_fits(lm.decoder, lengths[longest], longest if len(prompts) > 1 else None, counted)
    return lengths


_COUNTED = 4  # a prompt is counted exactly up to this many contexts


def _check_fits(decoder: Decoder, longest: int, which: int | None = None, counted: int | None = None) -> None:
    """BadInput unless a prompt of `longest` tokens fits the context (`which`: its index in a batch;
    `counted`: a `longest` above it is only known to be more than it)."""
    if not decoder.slides and longest > decoder.max_len:
        prompt = "prompt" if which is None else f"prompt {which}"
        size = f"more than {counted:,}" if counted is not None and longest > counted else f"{longest}"
        raise BadInput(f"{prompt} of {size} tokens exceeds the decoder's context of {decoder.max_len} tokens "
                       "(shorten it, or train with a larger decoder.context)")


def check_max_new_tokens(max_new_tokens: object) -> None:
    if (n := as_integer(max_new_tokens)) is None or n < 1:  # any integer type: numpy's too
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")


def room_batches(lengths: Sequence[int], context: float, max_new_tokens: int,
                 batch_size: int | None = None) -> list[list[int]]:
    """Prompt indices (by prompt length in tokens) in batches that cut no answer short.

    A left-padded batch shares one context, so its longest prompt caps every row's answer: a
    prompt never joins a batch whose longest one would leave it less room than it has alone.
    Prompts that leave room for `max_new_tokens` (`answer_room`) go together freely; longer ones
    only with prompts as long. Batches hold similar lengths (little padding), at most `batch_size`
    prompts each, every batch's indices in ascending order.
    """
    free = answer_room(context, max_new_tokens)  # the longest prompt with room for the whole answer
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):  # shortest first: [0] is a batch's shortest
        if not batches or len(batches[-1]) == batch_size or lengths[i] > max(free, lengths[batches[-1][0]]):
            batches.append([])
        batches[-1].append(i)
    return [sorted(b) for b in batches]


def run(lm: MultimodalLM, fmt: PromptFormat, prompts: list[Resolved], max_new_tokens: int, sampling: Sampling,
        stop: Stops, seed: int | torch.Generator | None, device: torch.device) -> Iterator[list[_Row]]:
    """Generate for a batch; yields the rows after every step (streaming reads them). `seed`: an
    int, or a generator already seeded, which batches that share one seed draw on in turn.

    The decoder is in eval mode only while a step computes, never while the caller holds a row: a
    stream left suspended (or collected later) leaves the mode as its caller sets it."""
    with _eval_mode(lm):
        embeds, mask, lengths, steps = prepare_inputs(lm, fmt, prompts, max_new_tokens, device)
    generator = seeded(seed, device)
    rows = [_Row(fmt, stop, n) for n in lengths]
    if steps < 1:
        yield rows
        return
    never = fmt.never_written(lm.decoder.vocab_size)
    choices = decode_steps(lm.decoder, embeds, mask, steps, sampling, generator, never)
    for step in range(steps):
        with _eval_mode(lm):  # a step is one forward (the prefill, then one token), run inside next()
            choice = next(choices)
        tokens, logprobs, entropy = choice.tokens.tolist(), choice.logprobs.tolist(), choice.entropy.tolist()
        for row, t, lp, h in zip(rows, tokens, logprobs, entropy):
            if not row.done:
                row.add(t, lp, h, last=step == steps - 1)
        yield rows
        if all(r.done for r in rows):
            return


@contextmanager
def _eval_mode(lm: MultimodalLM) -> Iterator[None]:
    if not lm.training:  # as a loaded model is: the two walks over every module cost 30% of a token's time
        yield
        return
    lm.eval()
    try:
        yield
    finally:
        lm.train()


def generate(lm: MultimodalLM, fmt: PromptFormat, prompts: list[Resolved], max_new_tokens: int,
             sampling: Sampling, stop: Stops, seed: int | torch.Generator | None, device: torch.device
             ) -> list[Generation]:
    """Run a batch to the end; one `Generation` per prompt. Prompts whose answers a longer prompt
    of the batch would cut short for room run in a batch of their own (`room_batches`), so a
    greedy answer is the same alone or in any batch; those batches draw on one seeded generator
    in turn (the same seed for each would give their first rows the same draws)."""
    check_max_new_tokens(max_new_tokens)
    batches = [list(range(len(prompts)))]
    if len(prompts) > 1 and (lengths := check_prompts_fit(lm, fmt, prompts)) is not None:
        batches = room_batches(lengths, lm.decoder.max_len, max_new_tokens)  # before any batch runs
    out: dict[int, Generation] = {}
    generator = seeded(seed, device)
    for batch in batches:
        rows: list[_Row] = []
        for rows in run(lm, fmt, [prompts[i] for i in batch], max_new_tokens, sampling, stop, generator, device):
            pass
        out.update((i, row.out) for i, row in zip(batch, rows))
    return [out[i] for i in range(len(prompts))]


def seeded(seed: int | torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """A generator on `device` seeded with `seed`; a generator is used as it is (None: torch's own)."""
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    check_seed(seed)
    return torch.Generator(device=device).manual_seed(int(seed))


def check_seed(seed: object) -> None:
    """ValueError unless `seed` is None or an integer in [0, MAX_SEED] (room for the seeds of
    best_of's batches after it, below 2**63)."""
    if seed is not None and ((n := as_integer(seed)) is None or not 0 <= n <= MAX_SEED):  # numpy's ints too
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}] or None, got {seed!r}")


MAX_SEED = 2**63 - 1025
