"""mmembed: multimodal shared embeddings.

    import mmembed as mm
    model = mm.load("runs/demo")
    z = model.embed("image", ["cat.png"])          # (N, D) unit vectors
    out = model.generate(["What is in", mm.Image("cat.png"), "?"])   # a run with a decoder
    with mm.Session(model, memory="memory.db", user="ada") as chat:  # remembers across processes
        chat.ask("What colour was the star I showed you?")

Heavy modules (torch, encoders) load on first use, so `mmembed --help` stays instant.
"""

from __future__ import annotations

import importlib
from typing import Any

from mmembed.modality import Modality

__version__ = "0.1.0"

_LAZY = {
    "load": ("mmembed.model", "load"),
    "Model": ("mmembed.model", "Model"),
    "build_model": ("mmembed.model", "build_model"),
    "load_config": ("mmembed.config", "load_config"),
    "Config": ("mmembed.config", "Config"),
    "Tokenizer": ("mmembed.tokenizer", "Tokenizer"),
    "Index": ("mmembed.retrieval", "Index"),
    "Query": ("mmembed.retrieval", "Query"),
    "Image": ("mmembed.decoder.prompt", "Image"),
    "Audio": ("mmembed.decoder.prompt", "Audio"),
    "Text": ("mmembed.decoder.prompt", "Text"),
    "Generation": ("mmembed.decoder.answer", "Generation"),
    "Memory": ("mmembed.memory", "Memory"),
    "Session": ("mmembed.memory", "Session"),
}
# `train` is a subpackage and `mm.train(config)`: the package is callable (mmembed/train/__init__.py),
# since importing any of its modules sets `mmembed.train` to it whatever was there before
_SUBPACKAGES = ("decoder", "memory", "train")

__all__ = ["Modality", "__version__", *_LAZY, *_SUBPACKAGES]


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"mmembed.{name}")
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mmembed' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The lazy names too: a notebook's `mm.<Tab>` offered `load` only once it had been used."""
    return sorted({*globals(), *__all__})
