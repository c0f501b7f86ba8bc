"""The reduce stage: OPQ codebooks + FAISS ANN index over the mined patch embeddings (issue 6).

Public API::

    build_index(data_root, out_root, *, kind="auto", memory_budget_bytes=None, recall_target=0.95,
                seed=0, use_ray=None) -> manifest dict          # new version, published atomically
    update_index(data_root, out_root, **kw) -> manifest dict   # nightly add with frozen codebooks / retrain
    open_index(out_root, version=None) -> PatchIndex           # .search(queries, k), .metadata(), ...
    list_versions(out_root) -> list[str]; drop_version(out_root, version)

Kinds: flat, hnsw (HNSW32), ivfpq (OPQ+IVF+8-bit PQ), ivfpq-refine (OPQ+IVF+4-bit fast-scan PQ
candidates re-ranked by faiss.IndexRefine with the exact float16 vectors), sq8.  Sizing rules: :mod:`mining.index.sizing`;
FAISS mechanics: :mod:`mining.index.core`; search-parameter tuning: :mod:`mining.index.tuning`; reading the
committed store (records, vectors, training sample, task groups): :mod:`mining.index.source`.  See docs/index.md.

Sharded versions (issue 18; ``build_index(..., shards=S)``, :mod:`mining.index.layout`, :mod:`mining.index.stream`):
a version is a list of immutable shards **by date range**, not by patch_id hash: a night's data is a new
shard, so nightly adds never rewrite (re-upload, re-fetch) old shards; small old shards are merged on a
schedule by the compaction policy (``compaction_plan``, ``update_index(compact=...)``).  Every query asks
every shard, so unequal shard sizes cost balance, not correctness; all shards share one set of trained
codebooks, so sharded recall at equal parameters is never below the single index's.  The in-memory
(single-index) build stays the default for small stores (flat/hnsw/sq8 kinds, uniqueness.parquet).
"""
from mining.index.build import build_index
from mining.index.source import sample_vectors
from mining.index.update import update_index
from mining.index.publish import current_version, drop_version, list_versions
from mining.index.layout import ShardedIndex, fetch_version, open_index, open_shard
from mining.index.search import PatchIndex
from mining.index.stream import compaction_plan
from mining.index.sizing import KINDS, IndexPlan, choose_kind, choose_nlist, parse_bytes, plan_index

__all__ = [
    "build_index", "update_index", "open_index", "PatchIndex", "ShardedIndex", "open_shard", "fetch_version",
    "compaction_plan", "list_versions", "drop_version",
    "current_version", "sample_vectors", "plan_index", "choose_kind", "choose_nlist", "parse_bytes",
    "IndexPlan", "KINDS",
]
