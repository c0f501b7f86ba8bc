"""The query engine: text / image-patch / multi-example / raw-embedding search over a patch index.

Implements the search process of the thesis §3.3.1 and the averaged query of §4.3 (Eq. 4.1):

1. **encode** the query with the SAME CLIP model the index was built with
   (:mod:`mining.query.encoding`; one resolve path for every kind of query);
2. **search** the FAISS index (``mining.index.PatchIndex.search``) for more candidates than
   asked for (over-fetch, grown 4x until ``k`` hits survive the filters and the dedup or the index
   is exhausted);
3. map patch ids to (image id, box, date) through the snapshot's metadata arrays
   (:mod:`mining.query.snapshot`);
4. **filter** by date range, excluded image ids (already labeled / already exported) and a
   ``where`` condition on the frames' metadata;
5. optional **exact re-rank** of the candidates with the stored full-precision vectors
   (``PatchIndex.reconstruct_exact``; on by default for approximate indexes, i.e. kinds not in
   :data:`EXACT_KINDS`); max / sum multi-example queries and negatives always score exactly;
6. **per-image overlap dedup** (§3.3.1, :func:`mining.query.result.dedup_per_image`);
7. return a ``pyarrow.Table`` (:data:`mining.query.result.RESULT_SCHEMA`) with the query,
   timings and index version in its metadata.

Ordering is deterministic: score descending, ties by patch id. Bad queries raise
:class:`~mining.query.validation.QueryError`; the engine stays usable. A query pins the snapshot
it started with, so :meth:`QueryEngine.reload` never changes a query in flight.

**The seam for a sharded index** (a router actor merging the top-k of shard actors, then applying
the filters, dedup and re-rank here). Every encoded query goes
``QueryEngine._query`` -> ``_resolve_query`` (encode once: :class:`EncodedQuery`) -> ``_run`` ->
:func:`ranked_candidates`, whose loop has two halves:

- ``search(Q, fetch) -> (D, I)``: the ANN search for candidate (score, patch_id) rows, (q, fetch)
  each. Here it is :meth:`QueryEngine._search` (the snapshot's index). The router
  (:mod:`mining.query.router`) does not override it: its snapshots' index is a
  :class:`~mining.query.shards.ShardSet` whose ``search`` asks every shard actor for its top
  ``fetch`` and merges by score, so the campaign and novel paths, which call the index directly,
  go through the actors too -- the rest is unchanged.
- :func:`rank_hits`: candidate ids + index scores -> metadata rows, filters, scoring
  (:func:`make_scorer`: exact re-rank and multi-example combination through a ``vectors(ids)``
  callable), ordering and dedup; then :meth:`QueryEngine._finish` builds the result table.
"""
from __future__ import annotations

import functools
import logging
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from mining.query.encoding import EncodedQuery, QueryEncoder, spec_from_manifest
from mining.query.result import _Timer, dedup_per_image, finished_table, result_table
from mining.query.snapshot import RANDOM_INIT_QUERY_WARNING, IndexSnapshot, _current_version, _open_index
from mining.query.validation import QueryConfig, QueryError, _check_k, validate_filters

log = logging.getLogger(__name__)

EXACT_KINDS = frozenset({"flat", "hnsw", "ivfpq-refine", "ivf-flat", "ivfflat"})
"""Index kinds whose search scores are already exact cosines (no automatic re-rank)."""

Scorer = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]


