"""Boolean Map Saliency (Zhang & Sclaroff, ICCV 2013), weight-free.

Figure-ground "surroundedness": threshold each CIE-Lab channel at many levels; in every
resulting boolean map (and its complement), the connected regions that do not touch the
image border are *surrounded* and form an attention map. Each attention map is L2
normalised, which favours maps with a few compact surrounded regions (a sign, a car, an
animal) over maps where texture (foliage) activates everywhere. The mean over all maps,
blurred, is the saliency map.

Fully vectorised per boolean map (OpenCV connected components + numpy), no learned
weights. Returns (H, W) float32 in [0, 1] like every backend.

Device path (:meth:`BooleanMapSaliency.predict_tensors`, issue 13): the same map as batched
torch ops, with the 96 connected-component passes per image replaced by six grey
reconstructions that give every threshold's surrounded regions at once (exact; see
:mod:`mining.saliency.torch_ops`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

from mining.saliency.base import SaliencyBackend, check_image, normalize_map, register_backend

if TYPE_CHECKING:  # pragma: no cover
    import torch


def _surrounded(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` (uint8 0/1) in connected regions that do not touch the border."""
    n, labels = cv2.connectedComponents(mask, connectivity=4)
    if n <= 1:
        return np.zeros(mask.shape, bool)
    border = np.zeros(n, bool)
    border[labels[0, :]] = True
    border[labels[-1, :]] = True
    border[labels[:, 0]] = True
    border[labels[:, -1]] = True
    border[0] = True  # background of the mask
    return ~border[labels]


