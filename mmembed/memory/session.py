"""A conversation that remembers: each turn reads recent turns and recalled memories, then is stored.

    ask(prompt) ─► embed the turn's items (once, by the memory's model; not stored yet)
               ─► recall: the user's older items most similar to the turn (any modality), score ≥ threshold;
                  the turn's words as a question through the query tower when the run has one
               ─► prompt = recalled memories + last turns of this session + this turn
                  (every media item as its vector, inside its modality's markers)
               ─► model.generate ─► store the turn and its answer, in one transaction
               ─► Generation (+ .recalled)

Memories need no second pass through a tower: the store keeps each item's shared-space vector,
and the decoder reads vectors (`Embedded`), so a sound heard in an earlier process comes back
as the same soft tokens it gave then. A new process that opens the same file continues the
user's latest session where the last one stopped.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import inspect
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from mmembed.decoder.generate import answer_room
from mmembed.decoder.prompt import Embedded, Media, Segment
from mmembed.decoder.score import check_generation
from mmembed.errors import BadInput, UserError
from mmembed.memory.checks import check_int, check_model, check_optional_str, check_user, is_number
from mmembed.memory.items import ItemError, Pending
from mmembed.memory.memory import Memory
from mmembed.memory.records import MemoryHit
from mmembed.modality import Modality

log = logging.getLogger(__name__)
_SETTINGS = frozenset(inspect.signature(check_generation).parameters)  # what `ask` passes on to generate

ASSISTANT = "assistant"


class Session:
    """A chat with one user's persistent multimodal memory.

    Args:
        model: a model with a decoder stage (`mm.load(run)`).
        memory: the memory file (created or reopened), or an open `Memory`.
        user: whose memory; recall never reads another user's items.
        session: the conversation to continue or start; None continues the user's latest one,
            the one with the newest item (a new one when there is none or `new=True`).
        history_turns: earlier turns of this session shown in full (oldest dropped first when
            the prompt would not fit the decoder's context).
        recall_k: older memories recalled per turn at most.
        recall_threshold: the cosine similarity a memory needs to be recalled (the turn's words, with
            a run's query tower, need the tower's own threshold instead: `model.query_threshold`).
        new: start a new session even when the user has one (with `session`, a name the user has
            not used: a UserError otherwise).
    """

    def __init__(self, model: Any, memory: str | Path | Memory, user: str, session: str | None = None, *,
                 history_turns: int = 3, recall_k: int = 3, recall_threshold: float = 0.3, new: bool = False) -> None:
        check_model(model)
        if getattr(model, "prompt_model", None) is None:
            raise UserError("a Session needs a model with a decoder stage (train one with a `decoder:` section)")
        history_turns, recall_k = (check_int(value, name, 0, None, "an integer >= 0")
                                   for name, value in (("history_turns", history_turns), ("recall_k", recall_k)))
        # not math.isfinite: 10**400 overflowed it
        if not is_number(recall_threshold) or not -math.inf < recall_threshold < math.inf:
            raise UserError(f"recall_threshold must be a number (a cosine similarity), got {recall_threshold!r}")
        check_user(user)  # before the file is opened: a mistyped name must not create (and claim) it
        check_optional_str(session, "session")
        if session == "":  # an unset shell variable (`--session "$S"`) began a conversation without a name
            raise UserError("session must be a non-empty name, or None for the user's latest conversation")
        self.model, self.user = model, user
        self._own = not isinstance(memory, Memory)
        if not self._own:
            _check_memory_model(memory, model)
        self.memory = Memory(memory, model=model) if self._own else memory
        self.history_turns, self.recall_k, self.recall_threshold = history_turns, recall_k, recall_threshold
        try:
            self.session = self._session(session, new)
            self.turn = self.memory.last_turn(user, self.session)  # the highest, whatever was added after it
        except BaseException:
            self.close()
            raise

    def _session(self, session: str | None, new: bool) -> str:
        """The session to continue or start (see the class's `session` and `new`)."""
        names = self.memory.sessions(self.user)
        if new and session in names:  # it continued that conversation, its old turns fed to the decoder
            raise UserError(f"session {session!r} of {self.user!r} already exists: `new` starts another one "
                            "(leave out the name, or give a new one)")
        if session is None:
            return names[-1] if names and not new else _new_session_name()
        return session

    # ---- one turn --------------------------------------------------------------------------------

    def ask(self, prompt: str | Sequence[Segment], **generate: Any) -> Any:
        """Answer one turn with what the memory holds; the turn and its answer are stored.

        Nothing is stored until the answer is, and then the turn with its answer in one
        transaction: a turn refused, failed or interrupted anywhere (Ctrl-C, a kill) did not happen.

        Args:
            prompt: as `Model.generate` takes one prompt (text, `mm.Image`, `mm.Audio`, `mm.Text`).
            **generate: `max_new_tokens`, `temperature`, `top_k`, `top_p`, `stop`, `seed`.

        Returns:
            The `Generation`, with `recalled`: the older memories shown to the decoder, best first.
        """
        if unknown := sorted(set(generate) - _SETTINGS):  # named as `generate` names its own
            raise TypeError(f"ask() got an unexpected keyword argument {unknown[0]!r}")
        check_generation(**generate)  # a refused setting stores nothing of the turn
        positions, segments = _turn_segments(prompt)
        try:
            pending = self.memory.prepare(segments)  # embedded once; stored as they are, with the answer
        except ItemError as e:  # named as `generate` names a segment: by its place in the prompt as given
            raise BadInput(f"prompt segment {positions[e.position]} ({e.modality}): {e.reason}") from None
        shown = [seg if isinstance(seg, str) else Embedded(z.to(self.model.device), e.modality)
                 for seg, e, z in zip(segments, pending.entries, pending.vectors)]
        # after the highest turn stored: another process may have added turns to this session (the
        # turn's own number is given as it is stored)
        turn = min(max(self.turn, self.memory.last_turn(self.user, self.session)) + 1, 2**63 - 1)
        history = self._history(turn)
        # Candidates beyond recall_k: those in the history shown are left out once `_fit` knows
        # which turns fit, so a memory in a turn the context drops can still be recalled.
        candidates = self._recall(self._queries(pending), k=self.recall_k + len(history))
        max_new_tokens = generate.get("max_new_tokens", 32)
        parts, recalled = self._fit(candidates, history, shown, max_new_tokens)
        pm = self.model.prompt_model
        if pm.lm.decoder.window is not None and not pm.lm.decoder.slides:  # it refuses to write past its context
            room = int(answer_room(pm.lm.decoder.max_len, pm.fmt.length(parts)))
            generate = {**generate, "max_new_tokens": max(1, min(max_new_tokens, room))}
        out = self.model.generate(parts, **generate)
        answer = [self.memory.prepare([out.text], role=ASSISTANT)] if out.text.strip() else []
        self.turn, _ = self.memory.add_turn(self.user, self.session, [pending, *answer])
        return dataclasses.replace(out, recalled=recalled)

    def _history(self, turn: int) -> list[MemoryHit]:
        """Every item of this session's last `history_turns` turns before `turn`, in turn order
        (not by time: a clock set back reordered them; and no item limit: one capped it at 32 turns)."""
        if self.history_turns < 1:
            return []
        return self.memory.turns(self.user, self.session, max(turn - self.history_turns, -2**63), turn)

    def _queries(self, turn: Pending) -> list[tuple[Tensor, float]]:
        """What recall searches with, and the score a memory needs: each item of the turn by its
        vector, except that with a query tower the turn's words are embedded as a question (a
        question names part of what it asks about, so it is held to the tower's own threshold)."""
        tower = self.model.query_tower is not None
        texts = [e.text for e in turn.entries if e.modality == Modality.TEXT] if tower else []
        asked = iter(self.model.embed_query(texts)) if texts else iter(())
        threshold = self.model.query_threshold if self.model.query_threshold is not None else self.recall_threshold
        return [(next(asked), threshold) if tower and e.modality == Modality.TEXT else (z, self.recall_threshold)
                for e, z in zip(turn.entries, turn.vectors)]

    def _recall(self, queries: list[tuple[Tensor, float]], k: int) -> list[MemoryHit]:
        """The user's `k` stored items most similar to any of `queries` ((vector, threshold) each), best first."""
        if self.recall_k < 1:
            return []
        best: dict[int, MemoryHit] = {}
        for query, threshold in queries:
            # k more than needed: copies of one text (below) take no place among the k
            for found in self.memory.search(self.user, query, k=2 * k):
                if found.score >= threshold and (found.id not in best or found.score > best[found.id].score):
                    best[found.id] = found
        return _one_of_each_text(sorted(best.values(), key=lambda h: (-h.score, -h.id)))[:k]

    # ---- the prompt ------------------------------------------------------------------------------

    def _fit(self, candidates: list[MemoryHit], history: list[MemoryHit], shown: list[Segment],
             max_new_tokens: int) -> tuple[list[Segment], list[MemoryHit]]:
        """The prompt and the memories recalled into it: the `recall_k` best `candidates` not in the
        history shown. The oldest history turn goes first, then the weakest memory, until the prompt
        fits the decoder's context with room for the answer: `max_new_tokens`, but at most half the
        context, so a long answer limit never pushes every memory out (`generate` caps the answer
        at the context instead). A decoder that slides (a window, rotary or sinusoidal positions) is
        fitted the same: it trained on nothing longer, and memories a window's reach has passed are
        read by no position."""
        pm = self.model.prompt_model
        context = pm.lm.decoder.max_len
        room = answer_room(context, min(max_new_tokens, context // 2))
        rendered = self._render(list({h.id: h for h in candidates + history}.values()))
        limit = self.recall_k
        while True:
            in_history = {h.id for h in history}
            recalled = [h for h in candidates if h.id not in in_history][:limit]
            # by time, then id: a turn's rows share one time (one transaction), and ids follow the order stored
            ordered = sorted(recalled, key=lambda h: (h.time, h.id)) + history
            parts = [seg for h in ordered for seg in rendered[h.id]] + shown
            if pm.fmt.length(parts, at_most=int(room)) <= room or not (history or recalled):
                return parts, recalled
            if history:
                oldest = history[0].turn
                history = [h for h in history if h.turn != oldest]
            else:
                limit = len(recalled) - 1

    def _render(self, items: list[MemoryHit]) -> dict[int, list[Segment]]:
        """Each stored item as the decoder reads it: a media item as its vector (read in one go), then
        its text if it has one."""
        media = [h for h in items if h.modality != Modality.TEXT]
        vectors = self.memory.vectors([h.id for h in media], user=self.user) if media else []
        out: dict[int, list[Segment]] = {h.id: [] for h in items}
        for h, z in zip(media, vectors):
            out[h.id].append(Embedded(z.to(self.model.device), h.modality))
        for h in items:
            if h.text:
                out[h.id].append(h.text)
        return out

    # ---- the conversation ------------------------------------------------------------------------

    def history(self, limit: int = 50) -> list[MemoryHit]:
        """This session's last `limit` items in the order they were added, oldest first (the user's,
        the answers and any note added to the session), not by their times (a clock set back
        reordered them)."""
        limit = check_int(limit, "limit", 1, None, "a positive int")
        items = self.memory.recent(self.user, self.session, limit=2**62)  # every item of the session (a note too)
        return sorted(items, key=lambda h: h.id)[-limit:]

    def forget(self) -> int:
        """Delete every item of this user (all sessions); returns how many."""
        n = self.memory.forget(self.user)
        self.turn = 0
        return n

    def close(self) -> None:
        if self._own:
            self.memory.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _turn_segments(prompt: Any) -> tuple[list[int], list[Segment]]:
    """A turn's segments as stored: words without the spaces around them (blank ones dropped) and
    media items, with each one's place in the prompt as given; anything else is refused by name."""
    if isinstance(prompt, (str, Media)):
        prompt = [prompt]
    elif not isinstance(prompt, (list, tuple)):
        raise UserError(f"a Session turn is text, a media item or a list of them, got {type(prompt).__name__}")
    positions: list[int] = []
    kept: list[Segment] = []
    for i, seg in enumerate(prompt):
        if isinstance(seg, str):
            if not seg.strip():
                continue
            seg = seg.strip()
        elif not isinstance(seg, Media):
            raise UserError(f"a Session turn takes text and mm.Image / mm.Audio / mm.Text, got {type(seg).__name__}")
        positions.append(i)
        kept.append(seg)
    if not kept:
        raise UserError("the turn is empty: give text or media")
    return positions, kept


def _check_memory_model(memory: Memory, model: Any) -> None:
    """A Memory handed to a Session embeds its turns and recalls with its own model: it must be this
    model (by fingerprint), or the decoder would read vectors of another space."""
    if memory.model is None:
        raise UserError(f"{memory.path.name} was opened without a model: open it as Memory(path, model=model), "
                        "or give the Session its path")
    if str(memory.model.fingerprint) != str(model.fingerprint):
        raise UserError(f"{memory.path.name} was opened with model {memory.model.fingerprint} but this Session's "
                        f"model is {model.fingerprint}; open the memory with the Session's model")


def _new_session_name() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")


def _one_of_each_text(hits: list[MemoryHit]) -> list[MemoryHit]:
    """`hits` (best first) with each text said more than once kept once, its newest copy first among
    equals: "Remember this picture." said in six turns tied at 1.00 with the picture it came back
    with and took every place recalled. Pictures and sounds are kept however alike: an earlier one
    seen again is what recall is for."""
    seen: set[tuple[str, str | None]] = set()
    out = []
    for h in hits:
        if h.modality == Modality.TEXT:
            if (h.role, h.text) in seen:
                continue
            seen.add((h.role, h.text))
        out.append(h)
    return out
