"""Search-parameter tuning and recall measures for FAISS indexes (the policy half of the search
settings; the mechanics are in :mod:`mining.index.core`, which re-exports these names).

* :func:`per_query_recall`, :func:`recall_at_k`: recall@k of found ids against exact ids.
* :func:`recall_lower_bound`: one-sided 95% lower confidence bound of a mean recall, so that a
  setting reaches the target on the population of queries, not only on the tuning sample.
* :func:`tune`: the cheapest nprobe / k_factor / efSearch reaching a recall target
  (:data:`TUNE_NPROBES`, :data:`K_FACTORS`).
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

import numpy as np

from mining.index.sizing import DEFAULT_K_FACTOR

if TYPE_CHECKING:
    import faiss

log = logging.getLogger(__name__)

# re-rank depths tried by tune() for ivfpq-refine (k * k_factor candidates; 4-bit codes need 2-4x more
# candidates than 8-bit ones for the same recall, and the fast scan makes them cheap). 512 is there
# for large shards: the 5M single shard with nlist capped at 2,048 reached 0.9375 held-out recall@16
# at most 256 and 0.969 at 512 (benchmarks/retune_shard.py, RESULTS.md issue 18)
K_FACTORS = (4, DEFAULT_K_FACTOR, 16, 32, 64, 128, 256, 512)


def per_query_recall(found: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    """|found[q, :k] ∩ truth[q, :k]| / |truth[q, :k] valid| per query: float64 (Q',), queries with no valid truth left out."""
    r = []
    for f, t in zip(found[:, :k], truth[:, :k]):
        t = set(t[t >= 0].tolist())
        if t:
            r.append(len(t & set(f.tolist())) / len(t))
    return np.asarray(r, dtype=np.float64)


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean |found[:, :k] ∩ truth[:, :k]| / |truth[:, :k] valid| over queries (ids; -1 ignored)."""
    r = per_query_recall(found, truth, k)
    return float(r.mean()) if len(r) else 1.0


def recall_lower_bound(per_query: np.ndarray, z: float = 1.645, margin: float = 0.0) -> float:
    """One-sided lower confidence bound of the mean recall: mean - max(margin, z * std / sqrt(Q)).

    The tuning queries are a sample; the recall that other queries see is the population mean.
    z = 1.645 is the normal 95% one-sided quantile (central limit over Q >= ~30 queries). An empty
    sample gives 1.0 (nothing to miss).
    """
    if len(per_query) == 0:
        return 1.0
    se = float(per_query.std(ddof=1)) / np.sqrt(len(per_query)) if len(per_query) > 1 else 0.0
    return float(per_query.mean()) - max(margin, z * se)


TUNE_EXTRA_NPROBES = 4  # ivfpq-refine: nprobe steps explored past the first that reaches the target (2 doublings)
TUNE_NPROBES = tuple(sorted({1 << i for i in range(17)} | {3 << i for i in range(16)}))
"""nprobe steps tried by :func:`tune`: powers of two and the 1.5x steps between them (1, 2, 3, 4, 6, 8, 12,
16, 24, 32, ...). At 1M vectors / 2,048 lists (k_factor 32), nprobe 16's lower bound missed the 0.95 target
(0.949), 24 reached it (0.959) and was 10% faster than 32, timed interleaved: 0.374 against 0.416 ms
(benchmarks/RESULTS.md, issue 18, session 9)."""
TUNE_TIMING_REPEATS = 3  # timed passes per candidate ...
TUNE_TIMING_QUERIES = 32  # ... of this many single-query searches (batch-1 latency, median)


def tune(
    kind: str,
    index: faiss.Index,
    search_fn: Callable[[np.ndarray, int, dict], np.ndarray],
    queries: np.ndarray,
    truth: np.ndarray,
    *,
    k: int = 16,
    recall_target: float = 0.95,
    nlist: int = 0,
    margin: float = 0.005,
    extra_nprobes: int = TUNE_EXTRA_NPROBES,
) -> tuple[dict, float]:
    """Cheapest search parameters reaching ``recall_target`` (recall@k against ``truth`` ids).

    ``search_fn(queries, k, params) -> ids (Q, k)`` runs the real search path (with re-rank).
    The tuning queries are a sample, so a setting counts as reaching the target when the one-sided
    95% lower confidence bound of its mean recall does (:func:`recall_lower_bound`: mean minus
    max(``margin``, 1.645 standard errors)). A fixed margin alone was too thin: at 1M vectors the
    tuning queries measured 0.9558 against a 0.955 goal and 200 held-out queries 0.9416
    (benchmarks/RESULTS.md, issue 18); the per-query spread there gives a standard error of
    about 0.006.

    - IVF (ivfpq): the smallest nprobe (:data:`TUNE_NPROBES` up to nlist) that reaches it.
    - ivfpq-refine: for each nprobe, the smallest k_factor in :data:`K_FACTORS` that reaches it;
      nprobe and k_factor trade against each other (more lists scanned vs more candidates
      re-ranked), so after the first nprobe that reaches the target ``extra_nprobes`` more are
      tried, and the fastest of these candidates wins: median batch-1 latency over
      :data:`TUNE_TIMING_REPEATS` passes of :data:`TUNE_TIMING_QUERIES` single-query searches, on
      the machine that builds the index -- the one choice here that depends on timing.
    - HNSW: the smallest efSearch over 16..1024. Flat/SQ8: nothing to tune.
    When the target is not reachable, returns the parameters with the best recall, smallest first
    (recall within 0.002 of the best).
    Returns: (params, measured recall).
    """
    if kind in ("flat", "sq8"):
        return {}, recall_at_k(search_fn(queries, k, {}), truth, k)
    goal = min(1.0, recall_target)
    if kind == "hnsw":
        outer = [[{"efSearch": e}] for e in (16, 32, 64, 128, 256, 512, 1024) if e >= k]
    else:
        nprobes = [p for p in TUNE_NPROBES if p < nlist] + [nlist]
        kfs = K_FACTORS if kind == "ivfpq-refine" else (None,)
        outer = [[{"nprobe": p, **({"k_factor": kf} if kf else {})} for kf in kfs] for p in nprobes]
    explore = extra_nprobes if kind == "ivfpq-refine" else 0
    tried, hits = [], []
    best = 0.0
    steps_after_hit = -1  # outer steps since the first hit
    for inner in outer:
        for params in inner:  # cheapest first: stop at the first that reaches the goal
            pq = per_query_recall(search_fn(queries, k, params), truth, k)
            r = float(pq.mean()) if len(pq) else 1.0
            lcb = recall_lower_bound(pq, margin=margin)
            tried.append((params, r))
            best = max(best, r)
            log.info("tune %s %s recall@%d=%.4f (95%% lower bound %.4f)", kind, params, k, r, lcb)
            if lcb >= goal:
                hits.append((params, r))
                break
        if hits:
            steps_after_hit += 1
        if steps_after_hit >= explore or (not hits and best >= 0.999):
            break
    if len(hits) == 1:
        return hits[0]
    if hits:
        def latency(params):  # batch 1: a query service answers one query at a time
            ts = []
            for _ in range(TUNE_TIMING_REPEATS):
                for i in range(min(len(queries), TUNE_TIMING_QUERIES)):
                    t0 = time.perf_counter()
                    search_fn(queries[i:i + 1], k, params)
                    ts.append(time.perf_counter() - t0)
            return float(np.median(ts))

        timed = [(latency(p), i, p, r) for i, (p, r) in enumerate(hits)]
        for t, _, p, r in timed:
            log.info("tune %s %s recall@%d=%.4f %.3f ms/query", kind, p, k, r, 1e3 * t)
        _, _, p, r = min(timed)
        return p, r
    for params, r in tried:
        if r >= best - 0.002:
            return params, r
    return tried[-1]


# --------------------------------------------------------------------------- quantisation error
