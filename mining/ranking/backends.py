"""``ltrp`` and ``kpp`` saliency backends: learned / training-free patch ranking as score maps.

Both turn each image (or level-1 window of the selection hierarchy) into one
square view (resize to ``img_size``, 224 px), pick tokens on its ``g x g``
grid (14 x 14), and render a map for the single candidate-box selector
(:mod:`mining.selection`):

* ``ltrp``: ranking-model scores of all tokens (LTRP §3.3), keep ``k`` tokens =
  ``k - h`` best-ranked + ``h = 0.2 k`` homogeneous ones from DPC-KNN clusters
  (§3.4, Tab. 1e);
* ``kpp``: greedy MAE-reconstruction selection of ``k = ratio * L`` tokens (KPP
  Appendix B).

Map values: a kept token gets ``0.5 + 0.5 * q`` where ``q`` in [0, 1] is its
rank quality (LTRP: rank of its score among all L tokens; KPP: selection
order, first = 1), every other token 0; the ``g x g`` grid is upsampled to the
input size with nearest-neighbour interpolation (token-exact boundaries).

Torch and timm are imported only when a backend is constructed, so importing
:mod:`mining.ranking` stays cheap.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from mining.saliency.base import SaliencyBackend, check_image, register_backend

ENV_LTRP_CHECKPOINT = "MINING_LTRP_CHECKPOINT"
ENV_MAE_CHECKPOINT = "MINING_MAE_CHECKPOINT"
ENV_RANKER_ARCH = "MINING_RANKER_ARCH"
ENV_MAE_ARCH = "MINING_MAE_ARCH"
ENV_RANDOM_INIT = "MINING_RANKER_RANDOM_INIT"
ENV_KPP_RATIO = "MINING_KPP_RATIO"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def resolve_device(device=None):
    """``torch.device``: the given one, else ``cuda`` when available, else ``cpu`` (TF32 enabled on cuda)."""
    import torch

    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere+; fp32 elsewhere
        torch.backends.cudnn.allow_tf32 = True
    return dev


def images_to_views(images: Sequence[np.ndarray], size: int, device):
    """Stack RGB uint8 images as one ``(B, 3, size, size)`` float32 ImageNet-normalised tensor.

    Each image is resized (aspect not kept) to ``size x size``: INTER_AREA when
    shrinking, bilinear when enlarging.

    Raises:
        ValueError: an image is not ``(H, W, 3)`` uint8.
    """
    import cv2
    import torch

    from mining.ranking.mae import IMAGENET_MEAN, IMAGENET_STD

    views = np.empty((len(images), size, size, 3), np.uint8)
    for i, im in enumerate(images):
        check_image(im)
        interp = cv2.INTER_AREA if min(im.shape[:2]) >= size else cv2.INTER_LINEAR
        views[i] = cv2.resize(np.ascontiguousarray(im), (size, size), interpolation=interp)
    x = torch.from_numpy(views).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def tensors_to_views(images, size: int, device):
    """Torch version of :func:`images_to_views` for device-resident ``(3, H, W)`` uint8 tensors.

    Images are batched by shape and resized to ``size x size`` on ``device`` as OpenCV does it
    in :func:`images_to_views`: INTER_AREA when shrinking (exact weights,
    :func:`mining.saliency.torch_ops.resize_area`), bilinear with ``align_corners=False``
    (INTER_LINEAR's sample positions; OpenCV's fixed-point rounding may differ by one
    level) when enlarging, rounded to uint8 levels; then scaled to [0, 1] and
    ImageNet-normalised.

    Returns:
        ``(B, 3, size, size)`` float32 tensor on ``device``.
    Raises:
        ValueError: an image is not a ``(3, H, W)`` uint8 tensor with H, W >= 1.
    """
    import torch
    import torch.nn.functional as F

    from mining.ranking.mae import IMAGENET_MEAN, IMAGENET_STD
    from mining.saliency import torch_ops as T

    for t in images:
        if not torch.is_tensor(t) or t.dim() != 3 or t.shape[0] != 3 or t.dtype != torch.uint8 or min(t.shape) < 1:
            raise ValueError(f"expected (3, H, W) uint8 tensors, got {tuple(getattr(t, 'shape', ()))}")
    x = torch.empty((len(images), 3, size, size), dtype=torch.float32, device=device)
    for (h, w), idx in T.group_by_shape(images).items():
        batch = torch.stack([images[i] for i in idx]).to(device)
        if min(h, w) >= size:
            v = T.resize_area(batch, (size, size), to_u8=True).float()
        else:
            v = F.interpolate(batch.float(), size=(size, size), mode="bilinear", align_corners=False)
            v = v.round_().clamp_(0, 255)
        x[torch.tensor(idx, device=device)] = v
    x.div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def render_token_map(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Upsample a ``(g, g)`` float token map to ``(height, width)`` float32 in [0, 1] (nearest)."""
    import cv2

    v = np.clip(np.asarray(values, np.float32), 0.0, 1.0)
    return cv2.resize(v, (int(width), int(height)), interpolation=cv2.INTER_NEAREST)


