"""Patch selection (thesis §3.1, Algorithm 2, Appendix A) against hand-computed cases."""
import dataclasses

import numpy as np
import pytest

from mining.saliency.base import SaliencyBackend, check_image
from mining.selection import (
    DEFAULT_PRESET,
    DEFAULT_SALIENCY,
    PRESETS,
    LevelParams,
    Selection,
    SelectionConfig,
    candidate_grid,
    get_preset,
    greedy_select,
    greedy_select_grouped,
    overlap_larger,
    score_apv,
    score_id,
    select_patches,
    select_patches_batch,
)


class BrightnessBackend(SaliencyBackend):
    """Deterministic test backend: saliency = grey level / 255 (no normalisation)."""

    name = "brightness"

    def __init__(self):
        self.calls = []

    def predict(self, image):
        check_image(image)
        self.calls.append(image.shape[:2])
        return image.mean(axis=2).astype(np.float32) / 255.0


# ---------------------------------------------------------------- candidate grid
def test_candidate_grid_hand_computed():
    g = candidate_grid(4, 6, 2, 2)
    assert g.dtype == np.int32
    assert g.tolist() == [
        [0, 0, 2, 2], [2, 0, 4, 2], [4, 0, 6, 2],
        [0, 2, 2, 4], [2, 2, 4, 4], [4, 2, 6, 4],
    ]


def test_candidate_grid_stride_smaller_than_size_and_border():
    g = candidate_grid(5, 5, 2, 2)  # starts 0, 2 (4 + 2 > 5)
    assert sorted(set(g[:, 0].tolist())) == [0, 2]
    g = candidate_grid(5, 5, 2, 2, cover_border=True)  # adds 3, flush with the border
    assert sorted(set(g[:, 0].tolist())) == [0, 2, 3]
    assert g[:, 2].max() == 5 and g[:, 3].max() == 5
    g = candidate_grid(10, 10, 4, 3)  # overlapping: 0, 3, 6
    assert len(g) == 9 and g[-1].tolist() == [6, 6, 10, 10]


def test_candidate_grid_too_large_or_invalid():
    assert candidate_grid(10, 100, 11, 5).shape == (0, 4)
    with pytest.raises(ValueError):
        candidate_grid(10, 10, 0, 1)
    with pytest.raises(ValueError):
        candidate_grid(10, 10, 3, 0)


# ---------------------------------------------------------------- Eq. 3.1 / 3.2
def test_score_apv_hand_computed():
    m = np.arange(16, dtype=np.float32).reshape(4, 4) / 15.0
    s = score_apv(m, np.array([[0, 0, 2, 2], [1, 1, 4, 4], [0, 0, 4, 4]]))
    # (0+1+4+5)/4/15, (5+6+7+9+10+11+13+14+15)/9/15, 120/16/15
    np.testing.assert_allclose(s, [10 / 60, 90 / 135, 0.5], rtol=1e-6)
    assert s.dtype == np.float32


def test_score_id_ten_percent_margin():
    # 10x10 patch: margin round(1.0) = 1 px -> inner 8x8 (64 px), frame 36 px
    m = np.zeros((10, 10), np.float32)
    m[1:9, 1:9] = 1.0
    assert score_id(m, np.array([[0, 0, 10, 10]]))[0] == pytest.approx(1.0)
    m2 = np.full((10, 10), 1.0, np.float32)
    m2[1:9, 1:9] = 0.5
    assert score_id(m2, np.array([[0, 0, 10, 10]]))[0] == pytest.approx(-0.5)


def test_score_id_margin_scales_with_side():
    # 20x20 patch: margin 2 px -> inner 16x16 = 256 px, frame 400 - 256 = 144 px
    box = np.array([[0, 0, 20, 20]])
    m = np.zeros((20, 20), np.float32)
    m[2, 2] = 1.0  # first inner pixel
    assert score_id(m, box)[0] == pytest.approx(1 / 256)
    m = np.zeros((20, 20), np.float32)
    m[1, 1] = 1.0  # in the frame (it would be inner with a 1-px margin)
    assert score_id(m, box)[0] == pytest.approx(-1 / 144)
    # a different margin moves the pixel inside
    assert score_id(m, box, margin=0.05)[0] == pytest.approx(1 / 324)


