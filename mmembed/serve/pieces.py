"""A request's form → the ordered pieces of a query or prompt.

A client sends pieces as repeated form fields, in order: `text` (typed words) and `file` (an
upload). `weights` (one comma-separated number per piece, in the same order) weighs a search.

    text="What colour is" file=@a.png text="?"           → [text, image, text]
    text="a red circle" file=@b.wav weights=1,-0.5         → two pieces, weights 1 and -0.5

Each file is read into memory (its name never used as a path; Starlette's parser spools a part
over 1 MB to an anonymous temporary file until the request ends, and nothing is kept), its
format sniffed from its bytes, and decoded once by the model's own preprocessing, so a bad file
is refused here with its name and the reason, before any work starts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser, parse_options_header
from starlette.requests import Request

from mmembed.errors import BadInput
from mmembed.modality import Modality
from mmembed.serve.safety import Limits, Refusal, accepted_formats, display_name, megabytes, over_limit, sniff

Check = Callable[[Modality, bytes], None]  # raises BadInput when the preprocessing cannot use the bytes


@dataclass(frozen=True)
class Piece:
    """One part of a query or prompt: typed text (`str`) or a file's bytes, and its name in messages."""

    modality: Modality
    value: str | bytes
    name: str

    @property
    def is_file(self) -> bool:
        return isinstance(self.value, bytes)