class _TokenBackend(SaliencyBackend):
    """Shared plumbing: batching on the device and rendering ``(g, g)`` token values."""

    weight_free = False
    img_size = 224
    batch_size = 64

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Score map of one image: ``(H, W, 3)`` uint8 RGB -> ``(H, W)`` float32 in [0, 1].

        Raises:
            ValueError: not an ``(H, W, 3)`` uint8 image.
        """
        return self.predict_batch([image])[0]

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Score maps of several images (sizes may differ), batched ``batch_size`` views per forward.

        Returns:
            one ``(H_i, W_i)`` float32 map in [0, 1] per image.
        """
        images = list(images)
        out: list[np.ndarray] = []
        for s in range(0, len(images), self.batch_size):
            chunk = images[s:s + self.batch_size]
            vals = self.token_values(chunk)
            out.extend(render_token_map(v, im.shape[0], im.shape[1]) for v, im in zip(vals, chunk))
        return out

    def token_values(self, images: Sequence[np.ndarray]) -> np.ndarray:  # pragma: no cover - abstract
        """``(B, g, g)`` float32 rendered token values in [0, 1]."""
        raise NotImplementedError

    def token_values_views(self, x):  # pragma: no cover - abstract
        """``(B, g, g)`` float32 token values in [0, 1] as a tensor on the device, from normalised views."""
        raise NotImplementedError

    device_native = True

    def predict_tensors(self, images):
        """Score maps of device-resident images, all in torch on the model's device (issue 13).

        :meth:`predict_batch` as torch ops: views by :func:`tensors_to_views`, token values by
        :meth:`token_values_views` (``batch_size`` views per forward), the ``g x g`` grid
        upsampled to each image's size with ``F.interpolate(mode="nearest")`` (OpenCV's
        INTER_NEAREST indices: token-exact boundaries, as :func:`render_token_map`). Equal to
        :meth:`predict_batch` for images of at least ``img_size`` px a side (INTER_AREA is
        exact); smaller ones are enlarged bilinearly, where OpenCV's fixed-point rounding can
        move a view pixel by one level and so the ranking of nearly tied tokens.

        Args:
            images: ``(3, H_i, W_i)`` uint8 RGB tensors (views are fine), all on one device.
        Returns:
            one ``(H_i, W_i)`` float32 tensor in [0, 1] per image, on the images' device.
        Raises:
            ValueError: an image is not a ``(3, H, W)`` uint8 tensor.
        """
        import torch
        import torch.nn.functional as F

        from mining.saliency import torch_ops as T

        images = list(images)
        if not images:
            return []
        with torch.inference_mode():
            vals = torch.cat([
                self.token_values_views(tensors_to_views(images[s:s + self.batch_size], self.img_size, self.device))
                for s in range(0, len(images), self.batch_size)
            ])
        vals = vals.float().clamp(0.0, 1.0)
        out = [None] * len(images)
        for (h, w), idx in T.group_by_shape(images).items():  # one upsampling per distinct shape
            sel = torch.tensor(idx, device=vals.device)
            up = F.interpolate(vals[sel][:, None], size=(h, w), mode="nearest")[:, 0]
            for i, m in zip(idx, up):
                out[i] = m.to(images[i].device)
        return out