def test_scores_on_boxes_offset_inside_a_larger_map():
    m = np.zeros((30, 40), np.float32)
    m[12:18, 22:28] = 1.0  # 6x6 blob
    boxes = np.array([[20, 10, 30, 20], [0, 0, 10, 10]])
    np.testing.assert_allclose(score_apv(m, boxes), [0.36, 0.0], atol=1e-6)
    # box 1: inner 8x8 starts at (21, 11): holds the whole blob (36 px) -> 36/64; frame 0
    np.testing.assert_allclose(score_id(m, boxes), [36 / 64, 0.0], atol=1e-6)


def test_scores_reject_boxes_outside_map():
    m = np.zeros((10, 10), np.float32)
    with pytest.raises(ValueError):
        score_apv(m, np.array([[0, 0, 11, 5]]))
    with pytest.raises(ValueError):
        score_id(m, np.array([[3, 3, 3, 5]]))
    with pytest.raises(ValueError):
        score_id(m, np.array([[0, 0, 5, 5]]), margin=0.5)


# ---------------------------------------------------------------- overlap and Algorithm 2
def test_overlap_is_intersection_over_larger_area():
    a = np.array([0, 0, 10, 10])
    assert overlap_larger(a, np.array([[5, 0, 15, 10]]))[0] == pytest.approx(0.5)
    # 10x10 vs 20x20 sharing 5x5: 25/400 (IoU would be 25/475, over-smaller 25/100)
    assert overlap_larger(a, np.array([[5, 5, 25, 25]]))[0] == pytest.approx(25 / 400)
    assert overlap_larger(a, np.array([[10, 0, 20, 10]]))[0] == 0.0


def test_greedy_select_hand_computed():
    boxes = np.array([
        [0, 0, 10, 10],   # 0.9 -> kept
        [2, 0, 12, 10],   # 0.8 -> overlap 0.8 with #0
        [10, 0, 20, 10],  # 0.7 -> kept (touches #0 only)
        [7, 0, 17, 10],   # 0.6 -> overlap 0.3 with #0
        [8, 0, 18, 10],   # 0.5 -> 0.2 with #0 but 0.8 with #2
        [0, 10, 10, 20],  # 0.4 -> kept
    ])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    assert greedy_select(boxes, scores, 10, 0.25).tolist() == [0, 2, 5]
    assert greedy_select(boxes, scores, 2, 0.25).tolist() == [0, 2]
    # 0.35 still blocks #3 (0.7 with #2); 0.75 admits it (0.3 with #0, 0.7 with #2)
    assert greedy_select(boxes, scores, 10, 0.35).tolist() == [0, 2, 5]
    assert greedy_select(boxes, scores, 10, 0.75).tolist() == [0, 2, 3, 5]
    # order follows the scores: #5, #4 kept; #3 (0.9 with #4), #2 (0.8), #1 (0.4) blocked; #0 (0.2) kept
    assert greedy_select(boxes, scores[::-1].copy(), 10, 0.25).tolist() == [5, 4, 0]


def test_greedy_overlap_threshold_is_strict():
    boxes = np.array([[0, 0, 20, 20], [0, 0, 10, 10]])  # contained: 100/400 = 0.25 exactly
    scores = np.array([1.0, 0.5])
    assert greedy_select(boxes, scores, 5, 0.25).tolist() == [0]
    assert greedy_select(boxes, scores, 5, 0.26).tolist() == [0, 1]


def test_greedy_ties_keep_index_order_and_no_limit():
    boxes = np.array([[0, 0, 5, 5], [10, 0, 15, 5], [20, 0, 25, 5]])
    assert greedy_select(boxes, np.zeros(3), 0, 0.25).tolist() == [0, 1, 2]
    assert greedy_select(boxes, np.array([0.0, 1.0, 0.0]), 0, 1.0).tolist() == [1, 0, 2]
    assert greedy_select(np.zeros((0, 4)), np.zeros(0), 3, 0.25).tolist() == []


