"""The JSON API under the page: status, search, the index's media, and generation (whole or streamed).

    GET  /api/status              run, modalities, index progress, limits
    POST /api/search              pieces (+ weights, target, k)          → {"hits": [...]}
    GET  /api/media/{id}?g=TAG    an indexed item's own file (images, sounds); TAG is the server's,
                                  from the hit's `media` URL (cached only under it)
    POST /api/generate            pieces (+ temperature, top_p, ..., stop, best_of) → {"text", "tokens": [...], ...}
    POST /api/generate/stream     the same, as server-sent events: `token` per token, then `done`
                                  (not best_of, which chooses among whole answers)

Requests are multipart forms (see `pieces.py`) of the fields each endpoint names (`*_FIELDS`; any
other is a 400: a misspelt setting was ignored); every error is `{"error": "one line"}` with a 4xx
status (503 while the index is being built).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, StreamingResponse
from starlette.datastructures import FormData

from mmembed.decoder import MEDIA, Generation, Stops
from mmembed.decoder.generate import MAX_SEED
from mmembed.decoder.stream import replay_tokens, token_texts
from mmembed.errors import UserError
from mmembed.retrieval import Hit, Query
from mmembed.serve.pieces import Piece, check_fields, check_once, number, parse_weights, read_form, read_pieces
from mmembed.serve.safety import FILE_MODALITIES, Refusal
from mmembed.serve.state import ServeState

router = APIRouter(prefix="/api")
log = logging.getLogger(__name__)
SEARCH_FIELDS = ("text", "file", "weights", "target", "k")
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "stop", "seed", "best_of", "rerank_weight")
GENERATE_FIELDS = ("text", "file", *SAMPLING_FIELDS)


def state_of(request: Request) -> ServeState:
    return request.app.state.serve


async def model_call(state: ServeState, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` in a worker thread, one request at a time: requests waiting for the model queue on
    the event loop instead of each holding one of the worker threads that status, media, the page
    and upload decoding need (`fn` still takes `state.lock`, which the index build shares)."""
    return await anyio.to_thread.run_sync(fn, *args, limiter=state.model_slot())


@contextmanager
def user_errors() -> Iterator[None]:
    """A mistake in what the client sent (UserError, or a ValueError from sampling settings) → 400."""
    try:
        yield
    except (UserError, ValueError) as e:
        raise Refusal(400, str(e)) from None


@router.get("/status")
def status(request: Request) -> dict[str, Any]:
    return state_of(request).status()


# ---- search ------------------------------------------------------------------------------------


@router.post("/search")
async def search(request: Request) -> dict[str, Any]:
    state = state_of(request)
    form = await read_form(request, state.limits)
    check_fields(form, SEARCH_FIELDS)
    pieces = await read_pieces(form, state.limits, state.check)
    if not pieces:
        raise Refusal(400, "nothing to search for: type some text or add an image or a sound")
    weights = parse_weights(_str(form, "weights"), len(pieces))
    target = _target(_str(form, "target"), state)
    k = number(form, "k", int, 12, 1, state.limits.max_k)
    index = state.index.ready()
    start = time.perf_counter()
    hits = await model_call(state, _search, state, index, pieces, weights, target, k)
    playable = await anyio.to_thread.run_sync(state.index.playable, [h.id for h in hits])  # reads their files
    return {"hits": [hit_json(h, rank, state.media_tag, h.id in playable) for rank, h in enumerate(hits, 1)],
            "target": target, "pieces": len(pieces), "took_ms": round(1000 * (time.perf_counter() - start), 1)}


def _search(state: ServeState, index: Any, pieces: list[Piece], weights: list[float], target: str | None,
            k: int) -> list[Hit]:
    items: dict[str, list[Any]] = {}
    by_part: dict[str, list[float]] = {}
    for piece, w in zip(pieces, weights):
        items.setdefault(piece.modality.value, []).append(piece.value)
        by_part.setdefault(piece.modality.value, []).append(w)
    with user_errors(), state.lock:
        return index.search(Query(weights=by_part, **items), target=target, k=k)


def _target(value: str | None, state: ServeState) -> str | None:
    if value in (None, "", "any"):
        return None
    if value not in {str(m) for m in state.model.modalities}:
        valid = ", ".join(["any", *map(str, state.model.modalities)])
        raise Refusal(400, f"target must be one of {valid}, got {value[:20]!r}")
    return value


def hit_json(hit: Hit, rank: int, media_tag: str, playable: bool) -> dict[str, Any]:
    """A hit as the page draws it: media by URL (never a server path; `media_tag` names this
    server's index in it) when `playable` (the media route serves its file), text as text."""
    meta = dict(hit.metadata)
    item = meta.pop("item", None)
    has_file = hit.modality in FILE_MODALITIES
    return {"rank": rank, "id": hit.id, "score": round(hit.score, 4), "modality": str(hit.modality),
            "label": meta.get("label"), "text": None if has_file else item,
            "name": Path(item).name if has_file and isinstance(item, str) else None,
            "media": f"/api/media/{hit.id}?g={media_tag}" if playable else None, "metadata": meta}


