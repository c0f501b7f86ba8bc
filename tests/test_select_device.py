"""The torch patch selector (mining/select_device.py) against the numpy reference.

Parity is the acceptance criterion: on the SAME saliency maps, ``select_patches_torch`` must
return exactly the boxes, levels and order of ``select_patches_batch`` (thesis §3.1,
Eq. 3.1/3.2, Algorithm 2, hierarchy §3.1.3), scores to float32 rounding.
"""
from __future__ import annotations

import hashlib
import os

import cv2
import numpy as np
import pytest
import torch

from mining.saliency.base import SaliencyBackend, check_image, get_backend
from mining.select_device import select_frames, select_patches_torch
from mining.select_device_greedy import (
    candidate_grid_torch,
    greedy_select_grouped_torch,
    integral_stack,
    numpy_mean_f32,
    score_apv_id,
)
from mining.selection import (
    PRESETS,
    LevelParams,
    candidate_grid,
    get_preset,
    greedy_select_grouped,
    score_apv,
    score_id,
    select_patches_batch,
)

_W = (np.float32(0.299), np.float32(0.587), np.float32(0.114))


class GreyMaps(SaliencyBackend):
    """Deterministic maps from the crop's content, bit-identical in numpy and torch.

    map = min-max normalised (grey / 255) ** 2 of the crop (zeros for a constant crop): only
    elementwise float32 operations in the same order, plus a min and a max (exact), so
    ``predict_batch`` and ``predict_tensors`` return the same values. Per-crop normalisation
    makes level-2 maps differ from the level-1 map (as with real backends).
    """

    name = "grey-test"

    def __init__(self):
        self.tensor_calls = []

    def predict(self, image):
        check_image(image)
        f = image.astype(np.float32)
        m = (f[..., 0] * _W[0] + f[..., 1] * _W[1]) + f[..., 2] * _W[2]
        m = m / np.float32(255.0)
        m = m * m
        lo, hi = m.min(), m.max()
        return np.zeros_like(m) if not hi > lo else (m - lo) / (hi - lo)

    def predict_tensors(self, images):
        self.tensor_calls.append(len(images))
        out = []
        for t in images:
            assert t.dtype == torch.uint8 and t.dim() == 3 and t.shape[0] == 3
            f = t.float()
            w = [torch.tensor(c, device=t.device) for c in _W]
            m = (f[0] * w[0] + f[1] * w[1]) + f[2] * w[2]
            m = m / torch.tensor(np.float32(255.0), device=t.device)
            m = m * m
            lo, hi = m.min(), m.max()
            out.append(torch.zeros_like(m) if not bool(hi > lo) else (m - lo) / (hi - lo))
        return out


class CachedMaps(SaliencyBackend):
    """Maps of an inner backend computed once per distinct crop (keyed by its pixels) and replayed.

    The numpy selector fills the cache through ``predict_batch``; the torch selector then
    reads the same maps through the default host round-trip ``predict_tensors``. ``misses``
    counts crops the second run asked for that the first did not (parity needs none).
    """

    name = "cached-test"

    def __init__(self, inner):
        self.inner, self.cache, self.frozen, self.misses = inner, {}, False, 0

    @staticmethod
    def key(im):
        return im.shape, hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest()

    def predict_batch(self, images):
        todo = [im for im in images if self.key(im) not in self.cache]
        if todo:
            self.misses += len(todo) if self.frozen else 0
            for im, m in zip(todo, self.inner.predict_batch(todo)):
                self.cache[self.key(im)] = np.asarray(m, np.float32)
        return [self.cache[self.key(im)] for im in images]


class HostRoundTrip(SaliencyBackend):
    """An inner backend's ``predict_batch`` behind the base class's host round-trip ``predict_tensors``
    (even when the inner backend has a device-native ``predict_tensors`` of its own)."""

    name = "host-round-trip-test"

    def __init__(self, inner):
        self.inner = inner

    def predict_batch(self, images):
        return self.inner.predict_batch(images)


