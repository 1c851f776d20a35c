"""What a run tells as it goes: `metrics.jsonl`, one JSON row per logged step, evaluation and
best checkpoint (`plots.py` draws it), and, without a terminal, a progress line now and then."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmembed.checkpoint import atomic_write_text

log = logging.getLogger("mmembed.train.engine")


class MetricsLog:
    """A run's `metrics.jsonl`, appended to by the process that writes (`write`; rank 0): the
    others hold one too and write nothing."""

    def __init__(self, path: Path, write: bool = True) -> None:
        self.path, self.write = Path(path), write

    def append(self, row: dict[str, Any]) -> None:
        if self.write:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def clear(self) -> None:
        """A fresh run starts a fresh file."""
        if self.write:
            self.path.unlink(missing_ok=True)

    def truncate(self, step: int, evaluated: bool = True) -> None:
        """Drop lines written after the checkpoint a run resumes from (they will be redone), and
        the end-of-run row naming the restored weights (the resumed run writes its own).
        `evaluated`: the checkpoint knows of a validation at its own step; if not, a validation row
        of that step came after it (an epoch's end) and is redone too."""
        if not self.write or not self.path.exists():
            return
        keep = [line for line in self.path.read_text(encoding="utf-8").split("\n")
                if line.strip() and _step_of(line) <= step and '"weights_step"' not in line
                and (evaluated or _step_of(line) < step or '"val/' not in line)]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, TypeError, ValueError):
        return 1 << 62  # a torn last line from a kill: drop it


class ProgressLine:
    """Logs "step S/T (P%), loss L, N samples/s, ETA h:mm:ss" at most once every `every_s` seconds
    (the first step logs at once): a run without a terminal still shows that it moves."""

    def __init__(self, total: int, every_s: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger | None = None) -> None:
        self.total, self.every_s, self.clock, self.logger = total, every_s, clock, logger or log
        self.start = clock()
        self._last: float | None = None
        self._first_step: int | None = None

    def update(self, step: int, loss: float, samples_per_s: float) -> None:
        now = self.clock()
        if self._first_step is None:  # time the steps after this one (the first may include warm-up)
            self._first_step, self.start = step, now
        if self._last is not None and now - self._last < self.every_s:
            return
        self._last = now
        done = step - self._first_step
        eta = _hms((now - self.start) / done * (self.total - step)) if done else "–"
        self.logger.info("step %d/%d (%.0f%%), loss %.4f, %.0f samples/s, ETA %s", step, self.total,
                         100 * step / max(self.total, 1), loss, samples_per_s, eta)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
