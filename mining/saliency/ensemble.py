"""Ensembles of saliency backends: the weighted mean of their normalised maps.

``sr-bms`` averages two complementary weight-free cues (an improvement beyond the thesis):

* ``spectral-residual-ms`` -- *spectral novelty*: what deviates from the image's smooth
  log-amplitude spectrum (small, distinct structures), colour and multi-scale;
* ``boolean-map`` -- *figure-ground surroundedness*: compact regions enclosed by their
  surround (objects rather than texture or sky).

Each alone misses objects the other finds (measured in benchmarks/RESULTS.md).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from mining.saliency.base import SaliencyBackend, check_image, normalize_map, register_backend


class Ensemble(SaliencyBackend):
    """Weighted mean of several backends' maps, min-max normalised to [0, 1].

    Args:
        members: sequence of (backend name, weight, kwargs dict).
    Raises:
        KeyError: a member name is not registered.
    """

    weight_free = True
    members: tuple = ()

    def __init__(self, members: Sequence[tuple[str, float, dict]] | None = None):
        from mining.saliency.base import get_backend

        spec = tuple(members) if members is not None else self.members
        if not spec:
            raise ValueError("an ensemble needs at least one member")
        self._members = [(get_backend(n, **(kw or {})), float(w)) for n, w, kw in spec]
        self.weight_free = all(b.weight_free for b, _ in self._members)

    def predict(self, image: np.ndarray) -> np.ndarray:
        check_image(image)
        acc = np.zeros(image.shape[:2], np.float32)
        for b, w in self._members:
            acc += w * b.predict(image)
        return normalize_map(acc)

    @property
    def device_native(self) -> bool:  # type: ignore[override]
        return all(b.device_native for b, _ in self._members)

    def predict_tensors(self, images):
        """Weighted mean of the members' device maps, min-max normalised (see :meth:`predict`).

        Args:
            images: (3, H_i, W_i) uint8 RGB tensors on one device.
        Returns:
            (H_i, W_i) float32 maps in [0, 1] on that device.
        """
        from mining.saliency import torch_ops as T

        if not len(images):
            return []
        acc = None
        for b, w in self._members:
            maps = b.predict_tensors(images)
            acc = [w * m for m in maps] if acc is None else [a + w * m for a, m in zip(acc, maps)]
        return [T.normalize_maps(a[None])[0] for a in acc]


@register_backend("sr-bms")
class SpectralBooleanEnsemble(Ensemble):
    """Mean of ``spectral-residual-ms`` and ``boolean-map`` (weights 0.5 / 0.5)."""

    members = (("spectral-residual-ms", 0.5, {}), ("boolean-map", 0.5, {}))