def _reference_greedy(boxes, scores, k, thr):
    """Literal Algorithm 2, one candidate at a time."""
    order = sorted(range(len(boxes)), key=lambda i: (-scores[i], i))
    chosen = []
    for i in order:
        if k > 0 and len(chosen) >= k:
            break
        if all(overlap_larger(boxes[j], boxes[i][None])[0] < thr for j in chosen):
            chosen.append(i)
    return chosen


def test_vectorised_greedy_matches_literal_algorithm_2():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(1, 60))
        xy = rng.integers(0, 80, size=(n, 2))
        wh = rng.integers(5, 40, size=(n, 1)).repeat(2, axis=1)
        boxes = np.concatenate([xy, xy + wh], axis=1)
        scores = rng.random(n).round(2)  # some ties
        k = int(rng.integers(0, 12))
        thr = float(rng.choice([0.1, 0.25, 0.5]))
        assert greedy_select(boxes, scores, k, thr).tolist() == _reference_greedy(boxes, scores, k, thr)


def test_grouped_greedy_is_independent_per_group():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [1, 0, 11, 10]])
    scores = np.array([0.9, 0.8, 0.7, 0.95])
    groups = np.array([0, 0, 1, 1])
    idx = greedy_select_grouped(boxes, scores, groups, 5, 0.25)
    assert idx.tolist() == [0, 3]  # group 0: #0; group 1: #3 (higher score), identical boxes across groups ok
    valid = np.array([False, True, True, True])
    assert greedy_select_grouped(boxes, scores, groups, 5, 0.25, valid=valid).tolist() == [1, 3]


# ---------------------------------------------------------------- presets (Appendix A)
def test_faithful_presets_match_appendix_a():
    a1 = PRESETS["baseline-unfiltered"].levels
    assert len(a1) == 1 and a1[0].sizes == (448,) and a1[0].strides == (224,) and a1[0].k <= 0
    a2 = PRESETS["baseline-filtered"].levels[0]
    assert (a2.sizes, a2.strides, a2.apv_threshold, a2.k, a2.overlap) == ((448,), (224,), 0.05, 35, 0.25)
    a3 = PRESETS["multisize-filtered"].levels[0]
    assert (a3.sizes, a3.strides, a3.apv_threshold, a3.k, a3.overlap) == (
        (896, 448, 224), (224, 112, 56), 0.05, 35, 0.25)
    l1, l2 = PRESETS["hierarchical-filtered"].levels
    assert (l1.sizes, l1.strides, l1.apv_threshold, l1.k, l1.overlap) == ((896,), (224,), 0.05, 5, 0.25)
    assert (l2.sizes, l2.strides, l2.apv_threshold, l2.k, l2.overlap) == ((448, 224), (112, 56), 0.3, 6, 0.25)
    for name in ("baseline-unfiltered", "baseline-filtered", "multisize-filtered", "hierarchical-filtered"):
        cfg = PRESETS[name]
        assert cfg.reference_width == 3848 and cfg.margin == 0.10 and cfg.context == 0.0
        assert not cfg.cover_border and cfg.emit_levels is None
        assert all(lv.rank == "id" and not lv.adaptive_apv for lv in cfg.levels)
    assert PRESETS["hierarchical-filtered"].max_patches == 35
    assert PRESETS["baseline-filtered"].max_patches == 35
    assert PRESETS["baseline-unfiltered"].max_patches is None


def test_default_preset_is_registered():
    assert DEFAULT_PRESET in PRESETS
    from mining.saliency import available_backends

    assert DEFAULT_SALIENCY in available_backends()


def test_scaling_to_input_width():
    cfg = get_preset("hierarchical-filtered").scaled(1360, 800)
    l1, l2 = cfg.levels
    # 896 * 1360/3848 = 316.7 -> 317; strides keep the 1/4 ratio
    assert l1.sizes == (317,) and l1.strides == (79,)
    assert l2.sizes == (158, 79) and l2.strides == (40, 20)
    assert cfg.scaled_to == (1360, 800) and cfg.reference_width == 1360
    assert cfg.scaled(1360, 800) is cfg  # idempotent
    full = get_preset("hierarchical-filtered").scaled(3848, 2168)
    assert full.levels[1].sizes == (448, 224) and full.levels[1].strides == (112, 56)


