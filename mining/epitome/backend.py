"""The ``epitome`` saliency backend and per-box novelty (issue 14).

The saliency map of an image is the per-pixel negative log-likelihood of the K x K
working-resolution patch around each pixel under an epitome trained on the fleet's own
frames (the normaliser of Eq. 5, :meth:`mining.epitome.model.Epitome.nll_map`), resized to
the image and min-max normalised to [0, 1]: what the epitome explains badly is what is
rare in the fleet's data.

The *novelty* of a selected patch is the mean of the same NLL map (raw nats per K x K
patch, not normalised, so it is comparable across frames and nights) inside the patch's
box, computed on the full frame's map with an integral image.

Which model: ``EpitomeSaliency(model=...)`` takes a path / URI or an :class:`Epitome`;
without one it reads env ``MINING_EPITOME`` (set by the mining driver for its actors,
see :func:`mining.epitome.resolve.resolve_epitome`).
"""
from __future__ import annotations

import os
import hashlib
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch

from mining.epitome.model import Epitome, load_epitome
from mining.saliency.base import SaliencyBackend, check_image, register_backend
from mining.saliency.ensemble import Ensemble

ENV_EPITOME = "MINING_EPITOME"


@register_backend("epitome")
class EpitomeSaliency(SaliencyBackend):
    """Epitome NLL saliency: (H, W, 3) uint8 RGB -> (H, W) float32 in [0, 1].

    Args:
        model: an :class:`Epitome`, or a path / URI of a model file, or None for env
            ``MINING_EPITOME``.
        device: torch device for the maps (None: the tensors' device in
            :meth:`predict_tensors`; cuda when available for :meth:`predict`).
    Raises:
        ValueError: no model given and ``MINING_EPITOME`` unset (the message names
            ``--epitome`` and ``python -m jobs.train_epitome``).
        FileNotFoundError: the model file does not exist.
    """

    name = "epitome"
    weight_free = False
    device_native = True

    def __init__(self, model: "Epitome | str | os.PathLike | None" = None, device=None):
        if model is None:
            model = os.environ.get(ENV_EPITOME) or None
        if model is None:
            raise ValueError("the epitome backend needs a model: pass --epitome PATH (train one with "
                             "`python -m jobs.train_epitome --input SHARDS --out DIR`) or set MINING_EPITOME")
        if isinstance(model, Epitome):
            self.model, self.meta = model.eval(), {}
        else:
            self.model, self.meta = load_epitome(model)
        self.device = torch.device(device) if device is not None else None
        self._cache: OrderedDict = OrderedDict()  # content key -> raw map (CPU frames only)

    def _on(self, dev: torch.device) -> Epitome:
        if self.model.mu.device != dev:
            self.model = self.model.to(dev)
        return self.model

    CACHE_MAPS = 64
    """Working-resolution maps kept for reuse (about 70 KB each for a 1360 x 800 frame at scale 8)."""

    @staticmethod
    def _key(im: torch.Tensor):
        """Content key of a CPU frame (the selection's map and the novelty column then share one
        computation even though they see different tensor objects); None on other devices, where
        recomputing is cheaper than hashing through a device sync."""
        if im.device.type != "cpu":
            return None
        return tuple(im.shape), hashlib.blake2b(im.contiguous().numpy().tobytes(), digest_size=16).digest()

    @torch.no_grad()
    def nll_maps(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Raw NLL maps at the working resolution (nats per K x K patch).

        Args:
            images: (3, H_i, W_i) uint8 RGB tensors on one device.
        Returns:
            one (ceil(H_i/scale), ceil(W_i/scale)) float32 tensor per image, same device.
        """
        if not len(images):
            return []
        model = self._on(images[0].device)
        out = []
        for im in images:
            key = self._key(im)
            raw = self._cache.get(key) if key is not None else None
            if raw is None:
                raw = model.nll_map(im)
                if key is not None:
                    self._cache[key] = raw
                    while len(self._cache) > self.CACHE_MAPS:
                        self._cache.popitem(last=False)
            out.append(raw)
        return out

    @torch.no_grad()
    def predict_tensors(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Saliency maps of device-resident images (see the module docstring).

        Args:
            images: (3, H_i, W_i) uint8 RGB tensors on one device.
        Returns:
            (H_i, W_i) float32 maps in [0, 1] on that device.
        """
        from mining.saliency import torch_ops as T

        maps = []
        for im, raw in zip(images, self.nll_maps(images)):
            up = torch.nn.functional.interpolate(raw[None, None], size=tuple(im.shape[-2:]), mode="bilinear",
                                                 align_corners=False)[0]
            maps.append(T.normalize_maps(up)[0])
        return maps

    def predict(self, image: np.ndarray) -> np.ndarray:
        check_image(image)
        dev = self.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).to(dev)
        return self.predict_tensors([t])[0].cpu().numpy().astype(np.float32)

    @torch.no_grad()
    def box_novelty(self, image: torch.Tensor, boxes: np.ndarray) -> np.ndarray:
        """Mean raw NLL inside each box (the ``novelty`` column).

        Args:
            image: (3, H, W) uint8 RGB tensor, native pixels (the full frame).
            boxes: (M, 4) x0, y0, x1, y1 in native pixels, x1/y1 exclusive.
        Returns:
            (M,) float32 novelty in nats per K x K working-resolution patch.
        """
        raw = self.nll_maps([image])[0]
        return box_means(raw.double().cpu().numpy(), np.asarray(boxes, np.float64).reshape(-1, 4),
                         self.model.spec.scale, image.shape[-2:])


