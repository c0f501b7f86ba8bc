"""Torch kernels of the device patch selector (:mod:`mining.select_device`).

Each function is a batched torch port of one numpy step of :mod:`mining.selection`, written
so that on the same saliency maps it returns the same numbers (float64 scores, float32
means) and, above all, the same selection order:

* :func:`candidate_grid_torch` -- the strided candidate grid of thesis §3.1.1
  (:func:`mining.selection.candidate_grid`);
* :func:`integral_stack` / :func:`score_apv_id` -- S_apv (Eq. 3.1) and S_id (Eq. 3.2) of
  every candidate of every map, by gathers from one padded float64 integral-image stack;
* :func:`numpy_mean_f32` -- ``np.mean`` of float32 maps bit for bit (numpy's pairwise
  float32 summation), for the adaptive S_apv threshold;
* :func:`greedy_select_grouped_torch` -- Algorithm 2 (greedy selection under an overlap
  limit) in every group at once (:func:`mining.selection.greedy_select_grouped`).

Boxes are ``x0, y0, x1, y1`` in pixels, x1/y1 exclusive, int64 tensors.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from mining.selection import LevelParams

__all__ = [
    "candidate_grid_torch",
    "integral_stack",
    "score_apv_id",
    "numpy_mean_f32",
    "overlap_larger_torch",
    "greedy_select_grouped_torch",
]


def _starts(extent: int, size: int, stride: int, cover_border: bool, device) -> torch.Tensor:
    s = torch.arange(0, extent - size + 1, stride, dtype=torch.int64, device=device)
    last = ((extent - size) // stride) * stride
    if cover_border and last != extent - size:
        s = torch.cat([s, torch.tensor([extent - size], dtype=torch.int64, device=device)])
    return s


def candidate_grid_torch(height: int, width: int, lv: LevelParams, cover_border: bool, device) -> torch.Tensor:
    """All candidates of one level in a ``height`` x ``width`` map (thesis §3.1.1).

    Same boxes and order as concatenating :func:`mining.selection.candidate_grid` over
    ``zip(lv.sizes, lv.strides)``: per size in ``lv.sizes`` order, row-major (y, then x).

    Returns:
        (C, 4) int64 tensor on ``device``; C = 0 when no size fits in the map.
    """
    parts = []
    for size, stride in zip(lv.sizes, lv.strides):
        if size > width or size > height:
            continue
        xs = _starts(width, size, stride, cover_border, device)
        ys = _starts(height, size, stride, cover_border, device)
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        x0, y0 = xx.reshape(-1), yy.reshape(-1)
        parts.append(torch.stack([x0, y0, x0 + size, y0 + size], dim=1))
    return torch.cat(parts) if parts else torch.zeros((0, 4), dtype=torch.int64, device=device)


def integral_stack(maps: list[torch.Tensor]) -> torch.Tensor:
    """One zero-padded float64 integral image per map: ``ii[r, y, x]`` = sum of map r over [0, y) x [0, x).

    Args:
        maps: list of (R_k, h_k, w_k) float tensors (maps grouped by size); the stack's rows
            are their maps in list order (row ``sum(R_j, j < k) + i`` = map i of group k).
    Returns:
        (sum R_k, Hmax + 1, Wmax + 1) float64 tensor; row 0 / column 0 and everything beyond
        a map's own (h + 1, w + 1) corner are zeros (padding, never read). Computed as
        ``cumsum`` over y, then over x, in float64: the operations of
        :func:`mining.selection._integral` (bitwise equal on the CPU).
    """
    hmax = max(m.shape[1] for m in maps)
    wmax = max(m.shape[2] for m in maps)
    ii = torch.empty((sum(m.shape[0] for m in maps), hmax + 1, wmax + 1), dtype=torch.float64,
                     device=maps[0].device)
    ii[:, 0, :] = 0.0
    ii[:, :, 0] = 0.0
    row = 0
    for m in maps:
        r, h, w = m.shape
        ii[row:row + r, 1:h + 1, 1:w + 1] = m
        ii[row:row + r, h + 1:, :] = 0.0
        ii[row:row + r, :, w + 1:] = 0.0
        row += r
    return ii.cumsum_(1).cumsum_(2)  # in place: the same sequential sums, no extra (R, H, W) buffers


def score_apv_id(ii: torch.Tensor, region: torch.Tensor, boxes: torch.Tensor, margin: float = 0.10):
    """S_apv (thesis Eq. 3.1) and S_id (Eq. 3.2) of many boxes on many maps, by gathers.

    S_apv = mean of the map in the box. S_id = mean of the inner rectangle (every side moved
    in by ``round(margin * side)`` px, at least one inner pixel kept) minus the mean of the
    frame around it; a box whose frame is empty scores 0. Maps are in [0, 1], so the thesis'
    1/255 factor is a no-op. Same float64 operations, in the same order, as
    :func:`mining.selection._apv_id`.

    Args:
        ii: (R, H + 1, W + 1) float64 integral images (:func:`integral_stack`).
        region: (N,) int64 map index of each box.
        boxes: (N, 4) int64 boxes in pixels of their own map (inside it, non-empty).
        margin: inner-rectangle margin, fraction of the side.
    Returns:
        (apv, sid): two (N,) float64 tensors.
    """
    plane = ii.shape[1] * ii.shape[2]
    row = ii.shape[2]
    flat = ii.reshape(-1)
    base = region * plane

    def sums(x0, y0, x1, y1):
        def g(y, x):
            return flat[base + y * row + x]
        return g(y1, x1) - g(y0, x1) - g(y1, x0) + g(y0, x0)

    x0, y0, x1, y1 = boxes.unbind(1)
    w, h = x1 - x0, y1 - y0
    mx = torch.minimum(torch.floor(margin * w.double() + 0.5).long(), (w - 1) // 2)
    my = torch.minimum(torch.floor(margin * h.double() + 0.5).long(), (h - 1) // 2)
    area = (w * h).double()
    a_in = ((w - 2 * mx) * (h - 2 * my)).double()
    total = sums(x0, y0, x1, y1)
    s_in = sums(x0 + mx, y0 + my, x1 - mx, y1 - my)
    a_out = area - a_in
    mean_in = s_in / a_in
    mean_out = torch.where(a_out > 0, (total - s_in) / a_out.clamp(min=1), mean_in)
    return total / area, mean_in - mean_out


@functools.lru_cache(maxsize=128)
def _pairwise_plan(n: int):
    """numpy's pairwise float32 summation of n elements, as octet-block leaves and a combine tree.

    numpy (``@TYPE@_pairwise_sum``) splits n > 128 elements at ``n2 = n // 2 - (n // 2) % 8``
    recursively; a leaf of <= 128 elements is summed into 8 interleaved accumulators
    (r[j] = a[j], then r[j] += a[8 i + j] octet by octet), combined as
    ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7)), then its last ``len % 8`` elements
    are added one by one. Every split point is a multiple of 8, so leaves start on octet
    boundaries and only the last leaf has such a tail (elements ``n - n % 8 .. n - 1``).

    Returns:
        (octet start per leaf (nl,), [(step o, leaves with more than o octets) ...],
        [(dst, left, right) node columns per tree height ...], node count, root column).
    """
    leaves, internal = [], []

    def rec(start: int, m: int):
        if m <= 128:
            leaves.append((start // 8, m // 8 if m >= 8 else 0))
            return ("l", len(leaves) - 1, 0)
        n2 = m // 2
        n2 -= n2 % 8
        a, b = rec(start, n2), rec(start + n2, m - n2)
        internal.append((a, b))
        return ("i", len(internal) - 1, 1 + max(a[2], b[2]))

    root = rec(0, n)
    start = np.array([lf[0] for lf in leaves], np.int64)
    noct = np.array([lf[1] for lf in leaves], np.int64)
    steps = [(o, np.flatnonzero(noct > o)) for o in range(1, int(noct.max()))]
    nl = len(leaves)
    col = lambda node: node[1] if node[0] == "l" else nl + node[1]  # noqa: E731
    by_height: dict[int, list] = {}
    for j, (a, b) in enumerate(internal):
        by_height.setdefault(1 + max(a[2], b[2]), []).append((nl + j, col(a), col(b)))
    combine = [tuple(np.array(c, np.int64) for c in zip(*by_height[h])) for h in sorted(by_height)]
    return start, steps, combine, nl + len(internal), col(root)


def numpy_mean_f32(x: torch.Tensor) -> torch.Tensor:
    """``np.mean`` of each row of a float32 tensor, bit for bit (numpy's pairwise summation).

    The adaptive S_apv threshold (``LevelParams.adaptive_apv``) is ``apv_threshold *
    map.mean()`` with numpy's float32 mean of a contiguous map; this reproduces that value
    exactly (on CPU and CUDA: only IEEE float32 additions, in numpy's order), so a candidate
    on the threshold is kept or dropped as in :mod:`mining.selection`.

    Args:
        x: (R, n) float32 tensor, n >= 1 (the maps flattened row-major).
    Returns:
        (R,) float32 tensor of means (float32(sum) / n, rounded to float32 as numpy does).
    """
    x = x.to(torch.float32).contiguous()
    r, n = x.shape
    dev = x.device
    n8 = n - n % 8
    tail = x[:, n8:] if n >= 8 else x
    if n < 8:  # numpy: res = 0, then every element added in turn
        res = torch.zeros((r, 1), dtype=torch.float32, device=dev)
        vals, root, combine = res, 0, []
    else:
        start, steps, combine, nnodes, root = _pairwise_plan(int(n))
        octs = x.as_strided((r, n8 // 8, 8), (n, 8, 1))  # view: the map as octets
        st = torch.from_numpy(start).to(dev)
        acc = octs.index_select(1, st)  # (R, nl, 8): r[j] = first octet
        for o, live in steps:  # octet o of every leaf that has one, in order
            if len(live) == len(start):
                acc = acc + octs.index_select(1, st + o)
            else:
                li = torch.from_numpy(live).to(dev)
                acc[:, li] = acc[:, li] + octs.index_select(1, st[li] + o)
        a = acc.unbind(2)
        res = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
        vals = torch.cat([res, torch.empty((r, nnodes - res.shape[1]), dtype=torch.float32, device=dev)], 1)
    last = len(start) - 1 if n >= 8 else 0
    for j in range(tail.shape[1]):  # the tail of the last leaf, one element at a time
        vals[:, last] = vals[:, last] + tail[:, j]
    for dst, left, right in combine:
        d, lf, rt = (torch.from_numpy(v).to(dev) for v in (dst, left, right))
        vals[:, d] = vals[:, lf] + vals[:, rt]
    return (vals[:, root].double() / n).float()


def overlap_larger_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection area / area of the larger box (§3.1.2), float64, broadcasting (..., 4) boxes.

    Same operations as :func:`mining.selection.overlap_larger`.
    """
    a, b = a.double(), b.double()
    iw = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    ih = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return iw * ih / torch.maximum(torch.maximum(area_a, area_b), torch.full_like(area_a, 1e-12))


def greedy_select_grouped_torch(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, n_groups: int,
                                k: int, overlap: float, valid: torch.Tensor | None = None,
                                budget_mult: torch.Tensor | None = None) -> torch.Tensor:
    """Algorithm 2 (thesis §3.1.2) in every group at once: the torch port of
    :func:`mining.selection.greedy_select_grouped`, same result and order.

    Within each group candidates are visited by decreasing score, ties by lower index; a
    candidate is taken when its overlap (intersection / area of the larger box) with every
    patch already taken in its group is < ``overlap``, up to the group's budget. Runs a
    fixed number of rounds (the largest budget, capped by the largest group), each taking
    the best remaining candidate of every group and masking what overlaps it; no host
    synchronisation inside the loop (two before it: the group size and the round count).

    Args:
        boxes: (N, 4) int64 boxes (pixels).
        scores: (N,) float64, higher is better; NaN = never selected.
        groups: (N,) int64 group ids in [0, n_groups).
        n_groups: number of groups G.
        k: patches per group; ``k <= 0`` = no limit.
        overlap: maximum overlap; ``>= 1`` disables the test.
        valid: optional (N,) bool, candidates allowed (S_apv filter, centre rule).
        budget_mult: optional (G,) int64: group g's budget is ``k * budget_mult[g]``
            (pooled level-2 budgets: k per parent region of the image); a budget <= 0
            means no limit, as in numpy.
    Returns:
        (M,) int64 tensor of indices into ``boxes``, sorted by (group id, selection order).
    """
    dev = boxes.device
    n = boxes.shape[0]
    alive = ~torch.isnan(scores)
    if valid is not None:
        alive &= valid
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=dev)
    # order = lexsort(index, -score, group): stable sorts, last key last; +0.0 merges -0.0 into 0.0
    key = torch.where(alive, scores, torch.full_like(scores, -torch.inf)) + 0.0
    o1 = torch.sort(key, descending=True, stable=True).indices
    order = o1[torch.sort(groups[o1], stable=True).indices]
    if k <= 0 and overlap >= 1.0:  # nothing to filter: every valid candidate, by score
        return order[alive[order]]
    counts = torch.bincount(groups, minlength=n_groups)
    big = int(counts.max())  # host sync 1
    gs = groups[order]
    pos = torch.arange(n, device=dev) - (counts.cumsum(0) - counts)[gs]
    table = torch.full((n_groups, big), -1, dtype=torch.int64, device=dev)
    table[gs, pos] = order
    present = table >= 0
    tix = table.clamp(min=0)
    live = present & alive[tix]
    bx = boxes[tix].double()  # (G, L, 4)
    if k <= 0:
        kg = torch.full((n_groups,), big, dtype=torch.int64, device=dev)
    else:
        kg = torch.full((n_groups,), int(k), dtype=torch.int64, device=dev)
        if budget_mult is not None:
            kg = kg * budget_mult
        kg = torch.where(kg <= 0, big, kg.clamp(max=big))  # a budget <= 0 means no limit, as in numpy
    kmax = int(kg.max())  # host sync 2
    rows = torch.arange(n_groups, device=dev)
    count = torch.zeros(n_groups, dtype=torch.int64, device=dev)
    picked = torch.zeros((n_groups, kmax), dtype=torch.int64, device=dev)
    took = torch.zeros((n_groups, kmax), dtype=torch.bool, device=dev)
    for step in range(kmax):
        has = live.any(1) & (count < kg)
        first = live.to(torch.uint8).argmax(1)  # first alive = best remaining (table is score-sorted)
        picked[:, step] = first
        took[:, step] = has
        count += has
        live[rows, first] &= ~has
        if overlap < 1.0:
            ov = overlap_larger_torch(bx[rows, first][:, None, :], bx)  # (G, L)
            live &= (ov < overlap) | ~has[:, None]
    return table[rows[:, None].expand_as(picked)[took], picked[took]]
