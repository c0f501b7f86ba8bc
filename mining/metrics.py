"""Patch-selection quality: the capture metric of the thesis (§4.2).

An annotated object is *captured* (the thesis: "well represented in at least one
patch") when ONE selected patch both

* covers at least 50 % of the object's box (intersection / object area >= ``min_cover``), and
* is filled at least 5 % by the object (intersection / patch area >= ``min_fill``; the
  thesis says "the object itself must occupy at least 5 % of the patch", measured here
  on the part of the object inside the patch).

Objects no patch captures are invisible to every later search, so this rate is the
ceiling of the retrieval system.

Boxes are ``x0, y0, x1, y1`` in pixels with x1/y1 exclusive.
"""
from __future__ import annotations

import numpy as np

__all__ = ["coverage_matrix", "captured", "capture_rate", "best_coverage"]


def _boxes(a, name: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.size == 0:
        return a.reshape(0, 4)
    if a.ndim != 2 or a.shape[1] != 4:
        raise ValueError(f"{name} must be an (N, 4) array of x0, y0, x1, y1, got shape {a.shape}")
    if (a[:, 2] <= a[:, 0]).any() or (a[:, 3] <= a[:, 1]).any():
        raise ValueError(f"{name} contains empty boxes (x1 <= x0 or y1 <= y0)")
    return a


def coverage_matrix(objects: np.ndarray, patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairwise cover and fill fractions.

    Args:
        objects: (M, 4) object boxes, pixels.
        patches: (N, 4) patch boxes, pixels.
    Returns:
        ``(cover, fill)``, both (M, N) float64: cover[i, j] = |o_i ∩ p_j| / |o_i|,
        fill[i, j] = |o_i ∩ p_j| / |p_j|.
    Raises:
        ValueError: not (., 4) arrays or empty boxes.
    """
    o = _boxes(objects, "objects")[:, None, :]
    p = _boxes(patches, "patches")[None, :, :]
    iw = np.clip(np.minimum(o[..., 2], p[..., 2]) - np.maximum(o[..., 0], p[..., 0]), 0, None)
    ih = np.clip(np.minimum(o[..., 3], p[..., 3]) - np.maximum(o[..., 1], p[..., 1]), 0, None)
    inter = iw * ih
    area_o = (o[..., 2] - o[..., 0]) * (o[..., 3] - o[..., 1])
    area_p = (p[..., 2] - p[..., 0]) * (p[..., 3] - p[..., 1])
    return inter / area_o, inter / area_p


def captured(
    objects: np.ndarray, patches: np.ndarray, min_cover: float = 0.5, min_fill: float = 0.05
) -> np.ndarray:
    """Which objects are captured by at least one patch (thesis §4.2).

    Object i is captured iff there is ONE patch j with
    |o_i ∩ p_j| / |o_i| >= ``min_cover`` (the patch covers >= 50 % of the object) AND
    |o_i ∩ p_j| / |p_j| >= ``min_fill`` (the object occupies >= 5 % of that patch).

    Args:
        objects: (M, 4) object boxes x0, y0, x1, y1, pixels, x1/y1 exclusive.
        patches: (N, 4) selected patch boxes, same convention (N may be 0).
        min_cover: minimum fraction of the object inside the patch (0.5).
        min_fill: minimum fraction of the patch occupied by the object (0.05).
    Returns:
        (M,) bool.
    Raises:
        ValueError: malformed or empty boxes.
    """
    o = _boxes(objects, "objects")
    p = _boxes(patches, "patches")
    if len(o) == 0:
        return np.zeros(0, bool)
    if len(p) == 0:
        return np.zeros(len(o), bool)
    cover, fill = coverage_matrix(o, p)
    eps = 1e-12  # exact thresholds (e.g. exactly 50 %) count as captured
    return ((cover >= min_cover - eps) & (fill >= min_fill - eps)).any(axis=1)


def best_coverage(
    objects: np.ndarray, patches: np.ndarray, min_cover: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """How close each object came to being captured: its best cover and the matching fill.

    ``cover[i]`` is the largest fraction of object i inside any one patch. ``fill[i]`` is the
    largest fraction of a patch filled by object i among the patches that cover it by at least
    ``min_cover``; when no patch does, it is the fill of the patch with the largest cover.
    So object i is captured (:func:`captured` with the same ``min_cover``) iff
    ``cover[i] >= min_cover`` and ``fill[i] >= min_fill``, and a miss reads as either "no patch
    on it" (low cover) or "patches too large for it" (cover reached, low fill).

    Args:
        objects: (M, 4) object boxes x0, y0, x1, y1, pixels, x1/y1 exclusive.
        patches: (N, 4) selected patch boxes, same convention (N may be 0).
        min_cover: the cover threshold of :func:`captured` (0.5).
    Returns:
        ``(cover, fill)``, both (M,) float64 in [0, 1]; zeros when there are no patches.
    Raises:
        ValueError: malformed or empty boxes.
    """
    o = _boxes(objects, "objects")
    p = _boxes(patches, "patches")
    if len(o) == 0 or len(p) == 0:
        return np.zeros(len(o)), np.zeros(len(o))
    cover, fill = coverage_matrix(o, p)
    best = cover.max(axis=1)
    ok = cover >= min_cover - 1e-12
    fill_ok = np.where(ok, fill, -1.0).max(axis=1)
    fill_best = fill[np.arange(len(o)), cover.argmax(axis=1)]
    return best, np.where(ok.any(axis=1), fill_ok, fill_best)


def capture_rate(
    objects: np.ndarray, patches: np.ndarray, min_cover: float = 0.5, min_fill: float = 0.05
) -> float:
    """Fraction of ``objects`` captured by ``patches`` (see :func:`captured`).

    Returns:
        float in [0, 1]; NaN when there are no objects.
    """
    c = captured(objects, patches, min_cover, min_fill)
    return float(c.mean()) if len(c) else float("nan")
