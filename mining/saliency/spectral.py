"""Weight-free saliency backends beyond OpenCV's defaults (improvements over the thesis).

Both are classical, training-free saliency models, vectorised with numpy FFTs / OpenCV
filters:

* ``spectral-residual-ms`` -- Hou & Zhang (CVPR 2007) spectral residual, computed on the
  three CIE-Lab channels (so colour contrast counts, not only luminance) and averaged over
  several working resolutions. OpenCV's ``StaticSaliencySpectralResidual`` always works
  on a 64 x 64 grey image, where a 30-px road sign of a 1360-px frame is about one pixel;
  the extra scales (128, 256 px) keep such objects visible.
* ``colour-contrast`` -- multi-scale centre-surround colour contrast in CIE-Lab
  (in the spirit of Itti, Koch & Niebur 1998 and Achanta et al.'s frequency-tuned
  saliency, CVPR 2009): for several centre/surround Gaussian scales, the Lab distance
  between a pixel's neighbourhood and its surround, plus the global distance to the mean
  colour; summed and normalised.

Both return (H, W) float32 maps in [0, 1] like every backend (:mod:`mining.saliency.base`).

``spectral-residual-ms`` also has a batched device path (:meth:`predict_tensors`, issue 13):
the same steps as torch ops (Lab by OpenCV's own table, INTER_AREA as matrix products, FFTs
in float64 like numpy's), equal to the reference up to float rounding.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

from mining.saliency.base import SaliencyBackend, check_image, normalize_map, register_backend

if TYPE_CHECKING:  # pragma: no cover
    import torch


def _lab(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> float32 CIE-Lab with L in [0, 100], a/b roughly [-128, 127]."""
    return cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)


def _resize_long(img: np.ndarray, long_side: int) -> np.ndarray:
    h, w = img.shape[:2]
    s = long_side / float(max(h, w))
    nw, nh = max(int(round(w * s)), 8), max(int(round(h * s)), 8)
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    return cv2.resize(img, (nw, nh), interpolation=interp)


def spectral_residual_map(channels: np.ndarray, blur_frac: float = 0.03) -> np.ndarray:
    """Spectral residual saliency (Hou & Zhang 2007) of a (h, w, C) float image, summed over C.

    For each channel: A = log|F|, R = A - box3x3(A), S = |F^-1(exp(R + i*phase))|^2,
    then a Gaussian blur of sigma ``blur_frac * max(h, w)`` pixels. The DC term F(0, 0)
    of the mean-free channel (rounding noise; see the comment in the code) is dropped, and
    its log amplitude in the box filter is the mean of its three spectral neighbours.

    Returns:
        (h, w) float32, not normalised.
    """
    x = channels.astype(np.float32)
    if x.ndim == 2:
        x = x[..., None]
    x = x - x.mean(axis=(0, 1), keepdims=True)
    f = np.fft.fft2(x, axes=(0, 1))
    # The DC term of a mean-free image is float rounding noise (|F(0, 0)| ~ 1e-3 from a
    # float32 mean), and its log leaks into the residual of the lowest frequencies through
    # the 3x3 box filter: the map then depends on the summation order of the mean. Its log
    # amplitude is replaced below by the mean of its three neighbours in the spectrum, and
    # the term itself is dropped from the reconstruction (the image is mean-free: its true
    # DC is 0, and the noise's phase would add a random constant), so the map is a function
    # of the image alone (and the device path can match it).
    f[0, 0] = 0
    amp = np.abs(f)
    log_a = np.log(amp + 1e-8).astype(np.float32)
    if min(log_a.shape[:2]) > 1:
        log_a[0, 0] = (log_a[0, 1] + log_a[1, 0] + log_a[1, 1]) / np.float32(3)
    resid = log_a - cv2.blur(log_a, (3, 3), borderType=cv2.BORDER_REFLECT)
    phase = f / (amp + 1e-8)
    s = np.abs(np.fft.ifft2(np.exp(resid) * phase, axes=(0, 1))) ** 2
    s = s.sum(axis=2).astype(np.float32)
    sigma = max(blur_frac * max(s.shape), 0.8)
    return cv2.GaussianBlur(s, (0, 0), sigma)