@register_backend("ltrp")
class LTRPBackend(_TokenBackend):
    """LTRP learned patch ranking (Luo et al. 2024) as a saliency backend.

    Args:
        checkpoint: LTRP checkpoint path (official ``irsLu/ltrp`` layout or ``jobs.train_ltrp``
            output); default env ``MINING_LTRP_CHECKPOINT``.
        random_init: explicit opt-in to random weights (throughput only); default env
            ``MINING_RANKER_RANDOM_INIT=1``.
        arch: ``"vit_small_patch16_224"`` (default), ``"vit_tiny_patch16_224"`` or ``"tiny-test"``
            (random-init only; env ``MINING_RANKER_ARCH``). Ignored for checkpoints (shape is read from them).
        device: torch device; default cuda when available, else cpu.
        keep_ratio: ``k / L``, tokens kept per view (default 0.25 -> 49 of 196).
        homogeneous_ratio: ``h / k`` homogeneous tokens from DPC-KNN (Tab. 1e: 0.2).
        dpc_k: neighbours of the DPC-KNN density.
        batch_size: views per forward.
    Raises:
        ValueError: neither ``checkpoint`` nor ``random_init``; ratios out of range.
    """

    weight_free = False

    def __init__(self, checkpoint: str | None = None, random_init: bool = False, arch: str | None = None,
                 device=None, keep_ratio: float = 0.25, homogeneous_ratio: float = 0.2, dpc_k: int = 5,
                 batch_size: int = 64):
        from mining.ranking.ltrp import build_ranker

        checkpoint = checkpoint or os.environ.get(ENV_LTRP_CHECKPOINT) or None
        random_init = bool(random_init) or _env_flag(ENV_RANDOM_INIT)
        arch = arch or os.environ.get(ENV_RANKER_ARCH) or "vit_small_patch16_224"
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        if not 0.0 <= homogeneous_ratio < 1.0:
            raise ValueError(f"homogeneous_ratio must be in [0, 1), got {homogeneous_ratio}")
        self.device = resolve_device(device)
        self.model = build_ranker(arch, checkpoint=checkpoint, random_init=random_init).to(self.device).eval()
        self.img_size = self.model.cfg.img_size
        self.grid = self.model.cfg.grid
        self.keep = max(1, int(round(keep_ratio * self.model.num_patches)))
        self.homogeneous_ratio = float(homogeneous_ratio)
        self.dpc_k = int(dpc_k)
        self.batch_size = int(batch_size)
        self.random_weights = checkpoint is None
        self.arch = arch

    def scores(self, images: Sequence[np.ndarray]):
        """Raw ranking scores ``(B, L)`` float32 torch tensor on the device, plus the views."""
        import torch

        x = images_to_views(images, self.img_size, self.device)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
            s = self.model(x)
        return s.float(), x

    def token_values(self, images: Sequence[np.ndarray]) -> np.ndarray:
        x = images_to_views(images, self.img_size, self.device)
        return self.token_values_views(x).cpu().numpy()

    def token_values_views(self, x):
        """``(B, g, g)`` float32 tensor: kept tokens ``0.5 + 0.5 * rank quality``, others 0 (module docstring)."""
        import torch

        from mining.ranking.dpc_knn import select_tokens
        from mining.ranking.mae import patchify

        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.is_cuda):
            s = self.model(x)
        s = s.float()
        with torch.inference_mode():
            top, homog = select_tokens(s, patchify(x, self.model.cfg.patch_size), self.keep,
                                       self.homogeneous_ratio, self.dpc_k)
            n = s.shape[1]
            rank = torch.argsort(torch.argsort(s, dim=1, descending=True), dim=1).float()  # 0 = best
            q = 1.0 - rank / max(1, n - 1)
            vals = torch.where(top | homog, 0.5 + 0.5 * q, torch.zeros_like(q))
        return vals.reshape(-1, self.grid, self.grid).float()


