"""The memory view's API (servers started with --memory): a user's items, a turn that recalls, forgetting.

    GET    /api/memory?user=U                     the user's items, newest first
    POST   /api/memory/remember                   user + pieces → stored items (no answer)
    POST   /api/memory/ask                        user + pieces (+ sampling) → the answer and what it recalled
    GET    /api/memory/items/{id}/media?user=U&g=TAG
                                                  a stored item's own bytes (image, sound); TAG as in
                                                  the item's `media` URL (see api.py's media)
    DELETE /api/memory/items/{id}?user=U          forget one item

A user only ever sees, recalls and deletes their own items (`Memory` scopes every call).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from mmembed.serve.api import SAMPLING_FIELDS, model_call, read_prompt, state_of, to_segment, user_errors
from mmembed.serve.pieces import check_fields, check_once, read_form, read_pieces
from mmembed.serve.safety import FILE_MODALITIES, Refusal, sniff, unplayable
from mmembed.serve.state import ServeState

router = APIRouter(prefix="/api/memory")
MAX_USER_CHARS = 64
REMEMBER_FIELDS = ("user", "text", "file")
ASK_FIELDS = (*REMEMBER_FIELDS, *SAMPLING_FIELDS)


def user_name(value: Any) -> str:
    """The user a request names, exactly as `Memory` takes it: " zed" is not "zed" there, so a name
    with a space at either end is refused, not trimmed (trimmed, it read and deleted zed's items)."""
    if not isinstance(value, str) or not value.strip():
        raise Refusal(400, "give a user name (whose memory)")
    if value != value.strip():
        raise Refusal(400, f"a user name must not start or end with a space, got {value[:MAX_USER_CHARS]!r}")
    if len(value) > MAX_USER_CHARS:
        raise Refusal(400, f"a user name is at most {MAX_USER_CHARS} characters, got {len(value)}")
    if not value.isprintable():  # a 3-letter name with a NUL was told "at most 64 printable characters"
        raise Refusal(400, f"a user name must be printable characters, got {value!r}")
    if "\ufffd" in value:  # what a form's undecodable bytes became: %FE and %FF were one user
        raise Refusal(400, "a user name must be valid UTF-8 text")
    return value


@router.get("")
def items(request: Request, user: str, limit: int = 200) -> dict[str, Any]:
    state = state_of(request)
    check_once(request.query_params, "query parameter")
    memory, user = state.need_memory(), user_name(user)
    if not 1 <= limit <= 1000:
        raise Refusal(400, f"limit must be between 1 and 1000, got {limit}")
    with user_errors():
        found = memory.recent(user, limit=limit)
        total = memory.count(user)
        playable = playable_media(state, memory, user, found)
    return {"user": user, "count": total,
            "items": [item_json(h, state.media_tag, h.id in playable) for h in reversed(found)]}


def playable_media(state: ServeState, memory: Any, user: str, hits: list[Any]) -> set[int]:
    """The ids among `hits` whose stored bytes `item_media` serves (a format the page plays). Each
    item is read once: an id is never reused in a memory file (AUTOINCREMENT), nor its bytes changed."""
    known = state.memory_media
    todo = [h.id for h in hits if h.id not in known and h.modality in FILE_MODALITIES and h.media_path is None]
    for h in memory.get(todo, user=user) if todo else ():
        known[h.id] = h.media is not None and sniff(h.media) is not None
    return {h.id for h in hits if known.get(h.id)}


def item_json(hit: Any, media_tag: str, playable: bool) -> dict[str, Any]:
    """An item as the page draws it; `media` only when `playable` (see `playable_media`)."""
    out = {"id": hit.id, "modality": str(hit.modality), "text": hit.text, "role": hit.role, "session": hit.session,
           "turn": hit.turn, "time": hit.time,
           "media": f"/api/memory/items/{hit.id}/media?user={_quote(hit.user)}&g={media_tag}" if playable else None}
    if hit.score is not None:
        out["score"] = round(hit.score, 4)
    return out


@router.post("/remember")
async def remember(request: Request) -> dict[str, Any]:
    state = state_of(request)
    memory = state.need_memory()
    form = await read_form(request, state.limits)
    check_fields(form, REMEMBER_FIELDS)
    user = user_name(form.get("user"))
    pieces = await read_pieces(form, state.limits, state.check)
    if not pieces:
        raise Refusal(400, "nothing to remember: add text, an image or a sound")

    def store() -> list[int]:
        with user_errors(), state.lock:
            return memory.add_many(user, [to_segment(p) for p in pieces])

    return {"user": user, "ids": await model_call(state, store)}


@router.post("/ask")
async def ask(request: Request) -> dict[str, Any]:
    state, prompt, settings = await read_prompt(request, ASK_FIELDS)
    memory = state.need_memory()
    form = await read_form(request, state.limits)  # parsed once by Starlette; this reads its cache
    user = user_name(form.get("user"))
    return await model_call(state, _ask, state, memory, user, prompt, settings)


def _ask(state: ServeState, memory: Any, user: str, prompt: list[Any], settings: dict[str, Any]) -> dict[str, Any]:
    from mmembed.memory import Session

    with user_errors(), state.lock:
        session = Session(state.model, memory, user)
        out = session.ask(prompt, **settings)
        playable = playable_media(state, memory, user, out.recalled)
    recalled = [item_json(h, state.media_tag, h.id in playable) for h in out.recalled]
    return {"user": user, "session": session.session, "turn": session.turn, "text": out.text,
            "entropy": [round(h, 4) for h in out.entropy], "recalled": recalled}


@router.get("/items/{item_id}/media")
def item_media(request: Request, item_id: int, user: str, g: str | None = None) -> Response:
    state = state_of(request)
    check_once(request.query_params, "query parameter")
    memory, user = state.need_memory(), user_name(user)
    caching = state.media_cache_control(g, f"item {item_id}")
    with user_errors():
        found = memory.get([item_id], user=user)
    if not found or found[0].modality not in FILE_MODALITIES:
        raise Refusal(404, f"user {user!r} has no item {item_id} with a picture or sound")
    data = found[0].media
    if data is None:  # added with store_media="path": the server serves no path outside its index
        raise Refusal(404, f"item {item_id}'s {found[0].modality} is stored as a path, which the page does not show")
    fmt = sniff(data)
    if fmt is None:
        raise Refusal(404, unplayable(f"item {item_id}", found[0].modality, data[:16]))
    return Response(data, media_type=fmt.mime, headers={"cache-control": caching})


@router.delete("/items/{item_id}")
def forget(request: Request, item_id: int, user: str) -> dict[str, Any]:
    check_once(request.query_params, "query parameter")
    memory, user = state_of(request).need_memory(), user_name(user)
    with user_errors():
        deleted = memory.delete([item_id], user=user)
    if not deleted:
        raise Refusal(404, f"user {user!r} has no item {item_id}")
    return {"user": user, "deleted": item_id, "count": memory.count(user)}


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")