def _frame(rng, h, w, flat=False):
    """Smooth random RGB field with a few bright discs; ``flat``: quantised into constant steps (ties)."""
    lo = rng.random((max(h // 48, 2), max(w // 48, 2), 3)).astype(np.float32)
    im = cv2.resize(lo, (w, h), interpolation=cv2.INTER_CUBIC) * 180.0
    for _ in range(4):
        cx, cy, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(3, max(4, h // 10)))
        cv2.circle(im, (cx, cy), r, (250.0, 240.0, 230.0), -1)
    if flat:
        im = np.floor(im / 64.0) * 64.0
    return np.clip(im, 0, 255).astype(np.uint8)


def _tie_frame(h, w):
    """Black frame with identical white squares on a lattice: a 0/1 map, exact integral sums, many exact ties."""
    im = np.zeros((h, w, 3), np.uint8)
    for y in range(40, h - 40, 111):
        for x in range(40, w - 40, 111):
            im[y:y + 30, x:x + 30] = 255
    return im


# CPU here and in CI; benchmarks/gpu_check.sh runs these with MINING_TEST_DEVICE=cuda
DEV = torch.device(os.environ.get("MINING_TEST_DEVICE", "cpu"))


def _t(images):
    return [torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1))).to(DEV) for im in images]


def _assert_same(ref, got, exact_scores=True):
    assert len(ref) == len(got)
    for i, (a, b) in enumerate(zip(ref, got)):
        assert a.boxes.dtype == b.boxes.dtype == np.int32 and b.levels.dtype == np.int8 and b.scores.dtype == np.float32
        assert np.array_equal(a.boxes, b.boxes), f"frame {i}: boxes differ\n{a.boxes}\n{b.boxes}"
        assert np.array_equal(a.levels, b.levels), f"frame {i}: levels differ"
        np.testing.assert_allclose(b.scores, a.scores, rtol=0, atol=0 if exact_scores else 1e-6)


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(7)
    return [
        _frame(rng, 360, 640),  # 640 px wide: level-1 149 px, level-2 75/37 px
        _frame(rng, 333, 501),  # not a multiple of any stride, another width = other scaled sizes
        _frame(rng, 20, 40),  # smaller than the smallest patch (32 px): whole-frame fallback
        _frame(rng, 360, 640, flat=True),  # constant steps: many exactly tied scores
        _frame(rng, 420, 760),
        _tie_frame(360, 640),  # tied scores: the index tie-break decides (region, size, row-major)
    ]


VARIANTS = [(name, {}) for name in PRESETS] + [
    ("hierarchical-pooled", {"level1_tiles": 1.5}),
    ("hierarchical-context", {"cover_border": True, "emit_levels": (2,)}),
    ("hierarchical-filtered", {"level1_rank": "apv", "level2_k": 0}),
    ("multisize-filtered", {"overlap": 1.0, "k": 12, "pooled": True}),
    ("hierarchical-pooled", {"level1_k": 9, "level1_overlap": 0.6, "level2_k": 2}),
    ("baseline-filtered", {"adaptive_apv": True, "apv_threshold": 1.2, "margin": 0.2}),
]


@pytest.mark.parametrize("name,overrides", VARIANTS, ids=[f"{n}{'+' if o else ''}{'-'.join(o)}" for n, o in VARIANTS])
def test_parity_every_preset(frames, name, overrides):
    cfg = get_preset(name, **overrides)
    be = GreyMaps()
    ref = select_patches_batch(frames, cfg, be, device="cpu")
    got = select_patches_torch(_t(frames), cfg, be)
    _assert_same(ref, got)
    # non-trivial: every normal frame gets patches, the tiny one the whole frame
    assert all(len(ref[i]) >= 2 for i in (0, 1, 3, 4, 5))
    assert ref[2].boxes.tolist() == [[0, 0, 40, 20]] and got[2].levels.tolist() == [1]
    n_levels = len(cfg.levels) + (1 if cfg.level1_tiles > 0 else 0)
    assert len(be.tensor_calls) <= n_levels  # one predict_tensors call per level (+ tiles)
    # each frame's batch result equals its single-frame result (no leakage across frames)
    alone = select_patches_torch(_t(frames[3:4]), cfg, be)
    _assert_same(ref[3:4], alone)


def test_parity_mixed_sizes_and_orders(frames):
    """Frames of several sizes interleaved, in two orders: each frame's result is the same."""
    cfg = get_preset("hierarchical-pooled")
    be = GreyMaps()
    order = [4, 0, 5, 2, 1, 3]
    ref = select_patches_batch([frames[i] for i in order], cfg, be, device="cpu")
    got = select_patches_torch(_t([frames[i] for i in order]), cfg, be)
    _assert_same(ref, got)
    base = select_patches_torch(_t(frames), cfg, be)
    for j, i in enumerate(order):
        assert np.array_equal(base[i].boxes, got[j].boxes)
    assert len({s.boxes.tobytes() for s in got}) == 6
    assert (got[0].levels == 1).sum() == 5 and (got[0].levels == 2).sum() >= 20  # 5 + up to 30 pooled


def test_constant_map_gives_empty_selection():
    grey = np.full((300, 500, 3), 128, np.uint8)  # constant crop -> all-zero map
    be = GreyMaps()
    for name in PRESETS:
        cfg = get_preset(name)
        ref = select_patches_batch([grey], cfg, be, device="cpu")
        got = select_patches_torch(_t([grey]), cfg, be)
        _assert_same(ref, got)
        if cfg.levels[0].apv_threshold >= 0:
            assert len(got[0]) == 0 and got[0].boxes.shape == (0, 4)
        else:  # baseline-unfiltered keeps every candidate
            assert len(got[0]) == len(candidate_grid(300, 500, *cfg.scaled(500, 300).levels[0].sizes,
                                                     *cfg.scaled(500, 300).levels[0].strides))


def test_select_frames_dispatch_and_errors(frames):
    cfg = get_preset("hierarchical-pooled")
    batch = torch.from_numpy(np.stack([frames[0], frames[3]]).transpose(0, 3, 1, 2).copy())  # (B, 3, H, W)
    be = GreyMaps()
    _assert_same(select_frames(batch, cfg, be, impl="numpy"), select_frames(batch, cfg, be, impl="torch"))
    assert select_patches_torch([], cfg, be) == []
    with pytest.raises(ValueError):
        select_patches_torch([torch.zeros((3, 50, 50), dtype=torch.float32)], cfg, be)
    with pytest.raises(ValueError):
        select_patches_torch([torch.zeros((50, 50, 3), dtype=torch.uint8)], cfg, be)

    class Wrong(GreyMaps):
        def predict_tensors(self, images):
            return [m[:-1] for m in super().predict_tensors(images)]

    with pytest.raises(ValueError, match="shape"):
        select_patches_torch(_t(frames[:1]), cfg, Wrong())


# ------------------------------------------------------------------ Eq. 3.1 / 3.2 by hand
def test_scores_hand_computed():
    m1 = torch.arange(16, dtype=torch.float32).reshape(4, 4) / 16.0  # exact in float32
    m2 = torch.zeros((10, 10))
    m2[1:9, 1:9] = 1.0  # 10x10 box: margin round(1.0) = 1 px -> inner 8x8 all ones, frame 36 px zeros
    m3 = torch.zeros((10, 10))
    m3[0, :] = 1.0  # 10 ones on the frame's top row
    ii = integral_stack([m1[None], torch.stack([m2, m3])])  # rows 0 | 1, 2
    assert ii.shape == (3, 11, 11) and ii.dtype == torch.float64
    boxes = torch.tensor([[0, 0, 2, 2], [1, 1, 4, 4], [0, 0, 4, 4], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 3, 3]])
    region = torch.tensor([0, 0, 0, 1, 2, 0])
    apv, sid = score_apv_id(ii, region, boxes, 0.10)
    # S_apv (Eq. 3.1): (0+1+4+5)/4/16, (5+6+7+9+10+11+13+14+15)/9/16, 120/16/16, 64/100, 10/100,
    # (0+1+2+4+5+6+8+9+10)/9/16
    np.testing.assert_allclose(apv.numpy(), [10 / 64, 90 / 144, 120 / 256, 0.64, 0.1, 45 / 144], rtol=1e-12)
    # S_id (Eq. 3.2): inner mean - frame mean. 2x2 and 3x3 boxes: margin round(0.2)=round(0.3)=0 -> no frame -> 0.
    # 4x4: margin round(0.4) = 0 -> 0. 10x10 on m2: 1 - 0 = 1; on m3: 0 - 10/36.
    np.testing.assert_allclose(sid.numpy(), [0.0, 0.0, 0.0, 1.0, -10 / 36, 0.0], atol=1e-12)
    # 20x20 box, margin 0.25 -> 5 px: inner 10x10
    m4 = torch.zeros((20, 20))
    m4[5:15, 5:15] = 0.5
    m4[0:5, :] = 0.2  # top band of the frame: 100 px
    apv4, sid4 = score_apv_id(integral_stack([m4[None]]), torch.tensor([0]), torch.tensor([[0, 0, 20, 20]]), 0.25)
    assert apv4.item() == pytest.approx((50 + 20) / 400)
    assert sid4.item() == pytest.approx(0.5 - 20 / 300)


def test_scores_equal_numpy_bitwise():
    rng = np.random.default_rng(3)
    maps = [rng.random((37, 53)).astype(np.float32), rng.random((64, 41)).astype(np.float32)]
    lv = LevelParams((16, 9), (5, 3), 0.0, 1)
    stack = integral_stack([torch.from_numpy(m)[None] for m in maps])
    for r, m in enumerate(maps):
        cand = candidate_grid_torch(m.shape[0], m.shape[1], lv, True, "cpu")
        ref = np.concatenate([candidate_grid(*m.shape, s, st, True) for s, st in zip(lv.sizes, lv.strides)])
        assert np.array_equal(cand.numpy(), ref) and len(ref) > 50
        apv, sid = score_apv_id(stack, torch.full((len(cand),), r), cand, 0.1)
        np.testing.assert_array_equal(apv.numpy().astype(np.float32), score_apv(m, ref))
        np.testing.assert_array_equal(sid.numpy().astype(np.float32), score_id(m, ref, 0.1))


def test_numpy_mean_bitwise():
    rng = np.random.default_rng(5)
    for n in [1, 7, 8, 9, 100, 128, 129, 1000, 8191, 8193, 70001, 225625]:
        x = (rng.random((3, n)).astype(np.float32)) ** 3
        got = numpy_mean_f32(torch.from_numpy(x)).numpy()
        assert np.array_equal(got, np.array([row.mean() for row in x], np.float32)), n


@pytest.mark.parametrize("seed", range(6))
def test_greedy_port_equals_numpy(seed):
    rng = np.random.default_rng(seed)
    n, g = 400, 7
    xy = rng.integers(0, 60, (n, 2))
    side = rng.choice([8, 16, 24], n)
    boxes = np.column_stack([xy, xy + side[:, None]])
    scores = np.round(rng.random(n), 1)  # coarse: many exact ties -> index tie-break
    scores[rng.random(n) < 0.05] = np.nan
    groups = np.sort(rng.integers(0, g, n)) if seed % 2 else rng.integers(0, g, n)
    valid = rng.random(n) < 0.8
    mult = np.bincount(rng.integers(0, g, 20), minlength=g)
    for k, ov in [(5, 0.25), (0, 0.5), (0, 1.0), (3, 1.0), (40, 0.1)]:
        ref = greedy_select_grouped(boxes, scores, groups, k, ov, valid=valid)
        got = greedy_select_grouped_torch(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(groups),
                                          g, k, ov, torch.from_numpy(valid))
        assert np.array_equal(got.numpy(), ref) and len(ref) > 0, (k, ov)
        if k > 0:  # per-candidate budgets, constant within a group (the pooled level-2 budget)
            ref = greedy_select_grouped(boxes, scores, groups, k * mult[groups], ov, valid=valid)
            got = greedy_select_grouped_torch(torch.from_numpy(boxes), torch.from_numpy(scores),
                                              torch.from_numpy(groups), g, k, ov, torch.from_numpy(valid),
                                              budget_mult=torch.from_numpy(mult))
            assert np.array_equal(got.numpy(), ref), (k, ov, "pooled")


# ------------------------------------------------------------------ learned rankers, real frames
_LEARNED: dict = {}


def _learned(name):
    """Tiny / random-weight learned backends on the CPU, built once per test session."""
    if name not in _LEARNED:
        torch.manual_seed(0)
        try:
            if name == "ltrp":
                _LEARNED[name] = get_backend(name, random_init=True, arch="tiny-test", device="cpu")
            elif name == "kpp":  # greedy MAE selection: keep few tokens (4 of 196) to stay fast
                _LEARNED[name] = get_backend(name, random_init=True, arch="tiny-test", device="cpu", ratio=0.02)
            else:
                _LEARNED[name] = get_backend("simplenet", allow_random=True, encoder="resnet", device="cpu",
                                             batch_size=8)
        except (ImportError, RuntimeError, OSError) as e:  # timm / model code unavailable
            pytest.skip(f"{name} backend unavailable: {e}")
    return _LEARNED[name]


@pytest.mark.parametrize("backend_name", ["ltrp", "simplenet"])
def test_parity_learned_rankers_same_maps(frames, backend_name):
    be = CachedMaps(_learned(backend_name))
    imgs = [frames[0], frames[1]]
    presets = ("hierarchical-pooled", "hierarchical-filtered", "multisize-filtered")
    for name in presets if backend_name == "ltrp" else presets[::2]:  # SimpleNet-ResNet-50 on CPU is slow
        cfg = get_preset(name)
        be.frozen = False
        ref = select_patches_batch(imgs, cfg, be, device="cpu")
        be.frozen = True
        got = select_patches_torch(_t(imgs), cfg, be)
        assert be.misses == 0  # the torch path asked for exactly the crops numpy did
        _assert_same(ref, got)
        assert all(len(s) >= 5 for s in ref)


def test_parity_gtsdb_spectral_residual_ms():
    from tests.conftest import gtsdb_images

    paths = gtsdb_images(3)
    imgs = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]
    be = HostRoundTrip(get_backend("spectral-residual-ms"))
    for name in ("hierarchical-pooled", "hierarchical-filtered"):
        cfg = get_preset(name)
        ref = select_patches_batch(imgs, cfg, be, device="cpu")
        got = select_patches_torch(_t(imgs), cfg, be)  # default predict_tensors: host round trip
        _assert_same(ref, got)
        assert all(len(s) >= 10 for s in ref) and len({s.boxes.tobytes() for s in ref}) == len(ref)


