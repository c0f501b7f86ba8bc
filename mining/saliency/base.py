"""The one small interface every saliency / patch-ranking backend implements.

A backend turns an RGB image into a *saliency map*: a float32 array of shape
(H, W) with values in [0, 1], the same H and W as the input image. The single
candidate-box selector in :mod:`mining.selection` consumes these maps, whether
they come from OpenCV spectral residual, SimpleNet (thesis §2.2.1) or a learned
patch ranker such as LTRP (its token scores rendered as a map).

Backends are named in the one registry, :mod:`mining.registry` (lazy entry points; see its
docstring for why); :func:`register_backend`, :func:`get_backend` and
:func:`available_backends` are re-exported here for the backend modules and old callers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from mining.registry import available_backends, get_backend, register_backend  # noqa: F401  (re-exported)

if TYPE_CHECKING:  # pragma: no cover
    import torch


class SaliencyBackend:
    """Base class: image (H, W, 3) uint8 RGB -> saliency map (H, W) float32 in [0, 1].

    Subclasses implement :meth:`predict`; :meth:`predict_batch` may be
    overridden to batch on a device (the default loops).

    Attributes:
        name: registry name, recorded in the output metadata.
        weight_free: True when the backend needs no learned weights.
    """

    name: str = "base"
    weight_free: bool = True
    device_native: bool = False
    """True when :meth:`predict_tensors` runs on the tensors' own device (no host round trip)."""

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Saliency map of one image.

        Args:
            image: (H, W, 3) uint8 RGB, H, W >= 1 pixels.
        Returns:
            (H, W) float32 in [0, 1].
        Raises:
            ValueError: if ``image`` is not (H, W, 3) uint8.
        """
        raise NotImplementedError

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Saliency maps of several images (each may have its own size).

        Returns one (H_i, W_i) float32 map in [0, 1] per input image.
        """
        return [self.predict(im) for im in images]

    def predict_tensors(self, images: Sequence["torch.Tensor"]) -> list["torch.Tensor"]:
        """Saliency maps of device-resident images: the entry point of the device selector.

        Args:
            images: (3, H_i, W_i) uint8 RGB tensors (views are fine), all on one device.
        Returns:
            one (H_i, W_i) float32 tensor in [0, 1] per image, on the images' device.

        The default is a host round trip through :meth:`predict_batch` (for the OpenCV-only
        backends); backends with a torch implementation override it and set
        ``device_native = True``.
        """
        import torch

        if not len(images):
            return []
        dev = images[0].device
        host = [np.ascontiguousarray(t.permute(1, 2, 0).cpu().numpy()) for t in images]
        return [torch.from_numpy(np.asarray(m, np.float32)).to(dev) for m in self.predict_batch(host)]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.predict(image)


def check_image(image: np.ndarray) -> None:
    """Raise ValueError unless ``image`` is an (H, W, 3) uint8 array with H, W >= 1."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"expected an (H, W, 3) uint8 RGB image, got {getattr(image, 'shape', type(image))} "
            f"{getattr(image, 'dtype', '')}"
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"empty image of shape {image.shape}")


def normalize_map(sal: np.ndarray) -> np.ndarray:
    """Min-max normalise a map to float32 [0, 1]; a constant map becomes all zeros."""
    sal = np.asarray(sal, dtype=np.float32)
    lo, hi = float(sal.min()), float(sal.max())
    if hi - lo < 1e-12:
        return np.zeros_like(sal, dtype=np.float32)
    return (sal - lo) / (hi - lo)