@router.get("/media/{item_id}")
def media(request: Request, item_id: int, g: str | None = None) -> FileResponse:
    state = state_of(request)
    check_once(request.query_params, "query parameter")
    caching = state.media_cache_control(g, f"item {item_id}")
    path, fmt = state.index.served(item_id)
    return FileResponse(path, media_type=fmt.mime, headers={"cache-control": caching})


# ---- generation ----------------------------------------------------------------------------------


async def read_prompt(request: Request, fields: tuple[str, ...] = GENERATE_FIELDS
                      ) -> tuple[ServeState, list[Any], dict[str, Any]]:
    """The prompt's segments in order (text as typed, files as `mm.Image` / `mm.Audio` of their bytes)
    and the sampling settings, from a form of `fields` only."""
    state = state_of(request)
    state.need_decoder()
    form = await read_form(request, state.limits)
    check_fields(form, fields)
    pieces = await read_pieces(form, state.limits, state.check)
    if not pieces:
        raise Refusal(400, "the prompt is empty: add text, an image or a sound")
    return state, [to_segment(p) for p in pieces], sampling(form, state)


def to_segment(piece: Piece) -> Any:
    return MEDIA[piece.modality](piece.value) if piece.is_file else piece.value


def sampling(form: FormData, state: ServeState) -> dict[str, Any]:
    return {"max_new_tokens": number(form, "max_new_tokens", int, 32, 1, state.limits.max_new_tokens),
            "temperature": number(form, "temperature", float, 0.0, 0, state.limits.max_temperature),
            "top_p": top_p(form),
            "top_k": number(form, "top_k", int, None, 1),  # past the vocabulary: all of it, as in Python
            "stop": stops(form, state),
            "seed": number(form, "seed", int, None, 0, MAX_SEED),
            "best_of": number(form, "best_of", int, 1, 1, state.limits.max_best_of),
            "rerank_weight": number(form, "rerank_weight", float, 1.0, 0, 1000)}


def top_p(form: FormData) -> float | None:
    """top_p in (0, 1]: 0 passed the form's range and got the Python API's "or None" message."""
    value = number(form, "top_p", float, None, 0, 1)
    if value == 0:
        raise Refusal(400, "top_p must be above 0 and at most 1, got 0")
    return value


def stops(form: FormData, state: ServeState) -> list[str] | None:
    """The `stop` fields, each one stop string exactly as sent (" on" stops before " on"; an empty one
    is none), as `generate(stop=[...])` takes them."""
    found = form.getlist("stop")
    if not all(isinstance(s, str) for s in found):
        raise Refusal(400, "stop must be a text field, not a file")
    found = [s for s in found if s]
    limits = state.limits
    if len(found) > limits.max_stops:
        raise Refusal(400, f"{len(found)} stop strings; at most {limits.max_stops}")
    for i, s in enumerate(found, 1):
        if len(s) > limits.max_text_chars:
            raise Refusal(413, f"stop string {i} has {len(s):,} characters; at most {limits.max_text_chars:,}")
    return found or None


def choice(settings: dict[str, Any]) -> dict[str, Any]:
    """Take `best_of` and `rerank_weight` out of the settings (the rest are `stream_tokens`')."""
    return {k: settings.pop(k) for k in ("best_of", "rerank_weight")}


@router.post("/generate")
async def generate(request: Request) -> dict[str, Any]:
    state, prompt, settings = await read_prompt(request)
    return await model_call(state, _generate_all, state, prompt, settings)


def _generate_all(state: ServeState, prompt: list[Any], settings: dict[str, Any]) -> dict[str, Any]:
    chosen = choice(settings)
    with user_errors(), state.lock:
        if chosen["best_of"] == 1:
            tokens = [token_json(t) for t in state.model.stream_tokens(prompt, **settings)]
            return whole(finish(state, prompt, tokens, settings), tokens)
        out = state.model.generate(prompt, **settings, **chosen)
        replayed = replay_tokens(state.model.prompt_model.fmt, out, Stops.parse(settings["stop"]))
        tokens = [token_json(t) for t in replayed]
        return {**whole(finish(state, prompt, tokens, settings), tokens),
                "candidates": [{"text": c.text, "logprob": round(c.logprob, 4), "score": round(c.score, 4),
                                "similarity": None if c.similarity is None else round(c.similarity, 4)}
                               for c in out.candidates]}