def make_scorer(vectors: Callable[[np.ndarray], np.ndarray], Q: np.ndarray, mode: str, exact: bool,
                neg: np.ndarray | None = None, neg_weight: float = 0.0) -> Scorer:
    """The score function of one query: ``score(ids, index_scores) -> (n,) float32``.

    Args:
        vectors: patch ids (n,) -> (n, D) float32 stored exact vectors (``IndexSnapshot.vectors``).
        Q: (q, D) float32 query directions. mode: ``single`` | ``max`` | ``sum``.
        exact: re-rank a single query with the exact vectors instead of the index's scores.
        neg: (m, D) float32 negatives; their best cosine times ``neg_weight`` is subtracted.
    Returns:
        a single query that needs no exact scores keeps the index's scores; otherwise the
        scores are the exact cosines (single), their max or sum over ``Q``, minus the negatives.
    """
    if mode == "single" and neg is None and not exact:
        return lambda ids, index_scores: index_scores

    def score(ids: np.ndarray, index_scores: np.ndarray | None) -> np.ndarray:
        vecs = vectors(ids)
        S = vecs @ Q.T  # (n, q) exact cosines
        if mode == "single":
            out = S[:, 0]
        elif mode == "max":
            out = S.max(axis=1)
        else:
            out = S.sum(axis=1)
        if neg is not None and len(ids):
            out = out - neg_weight * (vecs @ neg.T).max(axis=1)
        return out.astype(np.float32)

    return score


def rank_hits(snap: IndexSnapshot, ids: np.ndarray, index_scores: np.ndarray | None, k: int, filters: dict,
              max_ov: float | None, timer: _Timer, score: Scorer):
    """Finish one batch of ANN candidates: metadata rows, filters, scores, order, per-image dedup.

    Args:
        ids: (n,) int64 candidate patch ids (>= 0). index_scores: (n,) float32 the index's scores
            of a single query's candidates, or None.
        filters: validated filters. max_ov: dedup overlap threshold (None = no dedup).
        score: :data:`Scorer` (:func:`make_scorer`).
    Returns:
        (rows, scores, keep): (m,) int64 metadata rows and (m,) float32 scores of the candidates
        that exist and pass the filters, ordered by score desc then patch id, and the (<=k,) int64
        positions in them that survive the dedup.
    Raises:
        QueryError: a ``where`` filter DuckDB rejects.
    """
    tm = time.perf_counter()
    rows, found = snap.rows_of(ids)
    if filters:
        found &= snap.filter_mask(rows, filters)
    ids, rows = ids[found], rows[found]
    if index_scores is not None:
        index_scores = index_scores[found]
    timer.metadata_ms += (time.perf_counter() - tm) * 1e3
    tr = time.perf_counter()
    scores = score(ids, index_scores)
    order = np.lexsort((ids, -scores))  # score desc, ties by patch id: deterministic
    ids, scores, rows = ids[order], scores[order], rows[order]
    keep = dedup_per_image(snap.image_codes[rows], snap.boxes[rows], k, max_ov)
    timer.rerank_dedup_ms += (time.perf_counter() - tr) * 1e3
    return rows, scores, keep


def ranked_candidates(snap: IndexSnapshot, Q: np.ndarray, k: int, fetch: int, filters: dict,
                      max_ov: float | None, timer: _Timer, score: Scorer, *, single: bool = False,
                      search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]] | None = None):
    """The shared candidate loop of every query: ANN search of ``fetch`` candidates, then
    :func:`rank_hits` (filters, scoring, ordering, dedup), fetching 4x more until ``k`` hits
    survive or the index is exhausted.

    Args:
        Q: (q, D) float32 query directions. fetch: first candidate count.
        score: ``score(ids, index_scores) -> (n,) float32``; ``index_scores`` are the index's
            own scores of a single query (``single=True``), else None.
        single: one query: keep the index's order/scores of ``Q[0]``'s hits (no union).
        search: ``search(Q, fetch) -> (D, I)``, (q, fetch) float scores and int64 patch ids (-1 =
            none); default ``snap.index.search``. A router passes the merged top-k of its shards.
    Returns:
        (rows, scores, keep): metadata rows and scores of the ordered candidates, and the
        indices into them that survive dedup (at most k). ``timer.fetched`` is set.
    """
    search = search or snap.index.search
    n = snap.ntotal
    keep = scores = rows = np.zeros(0, np.int64)
    while n > 0:
        ts = time.perf_counter()
        D, I = search(Q, fetch)
        timer.search_ms += (time.perf_counter() - ts) * 1e3
        timer.searches += 1
        tm = time.perf_counter()
        d = None
        if single:
            ids, d = I[0], D[0]
            valid = ids >= 0
            ids, d = ids[valid], d[valid].astype(np.float32)
        else:
            ids = np.unique(I[I >= 0])
        timer.metadata_ms += (time.perf_counter() - tm) * 1e3
        rows, scores, keep = rank_hits(snap, ids, d, k, filters, max_ov, timer, score)
        if len(keep) >= k or fetch >= n:
            break
        fetch = min(n, fetch * 4)
    timer.fetched = int(fetch) if n else 0
    return rows, scores, keep


