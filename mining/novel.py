"""Query-free mode (issue 14, item 4): the rarest patches of a date range, one per frame.

``QueryEngine.novel`` / ``QueryActor.novel`` / ``python -m jobs.query --novel`` rank the patches
of an index version by *rarity* instead of by similarity to a query, keep the rarest patch of
each frame, and return the top k as an ordinary result table (:data:`mining.query.RESULT_SCHEMA`,
the rarity in ``score``), exported like any other query.

Two rarity signals, both per patch and both computed before any query:

* ``novelty``: the mean epitome NLL inside the box (nats; the patches table's ``novelty``
  column, written by mining when its saliency backend has an epitome member; carried into the
  index version's ``meta.arrow``). Null for patches mined without an epitome.
* ``uniqueness``: the kNN uniqueness in CLIP space, in [0, 1], of the index version
  (``uniqueness.parquet``, :mod:`mining.index.uniqueness`). Absent for versions built without it.

``by`` chooses the ranking:

* ``novelty``: score = novelty (nats), patches without one are left out;
* ``uniqueness``: score = uniqueness ([0, 1]), patches without one are left out;
* ``both``: score = the mean of the patch's two percentile ranks (in (0, 1], ties averaged,
  computed over the patches that pass the filters), so nats and distances need no common scale;
  a patch with only one of the two gets that one's percentile rank;
* None (default): ``both`` when the filtered patches have both signals, else the one they have.

Per-image dedup: walking the patches by descending score (ties by patch id), the first patch of
each frame is kept and the frame's other patches are dropped -- one patch per frame, its rarest.
Cost: O(N log N) over the N index rows that pass the filters (one sort), no ANN search, no CLIP
forward; the rarity arrays are read once per index version and cached on its snapshot.
"""
from __future__ import annotations

import threading
from typing import Any, Mapping

import numpy as np

BY = ("novelty", "uniqueness", "both")

_LOCK = threading.Lock()


def novel_filters(date_from: str | None, date_to: str | None, filters: Mapping | None) -> dict:
    """``filters`` with the date range merged in, validated (:func:`mining.query.validate_filters`).

    Raises:
        QueryError: a date that is not YYYY-MM-DD, date_from after date_to, or a bad filter.
    """
    from mining.query import QueryError, validate_filters

    f = dict(filters or {})
    f.update({n: v for n, v in (("date_from", date_from), ("date_to", date_to)) if v is not None})
    f = validate_filters(f)
    if f.get("date_from", "") > f.get("date_to", "9999-99-99"):
        raise QueryError(f"date_from {f['date_from']} is after date_to {f['date_to']}")
    return f


def rarity_arrays(snap: Any) -> dict:
    """The rarity signals of an index snapshot, aligned with its (patch_id-sorted) metadata rows.

    Args:
        snap: a :class:`mining.query.IndexSnapshot`.
    Returns:
        ``{"novelty": (N,) float64 | None, "uniqueness": (N,) float64 | None}``; NaN marks a patch
        without the signal, None a version without it at all. Cached on ``snap``.
    """
    cached = snap.__dict__.get("_rarity")
    if cached is not None:
        return cached
    with _LOCK:
        cached = snap.__dict__.get("_rarity")
        if cached is not None:
            return cached
        from mining.index.uniqueness import read_uniqueness

        n = len(snap.patch_ids)
        nov = None
        if "novelty" in snap.meta.column_names:
            col = snap.meta.column("novelty")
            if col.null_count < n:
                nov = np.asarray(col.to_numpy(zero_copy_only=False), np.float64).reshape(-1)
        uniq = None
        table = read_uniqueness(getattr(snap.index, "path", None))
        if table is not None and table.num_rows:
            pos, found = snap.rows_of(table.column("patch_id").to_numpy().astype(np.int64))
            uniq = np.full(n, np.nan)
            uniq[pos[found]] = table.column("uniqueness").to_numpy()[found]
        cached = snap.__dict__["_rarity"] = {"novelty": nov, "uniqueness": uniq}
        return cached