@router.post("/generate/stream")
async def generate_stream(request: Request) -> StreamingResponse:
    state, prompt, settings = await read_prompt(request)
    if choice(settings)["best_of"] != 1:
        raise Refusal(400, "best_of chooses among whole answers: POST it to /api/generate, not the stream")
    tokens = state.model.stream_tokens(prompt, **settings)
    first = await model_call(state, _next, state, tokens)  # a bad prompt is still a 400, not an event
    return _ClosingStream(_events(state, prompt, first, tokens, settings), media_type="text/event-stream",
                          headers={"cache-control": "no-store", "x-accel-buffering": "no"})


class _ClosingStream(StreamingResponse):
    """A stream whose events are closed as soon as the response ends, a client that went away
    included (Starlette leaves an abandoned generator, its caches and tensors, to the garbage collector)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _next(state: ServeState, tokens: Iterator[Any]) -> dict[str, Any] | None:
    with user_errors(), state.lock:
        token = next(tokens, None)
    return None if token is None else token_json(token)


def _finish(state: ServeState, prompt: list[Any], sent: list[dict[str, Any]], settings: dict[str, Any]
            ) -> dict[str, Any]:
    with state.lock:
        return finish(state, prompt, sent, settings)


def _close(state: ServeState, tokens: Iterator[Any]) -> None:
    with state.lock:  # the generation's own clean-up touches the model
        tokens.close()


async def _events(state: ServeState, prompt: list[Any], first: dict[str, Any] | None, tokens: Iterator[Any],
                  settings: dict[str, Any]) -> AsyncIterator[str]:
    """`event: token` per generated token, then `event: done` (or `event: error`). The model lock is
    held only while a token is computed, never across a yield: a client that stops reading must not
    stall the model."""
    sent, token = [], first
    try:
        while token is not None:
            sent.append(token)
            yield sse("token", token)
            token = await model_call(state, _next, state, tokens)
        yield sse("done", await model_call(state, _finish, state, prompt, sent, settings))
    except Refusal as e:
        yield sse("error", {"error": e.message})
    except Exception as e:  # noqa: BLE001 - the headers are sent: the stream itself must say what went wrong
        log.exception("generation failed")
        yield sse("error", {"error": f"generation failed ({type(e).__name__}); the server log has the details"})
    finally:
        with anyio.CancelScope(shield=True):  # also when the client's disconnect cancelled the stream
            await anyio.to_thread.run_sync(_close, state, tokens)


def token_json(token: Any) -> dict[str, Any]:
    return {"id": token.id, "text": token.text, "entropy": round(token.entropy, 4), "logprob": round(token.logprob, 4)}


def finish(state: ServeState, prompt: list[Any], tokens: list[dict[str, Any]], settings: dict[str, Any]
           ) -> dict[str, Any]:
    """The answer's summary: its text, why it ended (and whether the decoder's context cut it short of
    `max_new_tokens`), each token's own part of the text, and the model's own entropy (T = 1) at each token."""
    fmt = state.model.prompt_model.fmt
    ids = [t["id"] for t in tokens]
    drawn = [t["entropy"] for t in tokens]
    own = state.model.token_entropy(prompt, Generation("", ids, entropy=drawn)).model if ids else []
    text = "".join(t["text"] for t in tokens)
    reason = finish_reason(fmt, ids, Stops.parse(settings["stop"]))
    # only a decoder that does not slide stops short of max_new_tokens without an <eos> or a stop
    context = state.decoder_context()
    cut = reason == "length" and context is not None and len(ids) < settings["max_new_tokens"]
    return {"text": text, "finish_reason": reason, "context_cut": context if cut else None,
            "mean_entropy": round(sum(drawn) / len(drawn), 4) if drawn else 0.0,
            "model_entropy": [round(h, 4) for h in own], "token_texts": token_texts(fmt, ids, text)}


def whole(summary: dict[str, Any], tokens: list[dict[str, Any]]) -> dict[str, Any]:
    """/api/generate's answer: the summary, and the tokens each with its own text (the stream's `text` is
    what a token released: one may carry text held back while a stop string could begin)."""
    return {**summary, "tokens": [{**t, "text": own} for t, own in zip(tokens, summary["token_texts"])]}


def finish_reason(fmt: Any, ids: list[int], stops: Stops) -> str:
    """`Generation.finish_reason` of these ids: "eos", "stop" when their text holds a stop string
    (generation checks the text after every token and cuts it there), else "length"."""
    if ids and ids[-1] == fmt.eos_id:
        return "eos"
    return "stop" if ids and stops.cut(fmt.decode(ids)) is not None else "length"


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def _str(form: FormData, key: str) -> str | None:
    value = form.get(key)
    if value is not None and not isinstance(value, str):
        raise Refusal(400, f"{key} must be a text field, not a file")
    return value