# ------------------------------------------------------------------ device-native learned backends
@pytest.mark.parametrize("backend_name", ["ltrp", "kpp"])
def test_token_backends_predict_tensors(frames, backend_name):
    """Token rankers on the device: same maps as predict_batch when views are shrunk (INTER_AREA
    is reproduced exactly); nearly the same when a small crop is enlarged."""
    be = _learned(backend_name)
    assert be.device_native
    imgs = [frames[0], frames[1][:, :224], frames[0][:150, :120]]  # the last one is enlarged
    if backend_name == "ltrp":
        imgs.insert(1, frames[4])
    ref = be.predict_batch(imgs)
    got = be.predict_tensors(_t(imgs))
    for a, b in zip(ref, got):
        assert b.dtype == torch.float32 and tuple(b.shape) == a.shape and b.device.type == "cpu"
    for a, b in zip(ref[:-1], got[:-1]):
        np.testing.assert_array_equal(b.numpy(), a)
        assert a.max() > 0.5 and (a == 0).mean() > 0.3  # kept tokens and dropped ones
    assert (got[-1].numpy() == ref[-1]).mean() > 0.8
    assert be.predict_tensors([]) == []


def test_simplenet_predict_tensors(frames):
    be = _learned("simplenet")
    assert be.device_native
    imgs = [frames[0], frames[2], frames[1]]
    ref = be.predict_batch(imgs)
    got = be.predict_tensors(_t(imgs))
    for a, b in zip(ref, got):
        b = b.numpy()
        assert b.shape == a.shape and b.dtype == np.float32 and b.min() >= 0 and b.max() <= 1
        assert np.abs(a - b).max() < 0.05 and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999
    with pytest.raises(ValueError):
        be.predict_tensors([torch.zeros((3, 8, 8))])