@register_backend("spectral-residual-ms")
class MultiScaleSpectralResidual(SaliencyBackend):
    """Colour (Lab) spectral residual averaged over several working resolutions.

    Args:
        scales: longer side in pixels of each working resolution (never above the input's).
        blur_frac: Gaussian blur sigma as a fraction of the working long side.
    """

    weight_free = True

    def __init__(self, scales: tuple[int, ...] = (64, 128, 256), blur_frac: float = 0.03):
        self.scales = tuple(int(s) for s in scales)
        self.blur_frac = float(blur_frac)

    def predict(self, image: np.ndarray) -> np.ndarray:
        check_image(image)
        h, w = image.shape[:2]
        if min(h, w) < 8:
            return np.zeros((h, w), np.float32)
        lab = _lab(image)
        acc = np.zeros((h, w), np.float32)
        used = 0
        for s in self.scales:
            s = min(s, max(h, w))
            small = _resize_long(lab, s)
            m = spectral_residual_map(small, self.blur_frac)
            m = normalize_map(m)
            acc += cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
            used += 1
        return normalize_map(acc / max(used, 1))

    device_native = True

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
        for (h, w), idx in shapes.items():
            x = torch.stack([images[i] for i in idx])
            try:
                lab = T.rgb_to_lab(x, "f32")
                acc = None
                for s in self.scales:
                    hs, ws = T.working_size(h, w, min(s, max(h, w)))
                    small = T.resize_area(lab, (hs, ws)) if (hs, ws) != (h, w) else lab
                    m = T.normalize_maps(spectral_residual_torch(small, self.blur_frac))
                    m = T.resize_linear(m, (h, w))
                    acc = m if acc is None else acc + m
                m = T.normalize_maps(acc / len(self.scales))
            except ValueError:  # a map too small for its blur kernel: the host path
                m = torch.stack(super().predict_tensors([images[i] for i in idx]))
            for j, i in enumerate(idx):
                out[i] = m[j]
        return out


def spectral_residual_torch(x: "torch.Tensor", blur_frac: float = 0.03) -> "torch.Tensor":
    """:func:`spectral_residual_map` of a batch: (N, C, h, w) float32 -> (N, h, w) float32.

    FFTs in float64 (numpy's ``fft2`` promotes float32 to complex128), on the tensors' device.

    Raises:
        ValueError: the Gaussian kernel is wider than the map (see ``torch_ops.gaussian_blur``).
    """
    import torch

    from mining.saliency import torch_ops as T

    x = x - x.mean(dim=(2, 3), keepdim=True)
    f = torch.fft.fft2(x.double())
    f[..., 0, 0] = 0  # as the reference (see spectral_residual_map)
    amp = f.abs()
    log_a = torch.log(amp + 1e-8).float()
    if min(log_a.shape[-2:]) > 1:  # as the reference: the DC term of a mean-free image is rounding noise
        log_a[..., 0, 0] = (log_a[..., 0, 1] + log_a[..., 1, 0] + log_a[..., 1, 1]) / 3
    resid = log_a - T.box3(log_a)
    phase = f / (amp + 1e-8)
    s = torch.fft.ifft2(torch.exp(resid).double() * phase).abs() ** 2
    s = s.sum(1).float()
    sigma = max(blur_frac * max(s.shape[-2:]), 0.8)
    return T.gaussian_blur(s, sigma)


@register_backend("colour-contrast")
class ColourContrast(SaliencyBackend):
    """Multi-scale centre-surround colour contrast in CIE-Lab (weight-free).

    saliency = sum over (centre sigma c, surround sigma s) of ||G_c * Lab - G_s * Lab||
    + ||G_c * Lab - mean(Lab)||, computed at a working resolution whose longer side is
    ``work_size`` pixels, then normalised to [0, 1].

    Args:
        work_size: longer side in pixels of the working resolution.
        centre_surround: (centre, surround) Gaussian sigmas as fractions of the working
            long side.
        chroma_weight: weight of the a/b (colour) channels relative to L (lightness).
    """

    weight_free = True

    def __init__(
        self,
        work_size: int = 256,
        centre_surround: tuple[tuple[float, float], ...] = ((0.004, 0.03), (0.008, 0.06), (0.016, 0.12)),
        chroma_weight: float = 2.0,
    ):
        self.work_size = int(work_size)
        self.centre_surround = tuple((float(c), float(s)) for c, s in centre_surround)
        self.chroma_weight = float(chroma_weight)

    def predict(self, image: np.ndarray) -> np.ndarray:
        check_image(image)
        h, w = image.shape[:2]
        if min(h, w) < 8:
            return np.zeros((h, w), np.float32)
        lab = _resize_long(_lab(image), min(self.work_size, max(h, w)))
        lab[..., 1:] *= self.chroma_weight
        long_side = max(lab.shape[:2])
        acc = np.zeros(lab.shape[:2], np.float32)
        mean = lab.reshape(-1, 3).mean(axis=0)
        for c, s in self.centre_surround:
            centre = cv2.GaussianBlur(lab, (0, 0), max(c * long_side, 0.5))
            surround = cv2.GaussianBlur(lab, (0, 0), max(s * long_side, 1.0))
            acc += np.linalg.norm(centre - surround, axis=2)
        centre = cv2.GaussianBlur(lab, (0, 0), max(self.centre_surround[0][0] * long_side, 0.5))
        acc += 0.5 * np.linalg.norm(centre - mean, axis=2)
        return normalize_map(cv2.resize(acc, (w, h), interpolation=cv2.INTER_LINEAR))