def test_min_patch_size_raises_small_sizes_and_merges():
    cfg = get_preset("hierarchical-filtered", min_patch_size=224).scaled(1360, 800)
    l1, l2 = cfg.levels
    assert l1.sizes == (317,)
    assert l2.sizes == (224,) and l2.strides == (56,)  # 158 and 79 both raised to 224 and merged
    with pytest.raises(ValueError):
        get_preset("baseline-filtered").scaled(0, 10)


def test_get_preset_overrides_and_errors():
    c = get_preset("hierarchical-filtered", level2_k=4, overlap=0.5, margin=0.2)
    assert c.levels[1].k == 4 and c.levels[0].k == 5
    assert c.levels[0].overlap == c.levels[1].overlap == 0.5 and c.margin == 0.2
    c = get_preset("baseline-filtered", sizes=(600, 300))
    assert c.levels[0].sizes == (600, 300) and c.levels[0].strides == (300, 150)
    assert PRESETS["hierarchical-filtered"].levels[1].k == 6  # presets unchanged
    with pytest.raises(KeyError, match="hierarchical-filtered"):
        get_preset("no-such-preset")
    with pytest.raises(TypeError):
        get_preset("baseline-filtered", bogus=1)
    with pytest.raises(TypeError):
        get_preset("baseline-filtered", level2_k=1)
    with pytest.raises(ValueError):
        LevelParams((10, 20), (5,), 0.1, 3)


# ---------------------------------------------------------------- end to end
def _scene(h=200, w=400):
    img = np.zeros((h, w, 3), np.uint8)
    img[60:100, 300:340] = 255  # one bright 40x40 square
    return img


def test_select_patches_finds_the_bright_object():
    cfg = SelectionConfig("t", (LevelParams((100, 50), (25, 10), 0.01, 3, 0.25),), reference_width=400, min_patch_size=1)
    sel = select_patches(_scene(), cfg, BrightnessBackend())
    assert isinstance(sel, Selection)
    assert sel.boxes.dtype == np.int32 and sel.levels.dtype == np.int8 and sel.scores.dtype == np.float32
    # best S_id: a 50-px patch centred on the square (inner 40x40 = the square, frame dark)
    assert sel.boxes[0].tolist() == [295, 55, 345, 105] or sel.boxes[0].tolist()[2] - sel.boxes[0].tolist()[0] == 50
    x0, y0, x1, y1 = sel.boxes[0]
    assert x0 <= 300 and x1 >= 340 and y0 <= 60 and y1 >= 100
    assert sel.scores[0] == pytest.approx(sel.scores.max())
    # the apv threshold removed the all-black candidates
    assert len(sel) <= 3


def test_select_patches_scales_config_to_image():
    cfg = get_preset("baseline-filtered", k=100, apv_threshold=-1.0)  # 448 px at 3848 -> 52 px at 452
    img = np.full((104, 452, 3), 128, np.uint8)
    sel = select_patches(img, cfg, BrightnessBackend())
    sides = set((sel.boxes[:, 2] - sel.boxes[:, 0]).tolist())
    assert sides == {53}


def test_hierarchical_recomputes_saliency_on_level1_patches():
    cfg = SelectionConfig(
        "h",
        (LevelParams((100,), (50,), 0.0, 2, 0.25), LevelParams((40, 20), (10, 5), 0.0, 3, 0.25)),
        reference_width=400, min_patch_size=1,
    )
    be = BrightnessBackend()
    img = _scene()
    img[150:170, 20:40] = 200  # a second, dimmer object
    sel = select_patches(img, cfg, be)
    assert be.calls[0] == (200, 400)  # whole image first
    assert be.calls[1:] == [(100, 100)] * 2  # then each of the two level-1 patches
    lv1 = sel.boxes[sel.levels == 1]
    lv2 = sel.boxes[sel.levels == 2]
    assert len(lv1) == 2 and 1 <= len(lv2) <= 6
    for b in lv2:  # every level-2 patch lies inside a level-1 patch
        assert any((b[0] >= p[0]) & (b[1] >= p[1]) & (b[2] <= p[2]) & (b[3] <= p[3]) for p in lv1)
    assert len(np.unique(sel.boxes, axis=0)) == len(sel.boxes)
    assert (sel.boxes[:, :2] >= 0).all() and (sel.boxes[:, 2] <= 400).all() and (sel.boxes[:, 3] <= 200).all()


