"""Patch selection over device-resident frames: ONE entry point, two implementations.

:func:`select_frames` takes a batch of decoded frames as (3, H, W) uint8 tensors (on the
GPU in a GPU actor) and returns one :class:`mining.selection.Selection` per frame.

* ``impl="torch"``: the §3.1 selector written as batched torch ops on the frames' device
  (this file): saliency maps from ``backend.predict_tensors``, candidates scored from
  integral images, greedy overlap selection over all regions of all frames at once.
* ``impl="numpy"``: the reference path, :func:`mining.selection.select_patches_batch`
  on host copies of the frames.

``impl=None`` picks the default for the frames' device (:func:`default_impl`): ``torch`` on
CUDA (the design target: no host copy of the frame, one call per frame batch), ``numpy`` on CPU,
because there the torch path is measured about 4x slower per frame (1,862 vs 473 ms/frame with
``sr-bms`` on one core, benchmarks/RESULTS.md): OpenCV's connected components and FFTs beat generic
tensor ops on a CPU. Both give the same boxes (297 of the 300 GTSDB frames, capture delta 0.000).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from mining.saliency.base import SaliencyBackend
from mining.select_device_greedy import (
    candidate_grid_torch,
    greedy_select_grouped_torch,
    integral_stack,
    numpy_mean_f32,
    score_apv_id,
)
from mining.selection import Selection, SelectionConfig, _whole_frame, candidate_grid, select_patches_batch

IMPLS = ("torch", "numpy")


def default_impl(device) -> str:
    """The implementation the mining job uses on ``device`` (a torch device or its name)."""
    kind = getattr(device, "type", str(device)).split(":")[0]
    return "torch" if kind == "cuda" else "numpy"


def select_frames(frames: Sequence, config: SelectionConfig, backend: SaliencyBackend,
                  impl: str | None = None) -> list[Selection]:
    """Select patches in a batch of frames (thesis §3.1, Algorithm 2; hierarchy §3.1.3).

    Args:
        frames: a (B, 3, H, W) uint8 tensor or a list of (3, H_i, W_i) uint8 tensors, all on
            one device.
        config: a :class:`~mining.selection.SelectionConfig`, scaled to each frame's width.
        backend: any saliency backend.
        impl: ``"torch"``, ``"numpy"`` or None (:func:`default_impl` of the frames' device).
    Returns:
        one :class:`~mining.selection.Selection` per frame (numpy arrays on the host).
    Raises:
        ValueError: unknown ``impl``, frames not (3, H, W) uint8.
    """
    frames = list(frames)
    if not frames:
        return []
    impl = impl or default_impl(frames[0].device)
    if impl not in IMPLS:
        raise ValueError(f"unknown selection impl {impl!r}; use one of {IMPLS}")
    if impl == "numpy":
        host = [np.ascontiguousarray(f.permute(1, 2, 0).cpu().numpy()) for f in frames]
        return select_patches_batch(host, config, backend, device="cpu")
    return select_patches_torch(frames, config, backend)


def _check_frames(frames) -> list:
    frames = list(frames)
    for f in frames:
        if not torch.is_tensor(f) or f.dim() != 3 or f.shape[0] != 3 or f.dtype != torch.uint8 \
                or f.shape[1] < 1 or f.shape[2] < 1:
            raise ValueError(f"expected (3, H, W) uint8 tensors with H, W >= 1, got "
                             f"{tuple(getattr(f, 'shape', ())) or type(f).__name__} {getattr(f, 'dtype', '')}")
        if f.device != frames[0].device:
            raise ValueError(f"frames must all be on one device, got {frames[0].device} and {f.device}")
    return frames


def _predict(backend: SaliencyBackend, crops: list, shapes: list) -> list:
    """``backend.predict_tensors`` on crop views; every map checked to be (h, w), as float32 on the device."""
    maps = backend.predict_tensors(crops)
    if len(maps) != len(crops):
        raise ValueError(f"saliency backend {getattr(backend, 'name', '?')!r} returned {len(maps)} maps "
                         f"for {len(crops)} images")
    dev = crops[0].device
    for m, shape in zip(maps, shapes):
        if tuple(m.shape) != tuple(shape):
            raise ValueError(f"saliency backend {getattr(backend, 'name', '?')!r} returned a map of shape "
                             f"{tuple(m.shape)}, expected {tuple(shape)}")
    return [m.to(device=dev, dtype=torch.float32) for m in maps]


def _by_shape(maps: list, shapes: np.ndarray, dev) -> list:
    """[(shape (h, w), region indices (R_k,) numpy, region indices tensor, maps (R_k, h, w))] per distinct shape."""
    uniq, inv = np.unique(shapes, axis=0, return_inverse=True)
    out = []
    for u in range(len(uniq)):
        idx = np.flatnonzero(inv.reshape(-1) == u)
        out.append(((int(uniq[u][0]), int(uniq[u][1])), idx, torch.from_numpy(idx).to(dev),
                    torch.stack([maps[j] for j in idx])))
    return out


def _tile_blend(frames: list, reg_frame: np.ndarray, groups: list, shape_cfg: dict, backend) -> list:
    """Level-1 maps blended with maps stitched from overlapping tiles (``config.level1_tiles``).

    Torch version of :func:`mining.selection._tile_level1`: tiles of side
    ``round(level1_tiles * largest level-1 size)`` px, stride half a tile, border-flush;
    all tiles of all frames in one ``predict_tensors`` call; overlaps averaged; the result
    is ``0.5 * whole-frame map + 0.5 * stitched map`` (float32, numpy's operation order).
    """
    jobs, crops = [], []
    for gi, ((h, w), idx, _, _) in enumerate(groups):
        cfg = shape_cfg[(h, w)]
        t = min(int(round(cfg.level1_tiles * max(cfg.levels[0].sizes))), h, w)
        if t >= max(h, w):
            continue
        tiles = candidate_grid(h, w, t, max(t // 2, 1), cover_border=True).tolist()
        crops += [frames[f][:, b[1]:b[3], b[0]:b[2]] for f in reg_frame[idx].tolist() for b in tiles]
        jobs.append((gi, t, tiles))
    if not jobs:
        return groups
    tmaps = _predict(backend, crops, [tuple(c.shape[1:]) for c in crops])
    out, pos = list(groups), 0
    for gi, t, tiles in jobs:
        (h, w), idx, idx_t, m = groups[gi]
        n_t = len(idx) * len(tiles)
        tm = torch.stack(tmaps[pos:pos + n_t]).view(len(idx), len(tiles), t, t)
        pos += n_t
        acc = torch.zeros_like(m)
        cnt = torch.zeros((h, w), dtype=torch.float32, device=m.device)
        for j, b in enumerate(tiles):  # tile order = numpy's summation order per pixel
            acc[:, b[1]:b[3], b[0]:b[2]] += tm[:, j]
            cnt[b[1]:b[3], b[0]:b[2]] += 1.0
        out[gi] = ((h, w), idx, idx_t, 0.5 * m + 0.5 * acc / cnt.clamp(min=1.0))
    return out


def select_patches_torch(frames: Sequence, config: SelectionConfig, backend: SaliencyBackend) -> list[Selection]:
    """Patch selection (thesis §3.1, Eq. 3.1/3.2, Algorithm 2; hierarchy §3.1.3) as batched torch ops.

    The torch implementation of :func:`mining.selection.select_patches_batch`, on the
    frames' own device. Per level: one ``backend.predict_tensors`` call on crop views of
    all regions of all frames (whole frames at level 1; every selected level-1 patch,
    grown by ``config.context``, at level 2; plus one call for the level-1 tiles when
    ``config.level1_tiles > 0``); candidate grids built once per distinct (map shape,
    level parameters); every candidate of every map scored from one padded float64
    integral-image stack (S_apv, Eq. 3.1, as filter -- absolute or ``adaptive_apv``;
    S_id, Eq. 3.2, or S_apv with ``rank="apv"``, as ranking); the centre-in-parent rule
    as a mask; greedy overlap selection (Algorithm 2) in all groups at once -- regions,
    or frames for ``pooled`` levels (budget k per parent region). Python loops run per
    level, per greedy round and per distinct map shape only; the host synchronises a
    few times per level (to slice the next level's crops).

    On the same saliency maps it returns what :func:`~mining.selection.select_patches_batch`
    returns: same boxes, levels and order, scores equal to float32 rounding. On the CPU the
    float64 integral images are bitwise numpy's; on CUDA the parallel ``cumsum`` rounds
    differently (~1e-16 relative), so candidates whose scores tie exactly in numpy
    may be ordered differently there (and a score equal to a threshold may flip).

    Args:
        frames: list (or (B, 3, H, W) tensor) of (3, H_i, W_i) uint8 RGB tensors on one device.
        config: a :class:`~mining.selection.SelectionConfig`, scaled to each frame's width.
        backend: a saliency backend; its ``predict_tensors`` gets (3, h, w) uint8 views
            and must return (h, w) float maps in [0, 1] (moved to the frames' device).
    Returns:
        one :class:`~mining.selection.Selection` per frame (numpy: boxes (N, 4) int32 in
        frame pixels x0, y0, x1, y1 exclusive, levels (N,) int8, scores (N,) float32),
        ordered by level then selection order, duplicates dropped (first kept). A frame
        smaller than the smallest level-1 patch gets one whole-frame patch (level 1,
        score 0); a frame where nothing passes the S_apv filter gets an empty selection.
    Raises:
        ValueError: a frame is not a (3, H, W) uint8 tensor, frames on several devices,
            or the backend returns a map of the wrong shape or number of maps.
    """
    frames = _check_frames(frames)
    n = len(frames)
    if n == 0:
        return []
    dev = frames[0].device
    hw = np.array([[f.shape[1], f.shape[2]] for f in frames], np.int64).reshape(n, 2)
    shapes_u, frame_shape = np.unique(hw, axis=0, return_inverse=True)
    frame_shape = frame_shape.reshape(-1)
    shape_cfg = {(int(h), int(w)): config.scaled(int(w), int(h)) for h, w in shapes_u}
    cfg_u = [shape_cfg[(int(h), int(w))] for h, w in shapes_u]
    small = np.array([min(c.levels[0].sizes) > min(int(h), int(w)) for c, (h, w) in zip(cfg_u, shapes_u)])[frame_shape]
    # region state (host, small): frame index and box (x0, y0, x1, y1, frame px) of every region
    reg_frame = np.flatnonzero(~small).astype(np.int64)
    reg_box = np.stack([np.zeros_like(reg_frame), np.zeros_like(reg_frame), hw[reg_frame, 1], hw[reg_frame, 0]], 1)
    picks = []
    with torch.no_grad():
        for li, lv0 in enumerate(config.levels):  # lv0: thresholds, k, overlap... are width-independent
            if len(reg_frame) == 0:
                break
            bounds = reg_box
            if li > 0 and config.context > 0:  # parent grown by context x its side, clipped to the frame
                mx = np.round(config.context * (reg_box[:, 2] - reg_box[:, 0])).astype(np.int64)
                my = np.round(config.context * (reg_box[:, 3] - reg_box[:, 1])).astype(np.int64)
                bounds = np.stack([np.maximum(reg_box[:, 0] - mx, 0), np.maximum(reg_box[:, 1] - my, 0),
                                   np.minimum(reg_box[:, 2] + mx, hw[reg_frame, 1]),
                                   np.minimum(reg_box[:, 3] + my, hw[reg_frame, 0])], 1)
            shapes = np.stack([bounds[:, 3] - bounds[:, 1], bounds[:, 2] - bounds[:, 0]], 1)
            crops = [frames[f][:, b[1]:b[3], b[0]:b[2]] for f, b in zip(reg_frame.tolist(), bounds.tolist())]
            groups = _by_shape(_predict(backend, crops, shapes.tolist()), shapes, dev)
            if li == 0 and config.level1_tiles > 0:
                groups = _tile_blend(frames, reg_frame, groups, shape_cfg, backend)
            lvs = [c.levels[li] for c in cfg_u]  # scaled level per distinct frame shape
            lv_id = np.array([lvs.index(lv) for lv in lvs], np.int64)[frame_shape][reg_frame]
            got = _select_level(groups, lvs, lv_id, shapes, bounds, reg_box, reg_frame, n, lv0, config)
            if got is None:
                break
            reg_frame, reg_box, scores = got
            picks.append((reg_frame, reg_box, scores, li + 1))
    return _assemble(n, hw, small, picks, config.emit_levels)


def _select_level(groups, lvs, lv_id, shapes, bounds, parents, reg_frame, n, lv0, config):
    """Score and greedily select the candidates of all regions of one level (thesis Algorithm 2).

    ``groups``: the regions' maps by shape (:func:`_by_shape`); ``lvs[lv_id[r]]``: region
    r's scaled level; ``bounds`` / ``parents``: (R, 4) crop boxes / boxes candidates'
    centres must lie in (frame px). Returns (frame (M,), box (M, 4) int64 frame px, score
    (M,) float32) of the selected patches, frame-major then selection order, or None when
    no region holds a candidate. One device-to-host copy.
    """
    dev = groups[0][3].device
    n_reg = len(reg_frame)
    ii = integral_stack([g[3] for g in groups])  # rows in group order
    row_of = torch.empty(n_reg, dtype=torch.int64, device=dev)
    row_of[torch.cat([g[2] for g in groups])] = torch.arange(n_reg, device=dev)
    thr = torch.full((n_reg,), float(lv0.apv_threshold), dtype=torch.float64, device=dev)
    if lv0.adaptive_apv:  # apv_threshold x numpy's float32 mean of the region's map
        for _, idx, idx_t, m in groups:
            thr[idx_t] = numpy_mean_f32(m.reshape(len(idx), -1)).double() * float(lv0.apv_threshold)
    # candidates: one grid per distinct (map shape, scaled level), repeated for its regions
    keys, kinv = np.unique(np.column_stack([shapes, lv_id]), axis=0, return_inverse=True)
    loc_l, reg_l = [], []
    for u, (h, w, lid) in enumerate(keys.tolist()):
        grid = candidate_grid_torch(h, w, lvs[lid], config.cover_border, dev)
        if len(grid):
            regs = torch.from_numpy(np.flatnonzero(kinv.reshape(-1) == u)).to(dev)
            loc_l.append(grid.repeat(len(regs), 1))
            reg_l.append(regs.repeat_interleave(len(grid)))
    if not loc_l:
        return None
    reg = torch.cat(reg_l)
    perm = torch.sort(reg, stable=True).indices  # numpy's candidate order: region, size, row-major
    reg, loc = reg[perm], torch.cat(loc_l)[perm]
    apv, sid = score_apv_id(ii, row_of[reg], loc, config.margin)
    box = loc + torch.from_numpy(bounds[:, :2]).to(dev).repeat(1, 2)[reg]
    par = torch.from_numpy(parents).to(dev)[reg]
    cx2, cy2 = box[:, 0] + box[:, 2], box[:, 1] + box[:, 3]  # twice the centre
    valid = (cx2 >= 2 * par[:, 0]) & (cx2 < 2 * par[:, 2]) & (cy2 >= 2 * par[:, 1]) & (cy2 < 2 * par[:, 3])
    if lv0.apv_threshold >= 0:
        valid &= apv > thr[reg]
    rank = sid if lv0.rank == "id" else apv
    rf = torch.from_numpy(reg_frame).to(dev)
    if lv0.pooled:  # one budget per frame: k x its number of parent regions
        sel = greedy_select_grouped_torch(box, rank, rf[reg], n, lv0.k, lv0.overlap, valid,
                                          budget_mult=torch.bincount(rf, minlength=n))
    else:  # k per region
        sel = greedy_select_grouped_torch(box, rank, reg, n_reg, lv0.k, lv0.overlap, valid)
    out = torch.cat([box[sel].double(), reg[sel, None].double(), rank[sel, None]], 1).cpu().numpy()
    return reg_frame[out[:, 4].astype(np.int64)], out[:, :4].astype(np.int64), out[:, 5].astype(np.float32)


def _assemble(n: int, hw: np.ndarray, small: np.ndarray, picks: list, emit) -> list[Selection]:
    """Per-frame Selections: level order then selection order, emitted levels only, duplicates dropped."""
    f = np.concatenate([p[0] for p in picks] + [np.zeros(0, np.int64)])
    b = np.concatenate([p[1] for p in picks] + [np.zeros((0, 4), np.int64)]).astype(np.int32)
    s = np.concatenate([p[2] for p in picks] + [np.zeros(0, np.float32)]).astype(np.float32)
    lev = np.concatenate([np.full(len(p[0]), p[3], np.int8) for p in picks] + [np.zeros(0, np.int8)])
    keep = np.isin(lev, emit) if emit is not None else np.ones(len(f), bool)
    keep = np.flatnonzero(keep)[np.argsort(f[keep], kind="stable")]
    f, b, s, lev = f[keep], b[keep], s[keep], lev[keep]
    _, first = np.unique(np.column_stack([f, b]).reshape(-1, 5), axis=0, return_index=True)
    keep = np.sort(first)
    f, b, s, lev = f[keep], b[keep], s[keep], lev[keep]
    lo, hi = np.searchsorted(f, np.arange(n)), np.searchsorted(f, np.arange(n), side="right")
    return [_whole_frame(int(hw[i, 0]), int(hw[i, 1])) if small[i]
            else Selection(b[lo[i]:hi[i]], lev[lo[i]:hi[i]], s[lo[i]:hi[i]]) for i in range(n)]
