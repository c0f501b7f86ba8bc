"""Checks on what a query asks for, before any work: k, filters, boxes, image URIs, query kinds.

Design decisions:

- Bad queries raise :class:`QueryError` (a ``ValueError``) with a one-line message meant for the
  user; the engine (and the actor serving it) stays usable. Ray re-raises it at the caller.
- Everything here is pure: no index, no model. The checks run before the (expensive) encoding, in
  the order the entry points call them: ``k``, then filters, then the query itself.
- Image URIs are read only under :attr:`QueryConfig.allowed_prefixes`, after ``..`` and (locally)
  symlinks are resolved; with no prefixes configured, only image bytes are accepted. Nothing can be
  read through the engine that an operator did not allow.
- Filters are a closed set (:data:`FILTER_NAMES`); an unknown name is an error listing the known
  ones, never silently ignored.
"""
from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

FILTER_NAMES = ("date_from", "date_to", "exclude_image_ids", "where")
MODES = ("mean", "max", "sum")


class QueryError(ValueError):
    """A bad query (empty text, unreadable image, box outside the image, bad k, unknown filter,
    URI outside the allowed prefixes, wrong embedding dim, ...). The message is for the user."""


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
            approximate (kind not in ``mining.query.EXACT_KINDS``, e.g. ivfpq, sq8).
        text_cache_size: entries of the LRU text-embedding cache (0 disables it).
        negative_weight: weight of negative examples (see :mod:`mining.query.encoding`).
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


def exactly_one(values: Mapping[str, Any], what: str, missing: Any = None) -> str:
    """The one name in ``values`` whose value was given (is not ``missing``).

    Args:
        values: name -> value, in the order the message lists them.
        what: the subject of the message, e.g. ``"an example"``.
        missing: the value that means "not given" (None, or a sentinel where None is a value).
    Returns:
        the name given.
    Raises:
        QueryError: none or several given: ``"<what> needs exactly one of a, b, c; got [...]"``.
    """
    given = [n for n, v in values.items() if v is not missing]
    if len(given) != 1:
        raise QueryError(f"{what} needs exactly one of {', '.join(values)}; got {given or 'none'}")
    return given[0]


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


def _check_k(k: Any, cap: int) -> int:
    """``k`` as an int in 1..cap. Raises QueryError (not an integer, < 1, above the cap)."""
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

    Returns:
        the validated filters (only those given; ``where`` stripped, image ids as strings).
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