@register_backend("kpp")
class KPPBackend(_TokenBackend):
    """KPP greedy key-patch selection (Xu et al. 2024) with a frozen MAE, as a saliency backend.

    Args:
        checkpoint / mae_checkpoint: official MAE "visualize" checkpoint path (``{"model": sd}``);
            default env ``MINING_MAE_CHECKPOINT``.
        random_init: explicit opt-in to random MAE weights; default env ``MINING_RANKER_RANDOM_INIT=1``.
        arch: MAE arch for random init: ``"mae_vit_base_patch16"`` (default) or ``"tiny-test"``
            (env ``MINING_MAE_ARCH``).
        device: torch device; default cuda when available.
        ratio: ``r``, the kept fraction of the 196 tokens (``--kpp-ratio``, default 0.25 -> 49);
            default env ``MINING_KPP_RATIO``.
        batch_size: views per call of :func:`~mining.ranking.kpp.kpp_select`.
        max_batch: rows per MAE forward (whole images; default: all views of a call).
    Raises:
        ValueError: no weights and no ``random_init``; ratio outside (0, 1].
    """

    weight_free = False

    def __init__(self, checkpoint: str | None = None, random_init: bool = False, arch: str | None = None,
                 device=None, ratio: float | None = None, mae_checkpoint: str | None = None,
                 batch_size: int = 8, max_batch: int | None = None):
        from mining.ranking.kpp import n_keep_for
        from mining.ranking.mae import build_mae

        checkpoint = mae_checkpoint or checkpoint or os.environ.get(ENV_MAE_CHECKPOINT) or None
        random_init = bool(random_init) or _env_flag(ENV_RANDOM_INIT)
        arch = arch or os.environ.get(ENV_MAE_ARCH) or "mae_vit_base_patch16"
        if ratio is None:
            ratio = float(os.environ.get(ENV_KPP_RATIO, "0.25"))
        self.device = resolve_device(device)
        self.mae = build_mae(arch, checkpoint=checkpoint, random_init=random_init).to(self.device)
        self.img_size = self.mae.cfg.img_size
        self.grid = self.mae.cfg.grid
        self.ratio = float(ratio)
        self.keep = n_keep_for(self.ratio, self.mae.num_patches)
        self.batch_size = int(batch_size)
        self.max_batch = max_batch
        self.random_weights = checkpoint is None
        self.arch = arch

    def token_values(self, images: Sequence[np.ndarray]) -> np.ndarray:
        import torch

        from mining.ranking.kpp import kpp_select

        x = images_to_views(images, self.img_size, self.device)
        with torch.inference_mode():
            order = kpp_select(self.mae, x, self.keep, max_batch=self.max_batch)  # (B, k)
        b, k = order.shape
        vals = np.zeros((b, self.mae.num_patches), np.float32)
        q = 1.0 - np.arange(k, dtype=np.float32) / max(1, k)
        np.put_along_axis(vals, order.cpu().numpy(), 0.5 + 0.5 * q[None, :], axis=1)
        return vals.reshape(b, self.grid, self.grid)

    def token_values_views(self, x):
        """``(B, g, g)`` float32 tensor on the device: i-th selected token ``0.5 + 0.5 * (1 - i / k)``, others 0."""
        import torch

        from mining.ranking.kpp import kpp_select

        with torch.inference_mode():
            order = kpp_select(self.mae, x, self.keep, max_batch=self.max_batch)  # (B, k)
            b, k = order.shape
            q = 1.0 - torch.arange(k, dtype=torch.float32, device=order.device) / max(1, k)
            vals = torch.zeros((b, self.mae.num_patches), dtype=torch.float32, device=order.device)
            vals.scatter_(1, order.long(), (0.5 + 0.5 * q)[None, :].expand(b, k).contiguous())
        return vals.reshape(b, self.grid, self.grid)