@pytest.mark.parametrize("backend_name", ["ltrp", "simplenet"])
def test_select_with_device_native_backends(frames, backend_name):
    """The selector on a device-native learned backend: runs, non-trivial, and equals numpy on the
    maps that predict_tensors produced (replayed through predict_batch)."""
    inner = _learned(backend_name)
    imgs = [frames[0], frames[4]] if backend_name == "ltrp" else [frames[0]]  # ResNet-50 on CPU: one frame
    cfg = get_preset("hierarchical-pooled")
    got = select_patches_torch(_t(imgs), cfg, inner)
    assert all(len(s) >= 10 for s in got)

    class Replay(SaliencyBackend):  # predict_tensors' maps, keyed by crop pixels, for both selectors
        name = "replay-test"

        def predict_tensors(self, images):
            maps = inner.predict_tensors(images)
            for t, m in zip(images, maps):
                cache[CachedMaps.key(t.permute(1, 2, 0).numpy())] = m.numpy()
            return maps

        def predict_batch(self, images):
            return [cache[CachedMaps.key(im)] for im in images]

    cache: dict = {}
    replay = Replay()
    got = select_patches_torch(_t(imgs), cfg, replay)
    _assert_same(select_patches_batch(imgs, cfg, replay, device="cpu"), got)
