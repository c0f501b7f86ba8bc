"""The selector itself (part of :mod:`mining.selection`): the saliency hierarchy of thesis §3.1.3
over a batch of images -- maps predicted for every region at once, candidates scored and greedily
selected per level, level-2 saliency recomputed on each level-1 patch -- and the
:class:`Selection` it returns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mining.saliency.base import SaliencyBackend, check_image
from mining.selection.presets import LevelParams, SelectionConfig
from mining.selection.scores import (
    _apv_id,
    _inner_boxes,
    _integral,
    candidate_grid,
    greedy_select_grouped,
)


# --------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------
@dataclass
class Selection:
    """Patches selected in one image.

    Attributes:
        boxes: (N, 4) int32 x0, y0, x1, y1 in ORIGINAL image pixels, x1/y1 exclusive,
            inside the image, no duplicates.
        levels: (N,) int8 hierarchy level of each patch, 1 = level 1, 2 = level 2, ...
        scores: (N,) float32 selection score on the map it was selected on: S_id
            (Eq. 3.2), or S_apv (Eq. 3.1) for a level whose ``rank`` is ``"apv"``.
        novelty: (N,) float32 mean epitome NLL inside each box (nats per K x K patch,
            :meth:`mining.epitome.backend.EpitomeSaliency.box_novelty`), set by the mining
            actor's select stage when its backend has an epitome member; None otherwise.
    """

    boxes: np.ndarray
    levels: np.ndarray
    scores: np.ndarray
    novelty: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.boxes)


def _candidates(h: int, w: int, lv: LevelParams, cover_border: bool) -> np.ndarray:
    grids = [candidate_grid(h, w, s, st, cover_border) for s, st in zip(lv.sizes, lv.strides)]
    return np.concatenate(grids, axis=0) if grids else np.zeros((0, 4), np.int32)


def _whole_frame(h: int, w: int) -> Selection:
    return Selection(
        np.array([[0, 0, w, h]], np.int32), np.array([1], np.int8), np.array([0.0], np.float32)
    )


def _as_map(m: np.ndarray, shape: tuple[int, int], who: str) -> np.ndarray:
    m = np.asarray(m, np.float32)
    if m.shape != shape:
        raise ValueError(f"saliency backend {who!r} returned a map of shape {m.shape}, expected {shape}")
    return m


def score_apv_id_torch(maps, boxes: np.ndarray, region: np.ndarray, margin: float = 0.10, device=None):
    """S_apv (Eq. 3.1) and S_id (Eq. 3.2) of boxes on several maps at once, with torch.

    The GPU path of the selector: the maps are padded into one (R, H+1, W+1) integral
    image tensor (``torch.cumsum``) and every box of every map is scored by one gather.
    Numerically equal (float64) to :func:`score_apv` / :func:`score_id`.

    Args:
        maps: list of R (H_r, W_r) float maps in [0, 1] (numpy arrays or tensors).
        boxes: (N, 4) int boxes x0, y0, x1, y1 in pixels of their own map.
        region: (N,) int index of each box's map.
        margin: Eq. 3.2 inner-rectangle margin (fraction of the side).
        device: torch device (default: CUDA when available, else CPU).
    Returns:
        (apv, sid): two (N,) float64 numpy arrays.
    """
    import torch

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    b = np.asarray(boxes, np.int64)
    if len(b) == 0:
        return np.zeros(0), np.zeros(0)
    hmax = max(int(m.shape[0]) for m in maps)
    wmax = max(int(m.shape[1]) for m in maps)
    stack = torch.zeros((len(maps), hmax + 1, wmax + 1), dtype=torch.float64, device=dev)
    for r, m in enumerate(maps):
        t = torch.as_tensor(np.asarray(m) if not torch.is_tensor(m) else m, device=dev, dtype=torch.float64)
        stack[r, 1 : t.shape[0] + 1, 1 : t.shape[1] + 1] = t
    ii = stack.cumsum(1).cumsum(2).reshape(len(maps), -1)
    stride = wmax + 1
    rg = torch.as_tensor(np.asarray(region, np.int64), device=dev)

    def sums(bb: np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(bb, device=dev)
        x0, y0, x1, y1 = t.unbind(1)
        g = lambda y, x: ii[rg, y * stride + x]  # noqa: E731
        return g(y1, x1) - g(y0, x1) - g(y1, x0) + g(y0, x0)

    inner = _inner_boxes(b, margin)
    area = torch.as_tensor(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).astype(np.float64), device=dev)
    a_in = torch.as_tensor(((inner[:, 2] - inner[:, 0]) * (inner[:, 3] - inner[:, 1])).astype(np.float64), device=dev)
    total, s_in = sums(b), sums(inner)
    a_out = area - a_in
    mean_in = s_in / a_in
    mean_out = torch.where(a_out > 0, (total - s_in) / a_out.clamp(min=1), mean_in)
    return (total / area).cpu().numpy(), (mean_in - mean_out).cpu().numpy()


def _select_level(
    maps: list[np.ndarray],
    offsets: np.ndarray,
    parents: np.ndarray,
    lv: LevelParams,
    margin: float,
    cover_border: bool,
    device=None,
    owners: np.ndarray | None = None,
):
    """Score and greedily select candidates in several regions at once.

    maps[i] is the saliency map of crop i whose top-left is offsets[i] (x, y) in image
    pixels; parents[i] is the region (x0, y0, x1, y1, image px) candidates' centres must
    lie in. ``device``: a CUDA torch device scores all regions in one batched torch op.
    Returns boxes in image pixels, ranking scores, region index per box.
    """
    all_local, all_boxes, all_reg, all_thr = [], [], [], []
    for i, m in enumerate(maps):
        h, w = m.shape
        cand = _candidates(h, w, lv, cover_border)
        if len(cand) == 0:
            continue
        thr = lv.apv_threshold * float(m.mean()) if lv.adaptive_apv else lv.apv_threshold
        cand_img = cand + np.array([offsets[i][0], offsets[i][1]] * 2, np.int32)
        px0, py0, px1, py1 = parents[i]
        if (px0, py0, px1, py1) != (offsets[i][0], offsets[i][1], offsets[i][0] + w, offsets[i][1] + h):
            cx2 = cand_img[:, 0] + cand_img[:, 2]  # twice the centre
            cy2 = cand_img[:, 1] + cand_img[:, 3]
            inside = (cx2 >= 2 * px0) & (cx2 < 2 * px1) & (cy2 >= 2 * py0) & (cy2 < 2 * py1)
            cand, cand_img = cand[inside], cand_img[inside]
            if len(cand) == 0:
                continue
        all_local.append(cand.astype(np.int64))
        all_boxes.append(cand_img)
        all_reg.append(np.full(len(cand), i, np.int64))
        all_thr.append(np.full(len(cand), thr))
    if not all_boxes:
        return np.zeros((0, 4), np.int32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    boxes = np.concatenate(all_boxes)
    reg = np.concatenate(all_reg)
    thr = np.concatenate(all_thr)
    if device is not None and getattr(device, "type", str(device)) != "cpu":
        apv, sid = score_apv_id_torch(maps, np.concatenate(all_local), reg, margin, device)
    else:  # one integral image per region (numpy), no loop per box
        parts = [_apv_id(_integral(maps[r[0]]), loc, margin) for loc, r in zip(all_local, all_reg)]
        apv = np.concatenate([p[0] for p in parts])
        sid = np.concatenate([p[1] for p in parts])
    valid = apv > thr if lv.apv_threshold >= 0 else np.ones(len(boxes), bool)
    rank = sid if lv.rank == "id" else apv
    if lv.pooled and owners is not None:
        # one budget per IMAGE: k x its number of parent regions
        n_reg = np.bincount(owners, minlength=owners.max() + 1)
        grp = owners[reg]
        idx = greedy_select_grouped(boxes, rank, grp, (lv.k * n_reg[grp]) if lv.k > 0 else 0, lv.overlap, valid=valid)
    else:
        # k patches per REGION (per image at level 1, per level-1 patch at level 2)
        idx = greedy_select_grouped(boxes, rank, reg, lv.k, lv.overlap, valid=valid)
    return boxes[idx], rank[idx].astype(np.float32), reg[idx]


def _tile_level1(images, regions, maps, cfgs, backend):
    """Level-1 maps blended with maps stitched from overlapping tiles (config.level1_tiles)."""
    jobs, owners = [], []
    for ri, (i, x0, y0, x1, y1) in enumerate(regions):
        cfg = cfgs[i]
        if cfg.level1_tiles <= 0:
            continue
        h, w = y1 - y0, x1 - x0
        t = int(round(cfg.level1_tiles * max(cfg.levels[0].sizes)))
        t = min(t, h, w)
        if t >= max(h, w):
            continue
        tiles = candidate_grid(h, w, t, max(t // 2, 1), cover_border=True)
        for tb in tiles:
            jobs.append(np.ascontiguousarray(images[i][y0 + tb[1]:y0 + tb[3], x0 + tb[0]:x0 + tb[2]]))
            owners.append((ri, tb))
    if not jobs:
        return maps
    tile_maps = backend.predict_batch(jobs)
    acc = {ri: np.zeros_like(maps[ri]) for ri, _ in owners}
    cnt = {ri: np.zeros_like(maps[ri]) for ri, _ in owners}
    for (ri, tb), tm in zip(owners, tile_maps):
        tm = _as_map(tm, (tb[3] - tb[1], tb[2] - tb[0]), getattr(backend, "name", "?"))
        acc[ri][tb[1]:tb[3], tb[0]:tb[2]] += tm
        cnt[ri][tb[1]:tb[3], tb[0]:tb[2]] += 1.0
    out = list(maps)
    for ri in acc:
        out[ri] = 0.5 * maps[ri] + 0.5 * acc[ri] / np.maximum(cnt[ri], 1.0)
    return out


def select_patches_batch(
    images: Sequence[np.ndarray], config: SelectionConfig, backend: SaliencyBackend, device=None
) -> list[Selection]:
    """Patch selection (thesis §3.1, Algorithm 2) for several images at once.

    For every level: saliency maps are predicted with ``backend.predict_batch`` for all
    regions of all images at once (whole images at level 1, every selected level-1 patch
    at level 2 -- the saliency is *recomputed* on the crop, §3.1.3), all candidates are
    scored with integral images, filtered with S_apv (Eq. 3.1) and greedily selected by
    S_id (Eq. 3.2) with the overlap rule, at most ``k`` per region.

    Args:
        images: list of (H_i, W_i, 3) uint8 RGB images (sizes may differ).
        config: a :class:`SelectionConfig`; scaled to each image's width inside.
        backend: a :class:`~mining.saliency.base.SaliencyBackend`.
        device: where candidates are scored; default: the backend's ``device``
            attribute if it has one (SimpleNet on CUDA -> the torch path of
            :func:`score_apv_id_torch`, batched over all regions of all images), else
            numpy on CPU. Results are identical either way.
    Returns:
        one :class:`Selection` per image, boxes ordered by level then selection order.
        An image smaller than the smallest level-1 patch gets one whole-frame patch
        (level 1, score 0). An image where no level-1 candidate passes the S_apv filter
        (e.g. a constant saliency map) gets an empty selection, as in Algorithm 2.
    Raises:
        ValueError: an image is not (H, W, 3) uint8, or the backend returns a map of the
            wrong shape.
    """
    images = list(images)
    for im in images:
        check_image(im)
    if device is None:
        device = getattr(backend, "device", None)
    n = len(images)
    cfgs = [config.scaled(im.shape[1], im.shape[0]) for im in images]
    out: list[Selection | None] = [None] * n
    per_image: list[list[tuple[np.ndarray, np.ndarray, int]]] = [[] for _ in range(n)]
    # level 1 inputs: whole images that can hold at least one level-1 patch
    active = []
    for i, (im, cfg) in enumerate(zip(images, cfgs)):
        h, w = im.shape[:2]
        if min(cfg.levels[0].sizes) > min(h, w):
            out[i] = _whole_frame(h, w)
        else:
            active.append(i)
    # region state: (image index, x0, y0, x1, y1)
    regions = [(i, 0, 0, images[i].shape[1], images[i].shape[0]) for i in active]
    nlev = len(config.levels)
    for li in range(nlev):
        if not regions:
            break
        bounds = []
        for (i, x0, y0, x1, y1) in regions:
            ctx = cfgs[i].context if li > 0 else 0.0
            if ctx > 0:
                H, W = images[i].shape[:2]
                mx, my = int(round(ctx * (x1 - x0))), int(round(ctx * (y1 - y0)))
                bounds.append((max(x0 - mx, 0), max(y0 - my, 0), min(x1 + mx, W), min(y1 + my, H)))
            else:
                bounds.append((x0, y0, x1, y1))
        crops = [np.ascontiguousarray(images[r[0]][b[1]:b[3], b[0]:b[2]]) for r, b in zip(regions, bounds)]
        maps = backend.predict_batch(crops)
        maps = [_as_map(m, c.shape[:2], getattr(backend, "name", "?")) for m, c in zip(maps, crops)]
        if li == 0:
            maps = _tile_level1(images, regions, maps, cfgs, backend)
        offsets = np.array([(b[0], b[1]) for b in bounds], np.int64)
        parents = np.array([r[1:] for r in regions], np.int64)
        # all images share the config's level structure; sizes may differ per image width
        boxes_l, scores_l, reg_l = [], [], []
        by_cfg: dict[tuple, list[int]] = {}
        for ri, r in enumerate(regions):
            by_cfg.setdefault(cfgs[r[0]].levels[li], []).append(ri)
        for lv, ris in by_cfg.items():
            cfg0 = cfgs[regions[ris[0]][0]]
            b, s, rr = _select_level(
                [maps[j] for j in ris], offsets[ris], parents[ris], lv, cfg0.margin, cfg0.cover_border, device,
                owners=np.array([regions[j][0] for j in ris], np.int64),
            )
            boxes_l.append(b)
            scores_l.append(s)
            reg_l.append(np.asarray(ris, np.int64)[rr] if len(rr) else rr)
        b = np.concatenate(boxes_l)
        s = np.concatenate(scores_l)
        rr = np.concatenate(reg_l)
        new_regions = []
        for j in range(len(b)):
            img_i = regions[rr[j]][0]
            per_image[img_i].append((b[j], s[j], li + 1))
            x0, y0, x1, y1 = (int(v) for v in b[j])
            new_regions.append((img_i, x0, y0, x1, y1))
        regions = new_regions
    for i in active:
        cfg = cfgs[i]
        emit = set(cfg.emit_levels) if cfg.emit_levels is not None else None
        items = [t for t in per_image[i] if emit is None or t[2] in emit]
        if not items:  # nothing passed the S_apv filter (e.g. a blank frame)
            out[i] = Selection(np.zeros((0, 4), np.int32), np.zeros(0, np.int8), np.zeros(0, np.float32))
            continue
        boxes = np.stack([t[0] for t in items]).astype(np.int32)
        scores = np.array([t[1] for t in items], np.float32)
        levels = np.array([t[2] for t in items], np.int8)
        # drop duplicates (the same level-2 box selected in two overlapping level-1 regions)
        _, first = np.unique(boxes, axis=0, return_index=True)
        keep = np.sort(first)
        out[i] = Selection(boxes[keep], levels[keep], scores[keep])
    return out  # type: ignore[return-value]


def select_patches(image: np.ndarray, config: SelectionConfig, backend: SaliencyBackend) -> Selection:
    """Select patches in one image (thesis §3.1, Algorithm 2; hierarchy §3.1.3).

    Args:
        image: (H, W, 3) uint8 RGB.
        config: a :class:`SelectionConfig` (e.g. ``get_preset("hierarchical-filtered")``),
            scaled to the image width inside.
        backend: saliency backend producing (H, W) float32 maps in [0, 1].
    Returns:
        a :class:`Selection`; boxes in image pixels, no duplicates. An image smaller than
        the smallest level-1 patch yields a single whole-frame patch at level 1.
    Raises:
        ValueError: image not (H, W, 3) uint8; backend map of the wrong shape.
    """
    return select_patches_batch([image], config, backend)[0]
