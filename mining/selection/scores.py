"""Candidate boxes and their scores, vectorised (part of :mod:`mining.selection`).

The strided candidate grid (thesis §3.1.1), S_apv (Eq. 3.1) and S_id (Eq. 3.2) of every candidate
from one integral image, the overlap measure of §3.1.2 (intersection / area of the larger patch)
and the greedy selection of Algorithm 2, for many groups at once.  numpy on the host; the torch
ports are in :mod:`mining.select_device_greedy`.
"""
from __future__ import annotations

import numpy as np


# --------------------------------------------------------------------------------------
# candidates and scores (vectorised)
# --------------------------------------------------------------------------------------
def candidate_grid(height: int, width: int, size: int, stride: int, cover_border: bool = False) -> np.ndarray:
    """Strided square candidate patches of one size (thesis §3.1.1).

    Top-left corners are at 0, stride, 2*stride, ... in x and y while the patch fits in
    the image. A patch larger than the image in either dimension yields no candidate.

    Args:
        height, width: image (or region) size in pixels.
        size: patch side in pixels (>= 1).
        stride: distance in pixels between adjacent candidates (>= 1).
        cover_border: also add a last column/row flush with the right/bottom border when
            the stride leaves a strip uncovered (not in the thesis).
    Returns:
        (N, 4) int32 boxes ``x0, y0, x1, y1`` (x1/y1 exclusive), row-major order
        (y, then x). N = 0 when ``size`` exceeds the image.
    Raises:
        ValueError: size or stride < 1.
    """
    if size < 1 or stride < 1:
        raise ValueError(f"size and stride must be >= 1, got size={size} stride={stride}")
    if size > width or size > height:
        return np.zeros((0, 4), np.int32)

    def starts(extent: int) -> np.ndarray:
        s = np.arange(0, extent - size + 1, stride, dtype=np.int64)
        if cover_border and s[-1] != extent - size:
            s = np.append(s, extent - size)
        return s

    xs, ys = starts(width), starts(height)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    x0, y0 = xx.ravel(), yy.ravel()
    return np.stack([x0, y0, x0 + size, y0 + size], axis=1).astype(np.int32)


def _integral(sal_map: np.ndarray) -> np.ndarray:
    sal = np.asarray(sal_map)
    if sal.ndim != 2:
        raise ValueError(f"saliency map must be 2-D (H, W), got shape {sal.shape}")
    ii = np.zeros((sal.shape[0] + 1, sal.shape[1] + 1), np.float64)
    np.cumsum(np.cumsum(sal, axis=0, dtype=np.float64), axis=1, out=ii[1:, 1:])
    return ii


def _check_boxes(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    b = np.asarray(boxes)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4), got {b.shape}")
    b = b.astype(np.int64, copy=False)
    if len(b) and (
        (b[:, 0] < 0).any() or (b[:, 1] < 0).any() or (b[:, 2] > shape[1]).any() or (b[:, 3] > shape[0]).any()
        or (b[:, 2] <= b[:, 0]).any() or (b[:, 3] <= b[:, 1]).any()
    ):
        raise ValueError(f"boxes must be non-empty and inside the {shape[1]}x{shape[0]} map")
    return b


def _sums_from_integral(ii: np.ndarray, b: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    return ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]