def test_context_lets_level2_centres_stay_in_parent():
    base = (LevelParams((100,), (50,), 0.0, 1, 0.25), LevelParams((40,), (10,), -1.0, 0, 1.0))
    img = _scene()
    strict = select_patches(img, SelectionConfig("s", base, reference_width=400, min_patch_size=1), BrightnessBackend())
    ctx = select_patches(img, SelectionConfig("c", base, reference_width=400, min_patch_size=1, context=0.25),
                         BrightnessBackend())
    parent = strict.boxes[strict.levels == 1][0]
    l2s, l2c = strict.boxes[strict.levels == 2], ctx.boxes[ctx.levels == 2]
    assert ((l2s[:, 0] >= parent[0]) & (l2s[:, 2] <= parent[2])).all()
    cx, cy = (l2c[:, 0] + l2c[:, 2]) / 2, (l2c[:, 1] + l2c[:, 3]) / 2
    assert ((cx >= parent[0]) & (cx < parent[2]) & (cy >= parent[1]) & (cy < parent[3])).all()
    assert len(l2c) > len(l2s)  # candidates straddling the parent's border are now allowed


def test_small_image_gives_one_whole_frame_patch():
    sel = select_patches(np.zeros((30, 50, 3), np.uint8), get_preset("hierarchical-filtered"), BrightnessBackend())
    assert sel.boxes.tolist() == [[0, 0, 50, 30]] and sel.levels.tolist() == [1]


def test_faithful_hierarchical_budget_and_batch_equals_single():
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 255, (200, 340, 3), dtype=np.uint8) for _ in range(2)]
    imgs.append(rng.integers(0, 255, (150, 300, 3), dtype=np.uint8))  # different size in the same batch
    cfg = get_preset("hierarchical-filtered", min_patch_size=1)
    batch = select_patches_batch(imgs, cfg, BrightnessBackend())
    for im, b in zip(imgs, batch):
        s = select_patches(im, cfg, BrightnessBackend())
        assert s.boxes.tolist() == b.boxes.tolist() and s.levels.tolist() == b.levels.tolist()
        assert len(b) <= 35 and (b.levels == 1).sum() <= 5
        assert len(np.unique(b.boxes, axis=0)) == len(b.boxes)


def test_every_preset_runs_on_a_small_image():
    img = np.random.default_rng(2).integers(0, 255, (120, 200, 3), dtype=np.uint8)
    for name in PRESETS:
        sel = select_patches(img, get_preset(name), BrightnessBackend())
        assert len(sel) >= 1
        assert (sel.boxes[:, 2] <= 200).all() and (sel.boxes[:, 3] <= 120).all()
        mp = get_preset(name).max_patches
        assert mp is None or len(sel) <= mp


def test_bad_inputs():
    with pytest.raises(ValueError):
        select_patches(np.zeros((10, 10), np.uint8), get_preset("baseline-filtered"), BrightnessBackend())

    class Wrong(SaliencyBackend):
        def predict(self, image):
            return np.zeros((3, 3), np.float32)

    with pytest.raises(ValueError, match="shape"):
        select_patches(np.zeros((400, 800, 3), np.uint8), get_preset("baseline-filtered"), Wrong())