@register_backend("sr-bms-epitome")
class SpectralBooleanEpitome(Ensemble):
    """``sr-bms`` and ``epitome`` maps, weighted ``1 - EPITOME_WEIGHT`` / ``EPITOME_WEIGHT``
    (the weight chosen by cross-validated capture, benchmarks/capture_cv.py).

    Args:
        model: the epitome (path / URI / :class:`Epitome`; None: env ``MINING_EPITOME``).
        device: torch device for the epitome maps.
    Raises:
        ValueError, FileNotFoundError: as :class:`EpitomeSaliency`.
    """

    EPITOME_WEIGHT = 0.25
    members = (("sr-bms", 1.0 - EPITOME_WEIGHT, {}), ("epitome", EPITOME_WEIGHT, {}))

    def __init__(self, model=None, device=None):
        w = self.EPITOME_WEIGHT
        super().__init__((("sr-bms", 1.0 - w, {}), ("epitome", w, {"model": model, "device": device})))
        self.weight_free = False


def box_means(raw: np.ndarray, boxes: np.ndarray, scale: int, native_hw) -> np.ndarray:
    """Mean of a working-resolution map over native-pixel boxes, with an integral image.

    Args:
        raw: (h, w) float64 map at the working resolution.
        boxes: (M, 4) native-pixel boxes (x1/y1 exclusive).
        scale: native pixels per working pixel.
        native_hw: (H, W) of the native frame (for clipping).
    Returns:
        (M,) float32 means; a box smaller than one working pixel uses the pixel it lies in.
    """
    h, w = raw.shape
    ii = np.zeros((h + 1, w + 1))
    ii[1:, 1:] = raw.cumsum(0).cumsum(1)
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    x0 = np.clip(np.floor(b[:, 0] / scale), 0, w - 1).astype(int)
    y0 = np.clip(np.floor(b[:, 1] / scale), 0, h - 1).astype(int)
    x1 = np.clip(np.ceil(b[:, 2] / scale), x0 + 1, w).astype(int)
    y1 = np.clip(np.ceil(b[:, 3] / scale), y0 + 1, h).astype(int)
    s = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
    return (s / ((y1 - y0) * (x1 - x0))).astype(np.float32)


def find_epitome_member(backend) -> "EpitomeSaliency | None":
    """The backend itself, or the first ``epitome`` member of an ensemble, else None."""
    if isinstance(backend, EpitomeSaliency):
        return backend
    for b, _w in getattr(backend, "_members", ()):
        if isinstance(b, EpitomeSaliency):
            return b
    return None
