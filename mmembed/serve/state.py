"""What one server holds: the model, its index, the optional memory file, the limits, and the lock
that lets one model call run at a time (torch spreads each call over the cores; twenty
concurrent calls would only fight over them)."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmembed.errors import BadInput, UserError
from mmembed.modality import Modality
from mmembed.serve.indexing import IndexBuild, runs_test_manifest
from mmembed.serve.safety import Limits, Refusal


@dataclass
class ServeState:
    """Everything the routes read. Build it with `open_state`."""

    model: Any
    index: IndexBuild
    memory: Any | None  # a `mm.Memory`, with --memory
    limits: Limits
    run: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    # in every media URL (`?g=`): ids restart at 0 in each index (and at 1 in each memory file), so a
    # browser's cache showed an earlier server's picture on the same port under this one's label
    media_tag: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    memory_media: dict[int, bool] = field(default_factory=dict)  # item id → the page plays its media
    _slot: Any = field(default=None, repr=False)

    def model_slot(self) -> Any:
        """The `anyio.CapacityLimiter` that admits one request's model work at a time (made on first use,
        inside the event loop): the rest queue on the loop, not in the worker threads every route shares."""
        if self._slot is None:
            import anyio

            self._slot = anyio.CapacityLimiter(1)
        return self._slot

    def check(self, modality: Modality, data: bytes) -> None:
        """Decode `data` with the model's preprocessing for `modality` (its guards included); BadInput when unusable."""
        pre = self.model.preprocessors.get(modality)
        if pre is None:
            have = ", ".join(map(str, self.model.modalities))
            raise BadInput(f"this model has no {modality} tower (it has: {have})")
        pre(data)

    def no_decoder(self) -> str | None:
        """Why this server cannot answer prompts (no decoder stage, or one not finished), or None when it can."""
        if getattr(self.model, "prompt_model", None) is not None:
            return None
        from mmembed.model_load import no_decoder

        return no_decoder(self.model, "answer prompts")

    def need_decoder(self) -> None:
        if (why := self.no_decoder()) is not None:
            raise Refusal(400, why)

    def need_memory(self) -> Any:
        if self.memory is None:
            raise Refusal(404, "this server has no memory: start it with --memory FILE")
        return self.memory

    def media_cache_control(self, tag: str | None, what: str) -> str:
        """The cache-control for a media answer: cached only under this server's tag (404 for another's)."""
        if tag is None:
            return "no-store"  # a bare URL may name another index's item next time
        if tag != self.media_tag:
            raise Refusal(404, f"{what} is of another server's index or memory (the server was restarted): "
                               "reload the page")
        return "private, max-age=3600"

    def status(self) -> dict[str, Any]:
        return {"run": self.run, "modalities": [str(m) for m in self.model.modalities],
                "decoder": (why := self.no_decoder()) is None, "no_decoder": why, "context": self.decoder_context(),
                "memory": self.memory is not None, "index": self.index.status(), "limits": self.limits.as_dict()}

    def decoder_context(self) -> int | None:
        """The decoder's context in tokens, which caps prompt + answer; None without a decoder or for
        one that slides (`decoder.window`: it writes on past it)."""
        pm = getattr(self.model, "prompt_model", None)
        return None if pm is None or pm.lm.decoder.slides else pm.lm.decoder.max_len


def open_state(model: Any, *, run: str, index: str | Path | None = None, memory: str | Path | None = None,
               limits: Limits | None = None) -> ServeState:
    """The server's state for a loaded model.

    Args:
        model: `mm.load(run)`.
        run: the run's name, shown on the page.
        index: a folder written by `Index.save` / `mmembed index`; None embeds the run's test
            manifest in the background (the page shows the progress).
        memory: a memory file (created when absent; its folder must exist).
        limits: upload and request bounds (default `Limits()`).
    Raises:
        UserError: the index was built by another model, or there is no index and no test manifest.
    """
    opened = None
    if memory is not None:  # before the index: a refused file must not leave a build thread running
        from mmembed.memory import Memory

        if not (parent := Path(memory).parent).is_dir():
            why = "is a file, not a folder" if parent.exists() else "does not exist"
            raise UserError(f"--memory {memory}: {parent} {why}")
        opened = Memory(memory, model=model)
    lock = threading.Lock()
    try:
        build = IndexBuild.load(index, model) if index is not None else IndexBuild.start(
            model, runs_test_manifest(model.config), lock)
    except BaseException:
        if opened is not None:
            opened.close()
        raise
    return ServeState(model, build, opened, limits or Limits(), run, lock)
