"""The FastAPI app (page + JSON API + guards) and how it is served: uvicorn on a socket bound here,
loopback unless asked otherwise, in the foreground (`mmembed serve`) or a background thread
(tests, benchmarks).

    create_app(state)          page at /, assets at /static, API at /api (api.py, memory_api.py)
    bind(host, port)           the listening socket (a busy port is a one-line UserError)
    run(app, sock)             serve until Ctrl+C
    BackgroundServer(app)      `with BackgroundServer(app) as url:` serves on a free loopback port
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from mmembed.errors import UserError
from mmembed.serve import api, memory_api
from mmembed.serve.safety import BodyLimit, Refusal, SameSite, SecurityHeaders, watch_start
from mmembed.serve.state import ServeState

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


def create_app(state: ServeState) -> FastAPI:
    """The web app over `state` (see `open_state`)."""
    app = FastAPI(title="mmembed", docs_url=None, redoc_url=None, openapi_url=None)  # the README documents the API
    app.state.serve = state
    app.include_router(api.router)
    app.include_router(memory_api.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)  # HEAD: a client checking the page is up
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-store"})

    app.add_exception_handler(Refusal, _refused)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http_error)
    # not `add_exception_handler(Exception, ...)`: Starlette answers that outside every middleware,
    # so a 500 would leave without the security headers
    app.add_middleware(CrashGuard)
    app.add_middleware(BodyLimit, max_bytes=state.limits.max_request_bytes)
    app.add_middleware(SameSite)
    app.add_middleware(SecurityHeaders)  # outermost: the body limit's own 413 gets the headers too
    return app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _refused(request: Request, exc: Refusal) -> JSONResponse:
    response = _error(exc.status, exc.message)
    if exc.status == 413:  # the rest of the body is never read: the connection cannot carry another request
        response.headers["connection"] = "close"
    return response


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("path", "query", "body"))
    return _error(400, f"{where or 'request'}: {first.get('msg', 'invalid')}")


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    response = _error(exc.status_code, str(exc.detail))
    response.headers.update(exc.headers or {})  # a 405's Allow (the methods that path takes)
    return response


class CrashGuard:
    """ASGI middleware: an exception no handler took becomes a one-line 500, logged with its
    traceback (inside the other middleware, so the answer carries the security headers too)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        watched, started = watch_start(send)
        try:
            await self.app(scope, receive, watched)
        except ClientDisconnect:  # the client left mid-request (a closed tab during an upload): no one to answer
            log.debug("%s %s: the client disconnected", scope.get("method"), scope.get("path"))
        except asyncio.CancelledError:  # still running 2 s after Ctrl+C: uvicorn cancels it (see _quiet_shutdown)
            log.info("%s %s: cut off by the server's shutdown", scope.get("method"), scope.get("path"))
            raise
        except Exception as exc:  # noqa: BLE001 - any failure is one line to the client, the details in the log
            if started():  # the answer is under way (a stream): nothing else can be sent
                raise
            log.error("%s %s failed", scope.get("method"), scope.get("path"), exc_info=exc)
            response = _error(500, f"internal error ({type(exc).__name__}); the server log has the details")
            await response(scope, receive, send)


# ---- serving -------------------------------------------------------------------------------------


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening socket on host:port (port 0: any free one). UserError when that is impossible."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except (OSError, UnicodeError) as e:  # UnicodeError: a name IDNA cannot encode ("a..b", a 64-letter label)
        raise UserError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e})") from None
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket) -> str:
    """The URL to open: a socket bound to every address (0.0.0.0, ::) is opened on this computer's loopback."""
    host, port = sock.getsockname()[:2]
    if ipaddress.ip_address(host).is_unspecified:
        host = "127.0.0.1" if sock.family == socket.AF_INET else "::1"
    return f"http://{bracketed(host)}:{port}/"


def bracketed(host: str) -> str:
    """An address as a URL or `host:port` writes it: IPv6 in brackets."""
    return f"[{host}]" if ":" in host else host


def _server(app: FastAPI, log_level: str) -> uvicorn.Server:
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off", timeout_graceful_shutdown=2)
    logging.getLogger("uvicorn.error").addFilter(_quiet_shutdown)  # after Config: it sets up uvicorn's logging
    return uvicorn.Server(config)


def _quiet_shutdown(record: logging.LogRecord) -> bool:
    """False for what uvicorn logs about requests it cancels 2 s after Ctrl+C: "Cancel N running
    task(s)" and each one's CancelledError with its traceback, where the CLI promises one line."""
    cancelled = record.exc_info is not None and isinstance(record.exc_info[1], asyncio.CancelledError)
    return not cancelled and not str(record.msg).startswith("Cancel %s running task(s)")


def run(app: FastAPI, sock: socket.socket, log_level: str = "warning") -> None:
    """Serve on `sock` until interrupted."""
    _server(app, log_level).run(sockets=[sock])


class BackgroundServer:
    """Serve `app` from a daemon thread on a free port of `host`; the context gives the page's URL."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", log_level: str = "warning") -> None:
        self.app, self.host = app, host
        self._server = _server(app, log_level)
        self._thread: threading.Thread | None = None
        self.url = ""

    def __enter__(self) -> str:
        sock = bind(self.host, 0)
        self.url = url_of(sock)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name="mmembed-serve")
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        memory = self.app.state.serve.memory
        if memory is not None:
            memory.close()
