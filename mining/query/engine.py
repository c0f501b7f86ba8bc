"""The query engine: text / image-patch / multi-example / raw-embedding search over a patch index.

Implements the search process of the thesis §3.3.1 and the averaged query of §4.3 (Eq. 4.1):

1. **encode** the query with the SAME CLIP model the index was built with (text tower for text,
   image tower for an image crop), L2-normalised so that inner product = cosine similarity;
   repeated text queries are served from an LRU embedding cache;
2. **search** the FAISS index (``mining.index.PatchIndex.search``) for more candidates than
   asked for (over-fetch, grown until ``k`` hits survive the filters or the index is exhausted);
3. map patch ids to (image id, box, date) through the Arrow patch metadata (``meta.arrow``,
   memory-mapped; only fixed-width columns and dictionary codes are held in RAM);
4. **filter** by date range and by excluded image ids (already labeled / already exported);
5. optional **exact re-rank** of the candidates with the stored full-precision vectors
   (``PatchIndex.reconstruct_exact``; on by default for approximate indexes);
6. **per-image overlap dedup** (§3.3.1): walking the hits by descending score, a hit is dropped
   when it overlaps a better hit *from the same image* by more than ``dedup_overlap``, overlap =
   intersection / area of the larger box (the thesis drops any overlap: default 0.0);
7. return a ``pyarrow.Table`` (:data:`RESULT_SCHEMA`).

Multi-example queries (:meth:`QueryEngine.examples`):

- ``mean``: q = normalise(mean_i z_i) -- Eq. 4.1 (the mean of the normalised example embeddings;
  the final re-normalisation does not change the ranking, it only makes the scores cosines);
- ``max`` / ``sum``: every example is searched on its own, the union of the candidates is scored
  exactly against every example and the per-example scores are combined with max or sum;
- negatives: ``mean`` uses q = normalise(mean(pos) - w * mean(neg)); ``max``/``sum`` subtract
  ``w * max_j cos(neg_j, x)`` from the combined score (w = ``negative_weight``, default 0.5).

Bad queries raise :class:`QueryError` (a ``ValueError``) with a message meant for the user;
the engine stays usable.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import posixpath
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)

RANDOM_INIT_QUERY_WARNING = (
    "index {where} was built from embeddings made with RANDOMLY INITIALISED CLIP weights "
    "(--clip-random-init): query results are not semantic"
)

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

FILTER_NAMES = ("date_from", "date_to", "exclude_image_ids", "where")
EXACT_KINDS = frozenset({"flat", "hnsw", "ivfpq-refine", "ivf-flat", "ivfflat"})
"""Index kinds whose search scores are already exact cosines (no automatic re-rank)."""
MODES = ("mean", "max", "sum")


class QueryError(ValueError):
    """A bad query (empty text, unreadable image, box outside the image, bad k, unknown filter,
    URI outside the allowed prefixes, wrong embedding dim, ...). The message is for the user."""


# --------------------------------------------------------------------------- config

@dataclass(frozen=True)
class QueryConfig:
    """Query limits and defaults.

    Attributes:
        k_cap: largest allowed ``k`` (k <= 0 or k > k_cap is a :class:`QueryError`).
        allowed_prefixes: URI prefixes an image query may read (local directories or
            ``s3://bucket/prefix``). Empty = image URIs are refused (bytes still work):
            nothing can be read through the engine that an operator did not allow.
        dedup_overlap: drop a hit overlapping a better hit of the same image by MORE than this
            (intersection / area of the larger box). 0.0 = any overlap (thesis §3.3.1);
            None or >= 1 disables the dedup.
        overfetch: first search asks for ``max(k * overfetch, k + 32)`` candidates.
        rerank: exact re-rank of the candidates; None = only for indexes whose scores are
            approximate (kind not in :data:`EXACT_KINDS`, e.g. ivfpq, sq8).
        text_cache_size: entries of the LRU text-embedding cache (0 disables it).
        negative_weight: weight of negative examples (see module docstring).
        max_image_bytes: largest accepted encoded query image, bytes.
    """

    k_cap: int = 1000
    allowed_prefixes: tuple[str, ...] = ()
    dedup_overlap: float | None = 0.0
    overfetch: int = 4
    rerank: bool | None = None
    text_cache_size: int = 1024
    negative_weight: float = 0.5
    max_image_bytes: int = 64 << 20


# --------------------------------------------------------------------------- helpers

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


def parse_box(box: Any) -> tuple[int, int, int, int] | None:
    """``None``, ``"x0,y0,x1,y1"`` or a 4-sequence of ints -> tuple of 4 ints.

    Raises:
        QueryError: not 4 integers, or x1 <= x0 / y1 <= y0.
    """
    if box is None:
        return None
    try:
        vals = [v for v in box.replace(" ", "").split(",")] if isinstance(box, str) else list(box)
        if len(vals) != 4:
            raise ValueError
        out = []
        for v in vals:
            f = float(v)
            if not np.isfinite(f) or f != int(f):
                raise ValueError
            out.append(int(f))
    except (TypeError, ValueError):
        raise QueryError(f"box must be 4 integers x0,y0,x1,y1 (pixels, x1/y1 exclusive), got {box!r}") from None
    x0, y0, x1, y1 = out
    if x1 <= x0 or y1 <= y0:
        raise QueryError(f"box {tuple(out)} is empty: need x0 < x1 and y0 < y1")
    return x0, y0, x1, y1


def decode_image(data: bytes, what: str = "query image") -> np.ndarray:
    """Encoded image bytes (JPEG/PNG/...) -> (H, W, 3) uint8 RGB, decoded exactly as the mining job
    decodes frames (:func:`mining.decode.decode_image`: EXIF orientation, 16-bit, CMYK, pixel limit),
    so a query box refers to the same upright frame as the mined boxes.

    Raises:
        QueryError: empty, undecodable or oversized bytes.
    """
    from mining.decode import DecodeError
    from mining.decode import decode_image as _decode

    if not data:
        raise QueryError(f"{what} is empty (0 bytes)")
    try:
        return _decode(data)
    except DecodeError as e:
        raise QueryError(f"{what} is unreadable: {e.reason}") from None


def _norm_prefix(uri: str) -> str:
    if "://" in uri and not uri.startswith("file://"):
        scheme, rest = uri.split("://", 1)
        return scheme + "://" + posixpath.normpath("/" + rest).lstrip("/")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return os.path.realpath(os.path.expanduser(path))


def uri_allowed(uri: str, prefixes: Iterable[str]) -> bool:
    """True when ``uri`` (after resolving ``..`` and, locally, symlinks) lies under one of ``prefixes``."""
    if not isinstance(uri, str) or not uri or "\x00" in uri:
        return False
    if ".." in uri.replace("\\", "/").split("/"):
        return False
    u = _norm_prefix(uri)
    for p in prefixes:
        q = _norm_prefix(p)
        if u == q or u.startswith(q.rstrip("/") + "/"):
            return True
    return False


def l2_normalize(v: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (float32)."""
    v = np.asarray(v, np.float32)
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(n, 1e-12)


def _check_k(k: Any, cap: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise QueryError(f"k must be an integer in 1..{cap}, got {k!r}")
    k = int(k)
    if k <= 0:
        raise QueryError(f"k must be >= 1, got {k}")
    if k > cap:
        raise QueryError(f"k={k} is above the cap of {cap} results per query")
    return k


def _check_date(name: str, v: Any) -> str:
    import datetime as dt

    if not isinstance(v, str):
        raise QueryError(f"filter {name} must be a date string YYYY-MM-DD, got {v!r}")
    try:
        dt.date.fromisoformat(v)
    except ValueError:
        raise QueryError(f"filter {name} must be a date YYYY-MM-DD, got {v!r}") from None
    return v


def validate_filters(filters: Mapping[str, Any] | None) -> dict:
    """Check filter names and values.

    Known filters: ``date_from`` / ``date_to`` (inclusive, YYYY-MM-DD, ingest date),
    ``exclude_image_ids`` (iterable of image id strings), ``where`` (a SQL condition over the
    frames' sidecar metadata, run by DuckDB: :mod:`mining.where`).

    Raises:
        QueryError: unknown name (the message lists the known ones) or bad value.
    """
    if not filters:
        return {}
    if not isinstance(filters, Mapping):
        raise QueryError(f"filters must be a mapping of {list(FILTER_NAMES)}, got {type(filters).__name__}")
    unknown = sorted(set(filters) - set(FILTER_NAMES))
    if unknown:
        raise QueryError(f"unknown filter name(s) {unknown}; known filters: {list(FILTER_NAMES)}")
    out = {}
    for name in ("date_from", "date_to"):
        if filters.get(name) is not None:
            out[name] = _check_date(name, filters[name])
    ex = filters.get("exclude_image_ids")
    if ex is not None:
        if isinstance(ex, str):
            raise QueryError("filter exclude_image_ids must be a list of image ids, not one string")
        ids = [str(x) for x in ex]
        if ids:
            out["exclude_image_ids"] = ids
    if filters.get("where") is not None:
        if not isinstance(filters["where"], str) or not filters["where"].strip():
            raise QueryError("filter where must be a non-empty SQL condition, e.g. \"camera = 'front'\"")
        out["where"] = filters["where"].strip()
    return out


# --------------------------------------------------------------------------- model spec

def spec_from_manifest(manifest: Mapping[str, Any], clip_model: str | None = None,
                       clip_pretrained: str | None = None, clip_random_init: bool = False):
    """The CLIP spec a query must use: derived from the index manifest unless given explicitly.

    The manifest records the model id (``ClipSpec.model_id``), e.g. ``ViT-B-16/openai``,
    ``tiny-test-random/random-init`` or ``ViT-B-16/file:ckpt.pt`` (a local checkpoint, whose
    path must then be given as ``clip_pretrained``).

    Returns:
        ``mining.embed.ClipSpec``.
    Raises:
        ValueError: the manifest names several models and none was given, or a checkpoint
            file is needed.
    """
    from mining.embed import ClipSpec

    models = manifest.get("models") or ([manifest["model"]] if manifest.get("model") else [])
    if isinstance(models, str):
        models = [models]
    models = sorted(set(models))
    if clip_model:
        if clip_random_init:
            spec = ClipSpec(clip_model, None, True)
        else:
            spec = ClipSpec(clip_model, clip_pretrained)
        if models and spec.model_id not in models:
            warnings.warn(f"querying with CLIP {spec.model_id} but the index was built with {models}: "
                          f"scores are only meaningful with the same model", UserWarning, stacklevel=2)
        return spec
    if not models:
        raise ValueError("the index manifest records no CLIP model: pass --clip-model/--clip-pretrained")
    if len(models) > 1:
        raise ValueError(f"the index mixes CLIP models {models}: pass --clip-model/--clip-pretrained explicitly")
    name, _, src = models[0].partition("/")
    if src == "random-init":
        return ClipSpec(name, None, True)
    if src.startswith("file:"):
        if not clip_pretrained:
            raise ValueError(f"the index was built with CLIP {name} from the checkpoint file {src[5:]!r}: "
                             f"pass --clip-pretrained /path/to/{src[5:]}")
        return ClipSpec(name, clip_pretrained)
    return ClipSpec(name, clip_pretrained or src or None)


def _manifest_random_init(manifest: Mapping[str, Any]) -> bool:
    if manifest.get("random_init"):
        return True
    models = manifest.get("models") or [manifest.get("model") or ""]
    if isinstance(models, str):
        models = [models]
    return any(str(m).endswith("/random-init") for m in models)


# --------------------------------------------------------------------------- index snapshot

class IndexSnapshot:
    """One immutable index version plus the lookup arrays queries need.

    Holds the ``PatchIndex`` and, from its Arrow metadata (memory-mapped ``meta.arrow``):
    ``patch_ids`` (N,) int64 sorted, ``boxes`` (N, 4) int32, ``image_codes`` (N,) int32
    (dictionary codes of image_id), ``date_codes`` (N,) int32 and the dictionaries.
    String columns stay in the memory-mapped table and are only ``take``-n for the final hits.
    """

    def __init__(self, index: Any, root: str | None = None):
        t0 = time.perf_counter()
        self.index = index
        self.root = root
        self.version = str(getattr(index, "version", "") or "")
        self.manifest = dict(getattr(index, "manifest", {}) or {})
        self.dim = int(index.dim)
        self.ntotal = int(index.ntotal)
        self.kind = str(self.manifest.get("kind", "flat"))
        self.random_init = _manifest_random_init(self.manifest)
        meta = index.metadata()
        self.meta = meta
        pid = meta.column("patch_id")
        self.patch_ids = pid.to_numpy() if pid.num_chunks == 1 else pid.combine_chunks().to_numpy()
        if len(self.patch_ids) > 1 and not np.all(self.patch_ids[1:] > self.patch_ids[:-1]):
            order = np.argsort(self.patch_ids, kind="stable")
            self.meta = meta = meta.take(pa.array(order))
            self.patch_ids = meta.column("patch_id").combine_chunks().to_numpy()
        self.boxes = np.stack([meta.column(c).to_numpy() for c in ("x0", "y0", "x1", "y1")], axis=1).astype(np.int32)
        img = pc.dictionary_encode(meta.column("image_id")).combine_chunks()
        self.image_codes = img.indices.to_numpy(zero_copy_only=False).astype(np.int32)
        self.image_dict = img.dictionary
        if "date" in meta.column_names:
            d = pc.dictionary_encode(meta.column("date")).combine_chunks()
            self.date_codes = d.indices.to_numpy(zero_copy_only=False).astype(np.int32)
            self.date_dict = np.asarray(d.dictionary.to_pylist(), dtype=object)
        else:
            self.date_codes = np.zeros(len(self.patch_ids), np.int32)
            self.date_dict = np.asarray([""], dtype=object)
        self._out_cols = [c for c in ("patch_id", "image_id", "image_uri", "x0", "y0", "x1", "y1", "date", "level")
                          if c in meta.column_names]
        # per-record-batch views: ``take`` on a multi-chunk (memory-mapped) table would first
        # concatenate whole string columns (tens of ms at 1M rows); taking from the few batches
        # that hold the hits touches only those rows
        self._batches = self.meta.select(self._out_cols).to_batches()
        lens = np.asarray([b.num_rows for b in self._batches], np.int64)
        self._batch_starts = np.concatenate([[0], np.cumsum(lens)[:-1]]) if len(lens) else np.zeros(0, np.int64)
        self.load_s = time.perf_counter() - t0

    def take(self, rows: np.ndarray) -> pa.Table:
        """Output columns of metadata ``rows`` (positions), in the given order."""
        rows = np.asarray(rows, np.int64)
        if len(self._batches) == 1:
            return pa.Table.from_batches([self._batches[0].take(pa.array(rows))])
        b = np.searchsorted(self._batch_starts, rows, side="right") - 1
        order = np.argsort(b, kind="stable")
        parts = []
        for bi in np.unique(b):
            sel = rows[order][b[order] == bi] - self._batch_starts[bi]
            parts.append(self._batches[bi].take(pa.array(sel)))
        t = pa.Table.from_batches(parts).combine_chunks()
        inv = np.empty(len(rows), np.int64)
        inv[order] = np.arange(len(rows))
        return t.take(pa.array(inv))

    def rows_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Patch ids -> (row positions, found mask)."""
        pos = np.searchsorted(self.patch_ids, ids)
        pos = np.minimum(pos, max(len(self.patch_ids) - 1, 0))
        found = (ids >= 0) & (len(self.patch_ids) > 0)
        if len(self.patch_ids):
            found &= self.patch_ids[pos] == ids
        return pos, found

    def filter_mask(self, rows: np.ndarray, filters: dict) -> np.ndarray:
        """(n,) bool: which metadata rows pass the (validated) filters."""
        mask = np.ones(len(rows), bool)
        if "date_from" in filters or "date_to" in filters:
            lo, hi = filters.get("date_from", ""), filters.get("date_to", "9999-99-99")
            ok_dates = np.asarray([lo <= str(d) <= hi for d in self.date_dict], bool)
            mask &= ok_dates[self.date_codes[rows]]
        if "exclude_image_ids" in filters:
            codes = pc.index_in(pa.array(filters["exclude_image_ids"], pa.string()), value_set=self.image_dict)
            bad = codes.drop_null().to_numpy().astype(np.int32)
            if len(bad):
                mask &= ~np.isin(self.image_codes[rows], bad)
        if "where" in filters:
            mask &= self.where_mask(filters["where"])[self.image_codes[rows]]
        return mask

    def where_mask(self, where: str) -> np.ndarray:
        """(n images,) bool over the image dictionary: frames whose metadata satisfy ``where``
        (:func:`mining.where.image_dict_mask`, cached per expression). Raises QueryError."""
        from mining.where import WhereError, image_dict_mask

        cache = self.__dict__.setdefault("_where_cache", {})
        if where not in cache:
            try:
                cache[where] = image_dict_mask(self.manifest.get("data_root"), where, self.image_dict)
            except WhereError as e:
                raise QueryError(str(e)) from None
            while len(cache) > 16:
                cache.pop(next(iter(cache)))
        return cache[where]


# --------------------------------------------------------------------------- engine

@dataclass
class Example:
    """One example of a multi-example query: exactly one of ``text``, ``image`` (bytes),
    ``uri`` (an allowed URI) or ``embedding`` ((D,) float); ``box`` optional for images."""

    text: str | None = None
    image: bytes | None = None
    uri: str | None = None
    box: Any = None
    embedding: Any = None

    @classmethod
    def coerce(cls, x: Any) -> "Example":
        if isinstance(x, Example):
            return x
        if isinstance(x, (bytes, bytearray, memoryview)):
            return cls(image=bytes(x))
        if isinstance(x, str):
            return cls(text=x)
        if isinstance(x, Mapping):
            unknown = set(x) - {"text", "image", "uri", "box", "embedding"}
            if unknown:
                raise QueryError(f"unknown example field(s) {sorted(unknown)}; use text, image, uri, box or embedding")
            return cls(**dict(x))
        if isinstance(x, np.ndarray):
            return cls(embedding=x)
        raise QueryError(f"an example must be text, image bytes, a dict or an Example, got {type(x).__name__}")


@dataclass
class _Timer:
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


def ranked_candidates(snap: "IndexSnapshot", Q: np.ndarray, k: int, fetch: int, filters: dict,
                      max_ov: float | None, timer: "_Timer", score, *, single: bool = False):
    """The shared candidate loop of every query: ANN search of ``fetch`` candidates, metadata
    filters, scoring, ordering (score desc, ties by patch id) and per-image dedup (§3.3.1),
    fetching 4x more until ``k`` hits survive or the index is exhausted.

    Args:
        Q: (q, D) float32 query directions. fetch: first candidate count.
        score: ``score(ids, index_scores) -> (n,) float32``; ``index_scores`` are the index's
            own scores of a single query (``single=True``), else None.
        single: one query: keep the index's order/scores of ``Q[0]``'s hits (no union).
    Returns:
        (rows, scores, keep): metadata rows and scores of the ordered candidates, and the
        indices into them that survive dedup (at most k). ``timer.fetched`` is set.
    """
    n = snap.ntotal
    keep = scores = rows = np.zeros(0, np.int64)
    while n > 0:
        ts = time.perf_counter()
        D, I = snap.index.search(Q, fetch)
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
        rows, found = snap.rows_of(ids)
        if filters:
            found &= snap.filter_mask(rows, filters)
        ids, rows = ids[found], rows[found]
        if d is not None:
            d = d[found]
        timer.metadata_ms += (time.perf_counter() - tm) * 1e3
        tr = time.perf_counter()
        scores = score(ids, d)
        order = np.lexsort((ids, -scores))  # score desc, ties by patch id: deterministic
        ids, scores, rows = ids[order], scores[order], rows[order]
        keep = dedup_per_image(snap.image_codes[rows], snap.boxes[rows], k, max_ov)
        timer.rerank_dedup_ms += (time.perf_counter() - tr) * 1e3
        if len(keep) >= k or fetch >= n:
            break
        fetch = min(n, fetch * 4)
    timer.fetched = int(fetch) if n else 0
    return rows, scores, keep


class QueryEngine:
    """Search a patch index with text, an image crop, several examples or a raw embedding.

    Args:
        index_root: index directory (``open_index`` layout, ``CURRENT`` names the version);
            may be None when ``index`` is given.
        version: index version to open (default: ``CURRENT``).
        clip: ``mining.embed.ClipSpec``; default derived from the index manifest
            (:func:`spec_from_manifest`) -- the query MUST use the index's model.
        device: torch device for the CLIP towers ("cuda", "cpu"; None = cuda when available).
        config: :class:`QueryConfig`.
        index: an already opened ``PatchIndex``-like object (tests, benchmarks).
        embedder: an already loaded ``ClipEmbedder`` (shared across reloads).
    Raises:
        FileNotFoundError: no index at ``index_root``.
        ValueError: the CLIP model's dim differs from the index dim, or no model can be derived.
        mining.embed.WeightsError: the CLIP weights cannot be loaded.
    Warns:
        UserWarning when the index was built from randomly initialised CLIP embeddings.
    """

    def __init__(self, index_root: str | None = None, *, version: str | None = None, clip=None,
                 device: str | None = None, config: QueryConfig | None = None, index: Any = None,
                 embedder: Any = None, load_embedder: bool = True):
        self.config = config or QueryConfig()
        self.index_root = index_root
        self._clip_arg = clip
        self._device = device
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[tuple[str, str], np.ndarray] = collections.OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0
        if index is None:
            if index_root is None:
                raise ValueError("give index_root or index")
            index = _open_index(index_root, version)
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
        """The index version new queries use (an in-flight query keeps the one it started with)."""
        return self._snap

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

    def _check_dim(self, embedder, snap: IndexSnapshot) -> None:
        if int(embedder.dim) != snap.dim:
            raise ValueError(f"CLIP {embedder.model_id} embeds to dim {embedder.dim} but index version {snap.version} "
                             f"has dim {snap.dim}: query with the model the index was built with "
                             f"({snap.manifest.get('models') or snap.manifest.get('model')})")

    def _load_embedder(self, snap: IndexSnapshot) -> None:
        from mining.embed import ClipEmbedder

        spec = self._clip_arg or spec_from_manifest(snap.manifest)
        if self.embedder is None or self.embedder.spec != spec:
            emb = ClipEmbedder(spec, device=self._device)
            self._check_dim(emb, snap)
            self.embedder = emb
            with self._lock:
                self._cache.clear()
        self.clip = spec

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
        snap = IndexSnapshot(_open_index(self.index_root, version), self.index_root)
        if self._clip_arg is None:
            spec = spec_from_manifest(snap.manifest)
            if self.embedder is None or spec != self.embedder.spec:
                self._load_embedder(snap)
        if self.embedder is not None:
            self._check_dim(self.embedder, snap)
        self._warn_random(snap)
        self._snap = snap  # the atomic swap: one reference assignment
        return {"old": old.version, "new": snap.version, "swapped": True, "load_s": round(time.perf_counter() - t0, 3)}

    # ------------------------------------------------------------------ encoding
    def _need_embedder(self):
        if self.embedder is None:
            self._load_embedder(self._snap)
        return self.embedder

    def encode_text(self, text: str, timer: _Timer | None = None) -> np.ndarray:
        """Text -> (D,) float32 normalised embedding, from the LRU cache when seen before.

        Raises:
            QueryError: not a string, empty or blank.
        """
        if not isinstance(text, str) or not text.strip():
            raise QueryError("text query is empty: give a non-empty phrase, e.g. 'a road narrows sign'")
        emb = self._need_embedder()
        key = (emb.model_id, text.strip())
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
                if timer:
                    timer.cache_hit = True
                return hit
        try:
            z = emb.embed_texts([text.strip()])[0].astype(np.float32)
        except ValueError as e:
            raise QueryError(f"text query rejected: {e}") from None
        with self._lock:
            self.cache_misses += 1
            if self.config.text_cache_size > 0:
                self._cache[key] = z
                while len(self._cache) > self.config.text_cache_size:
                    self._cache.popitem(last=False)
        return z

    def read_uri(self, uri: str) -> bytes:
        """Read an image URI that lies under ``config.allowed_prefixes``.

        Raises:
            QueryError: URI outside the allowed prefixes, missing or unreadable.
        """
        if not uri_allowed(uri, self.config.allowed_prefixes):
            allowed = list(self.config.allowed_prefixes) or "none (image URIs are disabled; send the image bytes)"
            raise QueryError(f"image URI {uri!r} is outside the allowed prefixes: {allowed}")
        from mining.fs import get_fs

        try:
            fs, path = get_fs(uri)
            size = fs.size(path)
            if size is not None and size > self.config.max_image_bytes:
                raise QueryError(f"image {uri!r} is {size} bytes, above the {self.config.max_image_bytes} limit")
            with fs.open(path, "rb") as f:
                return f.read()
        except QueryError:
            raise
        except Exception as e:
            raise QueryError(f"cannot read image {uri!r}: {type(e).__name__}: {e}") from None

    def encode_image(self, image: bytes | str | np.ndarray, box: Any = None) -> np.ndarray:
        """Image (encoded bytes, an allowed URI, or an (H, W, 3) uint8 RGB array) + optional box
        -> (D,) float32 normalised embedding of the crop (whole frame when box is None).

        Raises:
            QueryError: unreadable image, box outside the image, URI not allowed.
        """
        arr, b = self._load_image(image, box)
        return self._need_embedder().embed_crops(arr, np.asarray([b], np.int64))[0].astype(np.float32)

    def encode_embedding(self, vector: Any) -> np.ndarray:
        """Raw embedding -> (D,) float32 normalised.

        Raises:
            QueryError: wrong dim, non-finite values or zero vector.
        """
        try:
            v = np.asarray(vector, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise QueryError("embedding must be a 1-D array of floats") from None
        d = self._snap.dim
        if v.shape[0] != d:
            raise QueryError(f"embedding has dim {v.shape[0]}, the index has dim {d}")
        if not np.all(np.isfinite(v)):
            raise QueryError("embedding has NaN or inf values")
        if float(np.linalg.norm(v)) < 1e-12:
            raise QueryError("embedding is the zero vector")
        return l2_normalize(v)

    def _load_image(self, image: bytes | str | np.ndarray, box: Any) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        """Decode/validate an image query -> ((H, W, 3) uint8 RGB, box inside it)."""
        if isinstance(image, np.ndarray):
            arr = image
            if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
                raise QueryError(f"image array must be (H, W, 3) uint8 RGB, got {arr.shape} {arr.dtype}")
        elif isinstance(image, (bytes, bytearray, memoryview)):
            if len(image) > self.config.max_image_bytes:
                raise QueryError(f"query image is {len(image)} bytes, above the {self.config.max_image_bytes} limit")
            arr = decode_image(bytes(image))
        elif isinstance(image, str):
            arr = decode_image(self.read_uri(image), what=f"image {image!r}")
        else:
            raise QueryError(f"image must be bytes, an allowed URI or an RGB array, got {type(image).__name__}")
        h, w = arr.shape[:2]
        b = parse_box(box)
        if b is None:
            b = (0, 0, w, h)
        elif b[0] < 0 or b[1] < 0 or b[2] > w or b[3] > h:
            raise QueryError(f"box {b} is outside the {w}x{h} image (x1/y1 exclusive, at most {w},{h})")
        return arr, b

    def encode_examples(self, items: Sequence[Any], timer: _Timer | None = None, what: str = "example") -> np.ndarray:
        """Several examples -> (n, D) float32 normalised; image crops go through the image tower
        in ONE batch. Raises QueryError naming the bad example (``"example 2: ..."``)."""
        import torch

        out: list[np.ndarray | None] = [None] * len(items)
        crops, where = [], []
        for i, e in enumerate(items):
            try:
                ex = Example.coerce(e)
                given = [n for n in ("text", "image", "uri", "embedding") if getattr(ex, n) is not None]
                if len(given) != 1:
                    raise QueryError(f"an example needs exactly one of text, image, uri, embedding; got {given or 'none'}")
                if ex.text is not None:
                    out[i] = self.encode_text(ex.text, timer)
                elif ex.embedding is not None:
                    out[i] = self.encode_embedding(ex.embedding)
                else:
                    arr, b = self._load_image(ex.image if ex.image is not None else ex.uri, ex.box)
                    t = torch.from_numpy(arr).permute(2, 0, 1)
                    crops.append(self._need_embedder().crops_from_image(t, np.asarray([b], np.int64)))
                    where.append(i)
            except QueryError as err:
                raise QueryError(f"{what} {i}: {err}") from None
        if crops:
            z = self._need_embedder().embed_pixels(torch.cat(crops))
            for j, i in enumerate(where):
                out[i] = z[j].astype(np.float32)
        return np.stack(out).astype(np.float32)

    def encode_example(self, ex: Any, timer: _Timer | None = None) -> np.ndarray:
        """One :class:`Example` (or text / bytes / dict) -> (D,) float32 normalised."""
        ex = Example.coerce(ex)
        given = [n for n in ("text", "image", "uri", "embedding") if getattr(ex, n) is not None]
        if len(given) != 1:
            raise QueryError(f"an example needs exactly one of text, image, uri, embedding; got {given or 'none'}")
        if ex.text is not None:
            return self.encode_text(ex.text, timer)
        if ex.image is not None:
            return self.encode_image(ex.image, ex.box)
        if ex.uri is not None:
            return self.encode_image(ex.uri, ex.box)
        return self.encode_embedding(ex.embedding)

    # ------------------------------------------------------------------ public queries
    def text(self, text: str, k: int = 16, *, filters: Mapping | None = None, dedup: bool = True,
             rerank: bool | None = None) -> pa.Table:
        """Text query (CLIP text tower, §3.3.1). Returns :data:`RESULT_SCHEMA` rows, best first.

        Raises:
            QueryError: empty text, bad k, unknown filter.
        """
        t0 = time.perf_counter()
        k = _check_k(k, self.config.k_cap)
        filters = validate_filters(filters)
        timer = _Timer()
        z = self.encode_text(text, timer)
        timer.encode_ms = (time.perf_counter() - t0) * 1e3
        return self._run(z[None], "single", k, filters, dedup, rerank, {"type": "text", "text": text}, timer, t0)

    def image(self, image: bytes | str | np.ndarray, box: Any = None, k: int = 16, *,
              filters: Mapping | None = None, dedup: bool = True, rerank: bool | None = None) -> pa.Table:
        """Image-patch query: ``image`` as encoded bytes or an allowed URI, ``box`` = x0,y0,x1,y1
        (pixels, x1/y1 exclusive; whole frame when None), embedded with the CLIP image tower.

        Raises:
            QueryError: unreadable image, box outside the image, URI not allowed, bad k/filter.
        """
        t0 = time.perf_counter()
        k = _check_k(k, self.config.k_cap)
        filters = validate_filters(filters)
        timer = _Timer()
        z = self.encode_image(image, box)
        timer.encode_ms = (time.perf_counter() - t0) * 1e3
        desc = {"type": "image", "uri": image if isinstance(image, str) else None,
                "box": list(parse_box(box)) if box is not None else None}
        return self._run(z[None], "single", k, filters, dedup, rerank, desc, timer, t0)

    def embedding(self, vector: Any, k: int = 16, *, filters: Mapping | None = None, dedup: bool = True,
                  rerank: bool | None = None) -> pa.Table:
        """Raw-embedding query: (D,) float, normalised here. Raises QueryError on wrong dim / NaN."""
        t0 = time.perf_counter()
        k = _check_k(k, self.config.k_cap)
        filters = validate_filters(filters)
        timer = _Timer()
        z = self.encode_embedding(vector)
        timer.encode_ms = (time.perf_counter() - t0) * 1e3
        return self._run(z[None], "single", k, filters, dedup, rerank, {"type": "embedding"}, timer, t0)

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
            negatives: examples to push away (see module docstring); weight ``negative_weight``.
        Raises:
            QueryError: no examples, unknown mode, any bad example (the message names which).
        """
        t0 = time.perf_counter()
        k = _check_k(k, self.config.k_cap)
        filters = validate_filters(filters)
        if mode not in MODES:
            raise QueryError(f"unknown multi-example mode {mode!r}; use one of {list(MODES)}")
        if examples is None or isinstance(examples, (str, bytes)) or len(examples) == 0:
            raise QueryError("a multi-example query needs a non-empty list of examples")
        w = self.config.negative_weight if negative_weight is None else float(negative_weight)
        timer = _Timer()

        def enc(items, what):
            return self.encode_examples(items, timer, what)

        pos = enc(examples, "example")
        neg = enc(negatives, "negative") if negatives else None
        timer.encode_ms = (time.perf_counter() - t0) * 1e3
        desc = {"type": "examples", "mode": mode, "n": len(pos), "negatives": 0 if neg is None else len(neg),
                "negative_weight": w}
        if mode == "mean":
            q = pos.mean(axis=0)  # Eq. 4.1
            if neg is not None:
                q = q - w * neg.mean(axis=0)
            if float(np.linalg.norm(q)) < 1e-9:
                raise QueryError("the examples cancel out (mean embedding is ~0)")
            return self._run(l2_normalize(q)[None], "single", k, filters, dedup, rerank, desc, timer, t0)
        return self._run(pos, mode, k, filters, dedup, rerank, desc, timer, t0, neg=neg, neg_weight=w)

    # ------------------------------------------------------------------ core
    def _run(self, Q: np.ndarray, mode: str, k: int, filters: dict, dedup: bool, rerank: bool | None,
             desc: dict, timer: _Timer, t0: float, neg: np.ndarray | None = None, neg_weight: float = 0.0) -> pa.Table:
        snap = self._snap  # pinned for the whole query: a reload does not affect it
        cpu0 = time.thread_time()
        if Q.shape[1] != snap.dim:
            raise QueryError(f"query embedding dim {Q.shape[1]} != index dim {snap.dim}")
        if rerank is None and self.config.rerank is None:
            do_rerank = snap.kind not in EXACT_KINDS  # only indexes whose scores are approximate
        else:
            do_rerank = bool(self.config.rerank if rerank is None else rerank)
        max_ov = self.config.dedup_overlap if dedup else None
        Q = np.ascontiguousarray(Q, np.float32)
        n = snap.ntotal
        fetch = min(n, max(k * max(1, self.config.overfetch), k + 32))

        def score(ids: np.ndarray, index_scores: np.ndarray | None) -> np.ndarray:
            if not (mode != "single" or neg is not None or do_rerank):
                return index_scores
            vecs = np.asarray(snap.index.reconstruct_exact(ids), np.float32) if len(ids) else \
                np.zeros((0, snap.dim), np.float32)
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

        rows, scores, keep = ranked_candidates(snap, Q, k, fetch, filters, max_ov, timer, score,
                                               single=mode == "single")
        return self._finish(snap, rows[keep], scores[keep], {**desc, "k": k, "filters": filters,
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
        snap, timer = self._snap, _Timer()
        tr = time.perf_counter()
        rows, scores, used = rarest_per_image(snap, k, f, by)
        timer.rerank_dedup_ms = (time.perf_counter() - tr) * 1e3
        return self._finish(snap, rows, scores, {"type": "novel", "by": used, "k": k, "filters": f,
                                                 "dedup": "one patch per image"}, timer, t0, cpu0)

    def _finish(self, snap: IndexSnapshot, rows: np.ndarray, scores: np.ndarray, query: dict, timer: _Timer,
                t0: float, cpu0: float) -> pa.Table:
        """The result table of the final hits, with the query / timings / version metadata."""
        tm = time.perf_counter()
        table = self._result(snap, rows, scores)
        timer.metadata_ms += (time.perf_counter() - tm) * 1e3
        total = (time.perf_counter() - t0) * 1e3
        # CPU time of this thread after encoding: what the query costs without the wall-clock
        # noise of a shared, oversubscribed machine
        timer.extra["non_encoder_cpu_ms"] = round((time.thread_time() - cpu0) * 1e3, 4)
        md = {
            b"query": json.dumps(query, default=str).encode(),
            b"timings": json.dumps(timer.as_dict(total)).encode(),
            b"index_version": snap.version.encode(),
            b"model": (self.embedder.model_id if self.embedder is not None else "").encode(),
            b"random_init": b"true" if snap.random_init else b"false",
        }
        return table.replace_schema_metadata(md)

    @staticmethod
    def _result(snap: IndexSnapshot, rows: np.ndarray, scores: np.ndarray) -> pa.Table:
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

    def stats(self) -> dict:
        """Counters: cache hits/misses/size, index version, ntotal, dim, model, device."""
        s = self._snap
        return {"version": s.version, "ntotal": s.ntotal, "dim": s.dim, "kind": s.kind, "random_init": s.random_init,
                "model": self.embedder.model_id if self.embedder is not None else None,
                "device": str(self.embedder.device) if self.embedder is not None else None,
                "cache_hits": self.cache_hits, "cache_misses": self.cache_misses, "cache_size": len(self._cache)}


def timings_of(table: pa.Table) -> dict:
    """The per-stage timings (ms) recorded in a result table's schema metadata."""
    md = table.schema.metadata or {}
    return json.loads(md.get(b"timings", b"{}"))


def query_info(table: pa.Table) -> dict:
    """query description, index_version, model and random_init from a result table's metadata."""
    md = table.schema.metadata or {}
    return {"query": json.loads(md.get(b"query", b"{}")), "index_version": md.get(b"index_version", b"").decode(),
            "model": md.get(b"model", b"").decode(), "random_init": md.get(b"random_init", b"false") == b"true"}


# --------------------------------------------------------------------------- index access

def _current_version(root: str) -> str | None:
    """The version ``<root>/CURRENT`` names (None when nothing is published)."""
    from mining.index import current_version

    return current_version(root)


def _open_index(root: str, version: str | None = None):
    from mining.index import open_index

    return open_index(root, version=version)