async def read_form(request: Request, limits: Limits) -> FormData:
    """The request's form, within the file and field counts; a malformed body is a 400."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind and kind not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise Refusal(415, f"send a form (multipart/form-data: fields text, file, ...), not {kind[:60]}")
    if not kind and (request.headers.get("content-length", "0").strip() not in ("", "0")
                     or "transfer-encoding" in request.headers):  # its body was ignored: "nothing to search for"
        raise Refusal(415, "send a form (multipart/form-data: fields text, file, ...); this body has no Content-Type")
    try:
        # a character is up to 4 bytes of UTF-8 in a multipart field and 12 once percent-encoded
        # (an url-encoded form); `_text` then counts the characters themselves
        bounds = {"max_files": limits.max_files, "max_fields": limits.max_fields,
                  "max_part_size": 12 * limits.max_text_chars + 512}
        if kind in _PARSERS and request._form is None:
            # parsed here, kept where Starlette's request.form() keeps its own (read again by /ask)
            async with aclosing(request.stream()) as stream:
                request._form = await _PARSERS[kind](request.headers, stream, **bounds).parse()
        return await request.form(**bounds)
    except (MultiPartException, HTTPException) as e:  # Starlette's form() turns the first into the second
        message = str(getattr(e, "message", None) or getattr(e, "detail", e))
        if "exceeded maximum size" in message:  # a field past max_part_size: a typed text far too long
            raise Refusal(413, f"a text field is too long; at most {limits.max_text_chars:,} characters") from None
        raise Refusal(400, f"bad form: {message}") from None
    except (AssertionError, ValueError, UnicodeError) as e:
        raise Refusal(400, f"bad form: {e}") from None


class _TextParser(MultiPartParser):
    """Starlette's multipart parser, refusing
    - a text field whose bytes are not text in its charset (the part's own Content-Type charset,
      else the form's, else UTF-8): Starlette decoded them as Latin-1 instead, so b"caf\\xe9" was
      stored as "café" and the user b"\\xfe" became the user "þ";
    - a body that ends before the closing boundary: Starlette kept the parts that had ended and
      dropped the one cut off, so a picture was lost (or k=3 ignored) and the answer was a 200."""

    _closed = False  # set when the parser reaches the closing boundary (`--B--`)

    def on_end(self) -> None:
        self._closed = True

    async def parse(self) -> FormData:
        form = await super().parse()
        if not self._closed:
            await form.close()  # the parts' spooled files
            raise MultiPartException("the form ends before its closing boundary (was the upload cut off?)")
        return form

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is not None:
            return super().on_part_end()
        own = dict(part.item_headers).get(b"content-type")
        charset = parse_options_header(own)[1].get(b"charset", b"").decode("latin-1") if own else ""
        charset = charset or self._charset
        try:
            self.items.append((part.field_name, bytes(part.data).decode(charset)))
        except (UnicodeDecodeError, LookupError):  # LookupError: a charset Python does not know
            raise MultiPartException(f"the field {part.field_name[:40]!r} is not {charset[:40]} text "
                                     "(send text as UTF-8)") from None


class _UrlTextParser(FormParser):
    """Starlette's url-encoded form parser, decoding each field's bytes (percent-escaped or not) in
    the form's charset, else UTF-8, and refusing bytes that are not text in it: Starlette decoded
    them as UTF-8 with errors="replace", so "caf%E9" was stored as "caf\\ufffd" whatever charset the
    form named."""

    def __init__(self, headers: Any, stream: Any, max_files: int, **bounds: Any) -> None:
        super().__init__(headers, stream, **bounds)  # max_files: no files in such a form
        self._charset = parse_options_header(headers.get("content-type"))[1].get(b"charset", b"utf-8")

    def on_field_end(self) -> None:
        super().on_field_end()  # counts the field against max_fields
        charset = self._charset.decode("latin-1")
        try:
            self._items[-1] = (_unquote(self._field_name, charset), _unquote(self._field_value, charset))
        except (UnicodeDecodeError, LookupError):  # LookupError: a charset Python does not know
            raise MultiPartException(f"the field {self._items[-1][0][:40]!r} is not {charset[:40]} text "
                                     "(send text as UTF-8)") from None


def _unquote(raw: bytearray, charset: str) -> str:
    return unquote_to_bytes(bytes(raw).replace(b"+", b" ")).decode(charset)


_PARSERS = {"multipart/form-data": _TextParser, "application/x-www-form-urlencoded": _UrlTextParser}


async def read_pieces(form: FormData, limits: Limits, check: Check) -> list[Piece]:
    """The `text` and `file` fields of `form`, in order, each checked (see the module doc)."""
    pieces: list[Piece] = []
    texts = 0  # a text is named by its place among the texts ("text 2" was the text after a file)
    for key, value in form.multi_items():
        if key == "text":
            texts += 1
            text = _text(value, limits, texts)
            if text:
                pieces.append(Piece(Modality.TEXT, text, f"text {texts}"))
        elif key == "file":
            if not isinstance(value, UploadFile):
                raise Refusal(400, "a `file` field must be an uploaded file")
            pieces.append(await _file(value, limits, check))
    return pieces


def _text(value: Any, limits: Limits, number: int) -> str:
    if not isinstance(value, str):
        raise Refusal(400, "a `text` field must be text, not a file")
    text = value.strip()
    if len(text) > limits.max_text_chars:
        raise Refusal(413, f"text {number} has {len(text):,} characters; at most {limits.max_text_chars:,}")
    return text


async def _file(upload: UploadFile, limits: Limits, check: Check) -> Piece:
    name = display_name(upload.filename)
    if upload.size is not None and upload.size > limits.max_file_bytes:
        raise Refusal(413, f"{name} is too large ({over_limit(upload.size, limits.max_file_bytes)} a file)")
    data = await upload.read(limits.max_file_bytes + 1)
    await upload.close()
    if len(data) > limits.max_file_bytes:
        raise Refusal(413, f"{name} is too large (over {megabytes(limits.max_file_bytes)} a file)")
    if not data:
        raise Refusal(400, f"{name} is empty (0 bytes)")
    fmt = sniff(data)
    if fmt is None:
        raise Refusal(415, f"{name} is not a file this server reads, whatever its name says: its content is none "
                           f"of {accepted_formats()}")
    try:
        await run_in_threadpool(check, fmt.modality, data)  # decoding is CPU work: off the event loop
    except BadInput as e:
        reason = str(e).replace("<bytes>", "the file")
        raise Refusal(400, f"{name} ({fmt.name}) cannot be used: {reason}") from None
    return Piece(fmt.modality, data, name)


REPEATABLE = ("text", "file", "stop")  # the pieces, in order, and the stop strings; every other field is one value


def check_fields(form: FormData, known: tuple[str, ...]) -> None:
    """A 400 naming a field the endpoint does not read (`temprature=1.5` was dropped, and the
    answer came back greedy with a 200), or one sent twice that takes one value."""
    for key in form.keys():
        if key not in known:
            raise Refusal(400, f"unknown field {key[:40]!r}; known: {', '.join(known)}")
    check_once(form, "field")


def check_once(fields: Any, what: str) -> None:
    """A 400 for a field (`what`: "field", "query parameter") sent more than once that takes one value:
    the last one won, so `user=ada&user=bob` stored the item as bob's and `k=1&k` returned 12 hits."""
    for key in dict.fromkeys(fields.keys()):
        if key not in REPEATABLE and (n := len(fields.getlist(key))) > 1:
            raise Refusal(400, f"{what} {key[:40]!r} is sent {n} times; it takes one value")


def parse_weights(text: str | None, n: int) -> list[float]:
    """'1, 0.5, -1' → one finite weight per piece (none given: 1.0 each)."""
    if text is None or not text.strip():
        return [1.0] * n
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise Refusal(400, f"weights must be numbers separated by commas, got {text[:60]!r}") from None
    if len(weights) != n:
        raise Refusal(400, f"{len(weights)} weights for {n} pieces (give one per piece, in order, or none)")
    if not all(math.isfinite(w) for w in weights):
        raise Refusal(400, "weights must be finite numbers")
    return weights


def _bound(x: float | None, kind: type) -> str:
    return "-inf" if x is None else str(int(x)) if kind is int else f"{x:g}"  # a seed's bound in full, not 9.2e+18


_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def number(form: FormData, key: str, kind: type, default: Any, low: float | None = None,
           high: float | None = None) -> Any:
    """A numeric form field (`kind` int or float) within [low, high]; absent or empty → `default`."""
    raw = form.get(key)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return default
    if not isinstance(raw, str):
        raise Refusal(400, f"{key} must be a text field, not a file")
    # ASCII digits only: Python's int() and float() read "٣" as 3 and "1_0" as 10
    pattern = _INTEGER if kind is int else _DECIMAL
    value = kind(raw) if pattern.fullmatch(raw.strip()) else None
    if value is None or (kind is float and not math.isfinite(value)):
        raise Refusal(400, f"{key} must be a{'n integer' if kind is int else ' number'}, got {str(raw)[:40]!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        shown = str(raw).strip()[:40]  # as sent: 1.0000001 printed as 1 looked inside the range
        if high is None:
            raise Refusal(400, f"{key} must be at least {_bound(low, kind)}, got {shown}")
        raise Refusal(400, f"{key} must be between {_bound(low, kind)} and {_bound(high, kind)}, got {shown}")
    return value
