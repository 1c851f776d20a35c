"""What the server accepts from a client, and how it says no.

    request ─► BodyLimit (bytes on the wire, before anything is parsed or spooled)
            ─► form parsing (at most `max_files` files, `max_fields` fields)
            ─► per file: size ≤ `max_file_bytes`, then `sniff`: the format from the leading bytes,
               never from the name or the declared type ─► the modality's preprocessing decodes it
               under its own guards (format allow-list, decompression bomb, sample rates)

Every refusal is a `Refusal`: an HTTP status and one line the page shows as is. File names a
client sends are used in messages only (`display_name`), never as paths.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from mmembed.modality import Modality

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Bounds on one request. The page states them; the README lists them."""

    max_file_bytes: int = 10 * MiB  # one uploaded file
    max_files: int = 8  # files in one request
    max_fields: int = 64  # form fields in one request (texts, weights, settings)
    max_text_chars: int = 2000  # one typed text piece
    max_k: int = 50  # hits per search
    max_new_tokens: int = 256  # tokens one answer may write
    max_best_of: int = 32  # candidates one answer may be chosen from (`best_of`)
    max_stops: int = 8  # stop strings one answer may be given (`stop`; each at most max_text_chars)
    max_temperature: float = 100.0  # far past where sampling is uniform; a typo, not a setting

    @property
    def max_request_bytes(self) -> int:
        """The whole body: every file at its limit, plus room for the text fields."""
        return self.max_files * self.max_file_bytes + self.max_fields * (4 * self.max_text_chars + 512)

    def as_dict(self) -> dict[str, float]:
        return {"max_file_bytes": self.max_file_bytes, "max_files": self.max_files,
                "max_text_chars": self.max_text_chars, "max_k": self.max_k, "max_new_tokens": self.max_new_tokens,
                "max_best_of": self.max_best_of, "max_stops": self.max_stops, "max_temperature": self.max_temperature}


class Refusal(Exception):
    """A request the server will not serve: `status` (4xx/503) and a one-line `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Format:
    """A media format recognised by its leading bytes."""

    name: str
    modality: Modality
    mime: str
    magic: bytes
    offset: int = 0


# The formats the preprocessing decodes (image: Pillow's allow-list; audio: soundfile). One line each.
FORMATS = (
    Format("PNG", Modality.IMAGE, "image/png", b"\x89PNG\r\n\x1a\n"),
    Format("JPEG", Modality.IMAGE, "image/jpeg", b"\xff\xd8\xff"),
    Format("GIF", Modality.IMAGE, "image/gif", b"GIF8"),
    Format("BMP", Modality.IMAGE, "image/bmp", b"BM"),
    Format("TIFF", Modality.IMAGE, "image/tiff", b"II*\x00"),
    Format("TIFF", Modality.IMAGE, "image/tiff", b"MM\x00*"),
    Format("WebP", Modality.IMAGE, "image/webp", b"WEBP", 8),
    Format("WAV", Modality.AUDIO, "audio/wav", b"WAVE", 8),
    Format("FLAC", Modality.AUDIO, "audio/flac", b"fLaC"),
    Format("OGG", Modality.AUDIO, "audio/ogg", b"OggS"),
)
FILE_MODALITIES = frozenset(fmt.modality for fmt in FORMATS)  # modalities whose items are files
# Formats the preprocessing may read (soundfile) but browsers do not play: known only to name them
# when an item of the index or the memory has one and the page cannot show it.
UNPLAYED = (
    Format("AIFF", Modality.AUDIO, "audio/aiff", b"AIFF", 8),
    Format("AIFF-C", Modality.AUDIO, "audio/aiff", b"AIFC", 8),
    Format("AU", Modality.AUDIO, "audio/basic", b".snd"),
    Format("CAF", Modality.AUDIO, "audio/x-caf", b"caff"),
)


def sniff(data: bytes, formats: tuple[Format, ...] = FORMATS) -> Format | None:
    """The format whose magic bytes `data` starts with (RIFF files are told apart at offset 8)."""
    for fmt in formats:
        if data[fmt.offset:fmt.offset + len(fmt.magic)] == fmt.magic:
            return fmt
    return None


def unplayable(what: str, modality: Modality, head: bytes) -> str:
    """Why the page cannot show an item's file of these leading bytes: "item 3's audio is AIFF, which
    the page does not play (it plays WAV, FLAC, OGG)"."""
    known = sniff(head, UNPLAYED)
    plays = dict.fromkeys(fmt.name for fmt in FORMATS if fmt.modality == modality)
    shown = f"{known.name}, which" if known else "in a format"
    return f"{what}'s {modality} is {shown} the page does not play (it plays {', '.join(plays) or 'none'})"


def accepted_formats() -> str:
    """'PNG, JPEG, … (image); WAV, FLAC, OGG (audio)' for messages."""
    by_modality: dict[Modality, list[str]] = {}
    for fmt in FORMATS:
        names = by_modality.setdefault(fmt.modality, [])
        if fmt.name not in names:
            names.append(fmt.name)
    return "; ".join(f"{', '.join(names)} ({m})" for m, names in by_modality.items())