def _inner_boxes(b: np.ndarray, margin: float) -> np.ndarray:
    """Inner rectangles of Eq. 3.2: each side shrunk by round(margin * side) px."""
    w = b[:, 2] - b[:, 0]
    h = b[:, 3] - b[:, 1]
    mx = np.floor(margin * w + 0.5).astype(np.int64)
    my = np.floor(margin * h + 0.5).astype(np.int64)
    # keep at least one inner pixel
    mx = np.minimum(mx, (w - 1) // 2)
    my = np.minimum(my, (h - 1) // 2)
    return np.stack([b[:, 0] + mx, b[:, 1] + my, b[:, 2] - mx, b[:, 3] - my], axis=1)


def _apv_id(ii: np.ndarray, b: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray]:
    area = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).astype(np.float64)
    total = _sums_from_integral(ii, b)
    inner = _inner_boxes(b, margin)
    a_in = ((inner[:, 2] - inner[:, 0]) * (inner[:, 3] - inner[:, 1])).astype(np.float64)
    s_in = _sums_from_integral(ii, inner)
    a_out = area - a_in
    mean_in = s_in / a_in
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_out = np.where(a_out > 0, (total - s_in) / np.maximum(a_out, 1), mean_in)
    return total / area, mean_in - mean_out


def score_apv(sal_map: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Average pixel value S_apv of each box (thesis Eq. 3.1).

    S_apv(p) = (1/255) * (1/A) * sum of the pixels of patch p. The map is already in
    [0, 1] here, so the 1/255 factor is a no-op and S_apv is in [0, 1].

    Args:
        sal_map: (H, W) float saliency map in [0, 1].
        boxes: (N, 4) int boxes x0, y0, x1, y1 (pixels, exclusive), inside the map.
    Returns:
        (N,) float32 mean saliency per box.
    Raises:
        ValueError: bad shapes, empty or out-of-map boxes.
    """
    b = _check_boxes(boxes, np.asarray(sal_map).shape[:2])
    if len(b) == 0:
        return np.zeros(0, np.float32)
    area = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).astype(np.float64)
    return (_sums_from_integral(_integral(sal_map), b) / area).astype(np.float32)


def score_id(sal_map: np.ndarray, boxes: np.ndarray, margin: float = 0.10) -> np.ndarray:
    """Inner-difference score S_id of each box (thesis Eq. 3.2).

    S_id(p) = (1/255) * (mean of the inner part - mean of the outer part). The inner part
    is the centred rectangle obtained by moving every side inwards by
    ``round(margin * side)`` pixels (10 % of the side in the thesis); the outer part is
    the rest of the patch (a frame). The map is in [0, 1], so 1/255 is a no-op and
    S_id is in [-1, 1]. A box too small to have a frame (margin rounds to 0 px) scores 0.

    Args:
        sal_map: (H, W) float saliency map in [0, 1].
        boxes: (N, 4) int boxes x0, y0, x1, y1 (pixels, exclusive), inside the map.
        margin: inner-rectangle margin as a fraction of the side, in [0, 0.5).
    Returns:
        (N,) float32 scores.
    Raises:
        ValueError: bad shapes, empty or out-of-map boxes, margin outside [0, 0.5).
    """
    if not 0.0 <= margin < 0.5:
        raise ValueError(f"margin must be in [0, 0.5), got {margin}")
    b = _check_boxes(boxes, np.asarray(sal_map).shape[:2])
    if len(b) == 0:
        return np.zeros(0, np.float32)
    return _apv_id(_integral(sal_map), b, margin)[1].astype(np.float32)


def overlap_larger(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Overlap of one box with many: intersection area / area of the larger of the two (§3.1.2).

    Args:
        box: (4,) or (..., 4) int boxes x0, y0, x1, y1; broadcast against ``boxes``.
        boxes: (N, 4) or (..., N, 4) boxes.
    Returns:
        float64 overlaps in [0, 1], broadcast shape without the last axis.
    """
    a = np.asarray(box, np.float64)
    b = np.asarray(boxes, np.float64)
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return iw * ih / np.maximum(np.maximum(area_a, area_b), 1e-12)


def greedy_select_grouped(
    boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, k: int, overlap: float, valid: np.ndarray | None = None
) -> np.ndarray:
    """Algorithm 2 run independently inside every group, all groups vectorised together.

    Within each group, candidates are visited in decreasing score (ties: lower index
    first); a candidate is added only if its overlap (intersection / area of the larger
    box) with EVERY patch already selected in its group is < ``overlap``; stop at ``k``
    per group or when no candidate is left. Implementation: k rounds; each round takes
    the best remaining candidate of every group and removes, in one vectorised step, all
    candidates of that group that overlap it by >= ``overlap`` -- equivalent to the
    sequential test because the overlap is symmetric.

    Args:
        boxes: (N, 4) int boxes.
        scores: (N,) float scores (higher is better); NaN is treated as -inf.
        groups: (N,) int group ids (regions / images); any integers.
        k: patches per group; ``k <= 0`` means no limit. Or an (N,) int array giving
            each candidate's group budget (constant within a group).
        overlap: maximum overlap; ``overlap >= 1`` disables the overlap test.
        valid: optional (N,) bool mask of candidates allowed (e.g. passed the S_apv filter).
    Returns:
        (M,) int64 indices into ``boxes``, sorted by (group id, selection order).
    Raises:
        ValueError: shape mismatch.
    """
    boxes = np.asarray(boxes)
    scores = np.asarray(scores, np.float64)
    groups = np.asarray(groups)
    n = len(boxes)
    if boxes.shape != (n, 4) or scores.shape != (n,) or groups.shape != (n,):
        raise ValueError(f"shape mismatch: boxes {boxes.shape}, scores {scores.shape}, groups {groups.shape}")
    alive = np.ones(n, bool) if valid is None else np.asarray(valid, bool).copy()
    alive &= ~np.isnan(scores)
    if n == 0 or not alive.any():
        return np.zeros(0, np.int64)
    uniq, gidx = np.unique(groups, return_inverse=True)
    if np.ndim(k) == 0 and k <= 0 and overlap >= 1.0:  # nothing to filter: all valid candidates, by score
        order = np.lexsort((np.arange(n), -scores, gidx))
        return order[alive[order]].astype(np.int64)
    g = len(uniq)
    # pad into a (G, L) layout sorted by score within each group
    order = np.lexsort((np.arange(n), -scores, gidx))
    counts = np.bincount(gidx, minlength=g)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    L = int(counts.max())
    pos = np.arange(n) - np.repeat(starts, counts)
    table = np.full((g, L), -1, np.int64)
    table[gidx[order], pos] = order
    present = table >= 0
    alive_t = present & alive[np.where(present, table, 0)]
    bx = boxes.astype(np.float64)[np.where(present, table, 0)]  # (G, L, 4)
    k_arr = np.asarray(k)
    if k_arr.ndim == 0:
        k_g = np.full(g, int(k_arr))
    else:  # one budget per candidate, constant within a group
        k_g = np.zeros(g, np.int64)
        k_g[gidx] = k_arr.astype(np.int64)
    k_g = np.where(k_g <= 0, L, np.minimum(k_g, L))
    kmax = int(k_g.max())
    count = np.zeros(g, np.int64)
    chosen = []
    rows = np.arange(g)
    for _ in range(kmax):
        has = alive_t.any(axis=1) & (count < k_g)
        if not has.any():
            break
        first = np.argmax(alive_t, axis=1)  # best remaining (table is score-sorted)
        r = rows[has]
        c = first[has]
        chosen.append(np.stack([r, c], axis=1))
        count[r] += 1
        alive_t[r, c] = False
        if overlap < 1.0:
            ov = overlap_larger(bx[r, c][:, None, :], bx[r])  # (R, L)
            alive_t[r] &= ov < overlap
    if not chosen:
        return np.zeros(0, np.int64)
    rc = np.concatenate(chosen, axis=0)
    # stable sort by group keeps per-group selection order
    rc = rc[np.argsort(rc[:, 0], kind="stable")]
    return table[rc[:, 0], rc[:, 1]]


def greedy_select(boxes: np.ndarray, scores: np.ndarray, k: int, overlap: float) -> np.ndarray:
    """Greedy top-k selection with an overlap limit (thesis Algorithm 2, §3.1.2).

    Candidates are visited from the highest to the lowest score (ties: lower index
    first). A candidate is added only if its overlap with every already selected patch,
    measured as intersection area / area of the larger of the two patches, is strictly
    below ``overlap``. Selection stops after ``k`` patches or when candidates run out.

    Args:
        boxes: (N, 4) int boxes x0, y0, x1, y1 in pixels.
        scores: (N,) float scores (S_id of Eq. 3.2 in the thesis).
        k: maximum number of patches; ``k <= 0`` = no limit.
        overlap: maximum overlap in [0, 1]; ``>= 1`` disables the test.
    Returns:
        (M,) int64 indices into ``boxes`` in selection order (M <= k).
    Raises:
        ValueError: shape mismatch.
    """
    n = len(np.asarray(boxes))
    return greedy_select_grouped(boxes, scores, np.zeros(n, np.int64), k, overlap)
