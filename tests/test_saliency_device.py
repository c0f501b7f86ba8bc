"""The device path of the weight-free saliency backends equals the OpenCV/numpy reference.

Every torch op of ``mining.saliency.torch_ops`` is checked against the OpenCV call it
replaces, and the backends' ``predict_tensors`` against their ``predict`` (issue 13 parity).
Runs on CPU here; the same code runs on CUDA.
"""
from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch

from mining.saliency import torch_ops as T
from mining.saliency.base import get_backend
from mining.saliency.bms import _surrounded
from mining.saliency.spectral import spectral_residual_map

from conftest import gtsdb_images

# CPU here and in CI; benchmarks/gpu_check.sh runs the same tests with MINING_TEST_DEVICE=cuda
DEV = torch.device(os.environ.get("MINING_TEST_DEVICE", "cpu"))


# --- the test oracle's second opinion: a binary flood fill by run propagation (a pixel run of a
# row or column is reached as soon as any of its pixels is), exact 4-connectivity
def _run_ids(m: torch.Tensor) -> torch.Tensor:
    """Id of the horizontal pixel run of every pixel of (M, H, W) bool masks (0 outside)."""
    start = m.clone()
    start[..., 1:] &= ~m[..., :-1]
    ids = torch.cumsum(start.reshape(-1), 0, dtype=torch.int64).view(m.shape)
    return ids * m


def border_reach(m: torch.Tensor, max_passes: int = 10_000) -> torch.Tensor:
    """Pixels of (M, H, W) bool masks 4-connected inside the mask to the image border.

    Equals the union of the ``cv2.connectedComponents(connectivity=4)`` components that touch
    the border (see the module docstring for the run-propagation fill).

    Returns:
        (M, H, W) bool.
    """
    hid = _run_ids(m)
    vid = _run_ids(m.transpose(1, 2).contiguous()).transpose(1, 2)
    reach = torch.zeros_like(m)
    reach[:, 0, :] = m[:, 0, :]
    reach[:, -1, :] = m[:, -1, :]
    reach[:, :, 0] |= m[:, :, 0]
    reach[:, :, -1] |= m[:, :, -1]
    hflat, vflat = hid.reshape(-1), vid.reshape(-1)
    nh, nv = int(hflat.max()) + 1, int(vflat.max()) + 1
    count = int(reach.sum())
    for _ in range(max_passes):
        hit = torch.zeros(nh, dtype=torch.uint8, device=m.device)
        hit.scatter_reduce_(0, hflat, reach.reshape(-1).to(torch.uint8), "amax")
        hit[0] = 0
        reach = hit[hid].bool()
        hit = torch.zeros(nv, dtype=torch.uint8, device=m.device)
        hit.scatter_reduce_(0, vflat, reach.reshape(-1).to(torch.uint8), "amax")
        hit[0] = 0
        reach = hit[vid].bool()
        new = int(reach.sum())
        if new == count:
            break
        count = new
    return reach