def boolean_map_saliency(
    image: np.ndarray, step: int = 8, dilate: int = 3, opening: int = 3, channel_weights=(1.0, 1.0, 1.0)
) -> np.ndarray:
    """BMS map of an (h, w, 3) uint8 RGB image at its own resolution (unnormalised float32).

    Args:
        step: threshold step on each 8-bit Lab channel (levels step/2, 3*step/2, ...).
        dilate: side in px of the square dilation applied to each attention map (0 = none).
        opening: side in px of the morphological opening of each boolean map (0 = none),
            which removes one-pixel noise and thin links to the border.
        channel_weights: weights of the L, a, b channels.
    """
    lab = cv2.cvtColor(image, cv2.COLOR_RGB2Lab)  # uint8, every channel in [0, 255]
    h, w = lab.shape[:2]
    acc = np.zeros((h, w), np.float32)
    k_open = cv2.getStructuringElement(cv2.MORPH_RECT, (opening, opening)) if opening > 1 else None
    k_dil = cv2.getStructuringElement(cv2.MORPH_RECT, (dilate, dilate)) if dilate > 1 else None
    for c in range(3):
        ch = lab[..., c]
        lo, hi = int(ch.min()), int(ch.max())
        if hi - lo < 2:
            continue
        for t in range(lo + step // 2, hi, step):
            b = (ch > t).astype(np.uint8)
            for m in (b, 1 - b):
                if k_open is not None:
                    m = cv2.morphologyEx(m, cv2.MORPH_OPEN, k_open)
                a = _surrounded(m).astype(np.float32)
                if k_dil is not None:
                    a = cv2.dilate(a, k_dil)
                norm = float(np.sqrt((a * a).sum()))
                if norm > 0:
                    acc += (channel_weights[c] / norm) * a
    return acc


def boolean_map_saliency_torch(lab: "torch.Tensor", step: int = 8, dilate: int = 3, opening: int = 3,
                               channel_weights=(1.0, 1.0, 1.0), sizes=None) -> "torch.Tensor":
    """:func:`boolean_map_saliency` of a batch, as torch ops on the tensors' device.

    Args:
        lab: (N, 3, H, W) uint8 OpenCV 8-bit Lab images; image i occupies the top-left
            ``sizes[i]`` pixels of its canvas (the rest is padding and is ignored).
        step, dilate, opening, channel_weights: as :func:`boolean_map_saliency`
            (``dilate`` / ``opening`` odd or <= 1).
        sizes: (N, 2) int tensor of (h_i, w_i) pixels, or None (every image fills the canvas).
    Returns:
        (N, H, W) float32 unnormalised maps (0 in the padding), equal to the reference on each
        image's own h_i x w_i up to float rounding of the final sum.
    Raises:
        ValueError: even ``dilate`` / ``opening`` sizes (OpenCV anchors them off-centre).
    """
    import torch

    from mining.saliency import torch_ops as T

    for k in (dilate, opening):
        if k > 1 and k % 2 == 0:
            raise ValueError(f"the device path needs odd morphology sizes, got {k}")
    n, _, h, w = lab.shape
    dev = lab.device
    dt = torch.float32
    if sizes is None:
        sizes = torch.tensor([[h, w]] * n, device=dev)
    hh, ww = sizes[:, 0].view(n, 1, 1, 1), sizes[:, 1].view(n, 1, 1, 1)
    yy = torch.arange(h, device=dev).view(1, 1, h, 1)
    xx = torch.arange(w, device=dev).view(1, 1, 1, w)
    inside = (yy < hh) & (xx < ww)                                    # (N, 1, H, W)
    border = inside & ((yy == 0) | (xx == 0) | (yy == hh - 1) | (xx == ww - 1))
    lo = torch.where(inside, lab, 255).amin((2, 3)).to(dt)            # (N, 3) over the image only
    hi = torch.where(inside, lab, 0).amax((2, 3)).to(dt)
    nthr = len(range(step // 2, 255, step))
    thr = lo[..., None] + step // 2 + step * torch.arange(nthr, device=dev, dtype=dt)   # (N, 3, J)
    valid = (thr < hi[..., None]) & ((hi - lo) >= 2)[..., None]
    acc = torch.zeros((n, h, w), dtype=dt, device=dev)
    wts = torch.as_tensor(channel_weights, dtype=dt, device=dev)
    seeds = border.expand(n, 3, h, w).reshape(n * 3, h, w)
    # polarity 0: ch > t; polarity 1: ch <= t  <=>  (255 - ch) > 254 - t  (integer levels)
    for grey, t in ((lab, thr), (255 - lab, 254.0 - thr)):
        # grey levels stay uint8 (4x less memory traffic than float32): the morphology and the
        # reconstruction only take minima and maxima. Padding: 255 for the erosion and 0 for
        # the dilation, i.e. ignored like OpenCV's border, and 0 (never above a threshold) after.
        o = grey
        if opening > 1:
            o = torch.where(inside, T.erode(torch.where(inside, grey, 255), opening), 0)
            o = T.dilate(o, opening, 0)
        o = torch.where(inside, o, 0)
        r = T.border_reconstruction(o.reshape(n * 3, h, w), seeds=seeds).view(n, 3, h, w)
        tt = t.to(torch.int16)[..., None, None]                       # (N, 3, J, 1, 1)
        sur = ((o[:, :, None] > tt) & (r[:, :, None] <= tt)).to(torch.uint8)   # (N, 3, J, H, W)
        a = T.dilate(sur, dilate, 0) if dilate > 1 else sur
        a = (a & inside[:, :, None].to(torch.uint8)).to(dt)           # no spill into the padding
        norm = a.sum((3, 4)).sqrt()
        coef = torch.where(valid & (norm > 0), wts[None, :, None] / norm.clamp(min=1e-12), torch.zeros_like(norm))
        acc += torch.einsum("ncjhw,ncj->nhw", a, coef)
    return acc


@register_backend("boolean-map")
class BooleanMapSaliency(SaliencyBackend):
    """Boolean Map Saliency (Zhang & Sclaroff 2013) on CIE-Lab, weight-free.

    Args:
        work_size: longer side in pixels of the working resolution (the map is resized
            back to the input size).
        step: threshold step (8-bit levels).
        blur_frac: Gaussian blur sigma of the final map, fraction of the working long side.
    """

    weight_free = True

    def __init__(self, work_size: int = 256, step: int = 16, blur_frac: float = 0.02):
        self.work_size = int(work_size)
        self.step = int(step)
        self.blur_frac = float(blur_frac)

    def predict(self, image: np.ndarray) -> np.ndarray:
        check_image(image)
        h, w = image.shape[:2]
        if min(h, w) < 8:
            return np.zeros((h, w), np.float32)
        s = min(self.work_size, max(h, w)) / float(max(h, w))
        small = cv2.resize(image, (max(int(round(w * s)), 8), max(int(round(h * s)), 8)), interpolation=cv2.INTER_AREA)
        m = boolean_map_saliency(small, self.step)
        if self.blur_frac > 0:
            m = cv2.GaussianBlur(m, (0, 0), max(self.blur_frac * max(m.shape), 0.5))
        return normalize_map(cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR))

    device_native = True
    chunk_pixels = 1 << 22
    """Working-resolution canvas pixels per batch on CPU (x16 on CUDA), x 48 boolean maps in flight."""

    def predict_tensors(self, images):
        """Batched device path of :meth:`predict` (same maps up to float rounding).

        Args:
            images: (3, H_i, W_i) uint8 RGB tensors on one device.
        Returns:
            (H_i, W_i) float32 maps in [0, 1] on that device.
        """
        import torch

        from mining.saliency import torch_ops as T

        out, shapes = T.split_tiny(images)
        groups = []   # (h, w, hs, ws, sigma, indices): shapes that run on the device
        for (h, w), idx in shapes.items():
            hs, ws = T.working_size(h, w, min(self.work_size, max(h, w)))
            sigma = max(self.blur_frac * max(hs, ws), 0.5)
            if self.blur_frac > 0 and (int(round(sigma * 8 + 1)) | 1) // 2 >= min(hs, ws):
                host = super().predict_tensors([images[i] for i in idx])  # kernel wider than the map
                for i, m in zip(idx, host):
                    out[i] = m
                continue
            groups.append((h, w, hs, ws, sigma, idx))
        if not groups:
            return out
        # every shape's working image on ONE padded canvas: the iterative part (the grey
        # reconstructions) then runs once per chunk, not once per crop shape
        dev = images[groups[0][5][0]].device
        hp, wp = max(g[2] for g in groups), max(g[3] for g in groups)
        items = [(g, j) for g in groups for j in range(len(g[5]))]
        per = max(1, self.chunk_pixels * (16 if dev.type == "cuda" else 1) // (hp * wp))
        small = {}
        for g in groups:
            x = torch.stack([images[i] for i in g[5]])
            small[id(g)] = T.rgb_to_lab(T.resize_area(x, (g[2], g[3]), to_u8=True), "u8")
        for c in range(0, len(items), per):
            part = items[c:c + per]
            canvas = torch.zeros((len(part), 3, hp, wp), dtype=torch.uint8, device=dev)
            sizes = torch.tensor([[g[2], g[3]] for g, _ in part], device=dev)
            for k, (g, j) in enumerate(part):
                canvas[k, :, :g[2], :g[3]] = small[id(g)][j]
            maps = boolean_map_saliency_torch(canvas, self.step, sizes=sizes)
            by_group: dict = {}
            for k, (g, j) in enumerate(part):
                by_group.setdefault(id(g), (g, []))[1].append((k, j))
            for g, kj in by_group.values():
                h, w, hs, ws, sigma, idx = g
                m = maps[[k for k, _ in kj], :hs, :ws]
                if self.blur_frac > 0:
                    m = T.gaussian_blur(m, sigma)
                m = T.normalize_maps(T.resize_linear(m, (h, w)))
                for row, (_, j) in enumerate(kj):
                    out[idx[j]] = m[row]
        return out
