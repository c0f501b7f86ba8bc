"""What a query returns: the per-image overlap dedup of the ranked hits and the result table.

Design decisions:

- **Per-image overlap dedup** (thesis §3.3.1): walking the hits by descending score, a hit is
  dropped when it overlaps a better hit *from the same image* by more than ``dedup_overlap``,
  overlap = intersection / area of the larger box (the thesis drops any overlap: default 0.0).
  Hits from different images never suppress each other.
- **One schema for every query** (:data:`RESULT_SCHEMA`): text, image, multi-example, raw
  embedding, campaign and query-free novelty queries all return the same columns, so export,
  gallery and labeling code reads one shape. Only the meaning of ``score`` differs (see the
  schema's docstring).
- **Provenance travels with the table**: the schema metadata holds the query description, the
  per-stage timings, the index version, the model and whether the index was built from randomly
  initialised CLIP weights; :func:`timings_of` and :func:`query_info` read them back (also after
  a Ray round trip, which keeps schema metadata).
- Timings are wall-clock milliseconds per stage plus ``non_encoder_cpu_ms``: the CPU time of the
  query's thread after encoding, which a shared, oversubscribed machine does not inflate.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from mining.query.snapshot import IndexSnapshot

RESULT_SCHEMA = pa.schema(
    [
        ("rank", pa.int32()),
        ("score", pa.float32()),
        ("patch_id", pa.int64()),
        ("image_id", pa.string()),
        ("image_uri", pa.string()),
        ("x0", pa.int32()),
        ("y0", pa.int32()),
        ("x1", pa.int32()),
        ("y1", pa.int32()),
        ("date", pa.string()),
        ("level", pa.int8()),
    ]
)
"""Columns of every query result: rank (1-based), score (cosine similarity, or the combined score
of a max/sum multi-example query, or the rarity of a query-free :meth:`QueryEngine.novel` query), patch_id, image_id, image_uri, box x0, y0, x1, y1 (original-image
pixels, x1/y1 exclusive), date (ingest date YYYY-MM-DD), level (hierarchy level). The schema metadata
holds ``query`` (JSON description), ``timings`` (JSON, milliseconds), ``index_version``, ``model``
and ``random_init``."""


@dataclass
class _Timer:
    """Per-stage timings of one query (ms), the text-cache hit and the candidate counts; ``extra``
    holds further entries (``non_encoder_cpu_ms``). Written to the result's ``timings`` metadata."""

    encode_ms: float = 0.0
    search_ms: float = 0.0
    rerank_dedup_ms: float = 0.0
    metadata_ms: float = 0.0
    cache_hit: bool = False
    fetched: int = 0
    searches: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self, total_ms: float) -> dict:
        d = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items() if k != "extra"}
        d["total_ms"] = round(total_ms, 4)
        d.update(self.extra)
        return d


def overlap_larger(a: Sequence[float], b: Sequence[float]) -> float:
    """Overlap of two boxes (x0, y0, x1, y1; x1/y1 exclusive): intersection area / area of the
    larger box, in [0, 1] (thesis §3.1.2 / §3.3.1). Scalar form of :func:`mining.selection.overlap_larger`."""
    from mining.selection import overlap_larger as _overlap

    return float(_overlap(np.asarray(a), np.asarray(b)))


def dedup_per_image(image_codes: np.ndarray, boxes: np.ndarray, k: int, max_overlap: float | None) -> np.ndarray:
    """Greedy per-image overlap dedup of hits already sorted by descending score (§3.3.1).

    Args:
        image_codes: (N,) int image identifiers of the hits (any hashable ints).
        boxes: (N, 4) int boxes x0, y0, x1, y1.
        k: stop after k kept hits.
        max_overlap: a hit whose overlap (intersection / larger area) with a kept hit of the same
            image is > max_overlap is dropped; None or >= 1 keeps everything.
    Returns:
        (<=k,) int64 positions of the kept hits, in input order.
    """
    from mining.selection import overlap_larger as _overlap_many

    n = len(image_codes)
    if max_overlap is None or max_overlap >= 1.0:
        return np.arange(min(n, k), dtype=np.int64)
    kept: list[int] = []
    by_image: dict[int, list] = {}
    codes = image_codes.tolist()
    bl = boxes.tolist()
    for i in range(n):
        prev = by_image.get(codes[i])
        b = bl[i]
        if prev is not None and (_overlap_many(b, prev) > max_overlap).any():
            continue
        by_image.setdefault(codes[i], []).append(b)
        kept.append(i)
        if len(kept) >= k:
            break
    return np.asarray(kept, dtype=np.int64)


def result_table(snap: "IndexSnapshot", rows: np.ndarray, scores: np.ndarray) -> pa.Table:
    """The :data:`RESULT_SCHEMA` rows of the final hits, without metadata.

    Args:
        snap: the snapshot the hits come from.
        rows: (n,) int metadata rows of the hits, best first. scores: (n,) their scores.
    Returns:
        ``pyarrow.Table`` with ranks 1..n; columns the index metadata lacks are null.
    """
    n = len(rows)
    if n == 0:
        return RESULT_SCHEMA.empty_table()
    sub = snap.take(rows)
    cols = {"rank": pa.array(np.arange(1, n + 1, dtype=np.int32)), "score": pa.array(scores.astype(np.float32))}
    arrays = []
    for f in RESULT_SCHEMA:
        if f.name in cols:
            arrays.append(cols[f.name])
        elif f.name in sub.column_names:
            arrays.append(pc.cast(sub.column(f.name), f.type).combine_chunks())
        else:
            arrays.append(pa.nulls(n, f.type))
    return pa.Table.from_arrays(arrays, schema=RESULT_SCHEMA)


def finished_table(snap: "IndexSnapshot", rows: np.ndarray, scores: np.ndarray, query: dict, timer: _Timer,
                   t0: float, cpu0: float, model: str) -> pa.Table:
    """:func:`result_table` with the query / timings / version metadata attached.

    Args:
        query: JSON-able description of the query. timer: its timings so far.
        t0: ``time.perf_counter()`` at the start of the query; cpu0: ``time.thread_time()`` after
            encoding. model: the CLIP model id ("" when none is loaded).
    """
    tm = time.perf_counter()
    table = result_table(snap, rows, scores)
    timer.metadata_ms += (time.perf_counter() - tm) * 1e3
    total = (time.perf_counter() - t0) * 1e3
    # CPU time of this thread after encoding: what the query costs without the wall-clock
    # noise of a shared, oversubscribed machine
    timer.extra["non_encoder_cpu_ms"] = round((time.thread_time() - cpu0) * 1e3, 4)
    md = {
        b"query": json.dumps(query, default=str).encode(),
        b"timings": json.dumps(timer.as_dict(total)).encode(),
        b"index_version": snap.version.encode(),
        b"model": model.encode(),
        b"random_init": b"true" if snap.random_init else b"false",
    }
    return table.replace_schema_metadata(md)


def timings_of(table: pa.Table) -> dict:
    """The per-stage timings (ms) recorded in a result table's schema metadata."""
    md = table.schema.metadata or {}
    return json.loads(md.get(b"timings", b"{}"))


def query_info(table: pa.Table) -> dict:
    """query description, index_version, model and random_init from a result table's metadata."""
    md = table.schema.metadata or {}
    return {"query": json.loads(md.get(b"query", b"{}")), "index_version": md.get(b"index_version", b"").decode(),
            "model": md.get(b"model", b"").decode(), "random_init": md.get(b"random_init", b"false") == b"true"}