def display_name(name: str | None) -> str:
    """A client's file name made safe to show: the last path part, printable, at most 60 characters."""
    base = re.split(r"[\\/]", name or "")[-1]
    shown = "".join(c if c.isprintable() else "?" for c in base).strip() or "upload"
    return shown if len(shown) <= 60 else shown[:28] + "…" + shown[-28:]


def megabytes(n: int) -> str:
    return f"{n / MiB:.1f} MB"


def over_limit(size: int, limit: int) -> str:
    """'10.1 MB; at most 10.0 MB': the size rounded up (10 MB and a byte read "10.0 MB; at most
    10.0 MB"), in bytes where both still read the same (a limit that is no whole tenth of a MB)."""
    shown, most = f"{math.ceil(10 * size / MiB) / 10:.1f} MB", megabytes(limit)
    if shown == most:
        shown, most = f"{size:,} bytes", f"{limit:,} bytes"
    return f"{shown}; at most {most}"


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 before the app parses it.

    A declared Content-Length over the limit is refused at once; a body without one (chunked)
    is counted as it arrives and cut off at the limit, so nothing larger is ever spooled.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_error(send, 413, self._message(int(declared)))
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(413, self._message(None))
            return message

        tracked, started = watch_start(send)
        try:
            await self.app(scope, counted, tracked)
        except _TooLarge as e:
            if not started():
                await _send_error(send, 413, e.message)

    def _message(self, declared: int | None) -> str:
        # no declared size: the body was cut off just past the limit (what was read would read as the limit)
        shown = f"over {megabytes(self.max_bytes)}" if declared is None else over_limit(declared, self.max_bytes)
        return f"request too large ({shown} in one request: send fewer or smaller files)"


class _TooLarge(Refusal):
    """Raised from inside the app's `receive`: the app's Refusal handler answers it (413)."""


class SameSite:
    """ASGI middleware: only pages of this server may change or ask it (a server on a laptop is
    reachable from every page the laptop's browser opens).

    - A request that writes or computes (any method but GET/HEAD/OPTIONS) from another origin is
      a 403: a form another site posts needs no CORS preflight (it wrote into a user's memory).
    - On a connection to a loopback address (the address the server is bound to, whatever name
      `--host` gave it), a Host header other than localhost, a loopback address or the unspecified
      address (0.0.0.0, ::) is a 403: a DNS name rebound to 127.0.0.1 would otherwise read every
      user's memory.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        bound = (scope.get("server") or ("",))[0] or ""
        if _is_ip(bound) and is_loopback(bound) and not _local(host):
            return await _send_error(send, 403, f"refused: Host {host[:80]!r} is not localhost or a loopback "
                                                "address (a name that reaches a server bound to loopback)")
        origin = headers.get(b"origin")
        if scope.get("method") not in ("GET", "HEAD", "OPTIONS") and origin is not None:
            refused = _foreign(origin.decode("latin-1"), host)
            if refused:
                return await _send_error(send, 403, refused)
        return await self.app(scope, receive, send)


def _foreign(origin: str, host: str) -> str | None:
    """Why a request from `origin` may not drive the server reached as `host`, or None when it may."""
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:  # "http://[" (an unclosed IPv6 bracket) was a traceback and a plain-text 500
        return f"refused: Origin {origin[:80]!r} is not a URL"
    if netloc != host:
        return f"refused: a page of another site may not send this server requests (Origin {origin[:80]!r})"
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    # under `--host ::` an IPv4 connection's address is ::ffff:127.0.0.1, which Python < 3.13 does
    # not count as loopback: the Host check was skipped for it
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _local(host: str) -> bool:
    """Whether a Host header ("127.0.0.1:8000", "[::1]:8000", "localhost") names this computer."""
    try:
        name = urlsplit(f"//{host}").hostname
    except ValueError:
        return False
    if name is None:
        return False
    # `--host 0.0.0.0` (or `::`) prints a loopback URL, but http://0.0.0.0:PORT/ reaches this computer
    # too (Linux connects it to 127.0.0.1), and its Host was a 403: an address, never a name to rebind
    return is_loopback(name.lower()) or _is_ip(name) and ipaddress.ip_address(name).is_unspecified


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# Headers on every response: the page runs only its own scripts, and no response is content-sniffed.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' blob:; media-src 'self' blob:; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


class SecurityHeaders:
    """ASGI middleware adding `SECURITY_HEADERS` to every response."""

    def __init__(self, app) -> None:
        self.app = app
        self.headers = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, with_headers)


def watch_start(send):
    """`send` wrapped to note when the response has started, and a function telling whether it has
    (after that, an error can no longer be answered with a response of its own)."""
    state = {"started": False}

    async def wrapped(message):
        state["started"] = state["started"] or message["type"] == "http.response.start"
        await send(message)

    return wrapped, lambda: state["started"]
