"""Weight-free OpenCV saliency backends (cv2.saliency from opencv-contrib)."""
from __future__ import annotations

import cv2
import numpy as np

from mining.saliency.base import SaliencyBackend, check_image, normalize_map, register_backend


class _OpenCVStatic(SaliencyBackend):
    weight_free = True
    _factory = None

    def __init__(self, work_size: int = 256):
        """Args: work_size: side in pixels of the square resize the map is computed on
        (the thesis' SimpleNet works at 256x256, §2.2.1)."""
        self.work_size = int(work_size)
        self._algo = self._factory()

    def predict(self, image: np.ndarray) -> np.ndarray:
        check_image(image)
        h, w = image.shape[:2]
        small = cv2.resize(image, (self.work_size, self.work_size), interpolation=cv2.INTER_AREA)
        ok, sal = self._algo.computeSaliency(cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
        if not ok:
            raise RuntimeError(f"{self.name}: cv2 computeSaliency failed")
        sal = cv2.resize(np.asarray(sal, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        return normalize_map(sal)


@register_backend("spectral-residual")
class SpectralResidual(_OpenCVStatic):
    """Hou & Zhang 2007 spectral residual saliency (cv2.saliency.StaticSaliencySpectralResidual)."""

    _factory = staticmethod(lambda: cv2.saliency.StaticSaliencySpectralResidual_create())


@register_backend("fine-grained")
class FineGrained(_OpenCVStatic):
    """Montabone & Soto 2010 fine-grained saliency (cv2.saliency.StaticSaliencyFineGrained)."""

    _factory = staticmethod(lambda: cv2.saliency.StaticSaliencyFineGrained_create())
