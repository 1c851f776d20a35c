"""Autoregressive generation: prefill the prompt once, then one token per step from the KV cache.

    prompts ─► left-padded ids + media vectors ─► prefill (whole prompt, fills the caches)
            ─► logits of the last position ─► choose ─► feed the token back ─► … until every row
               has written <eos>, a stop token or string, or max_new_tokens

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

import dataclasses
import logging
import operator
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mmembed.decoder.fusion import MultimodalLM
from mmembed.decoder.model import Decoder
from mmembed.decoder.prompt import PromptFormat, Resolved
from mmembed.decoder.sampling import Choice, Sampling, choose
from mmembed.errors import BadInput

log = logging.getLogger(__name__)


@dataclass
class Generation:
    """What the decoder wrote for one prompt.

    Attributes:
        text: the answer, without special tokens and cut before a stop string.
        token_ids: every generated id, the final <eos> or stop token included.
        logprobs: log-probability of each generated id under the distribution it was drawn from.
        entropy: entropy (nats) of that distribution at each step; 0 for greedy steps.
        finish_reason: "eos", "stop" (a stop string or id), or "length" (max_new_tokens or the
            end of the context).
        prompt_tokens: ids in the prompt (soft tokens and markers included).
        recalled: the memories a `Session` showed the decoder for this answer, best first
            (`MemoryHit`s with scores); empty outside a session.
        candidates: with `best_of` > 1, every distinct answer considered, best first
            (`score.Candidate`s with their scores); empty otherwise.
        final_step: whether the last token came on the last step there was room for, where a
            trailing U+FFFD is final text, not a character still to come (`replay_tokens` reads it).
    """

    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    finish_reason: str = "length"
    prompt_tokens: int = 0
    recalled: list = field(default_factory=list)
    candidates: list = field(default_factory=list)
    final_step: bool = False

    @property
    def mean_entropy(self) -> float:
        return sum(self.entropy) / len(self.entropy) if self.entropy else 0.0


@dataclass
class Stops:
    """When to stop besides <eos>: stop strings (cut from the text) and stop token ids."""

    strings: tuple[str, ...] = ()
    ids: frozenset[int] = frozenset()

    @classmethod
    def parse(cls, stop: str | int | Sequence[str | int] | None, vocab_size: int | None = None) -> Stops:
        """Stop strings and token ids (any integer type: numpy's too) from `stop`; an id outside
        [0, vocab_size), which could never be written, is a ValueError."""
        single = stop is None or isinstance(stop, str) or as_integer(stop) is not None
        # bytes iterate as ints: b"the" was read as three token ids
        if not single and (not isinstance(stop, Iterable) or isinstance(stop, (bytes, bytearray, memoryview))):
            raise ValueError(f"stop must be non-empty strings and/or token ids, got {stop!r}")
        items = [] if stop is None else [stop] if single else list(stop)
        strings = tuple(s for s in items if isinstance(s, str))
        ids = [as_integer(i) for i in items if not isinstance(i, str)]
        if None in ids or any(not s for s in strings):
            raise ValueError(f"stop must be non-empty strings and/or token ids, got {stop!r}")
        if vocab_size is not None and any(not 0 <= i < vocab_size for i in ids):
            raise ValueError(f"stop token ids must be in [0, {vocab_size}), got {sorted(ids)}")
        return cls(strings, frozenset(ids))

    def cut(self, text: str) -> int | None:
        """Index of the earliest stop string in `text`, or None."""
        found = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        return min(found) if found else None

    @property
    def holdback(self) -> int:
        """Characters a stream must hold back: they may be the start of a stop string."""
        return max((len(s) for s in self.strings), default=1) - 1


def as_integer(x: object) -> int | None:
    """`x` as an int when it is an integer of any type (not a bool), else None."""
    if isinstance(x, bool):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


class _Row:
    """One prompt's generation in progress."""

    def __init__(self, fmt: PromptFormat, stops: Stops, prompt_tokens: int) -> None:
        self.fmt, self.stops = fmt, stops
        self.out = Generation(text="", prompt_tokens=prompt_tokens)
        self.done = False
        self._text_ids: list[int] = []

    def add(self, token: int, logprob: float, entropy: float, last: bool = False) -> None:
        """One generated token; `last`: the final step, after which the text is what it is."""
        out = self.out
        out.final_step = last
        out.token_ids.append(token)
        out.logprobs.append(logprob)
        out.entropy.append(entropy)
        if token == self.fmt.eos_id or token in self.stops.ids:
            out.finish_reason = "eos" if token == self.fmt.eos_id else "stop"
            self.done = True
            self._cut(out.text)  # a trailing U+FFFD is final now
            return
        self._text_ids.append(token)
        out.text = self.fmt.decode(self._text_ids)
        # not in a trailing U+FFFD until the last step: it may be the start of a character whose
        # next bytes are still to come (a stop string "\ufffd" stopped at every "é" split over tokens)
        self._cut(out.text if last else out.text.rstrip("\ufffd"))

    def _cut(self, text: str) -> None:
        """End the answer before the earliest stop string in `text` (a prefix of the answer)."""
        if (cut := self.stops.cut(text)) is not None:
            self.out.text, self.out.finish_reason, self.done = self.out.text[:cut], "stop", True


def pad_left(fmt: PromptFormat, rows: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor | None]:
    """Ids (B, T) padded on the left, and the mask (B, T) (None when no row is padded)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), fmt.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[b, width - len(r):] = True
    return ids.to(device), (None if bool(mask.all()) else mask.to(device))


@torch.inference_mode()
def decode_steps(decoder: Decoder, embeds: Tensor, mask: Tensor | None, max_new_tokens: int,
                 sampling: Sampling, generator: torch.Generator | None = None,
                 suppress: Sequence[int] = ()) -> Iterator[Choice]:
    """Yield one `Choice` per step for every row; the caller stops iterating when it is done.

    Args:
        embeds: (B, T, C) left-padded prompt embeddings (soft tokens already in place).
        mask: (B, T) bool, True = real token; None when no row is padded.
        max_new_tokens: steps at most (the caches hold T + max_new_tokens - 1 slots: the last token
            chosen is never fed back).
        suppress: ids never chosen (probability 0), e.g. `PromptFormat.prompt_only_ids`.
    """
    B, T, _ = embeds.shape
    device = embeds.device
    slots = T + max_new_tokens - 1  # the last token chosen is never fed back
    caches = decoder.new_caches(B, slots)
    if mask is None:
        positions = None
        next_pos = torch.tensor([T], device=device)
    else:
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T): real tokens before each
        next_pos = positions[:, -1:] + 1  # (B, 1)
    head = _logits_fn(decoder, torch.tensor(list(suppress), dtype=torch.long, device=device))
    hidden = decoder.hidden(inputs_embeds=embeds, mask=mask, positions=positions, kv_caches=caches)
    logits = head(hidden[:, -1])  # (B, V)
    keys = _KeyMask(mask, slots, caches[0].max_len)
    for step in range(max_new_tokens):
        choice = choose(logits, sampling, generator)
        yield choice
        if step + 1 == max_new_tokens:
            return
        hidden = decoder.hidden(choice.tokens[:, None], mask=keys.last(T + step + 1), positions=next_pos,
                                kv_caches=caches)
        logits = head(hidden[:, -1])
        next_pos = next_pos + 1


class _KeyMask:
    """Key padding masks for the decoding steps of a left-padded batch: the prompt's padding, then
    real tokens. Attention reads a mask's last columns (as many keys as the cache returns), so a
    step gets the columns of the last `width` slots (the most keys a cache call returns): all of
    them for full caches; for rolling caches a bounded slice, None once the padding has left it."""

    def __init__(self, prompt_mask: Tensor | None, slots: int, width: int) -> None:
        self.width = width
        self.prompt = 0 if prompt_mask is None else prompt_mask.shape[1]
        self.full = None
        if prompt_mask is not None:  # one buffer, sliced per step: no allocation in the loop
            B = prompt_mask.shape[0]
            self.full = torch.ones(B, min(slots, self.prompt + width), dtype=torch.bool, device=prompt_mask.device)
            self.full[:, : self.prompt] = prompt_mask

    def last(self, end: int) -> Tensor | None:
        """(B, ≤ width) mask of slots [end - width, end), or None when they are all real tokens."""
        start = max(0, end - self.width)
        if self.full is None or start >= self.prompt:
            return None
        return self.full[:, start:end]  # end <= the buffer's width whenever start < prompt


def _logits_fn(decoder: Decoder, suppress: Tensor):
    """The LM head for this generation, with the `suppress` ids at -inf."""
    def head(h: Tensor) -> Tensor:
        logits = decoder.lm_head(h)
        return logits.index_fill_(-1, suppress, float("-inf")) if len(suppress) else logits

    return head


@torch.inference_mode()
def prepare_inputs(lm: MultimodalLM, fmt: PromptFormat, prompts: list[Resolved], max_new_tokens: int,
                   device: torch.device) -> tuple[Tensor, Tensor | None, list[int], int]:
    """Left-padded prompt embeddings (B, T, C) with soft tokens in place, the mask (None when no row
    is padded), each prompt's length and the steps to generate."""
    rows = [fmt.encode(p.parts) for p in prompts]
    steps = _steps(lm.decoder, max(len(r) for r in rows), max_new_tokens)
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
    lengths = [fmt.length(p.parts) for p in prompts]
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    _check_fits(lm.decoder, lengths[longest], longest if len(prompts) > 1 else None)
    return lengths


def _check_fits(decoder: Decoder, longest: int, which: int | None = None) -> None:
    """BadInput unless a prompt of `longest` tokens fits the context (`which`: its index in a batch)."""
    if not decoder.slides and longest > decoder.max_len:
        prompt = "prompt" if which is None else f"prompt {which}"
        raise BadInput(f"{prompt} of {longest} tokens exceeds the decoder's context of {decoder.max_len} tokens "
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
    int, or a generator already seeded, which batches that share one seed draw on in turn."""
    was_training = lm.training
    lm.eval()
    try:
        embeds, mask, lengths, steps = prepare_inputs(lm, fmt, prompts, max_new_tokens, device)
        generator = seeded(seed, device)
        rows = [_Row(fmt, stop, n) for n in lengths]
        if steps < 1:
            yield rows
            return
        never = fmt.never_written(lm.decoder.vocab_size)
        for step, choice in enumerate(decode_steps(lm.decoder, embeds, mask, steps, sampling, generator, never)):
            tokens, logprobs, entropy = choice.tokens.tolist(), choice.logprobs.tolist(), choice.entropy.tolist()
            for row, t, lp, h in zip(rows, tokens, logprobs, entropy):
                if not row.done:
                    row.add(t, lp, h, last=step == steps - 1)
            yield rows
            if all(r.done for r in rows):
                return
    finally:
        lm.train(was_training)


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
