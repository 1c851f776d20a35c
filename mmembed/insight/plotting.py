"""What the insight plots share: pyplot on the Agg backend, saving a PNG, and token labels for axes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mmembed.checkpoint import atomic_write
from mmembed.decoder.prompt import PromptFormat, Slot


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, out_png: str | Path, layout: bool = True, **savefig: Any) -> Path:
    """Lay out (with `layout`, unless the figure has a layout engine), write atomically (creating
    parent folders: a crash leaves the earlier file, never half a PNG) and close a figure; returns
    the PNG's path. `savefig`: more `Figure.savefig` arguments (dpi 110 unless given)."""
    if layout and fig.get_layout_engine() is None:
        fig.tight_layout()
    out = Path(out_png)
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", **{"dpi": 110, **savefig}))
    finally:
        pyplot().close(fig)
    return out


def token_labels(fmt: PromptFormat, ids: Sequence[int], parts: Sequence[str | Slot] = ()) -> list[str]:
    """One short axis label per id.

    Args:
        fmt: the prompt format (tokenizer and marker ids).
        ids: decoder ids.
        parts: the prompt's parts, to name its media items: the soft tokens of the n-th item of a
            kind read `<image n>` (kinds: image, audio, text, vector).

    Returns:
        len(ids) strings: a token's text (control characters escaped: \\n), a special token's name.
    """
    names = {i: n for n, i in {**fmt.tokenizer.special_tokens, **fmt.ids}.items()}
    seen: dict[str, int] = {}
    media = []
    for part in parts:
        if isinstance(part, Slot):
            seen[part.marker] = seen.get(part.marker, 0) + 1
            media.append(f"<{part.marker} {seen[part.marker]}>")
    items = iter(media)
    labels: list[str] = []
    for pos, i in enumerate(ids):
        if i == fmt.placeholder_id:
            starts = pos == 0 or ids[pos - 1] != fmt.placeholder_id
            labels.append(next(items, "<media>") if starts else labels[-1])
        elif i in names:
            labels.append(names[i])
        else:
            labels.append(_printable(fmt.tokenizer.decode([i])))
    return labels


def _printable(text: str) -> str:
    """Control characters (a byte token's \\n, \\x08 ...) as escapes: fonts have no glyph for them."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def spread(n: int, most: int) -> list[int]:
    """All of range(n) when n <= most, else `most` indices spread from 0 to n - 1."""
    if n <= most:
        return list(range(n))
    return sorted({round(i * (n - 1) / (most - 1)) for i in range(most)})
