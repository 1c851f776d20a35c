"""The local web app: search, prompt and memory views over one run, and the JSON API under them.

Reading order: `safety.py` (limits, sniffing, refusals, body limit, headers) → `pieces.py` (a
form → ordered text/file pieces) → `indexing.py` (the index: loaded, or built on start with
progress) → `state.py` (what a server holds) → `api.py` (status, search, media, generation) →
`memory_api.py` (the memory view) → `app.py` (the FastAPI app; uvicorn in the foreground or a
thread). The page is `static/index.html`, `static/app.js`, `static/style.css` (no build step).

    mmembed serve runs/demo --memory memory.db           # prints http://127.0.0.1:8000/

    from mmembed.serve import BackgroundServer, create_app, open_state
    state = open_state(mm.load("runs/demo"), run="demo", index="runs/demo/index")
    with BackgroundServer(create_app(state)) as url:
        ...                                               # POST url + "api/search", ...
"""

from mmembed.serve.app import BackgroundServer, bind, bracketed, create_app, run, url_of
from mmembed.serve.safety import Limits, is_loopback
from mmembed.serve.state import ServeState, open_state

__all__ = ["BackgroundServer", "Limits", "ServeState", "bind", "bracketed", "create_app", "is_loopback", "open_state",
           "run", "url_of"]
