"""Boolean Map Saliency (Zhang & Sclaroff, ICCV 2013), weight-free.

Figure-ground "surroundedness": threshold each CIE-Lab channel at many levels; in every
resulting boolean map (and its complement), the connected regions that do not touch the
image border are *surrounded* and form an attention map. Each attention map is L2
normalised, which favours maps with a few compact surrounded regions (a sign, a car, an
animal) over maps where texture (foliage) activates everywhere. The mean over all maps,
blurred, is the saliency map.

Fully vectorised per boolean map (OpenCV connected components + numpy), no learned
weights. Returns (H, W) float32 in [0, 1] like every backend.
"""
from __future__ import annotations

import cv2
import numpy as np

from mining.saliency.base import SaliencyBackend, check_image, normalize_map, register_backend


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
