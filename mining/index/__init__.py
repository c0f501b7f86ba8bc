"""The reduce stage: OPQ codebooks + FAISS ANN index over the mined patch embeddings (issue 6).

Public API::

    build_index(data_root, out_root, *, kind="auto", memory_budget_bytes=None, recall_target=0.95,
                seed=0, use_ray=None) -> manifest dict          # new version, published atomically
    update_index(data_root, out_root, **kw) -> manifest dict   # nightly add with frozen codebooks / retrain
    open_index(out_root, version=None) -> PatchIndex           # .search(queries, k), .metadata(), ...
    list_versions(out_root) -> list[str]; drop_version(out_root, version)

Kinds: flat, hnsw (HNSW32), ivfpq (OPQ+IVF+8-bit PQ), ivfpq-refine (OPQ+IVF+4-bit fast-scan PQ
candidates re-ranked by faiss.IndexRefine with the exact float16 vectors), sq8.  Sizing rules: :mod:`mining.index.sizing`.  See docs/index.md.
"""
from mining.index.build import build_index, sample_vectors, update_index
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