class QueryEngine(QueryEncoder):
    """Search a patch index with text, an image crop, several examples or a raw embedding.

    Args:
        index_root: index directory (``open_index`` layout, ``CURRENT`` names the version);
            may be None when ``index`` is given.
        version: index version to open (default: ``CURRENT``).
        clip: ``mining.embed.ClipSpec``; default derived from the index manifest
            (:func:`mining.query.spec_from_manifest`) -- the query MUST use the index's model.
        device: torch device for the CLIP towers ("cuda", "cpu"; None = cuda when available).
        config: :class:`~mining.query.validation.QueryConfig`.
        index: an already opened ``PatchIndex``-like object (tests, benchmarks).
        embedder: an already loaded ``ClipEmbedder`` (shared across reloads).
        load_embedder: load the CLIP model now (False: on the first query that needs it).
    Raises:
        FileNotFoundError: no index at ``index_root``.
        ValueError: the CLIP model's dim differs from the index dim, or no model can be derived.
        mining.embed.WeightsError: the CLIP weights cannot be loaded.
    Warns:
        UserWarning when the index was built from randomly initialised CLIP embeddings.
    """

    _result = staticmethod(result_table)  # mining.campaign builds its table with it

    def __init__(self, index_root: str | None = None, *, version: str | None = None, clip=None,
                 device: str | None = None, config: QueryConfig | None = None, index: Any = None,
                 embedder: Any = None, load_embedder: bool = True):
        self.config = config or QueryConfig()
        self.index_root = index_root
        self._init_encoder(clip, device)
        if index is None:
            if index_root is None:
                raise ValueError("give index_root or index")
            self._snap = self._open_snapshot(version)
        else:
            self._snap = IndexSnapshot(index, index_root)
        self._warn_random(self._snap)
        self.embedder = embedder
        self.clip = clip
        if load_embedder and embedder is None:
            self._load_embedder(self._snap)
        elif embedder is not None:
            self._check_dim(embedder, self._snap)

    # ------------------------------------------------------------------ state
    @property
    def snapshot(self) -> IndexSnapshot:
        """The index version a query uses: the current one (an in-flight query keeps the one it
        started with; a router returns the snapshot its query thread pinned)."""
        return self._snap

    def _open_snapshot(self, version: str | None) -> IndexSnapshot:
        """Open ``version`` (None = CURRENT) of ``index_root`` as a new snapshot, fully loaded.
        The override point of a router (shard actors instead of in-process shards).
        Raises FileNotFoundError / ValueError as :func:`mining.index.open_index`."""
        return IndexSnapshot(_open_index(self.index_root, version), self.index_root)

    @property
    def version(self) -> str:
        return self._snap.version

    @property
    def random_init(self) -> bool:
        return self._snap.random_init

    def _warn_random(self, snap: IndexSnapshot) -> None:
        if snap.random_init:
            msg = RANDOM_INIT_QUERY_WARNING.format(where=f"{snap.root or ''} version {snap.version}".strip())
            log.warning(msg)
            warnings.warn(msg, UserWarning, stacklevel=3)

    def reload(self, version: str | None = None) -> dict:
        """Open the newest (or the given) index version and swap it in atomically.

        The new version is fully loaded before the swap; queries already running keep the
        snapshot they started with and finish on the old version. A version with a different
        CLIP model loads that model first.

        Returns:
            {"old": old version, "new": new version, "swapped": bool, "load_s": seconds}.
        Raises:
            FileNotFoundError / ValueError: the new version cannot be opened (the old one stays).
        """
        if self.index_root is None:
            raise ValueError("engine was created from an index object; nothing to reload from")
        t0 = time.perf_counter()
        old = self._snap
        target = version or _current_version(self.index_root)
        if target is not None and target == old.version:
            return {"old": old.version, "new": old.version, "swapped": False, "load_s": 0.0}
        snap = self._open_snapshot(target)
        if self._clip_arg is None:
            spec = spec_from_manifest(snap.manifest)
            if self.embedder is None or spec != self.embedder.spec:
                self._load_embedder(snap)
        if self.embedder is not None:
            self._check_dim(self.embedder, snap)
        self._warn_random(snap)
        self._snap = snap  # the atomic swap: one reference assignment
        return {"old": old.version, "new": snap.version, "swapped": True, "load_s": round(time.perf_counter() - t0, 3)}

    # ------------------------------------------------------------------ public queries
    def text(self, text: str, k: int = 16, *, filters: Mapping | None = None, dedup: bool = True,
             rerank: bool | None = None) -> pa.Table:
        """Text query (CLIP text tower, §3.3.1). Returns :data:`RESULT_SCHEMA` rows, best first.

        Raises:
            QueryError: empty text, bad k, unknown filter.
        """
        return self._query(k, filters, dedup, rerank, text=text)

    def image(self, image: bytes | str | np.ndarray, box: Any = None, k: int = 16, *,
              filters: Mapping | None = None, dedup: bool = True, rerank: bool | None = None) -> pa.Table:
        """Image-patch query: ``image`` as encoded bytes or an allowed URI, ``box`` = x0,y0,x1,y1
        (pixels, x1/y1 exclusive; whole frame when None), embedded with the CLIP image tower.

        Raises:
            QueryError: unreadable image, box outside the image, URI not allowed, bad k/filter.
        """
        return self._query(k, filters, dedup, rerank, image=image, box=box)

    def embedding(self, vector: Any, k: int = 16, *, filters: Mapping | None = None, dedup: bool = True,
                  rerank: bool | None = None) -> pa.Table:
        """Raw-embedding query: (D,) float, normalised here. Raises QueryError on wrong dim / NaN."""
        return self._query(k, filters, dedup, rerank, embedding=vector)

    def examples(self, examples: Sequence[Any], k: int = 16, *, mode: str = "mean",
                 negatives: Sequence[Any] | None = None, negative_weight: float | None = None,
                 filters: Mapping | None = None, dedup: bool = True, rerank: bool | None = None) -> pa.Table:
        """Multi-example query (thesis §4.3).

        Args:
            examples: positives; each text, image bytes, ``{"image"|"uri": ..., "box": ...}``,
                ``{"text": ...}``, ``{"embedding": ...}`` or :class:`Example`.
            mode: ``mean`` (Eq. 4.1: search with the normalised mean embedding), ``max`` or
                ``sum`` (search each example, combine the exact per-example scores of the union
                of candidates).
            negatives: examples to push away (see :mod:`mining.query.encoding`); weight
                ``negative_weight`` (default ``config.negative_weight``).
        Raises:
            QueryError: no examples, unknown mode, any bad example (the message names which).
        """
        return self._query(k, filters, dedup, rerank, examples=examples, mode=mode, negatives=negatives,
                           negative_weight=negative_weight)

    # ------------------------------------------------------------------ core
    def _query(self, k: Any, filters: Mapping | None, dedup: bool, rerank: bool | None, **what: Any) -> pa.Table:
        """The one path of every encoded query: check k, then the filters, then encode exactly one
        query (``what``: see :meth:`_resolve_query`), then :meth:`_run`."""
        t0 = time.perf_counter()
        k = _check_k(k, self.config.k_cap)
        filters = validate_filters(filters)
        timer = _Timer()
        q = self._resolve_query(timer, **what)
        timer.encode_ms = (time.perf_counter() - t0) * 1e3
        return self._run(q, k, filters, dedup, rerank, timer, t0)

    def _search(self, snap: IndexSnapshot, Q: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """The ANN step: (q, D) float32 directions -> (q, fetch) scores and int64 patch ids (-1 =
        none) from ``snap``'s index. The override point of a router over shard actors."""
        return snap.index.search(Q, fetch)

    def _run(self, q: EncodedQuery, k: int, filters: dict, dedup: bool, rerank: bool | None, timer: _Timer,
             t0: float) -> pa.Table:
        snap = self.snapshot  # pinned for the whole query: a reload does not affect it
        cpu0 = time.thread_time()
        if q.Q.shape[1] != snap.dim:
            raise QueryError(f"query embedding dim {q.Q.shape[1]} != index dim {snap.dim}")
        if rerank is None and self.config.rerank is None:
            do_rerank = snap.kind not in EXACT_KINDS  # only indexes whose scores are approximate
        else:
            do_rerank = bool(self.config.rerank if rerank is None else rerank)
        max_ov = self.config.dedup_overlap if dedup else None
        Q = np.ascontiguousarray(q.Q, np.float32)
        fetch = min(snap.ntotal, max(k * max(1, self.config.overfetch), k + 32))
        score = make_scorer(snap.vectors, Q, q.mode, do_rerank, q.neg, q.neg_weight)
        rows, scores, keep = ranked_candidates(snap, Q, k, fetch, filters, max_ov, timer, score,
                                               single=q.mode == "single", search=functools.partial(self._search, snap))
        return self._finish(snap, rows[keep], scores[keep], {**q.desc, "k": k, "filters": filters,
                            "dedup_overlap": max_ov, "rerank": do_rerank}, timer, t0, cpu0)

    def novel(self, k: int = 16, date_from: str | None = None, date_to: str | None = None, *,
              by: str | None = None, filters: Mapping | None = None) -> pa.Table:
        """Query-free mode: the k rarest patches of the date range, one per frame (its rarest).

        Ranked by epitome ``novelty`` and / or kNN ``uniqueness`` (:mod:`mining.novel`); the
        rarity goes to the ``score`` column of an ordinary :data:`RESULT_SCHEMA` table.

        Args:
            k: patches (= frames) to return. date_from / date_to: inclusive ingest dates
                YYYY-MM-DD (also accepted inside ``filters``).
            by: ``novelty`` | ``uniqueness`` | ``both`` (mean percentile rank) | None (both when
                the patches have both, else the one they have).
            filters: other filters (:func:`validate_filters`).
        Raises:
            QueryError: bad k / date / filter, date_from after date_to, unknown ``by``, or no
                rarity signal for the patches.
        """
        from mining.novel import novel_filters, rarest_per_image

        t0, cpu0 = time.perf_counter(), time.thread_time()
        k = _check_k(k, self.config.k_cap)
        f = novel_filters(date_from, date_to, filters)
        snap, timer = self.snapshot, _Timer()
        tr = time.perf_counter()
        rows, scores, used = rarest_per_image(snap, k, f, by)
        timer.rerank_dedup_ms = (time.perf_counter() - tr) * 1e3
        return self._finish(snap, rows, scores, {"type": "novel", "by": used, "k": k, "filters": f,
                                                 "dedup": "one patch per image"}, timer, t0, cpu0)

    def _finish(self, snap: IndexSnapshot, rows: np.ndarray, scores: np.ndarray, query: dict, timer: _Timer,
                t0: float, cpu0: float) -> pa.Table:
        """The result table of the final hits, with the query / timings / version metadata."""
        model = self.embedder.model_id if self.embedder is not None else ""
        return finished_table(snap, rows, scores, query, timer, t0, cpu0, model)

    def stats(self) -> dict:
        """Counters: cache hits/misses/size, index version, ntotal, dim, model, device."""
        s = self._snap
        return {"version": s.version, "ntotal": s.ntotal, "dim": s.dim, "kind": s.kind, "random_init": s.random_init,
                "model": self.embedder.model_id if self.embedder is not None else None,
                "device": str(self.embedder.device) if self.embedder is not None else None,
                "cache_hits": self.cache_hits, "cache_misses": self.cache_misses, "cache_size": len(self._cache)}