def test_torch_scoring_path_equals_numpy():
    pytest.importorskip("torch")
    from mining.selection import score_apv_id_torch

    rng = np.random.default_rng(3)
    maps = [rng.random((30, 40)).astype(np.float32), rng.random((25, 20)).astype(np.float32)]
    b0 = candidate_grid(30, 40, 10, 5)
    b1 = candidate_grid(25, 20, 7, 3)
    boxes = np.concatenate([b0, b1])
    region = np.array([0] * len(b0) + [1] * len(b1))
    apv, sid = score_apv_id_torch(maps, boxes, region, 0.10, device="cpu")
    np.testing.assert_allclose(apv, np.concatenate([score_apv(maps[0], b0), score_apv(maps[1], b1)]), atol=1e-6)
    np.testing.assert_allclose(sid, np.concatenate([score_id(maps[0], b0), score_id(maps[1], b1)]), atol=1e-6)


def test_grouped_greedy_with_per_group_budgets():
    boxes = np.array([[0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10], [0, 0, 10, 10], [20, 0, 30, 10]])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    groups = np.array([0, 0, 0, 1, 1])
    k = np.array([2, 2, 2, 1, 1])  # budget of each candidate's group
    assert greedy_select_grouped(boxes, scores, groups, k, 0.25).tolist() == [0, 1, 3]


def test_improved_presets_keep_table_a4_and_budget():
    a4 = PRESETS["hierarchical-filtered"]
    for name in ("hierarchical-adaptive", "hierarchical-context", "hierarchical-pooled"):
        cfg = PRESETS[name]
        assert [lv.sizes for lv in cfg.levels] == [lv.sizes for lv in a4.levels]
        assert [lv.strides for lv in cfg.levels] == [lv.strides for lv in a4.levels]
        assert [lv.k for lv in cfg.levels] == [5, 6] and cfg.max_patches == 35
        assert cfg.levels[1].adaptive_apv
    assert PRESETS["hierarchical-context"].context == 0.25 and PRESETS["hierarchical-pooled"].levels[1].pooled


def test_pooled_level2_budget_is_shared_across_regions():
    # level 1 picks 2 regions; the left one holds three objects, the right one none
    img = np.zeros((100, 200, 3), np.uint8)
    for x in (5, 35, 65):
        img[40:60, x:x + 20] = 255
    img[:, 150:] = 20  # dim, uniform right part
    lv1 = LevelParams((100,), (100,), -1.0, 2, 0.25)
    lv2 = LevelParams((30,), (5,), -1.0, 2, 0.25)
    per_region = SelectionConfig("r", (lv1, lv2), reference_width=200, min_patch_size=1)
    pooled = SelectionConfig("p", (lv1, dataclasses.replace(lv2, pooled=True)), reference_width=200,
                             min_patch_size=1)
    a = select_patches(img, per_region, BrightnessBackend())
    b = select_patches(img, pooled, BrightnessBackend())
    assert (a.levels == 2).sum() == 4 and (b.levels == 2).sum() == 4
    left = lambda s: int(((s.levels == 2) & (s.boxes[:, 2] <= 100)).sum())  # noqa: E731
    assert left(a) == 2 and left(b) >= 3  # pooled spends the budget where the objects are


def test_blank_frame_is_filtered_out_by_apv():
    sel = select_patches(np.zeros((200, 400, 3), np.uint8), get_preset("baseline-filtered"), BrightnessBackend())
    assert sel.boxes.shape == (0, 4) and sel.levels.shape == (0,) and sel.scores.shape == (0,)


def test_level1_tiles_predict_on_tiles_and_blend():
    # a backend without normalisation gives the same map on a tile as on the whole image,
    # so the blended level-1 map -- and the selection -- must not change
    lv = (LevelParams((50,), (25,), 0.01, 3, 0.25),)
    plain = SelectionConfig("p", lv, reference_width=400, min_patch_size=1)
    tiled = SelectionConfig("t", lv, reference_width=400, min_patch_size=1, level1_tiles=2.0)
    be_p, be_t = BrightnessBackend(), BrightnessBackend()
    a = select_patches(_scene(), plain, be_p)
    b = select_patches(_scene(), tiled, be_t)
    assert a.boxes.tolist() == b.boxes.tolist()
    assert be_p.calls == [(200, 400)]
    # 100-px tiles, stride 50: 3 rows x 7 columns
    assert be_t.calls[0] == (200, 400) and be_t.calls[1:] == [(100, 100)] * 21