def _scene(h=120, w=200, seed=0) -> np.ndarray:
    """A synthetic road-like frame: smooth gradient sky, noise, a few coloured blobs and rings."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([60 + 100 * yy / h, 80 + 60 * xx / w, 150 - 80 * yy / h], -1)
    img += rng.normal(0, 8, img.shape)
    for _ in range(6):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(3, max(4, min(14, h // 4)))
        d = np.hypot(yy - cy, xx - cx)
        col = rng.integers(0, 256, 3)
        img[d < r] = col
        img[(d > r + 2) & (d < r + 4)] = 255 - col  # a ring: a region surrounded by another
    return np.clip(img, 0, 255).astype(np.uint8)


def _t(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous().to(DEV)


def test_lab_tables_equal_opencv_on_random_colours():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    x = _t(img)[None]
    assert (T.rgb_to_lab(x, "u8")[0].permute(1, 2, 0).cpu().numpy() == cv2.cvtColor(img, cv2.COLOR_RGB2Lab)).all()
    ref = cv2.cvtColor(img.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)
    assert np.array_equal(T.rgb_to_lab(x, "f32")[0].permute(1, 2, 0).cpu().numpy(), ref)


@pytest.mark.parametrize("src,dst", [((800, 1360), (151, 256)), ((475, 475), (256, 256)), ((512, 512), (256, 256)),
                                     ((120, 200), (38, 64)), ((100, 9), (88, 8))])
def test_area_resize_equals_opencv(src, dst):
    img = _scene(*src, seed=2)
    x = _t(img)[None]
    out = T.resize_area(x, dst, to_u8=True)[0].permute(1, 2, 0).cpu().numpy()
    ref = cv2.resize(img, dst[::-1], interpolation=cv2.INTER_AREA)
    assert out.shape == ref.shape
    assert (out != ref).mean() < 1e-3 and np.abs(out.astype(int) - ref).max() <= 1
    f = img.astype(np.float32) / 3.0
    outf = T.resize_area(_t(f)[None], dst)[0].permute(1, 2, 0).cpu().numpy()
    assert np.abs(outf - cv2.resize(f, dst[::-1], interpolation=cv2.INTER_AREA)).max() < 1e-4


def test_filters_equal_opencv():
    rng = np.random.default_rng(3)
    m = rng.random((2, 40, 64)).astype(np.float32)
    x = torch.from_numpy(m).to(DEV)
    for sigma in (0.8, 1.92, 5.12):
        ref = np.stack([cv2.GaussianBlur(a, (0, 0), sigma) for a in m])
        assert np.abs(T.gaussian_blur(x, sigma).cpu().numpy() - ref).max() < 1e-5
    ref = np.stack([cv2.blur(a, (3, 3), borderType=cv2.BORDER_REFLECT) for a in m])
    assert np.abs(T.box3(x).cpu().numpy() - ref).max() < 1e-5
    ref = np.stack([cv2.resize(a, (200, 120), interpolation=cv2.INTER_LINEAR) for a in m])
    assert np.abs(T.resize_linear(x, (120, 200)).cpu().numpy() - ref).max() < 1e-5
    k = cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3))
    g = (m[0] * 255).round()
    assert np.array_equal(T.dilate(T.erode(x[:1] * 0 + torch.from_numpy(g).to(DEV), 3), 3, -3e38)[0].cpu().numpy(),
                          cv2.morphologyEx(g, cv2.MORPH_OPEN, k))
    with pytest.raises(ValueError):
        T.gaussian_blur(torch.zeros(1, 5, 5, device=DEV), 2.0)


def test_grey_reconstruction_gives_every_thresholds_surrounded_regions():
    """R > t is the border-connected part of O > t, for every t (vs cv2.connectedComponents)."""
    img = cv2.cvtColor(_scene(90, 150, seed=4), cv2.COLOR_RGB2Lab)
    ch = img[..., 1].astype(np.float32)
    o = torch.from_numpy(ch)[None].to(DEV)
    r = T.border_reconstruction(o)[0].cpu().numpy()
    n_sur = 0
    for t in range(int(ch.min()), int(ch.max())):
        mask = (ch > t).astype(np.uint8)
        ref = _surrounded(mask)
        assert np.array_equal((ch > t) & (r <= t), ref), t
        n_sur += ref.sum()
        if t % 16:
            continue
        # the binary flood fill agrees too
        reach = border_reach(torch.from_numpy(mask.astype(bool))[None].to(DEV))[0].cpu().numpy()
        assert np.array_equal(mask.astype(bool) & ~reach, ref)
    assert n_sur > 0  # the rings make surrounded regions: the check is not vacuous


def test_spectral_residual_map_is_a_function_of_the_image():
    """The zeroed DC term: a constant offset (other float rounding of the mean) keeps the map."""
    lab = cv2.cvtColor(_scene(60, 100, seed=5).astype(np.float32) / 255, cv2.COLOR_RGB2Lab)
    a = spectral_residual_map(lab)
    b = spectral_residual_map(lab + np.float32(37.3))
    assert np.abs(a - b).max() / a.max() < 1e-3


@pytest.mark.parametrize("name", ["spectral-residual-ms", "boolean-map", "sr-bms"])
def test_predict_tensors_equals_predict_on_synthetic_frames(name):
    b = get_backend(name)
    assert b.device_native
    imgs = [_scene(120, 200, seed=6), _scene(120, 200, seed=7), _scene(97, 64, seed=8), _scene(8, 30, seed=9),
            _scene(5, 40, seed=10)]
    ref = b.predict_batch(imgs)
    out = b.predict_tensors([_t(i) for i in imgs])
    for o, r in zip(out, ref):
        assert o.dtype == torch.float32 and tuple(o.shape) == r.shape
        assert np.abs(o.cpu().numpy() - r).max() < 1e-4
    assert float(ref[0].std()) > 0.05  # non-trivial maps


def test_sr_bms_device_maps_equal_reference_on_a_real_frame():
    path = gtsdb_images(1)[0]
    img = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    b = get_backend("sr-bms")
    crops = [img, np.ascontiguousarray(img[400:800, 1000:1360])]
    ref = b.predict_batch(crops)
    out = b.predict_tensors([_t(c) for c in crops])
    for o, r in zip(out, ref):
        # INTER_AREA's float rounding flips about 1 pixel in 1e5 by one level (module docstring),
        # which moves a boolean map's edge there: a local difference of a few 1e-4
        assert np.abs(o.cpu().numpy() - r).max() < 2e-3
        assert np.abs(o.cpu().numpy() - r).mean() < 1e-5


def test_default_selection_end_to_end_same_boxes_on_a_real_frame():
    """The mining default (hierarchical-pooled + sr-bms) through the device path (device-native
    saliency maps + the torch selector) picks exactly the reference's boxes on a real frame."""
    from mining.select_device import select_frames
    from mining.selection import DEFAULT_PRESET, DEFAULT_SALIENCY, get_preset

    path = gtsdb_images(2)[1]
    img = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    cfg, b = get_preset(DEFAULT_PRESET), get_backend(DEFAULT_SALIENCY)
    ref = select_frames([_t(img).cpu()], cfg, b, impl="numpy")[0]
    dev = select_frames([_t(img)], cfg, b, impl="torch")[0]
    assert len(ref.boxes) == 35
    assert np.array_equal(ref.boxes, dev.boxes) and np.array_equal(ref.levels, dev.levels)
    assert np.abs(ref.scores - dev.scores).max() < 1e-4