def percentile_rank(x: np.ndarray) -> np.ndarray:
    """Percentile ranks of ``x`` in (0, 1] (largest = 1, ties get their average rank / n).

    Args:
        x: (n,) float, finite.
    Returns:
        (n,) float64.
    """
    x = np.asarray(x, np.float64).reshape(-1)
    n = len(x)
    if n == 0:
        return np.zeros(0)
    ranks = np.empty(n)
    ranks[np.argsort(x, kind="stable")] = np.arange(1, n + 1)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    avg = np.bincount(inv.reshape(-1), weights=ranks) / counts
    return avg[inv.reshape(-1)] / n


def rarity_scores(novelty: np.ndarray | None, uniqueness: np.ndarray | None, by: str | None):
    """Scores of the candidate rows under ``by`` (see the module docstring).

    Args:
        novelty / uniqueness: (n,) float64 over the candidate rows (NaN = missing), or None.
        by: one of :data:`BY`, or None for the automatic choice.
    Returns:
        ``(scores (n,) float64 with NaN where the row cannot be ranked, by actually used)``.
    Raises:
        QueryError: unknown ``by``, or the signal asked for (or any signal, for None) is absent.
    """
    from mining.query import QueryError

    if by is not None and by not in BY:
        raise QueryError(f"unknown rarity {by!r}; use one of {list(BY)}")
    has_n = novelty is not None and bool(np.isfinite(novelty).any())
    has_u = uniqueness is not None and bool(np.isfinite(uniqueness).any())
    if by is None:
        by = "both" if has_n and has_u else "novelty" if has_n else "uniqueness" if has_u else None
        if by is None:
            raise QueryError("no patch in this range has a rarity score: mine with an epitome backend "
                             "(novelty) or rebuild the index with uniqueness (jobs.build_index without --no-uniqueness)")
    if by in ("novelty", "both") and not has_n:
        raise QueryError(f"--by {by}: no patch in this range has an epitome novelty (mined without an epitome "
                         "saliency backend); use --by uniqueness")
    if by in ("uniqueness", "both") and not has_u:
        raise QueryError(f"--by {by}: this index version has no uniqueness (built with --no-uniqueness, before "
                         "issue 14, or a sharded version from before its uniqueness parts); use --by novelty")
    if by == "novelty":
        return novelty.copy(), by
    if by == "uniqueness":
        return uniqueness.copy(), by
    ranks = np.full((2, len(novelty)), np.nan)
    for i, v in enumerate((novelty, uniqueness)):
        ok = np.isfinite(v)
        ranks[i, ok] = percentile_rank(v[ok])
    both = np.isfinite(ranks).any(axis=0)
    out = np.full(len(novelty), np.nan)
    out[both] = np.nanmean(ranks[:, both], axis=0)
    return out, by


def rarest_per_image(snap: Any, k: int, filters: dict, by: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """The k rarest patches of the rows passing ``filters``, one per frame (its rarest).

    Args:
        snap: a :class:`mining.query.IndexSnapshot`.
        k: number of patches (= frames) to return.
        filters: validated query filters (``date_from`` / ``date_to`` / ``exclude_image_ids`` / ``where``).
        by: ``novelty`` | ``uniqueness`` | ``both`` | None (see the module docstring).
    Returns:
        ``(rows (<=k,) int64 metadata rows, scores (<=k,) float32, by used)``, rarest first (ties
        by patch id).
    Raises:
        QueryError: see :func:`rarity_scores`.
    """
    n = len(snap.patch_ids)
    rows = np.arange(n, dtype=np.int64)
    if filters:
        rows = rows[snap.filter_mask(rows, filters)]
    sig = rarity_arrays(snap)
    pick = {name: (None if v is None else v[rows]) for name, v in sig.items()}
    scores, used = rarity_scores(pick["novelty"], pick["uniqueness"], by)
    ok = np.isfinite(scores)
    rows, scores = rows[ok], scores[ok]
    order = np.lexsort((snap.patch_ids[rows], -scores))
    rows, scores = rows[order], scores[order]
    _, first = np.unique(snap.image_codes[rows], return_index=True)  # first = rarest patch of each frame
    keep = np.sort(first)[:k]
    return rows[keep], scores[keep].astype(np.float32), used
