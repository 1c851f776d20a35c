"""The index the server searches: a saved one (`--index DIR`), or the run's test manifest embedded
in a background thread when the server starts, its progress readable while it runs.

Media the hits show are served from this index's own files only: an item's file is found by the
item's id, and must lie inside the folder of the manifest the index was built from (a linked
subfolder of it, such as a shared image store, included: see `inside`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from mmembed.data.manifest import read_manifest
from mmembed.errors import UserError
from mmembed.modality import Modality
from mmembed.retrieval import Index
from mmembed.retrieval.commands import warn_if_media_moved
from mmembed.serve.safety import FILE_MODALITIES, Format, Refusal, display_name, sniff, unplayable

log = logging.getLogger(__name__)


def runs_test_manifest(config: Any) -> Path:
    """The run's test manifest (`data.root` / `data.test`), or UserError saying to pass --index."""
    if not config.data.test:
        raise UserError("the run's config names no test manifest (data.test): pass --index DIR")
    path = Path(config.data.test)
    path = path if path.is_absolute() else Path(config.data.root) / path
    if not path.is_file():
        raise UserError(f"the run's test manifest {path} is missing: pass --index DIR (an `mmembed index` folder), "
                        "or run where the run's data.root is reachable")
    return path


class IndexBuild:
    """The server's index and its state: "building" (with `done` of `total` items), "ready" or "failed"."""

    def __init__(self) -> None:
        self.state, self.done, self.total, self.error = "building", 0, 0, None
        self.source: str = ""
        self._index: Index | None = None
        self._root: Path | None = None
        self._modality: dict[int, Modality] = {}  # id → modality: which items have a file
        self._playable: dict[int, bool] = {}  # id → `served` serves its file, read once per item
        self._started = time.monotonic()
        self._seconds: float | None = None

    @classmethod
    def load(cls, directory: str | Path, model: Any) -> IndexBuild:
        """A saved index, checked against the model (UserError on a mismatch)."""
        build = cls()
        build.source = str(directory)
        build._finish(Index.load(directory, model=model))
        warn_if_media_moved(build._index, directory)  # else every hit's media is null without a word
        return build

    @classmethod
    def start(cls, model: Any, manifest: Path, lock: threading.Lock) -> IndexBuild:
        """Embed `manifest` in a daemon thread; `lock` is held around each batch the model embeds."""
        build = cls()
        build.source = str(manifest)
        rows = read_manifest(manifest).rows
        build.total = sum(1 for r in rows for m in r.items if m in model.modalities)
        threading.Thread(target=build._build, args=(model, manifest, lock), name="mmembed-index", daemon=True).start()
        return build

    def _build(self, model: Any, manifest: Path, lock: threading.Lock) -> None:
        try:
            index = Index.build(_Counting(model, self, lock), manifest, progress=False)
            index.model = model
            self._finish(index)
            log.info("indexed %d items from %s in %.1f s", len(index), manifest, self._seconds)
        except Exception as e:  # noqa: BLE001 - the server keeps running and reports it
            self.state, self.error = "failed", f"{type(e).__name__}: {e}" if not isinstance(e, UserError) else str(e)
            log.error("indexing %s failed: %s", manifest, self.error)

    def _finish(self, index: Index) -> None:
        manifest = index.info.get("manifest")
        self._root = Path(os.path.abspath(Path(manifest).parent)) if manifest else None  # as its items name it
        self._modality = dict(zip(index.ids(), index.items()[1]))
        self._index, self.done = index, len(index)
        self.total = max(self.total, len(index))
        self._seconds = time.monotonic() - self._started
        self.state = "ready"

    def advance(self, n: int) -> None:
        self.done = min(self.done + n, self.total)

    def ready(self) -> Index:
        """The index, or a 503 Refusal while it is being built (or when building failed)."""
        if self.state == "building":
            share = f" ({100 * self.done // max(self.total, 1)}%)" if self.total else ""
            raise Refusal(503, f"the index is still being built{share}: try again in a moment")
        if self._index is None:
            raise Refusal(503, f"no index: building it failed ({self.error})")
        return self._index

    def status(self) -> dict[str, Any]:
        """What /api/status shows of the index: `source` is the folder's or manifest's name only (any
        client reads this, and under --host 0.0.0.0 any machine: it showed the server's full path)."""
        name = Path(os.path.abspath(self.source)).name if self.source else ""  # abspath: `--index .` has none
        out: dict[str, Any] = {"state": self.state, "done": self.done, "total": self.total, "source": name}
        if self._index is not None:
            out.update(counts=self._index.counts(), seconds=round(self._seconds or 0.0, 1))
        if self.error:
            out["error"] = self.error
        return out

    def media_path(self, item_id: int) -> Path:
        """The file of an indexed media item, from the index alone (404 when there is none to serve)."""
        index = self.ready()
        if item_id not in index:
            raise Refusal(404, f"no item {item_id} in the index")
        item = index.metadata(item_id).get("item")
        if self._modality.get(item_id) not in FILE_MODALITIES or not isinstance(item, str) or self._root is None:
            raise Refusal(404, f"item {item_id} has no file to serve")
        path = inside(self._root, item)
        if path is None:
            raise Refusal(404, f"item {item_id}'s file is not inside the index's data folder")
        if not path.is_file():  # moved or deleted since the index was built
            raise Refusal(404, f"item {item_id}'s file is missing ({display_name(path.name)})")
        return path

    def served(self, item_id: int) -> tuple[Path, Format]:
        """An indexed item's file and its format, when the page can show it (else a 404 saying why)."""
        path = self.media_path(item_id)
        try:
            with path.open("rb") as f:
                head = f.read(16)
        except OSError as e:
            raise Refusal(404, f"item {item_id}'s file cannot be read ({e.strerror})") from None
        fmt = sniff(head)
        if fmt is None:
            raise Refusal(404, unplayable(f"item {item_id}", self._modality[item_id], head))
        return path, fmt

    def playable(self, ids: list[int]) -> set[int]:
        """The ids among `ids` whose file `served` serves: only their hits get a `media` URL. Each
        file is read once, not at every search that returns it (`served` itself reads it live)."""
        for i in ids:
            if i not in self._playable:
                self._playable[i] = self._serves(i)
        return {i for i in ids if self._playable[i]}

    def _serves(self, item_id: int) -> bool:
        try:
            self.served(item_id)
        except Refusal:
            return False
        return True


def inside(root: Path, item: str) -> Path | None:
    """The real file of `item` when the data folder `root` holds it, else None.

    Held: the file lies under the real folder of `root`, or `item` is (normalised, as the manifest
    accepted it) under `root` and its file lies under the real folder of one of the subfolders on
    the way: a linked subfolder (`images/` → a shared image store) is part of the data, while a `..`
    escape, an absolute path elsewhere, or a file linked out of its folder are not.
    """
    path, real = Path(os.path.abspath(item)), Path(os.path.realpath(item))
    folders = [root, *(p for p in path.parents if p != root and p.is_relative_to(root))]
    return real if any(real.is_relative_to(os.path.realpath(f)) for f in folders) else None


class _Counting:
    """The model as `Index.build` sees it: each batch embedded under the server's lock, and counted."""

    def __init__(self, model: Any, build: IndexBuild, lock: threading.Lock) -> None:
        self._model, self._build, self._lock = model, build, lock
        self.embed_dim, self.fingerprint, self.modalities = model.embed_dim, model.fingerprint, model.modalities

    def embed(self, modality: Modality | str, items: list) -> Any:
        with self._lock:
            out = self._model.embed(modality, items)
        self._build.advance(len(items))
        return out
