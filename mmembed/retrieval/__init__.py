"""Cross-modal retrieval: an index of unit vectors of any modality, queries, search backends.

Reading order: `store.py` (rows, ids, tombstones) → `exact.py` (blocked top-k) →
`faiss_backend.py` / `backends.py` (the registry) → `query.py` (composed queries) →
`embed.py` (embedding a manifest) → `index_format.py` (on-disk format) → `persist.py` (the folder swap)
→ `query_vectors.py` (queries → checked rows) → `index.py` (`Index`) →
`commands.py` (what `mmembed search` runs).
"""

from mmembed.retrieval.backends import BACKENDS, Backend
from mmembed.retrieval.commands import run_search
from mmembed.retrieval.exact import exact_topk
from mmembed.retrieval.hits import Hit, format_hits
from mmembed.retrieval.index import Index
from mmembed.retrieval.query import Query

__all__ = ["BACKENDS", "Backend", "Hit", "Index", "Query", "exact_topk", "format_hits", "run_search"]
