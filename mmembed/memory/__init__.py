"""Persistent multimodal memory: per-user items (text, images, sounds) in one SQLite file.

Reading order: `records.py` (rows as values: `NewItem`, `MemoryHit`) → `sqlite.py` (lock waits,
errors, forks) → `store.py` (the SQLite file: schema, WAL, transactions, one connection per process)
→ `items.py` (what `add` accepts → stored bytes) → `cache.py` (a user's vectors in memory, searched
with the retrieval backend) → `export.py` (a memory → a manifest folder) → `embedding.py` (items →
stored rows with the model) → `memory.py` (`Memory`, the public API) →
`session.py` (`Session`: a conversation that recalls memories into the decoder's prompt) →
`chat.py` (the `mmembed chat` loop).

    import mmembed as mm
    mem = mm.Memory("memory.db", model=mm.load("runs/demo"))
    mem.add(user="ada", item=mm.Image("x.png"), text="my bike")
    mem.search(user="ada", query=mm.Text("a red bicycle"), k=5)   # -> list[MemoryHit]
    with mm.Session(model, memory="memory.db", user="ada") as chat:
        chat.ask("What colour was my bike?").recalled              # the memories the decoder saw
"""

from mmembed.memory.memory import Memory
from mmembed.memory.records import MemoryHit
from mmembed.memory.session import Session
from mmembed.memory.sqlite import MemoryFileError
from mmembed.memory.store import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "Memory", "MemoryFileError", "MemoryHit", "Session"]
