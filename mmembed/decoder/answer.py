"""One answer as the decoder writes it: the `Generation` it becomes, the `Stops` that end it
besides <eos>, and `_Row`, which adds each generated token, decodes the text and cuts it before a
stop string. The decoding loop is decode.py; `run` / `generate` (generate.py) and stream.py drive rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from mmembed.decoder.prompt import PromptFormat
from mmembed.scalars import as_integer
from mmembed.text_encoding import SURROGATE


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
        [0, vocab_size), or a string holding a lone surrogate, which could never be written, is a
        ValueError."""
        # a 0-d array or tensor is one value (iterating it is a TypeError): an id, or refused below
        single = stop is None or isinstance(stop, str) or getattr(stop, "ndim", None) == 0 or as_integer(stop) is not None
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
        for i, s in enumerate(strings):
            if m := SURROGATE.search(s):  # a command line's undecodable byte: no decoded text holds it
                raise ValueError(f"stop string {i}: text is not valid UTF-8 (an undecodable character at "
                                 f"position {m.start()})")
        return cls(strings, frozenset(ids))

    def cut(self, text: str) -> int | None:
        """Index of the earliest stop string in `text`, or None."""
        found = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        return min(found) if found else None

    @property
    def holdback(self) -> int:
        """Characters a stream must hold back: they may be the start of a stop string."""
        return max((len(s) for s in self.strings), default=1) - 1


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
