"""Saliency-guided patch selection: the ONE candidate-box selector of the codebase.

Implements the patch selection of the thesis "Patch-wise image similarity search"
(Arvidsson & Davidsson, Chalmers 2022), §3.1 and Appendix A:

* a strided square grid of candidate patches per patch size (§3.1, :func:`candidate_grid`);
* the average-pixel-value score S_apv (Eq. 3.1, :func:`score_apv`) used as a threshold filter;
* the inner-difference score S_id (Eq. 3.2, :func:`score_id`), inner rectangle at a 10 %
  margin, used as the ranking;
* greedy selection of at most k patches whose pairwise overlap, measured as
  intersection / area of the larger patch, stays below a threshold (Algorithm 2,
  :func:`greedy_select`);
* the hierarchy of §3.1.3: saliency recomputed on every selected level-1 patch and level-2
  patches selected inside it (:func:`select_patches`).

Every candidate of a map is scored at once from an integral image (numpy/OpenCV on CPU,
``torch.cumsum`` on a CUDA device), there is no Python loop per candidate box, and the
greedy filter loops only once per *selected* patch (k iterations), handling all regions
of all images of a batch in the same vectorised step.

Saliency maps are float32 in [0, 1] (see :mod:`mining.saliency.base`), so the thesis'
division by the maximum pixel value 255 in Eq. 3.1 and 3.2 is a no-op here.

Coordinates are pixels of the ORIGINAL image, boxes are ``x0, y0, x1, y1`` with x1/y1
exclusive.

Presets (:data:`PRESETS`): the four variants of the thesis with Tables A.1-A.4's values,
unchanged (``baseline-unfiltered``, ``baseline-filtered``, ``multisize-filtered``,
``hierarchical-filtered``), and three improved hierarchical ones with the same sizes and
budget (5 + 5 x 6 = 35 patches), each adding one change to the previous:
``hierarchical-adaptive`` (level-2 S_apv threshold relative to the crop's mean saliency),
``hierarchical-context`` (+ level-2 saliency on the level-1 patch grown by 25 %, level-2
patches centred inside it), ``hierarchical-pooled`` (+ the 30 level-2 patches shared by
the image's level-1 regions). :data:`DEFAULT_PRESET` / :data:`DEFAULT_SALIENCY` are the
best measured pair (benchmarks/RESULTS.md).

Parameters are stated, as in the thesis, for 3848 x 2168 frames (``reference_width``)
and :meth:`SelectionConfig.scaled` scales patch sizes and strides to the input width.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mining.saliency.base import SaliencyBackend, check_image

__all__ = [
    "LevelParams",
    "SelectionConfig",
    "Selection",
    "PRESETS",
    "DEFAULT_PRESET",
    "DEFAULT_SALIENCY",
    "get_preset",
    "candidate_grid",
    "score_apv",
    "score_id",
    "score_apv_id_torch",
    "overlap_larger",
    "greedy_select",
    "greedy_select_grouped",
    "select_patches",
    "select_patches_batch",
]


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LevelParams:
    """Parameters of one hierarchy level (thesis Appendix A, Tables A.1-A.4).

    Attributes:
        sizes: patch sides in pixels at the configuration's ``reference_width``
            (3848 px for the thesis' frames). Square patches.
        strides: one stride per size, pixels at ``reference_width``; the distance between
            the corners (equivalently centres) of two adjacent candidates (§3.1.1).
        apv_threshold: Eq. 3.1 filter: a candidate is kept only if S_apv > threshold
            (Algorithm 2). A negative value disables the filter.
        k: patches kept per region at this level (per image at level 1, per level-1
            patch at level 2). ``k <= 0`` keeps every candidate (baseline-unfiltered).
        overlap: maximum allowed overlap, intersection / area of the larger patch; a
            patch is added only if its overlap with every selected patch is < overlap.
            ``overlap >= 1`` disables the overlap filter.
        adaptive_apv: improvement beyond the thesis (default False = thesis). When True
            the threshold is relative: a candidate is kept if S_apv > apv_threshold *
            mean(saliency map of the region), so it follows the map's own brightness
            instead of an absolute level (a min-max normalised map of a busy crop has
            a low mean; one of a plain crop a high one).
        rank: ranking score of the greedy selection: ``"id"`` = S_id, Eq. 3.2 (thesis);
            ``"apv"`` = S_apv, Eq. 3.1 (improvement for zoom regions: a level-1 patch is
            a region to look into again, so the saliency mass it holds matters more
            than whether it is centred).
        pooled: improvement beyond the thesis (default False = thesis: k patches in every
            parent region). When True (levels >= 2), the budget ``k`` x (number of parent
            regions of the image) is shared by all regions of the image: the candidates
            of all regions compete in one greedy selection (overlap tested across regions
            too), so a region holding several objects gets more patches than a region of
            empty sky.
    """

    sizes: tuple[int, ...]
    strides: tuple[int, ...]
    apv_threshold: float
    k: int
    overlap: float = 0.25
    adaptive_apv: bool = False
    rank: str = "id"
    pooled: bool = False

    def __post_init__(self):
        sizes = tuple(int(s) for s in self.sizes)
        strides = tuple(int(s) for s in self.strides)
        object.__setattr__(self, "sizes", sizes)
        object.__setattr__(self, "strides", strides)
        if not sizes:
            raise ValueError("LevelParams.sizes must not be empty")
        if len(sizes) != len(strides):
            raise ValueError(f"one stride per size expected, got sizes={sizes} strides={strides}")
        if min(sizes) < 1 or min(strides) < 1:
            raise ValueError(f"sizes and strides must be >= 1 px, got {sizes}, {strides}")
        if not (0.0 < float(self.overlap)):
            raise ValueError(f"overlap must be > 0, got {self.overlap}")
        if self.rank not in ("id", "apv"):
            raise ValueError(f"rank must be 'id' or 'apv', got {self.rank!r}")


@dataclass(frozen=True)
class SelectionConfig:
    """A complete patch-selection configuration (one named preset).

    Attributes:
        name: preset name, recorded with the selected patches.
        levels: one :class:`LevelParams` per hierarchy level. One level = the flat
            variants of §3.1.2; two levels = hierarchical (§3.1.3): the saliency map is
            recomputed on each selected level-1 patch and level-2 patches are selected
            inside it.
        reference_width: image width in pixels the sizes/strides are stated for
            (3848 for the thesis' 3848x2168 frames).
        min_patch_size: smallest patch side in pixels of the INPUT image after scaling.
            The thesis never used patches below 224 px (CLIP's input side) so that no
            patch is upscaled; with its 3848-px frames that rule and proportional
            scaling coincide. Scaled sizes below ``min_patch_size`` are raised to it
            (their stride is scaled by the same factor). The presets use 32 px, i.e.
            proportional scaling (224 px at 3848 -> 79 px at 1360); pass
            ``min_patch_size=224`` to apply the thesis' no-upscaling rule literally.
        margin: inner-rectangle margin of Eq. 3.2, fraction of the patch side (0.10).
        cover_border: improvement beyond the thesis (default False = thesis). When True,
            :func:`candidate_grid` adds a last row/column flush with the right/bottom
            image border so that the border strip left by the stride is also covered.
        emit_levels: which levels' patches are returned (default: all). The thesis
            returns level-1 and level-2 patches (5 + 5 x 6 = 35); an improved preset may
            use level 1 only as zoom regions.
        context: improvement beyond the thesis (default 0 = thesis: level-2 patches lie
            inside their level-1 patch and its saliency is computed on exactly that crop).
            When > 0, the crop whose saliency is recomputed is the parent patch grown by
            ``context`` x its side on every side (clipped to the image), and a level-2
            candidate is allowed when its CENTRE lies inside the parent patch. Objects cut
            by the parent's border can then still be centred in a patch, and saliency
            models that suppress regions touching the crop border (boolean maps) or blur
            at the border see them whole.
        level1_tiles: improvement beyond the thesis (default 0 = thesis: one level-1 map
            predicted on the whole image). When > 0, the level-1 map is the mean of the
            whole-image map and a map stitched from maps predicted on overlapping square
            tiles of side ``level1_tiles`` x the largest level-1 patch size (stride half a
            tile; overlaps averaged). Models that downscale their input (SimpleNet's 256 px,
            §3.1.3) then see small objects at a finer scale already at level 1, while the
            whole-image term keeps tiles of empty sky from being amplified by their own
            normalisation.
        scaled_to: (width, height) the sizes were scaled to, or None when unscaled.
    """

    name: str
    levels: tuple[LevelParams, ...]
    reference_width: int = 3848
    min_patch_size: int = 32
    margin: float = 0.10
    cover_border: bool = False
    emit_levels: tuple[int, ...] | None = None
    context: float = 0.0
    level1_tiles: float = 0.0
    scaled_to: tuple[int, int] | None = None

    def __post_init__(self):
        levels = tuple(self.levels)
        object.__setattr__(self, "levels", levels)
        if not levels:
            raise ValueError("SelectionConfig needs at least one level")
        if not 0.0 <= self.margin < 0.5:
            raise ValueError(f"margin must be in [0, 0.5), got {self.margin}")
        if self.context < 0:
            raise ValueError(f"context must be >= 0, got {self.context}")
        if self.level1_tiles < 0:
            raise ValueError(f"level1_tiles must be >= 0, got {self.level1_tiles}")
        if self.reference_width < 1:
            raise ValueError("reference_width must be >= 1 px")
        if self.emit_levels is not None:
            emit = tuple(int(i) for i in self.emit_levels)
            if not emit or min(emit) < 1 or max(emit) > len(levels):
                raise ValueError(f"emit_levels must name levels 1..{len(levels)}, got {emit}")
            object.__setattr__(self, "emit_levels", emit)

    @property
    def max_patches(self) -> int | None:
        """Upper bound on patches per image (k1 + k1*k2 + ...), None when a level keeps all."""
        total, prod = 0, 1
        for i, lv in enumerate(self.levels, start=1):
            if lv.k <= 0:
                return None
            prod *= lv.k
            if self.emit_levels is None or i in self.emit_levels:
                total += prod
        return total

    def scaled(self, width: int, height: int) -> "SelectionConfig":
        """This configuration with sizes and strides in pixels of a ``width`` x ``height`` image.

        Every size becomes ``max(round(size * width / reference_width), min_patch_size)``
        and its stride is multiplied by the same factor as its size (at least 1 px), so the
        stride/size ratio of the thesis is kept. Sizes that coincide after rounding are
        merged (the smaller stride wins). The result has ``reference_width == width``, so
        scaling it again to the same width is a no-op.

        Args:
            width, height: input image size in pixels (>= 1).
        Returns:
            a new :class:`SelectionConfig` with ``scaled_to == (width, height)``.
        Raises:
            ValueError: non-positive width/height.
        """
        if width < 1 or height < 1:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        if self.scaled_to == (width, height) and self.reference_width == width:
            return self
        factor = width / float(self.reference_width)
        new_levels = []
        for lv in self.levels:
            merged: dict[int, int] = {}
            for s, st in zip(lv.sizes, lv.strides):
                new_s = max(int(round(s * factor)), int(self.min_patch_size), 1)
                new_st = max(int(round(st * new_s / float(s))), 1)
                merged[new_s] = min(new_st, merged.get(new_s, new_st))
            sizes = tuple(sorted(merged, reverse=True))
            new_levels.append(
                dataclasses.replace(lv, sizes=sizes, strides=tuple(merged[s] for s in sizes))
            )
        return dataclasses.replace(
            self, levels=tuple(new_levels), reference_width=int(width), scaled_to=(int(width), int(height))
        )

    def to_dict(self) -> dict:
        """JSON-serialisable dict of the configuration (for metadata / benchmark output)."""
        return dataclasses.asdict(self)


def _lv(sizes, strides, thr, k, overlap=0.25, **kw) -> LevelParams:
    return LevelParams(tuple(sizes), tuple(strides), float(thr), int(k), float(overlap), **kw)


# Faithful presets: thesis Appendix A, Tables A.1-A.4, unchanged (sizes at 3848 px width).
_FAITHFUL = {
    # Table A.1: grid of 448-px patches, stride 224 px, no filtering at all.
    "baseline-unfiltered": SelectionConfig(
        "baseline-unfiltered", (_lv((448,), (224,), -1.0, 0, 1.0),)
    ),
    # Table A.2
    "baseline-filtered": SelectionConfig(
        "baseline-filtered", (_lv((448,), (224,), 0.05, 35, 0.25),)
    ),
    # Table A.3
    "multisize-filtered": SelectionConfig(
        "multisize-filtered", (_lv((896, 448, 224), (224, 112, 56), 0.05, 35, 0.25),)
    ),
    # Table A.4: level 1 896 px / k=5, level 2 448+224 px / k=6 per level-1 patch -> 35.
    "hierarchical-filtered": SelectionConfig(
        "hierarchical-filtered",
        (
            _lv((896,), (224,), 0.05, 5, 0.25),
            _lv((448, 224), (112, 56), 0.3, 6, 0.25),
        ),
    ),
}

# Improved presets (beyond the thesis): Table A.4's sizes, strides, k and overlap are kept,
# each preset adds one principled change to the previous one (measured separately in
# benchmarks/RESULTS.md). Same budget: at most 5 + 5 x 6 = 35 patches per image.
_A4_L1 = _FAITHFUL["hierarchical-filtered"].levels[0]
_A4_L2 = _FAITHFUL["hierarchical-filtered"].levels[1]
_IMPROVED = {
    # The thesis' absolute level-2 threshold 0.3 was set for SimpleNet's sigmoid maps; on a
    # min-max normalised weight-free map of a crop it removes most candidates. Relative
    # threshold instead: keep level-2 candidates whose mean saliency exceeds the crop's mean.
    "hierarchical-adaptive": SelectionConfig(
        "hierarchical-adaptive",
        (_A4_L1, dataclasses.replace(_A4_L2, apv_threshold=1.0, adaptive_apv=True)),
    ),
    # + context: saliency recomputed on the level-1 patch grown by 25 % per side, level-2
    # patches centred inside the level-1 patch (objects cut by its border stay findable).
    "hierarchical-context": SelectionConfig(
        "hierarchical-context",
        (_A4_L1, dataclasses.replace(_A4_L2, apv_threshold=1.0, adaptive_apv=True)),
        context=0.25,
    ),
    # + pooled level-2 budget: the 5 x 6 = 30 level-2 patches are shared by the image's
    # level-1 regions (one greedy selection across them) instead of exactly 6 each.
    "hierarchical-pooled": SelectionConfig(
        "hierarchical-pooled",
        (_A4_L1, dataclasses.replace(_A4_L2, apv_threshold=1.0, adaptive_apv=True, pooled=True)),
        context=0.25,
    ),
    # + level-1 tiles: the level-1 map is the mean of the whole-frame map and a map stitched from
    # overlapping tiles of 1.5 x the level-1 patch side, so small objects are seen at a finer
    # scale already at level 1. Chosen by 5-fold cross-validated capture (benchmarks/capture_cv.py:
    # 0.805 +- 0.058 held out vs 0.781 +- 0.050 without tiles; picked in all five nested folds).
    "hierarchical-pooled-tiles": SelectionConfig(
        "hierarchical-pooled-tiles",
        (_A4_L1, dataclasses.replace(_A4_L2, apv_threshold=1.0, adaptive_apv=True, pooled=True)),
        context=0.25,
        level1_tiles=1.5,
    ),
}

PRESETS: dict[str, SelectionConfig] = {**_FAITHFUL, **_IMPROVED}
"""Named configurations: the four faithful ones (thesis Appendix A, unchanged) and the
improved hierarchical ones (same sizes and budget, see the comments above)."""

DEFAULT_PRESET: str = "hierarchical-pooled-tiles"
"""The configuration with the best 5-fold cross-validated capture (benchmarks/RESULTS.md, epitome
block); the mining job's default."""

DEFAULT_SALIENCY: str = "sr-bms"
"""Weight-free saliency backend paired with :data:`DEFAULT_PRESET`: the mean of the
multi-scale colour spectral residual and Boolean Map Saliency maps."""


def get_preset(name: str, **overrides) -> SelectionConfig:
    """A named preset, optionally with fields overridden.

    Args:
        name: a key of :data:`PRESETS`.
        **overrides: any :class:`SelectionConfig` field (``min_patch_size=224``,
            ``margin=0.1``, ``levels=(...)``), or per-level fields applied to every level
            (``k=10``, ``overlap=0.5``, ``apv_threshold=0.1``), or to one level with a
            ``level<i>_`` prefix (``level2_k=4``, ``level1_sizes=(896, 448)``;
            a size override without strides keeps the stride/size ratio of the
            level's first size).
    Returns:
        a new :class:`SelectionConfig` (name unchanged).
    Raises:
        KeyError: unknown preset; the message lists the known names.
        TypeError: unknown override field.
    """
    if name not in PRESETS:
        raise KeyError(f"unknown selection preset {name!r}; known: {sorted(PRESETS)}")
    cfg = PRESETS[name]
    if not overrides:
        return cfg
    cfg_fields = {f.name for f in dataclasses.fields(SelectionConfig)}
    lvl_fields = {f.name for f in dataclasses.fields(LevelParams)}
    top = {k: v for k, v in overrides.items() if k in cfg_fields}
    levels = list(cfg.levels)
    for key, val in overrides.items():
        if key in cfg_fields:
            continue
        targets: Sequence[int]
        if key.startswith("level") and "_" in key:
            head, fname = key.split("_", 1)
            try:
                idx = int(head[5:]) - 1
            except ValueError:
                raise TypeError(f"unknown override {key!r}") from None
            if not 0 <= idx < len(levels):
                raise TypeError(f"override {key!r}: preset {name!r} has {len(levels)} level(s)")
            targets = [idx]
        else:
            fname, targets = key, range(len(levels))
        if fname not in lvl_fields:
            raise TypeError(
                f"unknown override {key!r}; config fields: {sorted(cfg_fields)}, level fields: {sorted(lvl_fields)}"
            )
        for i in targets:
            lv = levels[i]
            if fname == "sizes" and not any(k.endswith("strides") for k in overrides):
                ratio = lv.strides[0] / float(lv.sizes[0])
                new_sizes = tuple(int(s) for s in val)
                levels[i] = dataclasses.replace(
                    lv, sizes=new_sizes, strides=tuple(max(1, int(round(s * ratio))) for s in new_sizes)
                )
            else:
                levels[i] = dataclasses.replace(lv, **{fname: val})
    top["levels"] = tuple(levels)
    return dataclasses.replace(cfg, **top)


# --------------------------------------------------------------------------------------
# candidates and scores (vectorised)
# --------------------------------------------------------------------------------------
def candidate_grid(height: int, width: int, size: int, stride: int, cover_border: bool = False) -> np.ndarray:
    """Strided square candidate patches of one size (thesis §3.1.1).

    Top-left corners are at 0, stride, 2*stride, ... in x and y while the patch fits in
    the image. A patch larger than the image in either dimension yields no candidate.

    Args:
        height, width: image (or region) size in pixels.
        size: patch side in pixels (>= 1).
        stride: distance in pixels between adjacent candidates (>= 1).
        cover_border: also add a last column/row flush with the right/bottom border when
            the stride leaves a strip uncovered (not in the thesis).
    Returns:
        (N, 4) int32 boxes ``x0, y0, x1, y1`` (x1/y1 exclusive), row-major order
        (y, then x). N = 0 when ``size`` exceeds the image.
    Raises:
        ValueError: size or stride < 1.
    """
    if size < 1 or stride < 1:
        raise ValueError(f"size and stride must be >= 1, got size={size} stride={stride}")
    if size > width or size > height:
        return np.zeros((0, 4), np.int32)

    def starts(extent: int) -> np.ndarray:
        s = np.arange(0, extent - size + 1, stride, dtype=np.int64)
        if cover_border and s[-1] != extent - size:
            s = np.append(s, extent - size)
        return s

    xs, ys = starts(width), starts(height)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    x0, y0 = xx.ravel(), yy.ravel()
    return np.stack([x0, y0, x0 + size, y0 + size], axis=1).astype(np.int32)


def _integral(sal_map: np.ndarray) -> np.ndarray:
    sal = np.asarray(sal_map)
    if sal.ndim != 2:
        raise ValueError(f"saliency map must be 2-D (H, W), got shape {sal.shape}")
    ii = np.zeros((sal.shape[0] + 1, sal.shape[1] + 1), np.float64)
    np.cumsum(np.cumsum(sal, axis=0, dtype=np.float64), axis=1, out=ii[1:, 1:])
    return ii


def _check_boxes(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    b = np.asarray(boxes)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4), got {b.shape}")
    b = b.astype(np.int64, copy=False)
    if len(b) and (
        (b[:, 0] < 0).any() or (b[:, 1] < 0).any() or (b[:, 2] > shape[1]).any() or (b[:, 3] > shape[0]).any()
        or (b[:, 2] <= b[:, 0]).any() or (b[:, 3] <= b[:, 1]).any()
    ):
        raise ValueError(f"boxes must be non-empty and inside the {shape[1]}x{shape[0]} map")
    return b


def _sums_from_integral(ii: np.ndarray, b: np.ndarray) -> np.ndarray:
    x0, y0, x1, y1 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    return ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]


def _inner_boxes(b: np.ndarray, margin: float) -> np.ndarray:
    """Inner rectangles of Eq. 3.2: each side shrunk by round(margin * side) px."""
    w = b[:, 2] - b[:, 0]
    h = b[:, 3] - b[:, 1]
    mx = np.floor(margin * w + 0.5).astype(np.int64)
    my = np.floor(margin * h + 0.5).astype(np.int64)
    # keep at least one inner pixel
    mx = np.minimum(mx, (w - 1) // 2)
    my = np.minimum(my, (h - 1) // 2)
    return np.stack([b[:, 0] + mx, b[:, 1] + my, b[:, 2] - mx, b[:, 3] - my], axis=1)


def _apv_id(ii: np.ndarray, b: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray]:
    area = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).astype(np.float64)
    total = _sums_from_integral(ii, b)
    inner = _inner_boxes(b, margin)
    a_in = ((inner[:, 2] - inner[:, 0]) * (inner[:, 3] - inner[:, 1])).astype(np.float64)
    s_in = _sums_from_integral(ii, inner)
    a_out = area - a_in
    mean_in = s_in / a_in
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_out = np.where(a_out > 0, (total - s_in) / np.maximum(a_out, 1), mean_in)
    return total / area, mean_in - mean_out


def score_apv(sal_map: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Average pixel value S_apv of each box (thesis Eq. 3.1).

    S_apv(p) = (1/255) * (1/A) * sum of the pixels of patch p. The map is already in
    [0, 1] here, so the 1/255 factor is a no-op and S_apv is in [0, 1].

    Args:
        sal_map: (H, W) float saliency map in [0, 1].
        boxes: (N, 4) int boxes x0, y0, x1, y1 (pixels, exclusive), inside the map.
    Returns:
        (N,) float32 mean saliency per box.
    Raises:
        ValueError: bad shapes, empty or out-of-map boxes.
    """
    b = _check_boxes(boxes, np.asarray(sal_map).shape[:2])
    if len(b) == 0:
        return np.zeros(0, np.float32)
    area = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).astype(np.float64)
    return (_sums_from_integral(_integral(sal_map), b) / area).astype(np.float32)


def score_id(sal_map: np.ndarray, boxes: np.ndarray, margin: float = 0.10) -> np.ndarray:
    """Inner-difference score S_id of each box (thesis Eq. 3.2).

    S_id(p) = (1/255) * (mean of the inner part - mean of the outer part). The inner part
    is the centred rectangle obtained by moving every side inwards by
    ``round(margin * side)`` pixels (10 % of the side in the thesis); the outer part is
    the rest of the patch (a frame). The map is in [0, 1], so 1/255 is a no-op and
    S_id is in [-1, 1]. A box too small to have a frame (margin rounds to 0 px) scores 0.

    Args:
        sal_map: (H, W) float saliency map in [0, 1].
        boxes: (N, 4) int boxes x0, y0, x1, y1 (pixels, exclusive), inside the map.
        margin: inner-rectangle margin as a fraction of the side, in [0, 0.5).
    Returns:
        (N,) float32 scores.
    Raises:
        ValueError: bad shapes, empty or out-of-map boxes, margin outside [0, 0.5).
    """
    if not 0.0 <= margin < 0.5:
        raise ValueError(f"margin must be in [0, 0.5), got {margin}")
    b = _check_boxes(boxes, np.asarray(sal_map).shape[:2])
    if len(b) == 0:
        return np.zeros(0, np.float32)
    return _apv_id(_integral(sal_map), b, margin)[1].astype(np.float32)


def overlap_larger(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Overlap of one box with many: intersection area / area of the larger of the two (§3.1.2).

    Args:
        box: (4,) or (..., 4) int boxes x0, y0, x1, y1; broadcast against ``boxes``.
        boxes: (N, 4) or (..., N, 4) boxes.
    Returns:
        float64 overlaps in [0, 1], broadcast shape without the last axis.
    """
    a = np.asarray(box, np.float64)
    b = np.asarray(boxes, np.float64)
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return iw * ih / np.maximum(np.maximum(area_a, area_b), 1e-12)


def greedy_select_grouped(
    boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, k: int, overlap: float, valid: np.ndarray | None = None
) -> np.ndarray:
    """Algorithm 2 run independently inside every group, all groups vectorised together.

    Within each group, candidates are visited in decreasing score (ties: lower index
    first); a candidate is added only if its overlap (intersection / area of the larger
    box) with EVERY patch already selected in its group is < ``overlap``; stop at ``k``
    per group or when no candidate is left. Implementation: k rounds; each round takes
    the best remaining candidate of every group and removes, in one vectorised step, all
    candidates of that group that overlap it by >= ``overlap`` -- equivalent to the
    sequential test because the overlap is symmetric.

    Args:
        boxes: (N, 4) int boxes.
        scores: (N,) float scores (higher is better); NaN is treated as -inf.
        groups: (N,) int group ids (regions / images); any integers.
        k: patches per group; ``k <= 0`` means no limit. Or an (N,) int array giving
            each candidate's group budget (constant within a group).
        overlap: maximum overlap; ``overlap >= 1`` disables the overlap test.
        valid: optional (N,) bool mask of candidates allowed (e.g. passed the S_apv filter).
    Returns:
        (M,) int64 indices into ``boxes``, sorted by (group id, selection order).
    Raises:
        ValueError: shape mismatch.
    """
    boxes = np.asarray(boxes)
    scores = np.asarray(scores, np.float64)
    groups = np.asarray(groups)
    n = len(boxes)
    if boxes.shape != (n, 4) or scores.shape != (n,) or groups.shape != (n,):
        raise ValueError(f"shape mismatch: boxes {boxes.shape}, scores {scores.shape}, groups {groups.shape}")
    alive = np.ones(n, bool) if valid is None else np.asarray(valid, bool).copy()
    alive &= ~np.isnan(scores)
    if n == 0 or not alive.any():
        return np.zeros(0, np.int64)
    uniq, gidx = np.unique(groups, return_inverse=True)
    if np.ndim(k) == 0 and k <= 0 and overlap >= 1.0:  # nothing to filter: all valid candidates, by score
        order = np.lexsort((np.arange(n), -scores, gidx))
        return order[alive[order]].astype(np.int64)
    g = len(uniq)
    # pad into a (G, L) layout sorted by score within each group
    order = np.lexsort((np.arange(n), -scores, gidx))
    counts = np.bincount(gidx, minlength=g)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    L = int(counts.max())
    pos = np.arange(n) - np.repeat(starts, counts)
    table = np.full((g, L), -1, np.int64)
    table[gidx[order], pos] = order
    present = table >= 0
    alive_t = present & alive[np.where(present, table, 0)]
    bx = boxes.astype(np.float64)[np.where(present, table, 0)]  # (G, L, 4)
    k_arr = np.asarray(k)
    if k_arr.ndim == 0:
        k_g = np.full(g, int(k_arr))
    else:  # one budget per candidate, constant within a group
        k_g = np.zeros(g, np.int64)
        k_g[gidx] = k_arr.astype(np.int64)
    k_g = np.where(k_g <= 0, L, np.minimum(k_g, L))
    kmax = int(k_g.max())
    count = np.zeros(g, np.int64)
    chosen = []
    rows = np.arange(g)
    for _ in range(kmax):
        has = alive_t.any(axis=1) & (count < k_g)
        if not has.any():
            break
        first = np.argmax(alive_t, axis=1)  # best remaining (table is score-sorted)
        r = rows[has]
        c = first[has]
        chosen.append(np.stack([r, c], axis=1))
        count[r] += 1
        alive_t[r, c] = False
        if overlap < 1.0:
            ov = overlap_larger(bx[r, c][:, None, :], bx[r])  # (R, L)
            alive_t[r] &= ov < overlap
    if not chosen:
        return np.zeros(0, np.int64)
    rc = np.concatenate(chosen, axis=0)
    # stable sort by group keeps per-group selection order
    rc = rc[np.argsort(rc[:, 0], kind="stable")]
    return table[rc[:, 0], rc[:, 1]]


def greedy_select(boxes: np.ndarray, scores: np.ndarray, k: int, overlap: float) -> np.ndarray:
    """Greedy top-k selection with an overlap limit (thesis Algorithm 2, §3.1.2).

    Candidates are visited from the highest to the lowest score (ties: lower index
    first). A candidate is added only if its overlap with every already selected patch,
    measured as intersection area / area of the larger of the two patches, is strictly
    below ``overlap``. Selection stops after ``k`` patches or when candidates run out.

    Args:
        boxes: (N, 4) int boxes x0, y0, x1, y1 in pixels.
        scores: (N,) float scores (S_id of Eq. 3.2 in the thesis).
        k: maximum number of patches; ``k <= 0`` = no limit.
        overlap: maximum overlap in [0, 1]; ``>= 1`` disables the test.
    Returns:
        (M,) int64 indices into ``boxes`` in selection order (M <= k).
    Raises:
        ValueError: shape mismatch.
    """
    n = len(np.asarray(boxes))
    return greedy_select_grouped(boxes, scores, np.zeros(n, np.int64), k, overlap)


# --------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------
@dataclass
class Selection:
    """Patches selected in one image.

    Attributes:
        boxes: (N, 4) int32 x0, y0, x1, y1 in ORIGINAL image pixels, x1/y1 exclusive,
            inside the image, no duplicates.
        levels: (N,) int8 hierarchy level of each patch, 1 = level 1, 2 = level 2, ...
        scores: (N,) float32 selection score on the map it was selected on: S_id
            (Eq. 3.2), or S_apv (Eq. 3.1) for a level whose ``rank`` is ``"apv"``.
        novelty: (N,) float32 mean epitome NLL inside each box (nats per K x K patch,
            :meth:`mining.epitome.backend.EpitomeSaliency.box_novelty`), set by the mining
            actor's select stage when its backend has an epitome member; None otherwise.
    """

    boxes: np.ndarray
    levels: np.ndarray
    scores: np.ndarray
    novelty: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.boxes)


def _candidates(h: int, w: int, lv: LevelParams, cover_border: bool) -> np.ndarray:
    grids = [candidate_grid(h, w, s, st, cover_border) for s, st in zip(lv.sizes, lv.strides)]
    return np.concatenate(grids, axis=0) if grids else np.zeros((0, 4), np.int32)


def _whole_frame(h: int, w: int) -> Selection:
    return Selection(
        np.array([[0, 0, w, h]], np.int32), np.array([1], np.int8), np.array([0.0], np.float32)
    )


def _as_map(m: np.ndarray, shape: tuple[int, int], who: str) -> np.ndarray:
    m = np.asarray(m, np.float32)
    if m.shape != shape:
        raise ValueError(f"saliency backend {who!r} returned a map of shape {m.shape}, expected {shape}")
    return m


def score_apv_id_torch(maps, boxes: np.ndarray, region: np.ndarray, margin: float = 0.10, device=None):
    """S_apv (Eq. 3.1) and S_id (Eq. 3.2) of boxes on several maps at once, with torch.

    The GPU path of the selector: the maps are padded into one (R, H+1, W+1) integral
    image tensor (``torch.cumsum``) and every box of every map is scored by one gather.
    Numerically equal (float64) to :func:`score_apv` / :func:`score_id`.

    Args:
        maps: list of R (H_r, W_r) float maps in [0, 1] (numpy arrays or tensors).
        boxes: (N, 4) int boxes x0, y0, x1, y1 in pixels of their own map.
        region: (N,) int index of each box's map.
        margin: Eq. 3.2 inner-rectangle margin (fraction of the side).
        device: torch device (default: CUDA when available, else CPU).
    Returns:
        (apv, sid): two (N,) float64 numpy arrays.
    """
    import torch

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    b = np.asarray(boxes, np.int64)
    if len(b) == 0:
        return np.zeros(0), np.zeros(0)
    hmax = max(int(m.shape[0]) for m in maps)
    wmax = max(int(m.shape[1]) for m in maps)
    stack = torch.zeros((len(maps), hmax + 1, wmax + 1), dtype=torch.float64, device=dev)
    for r, m in enumerate(maps):
        t = torch.as_tensor(np.asarray(m) if not torch.is_tensor(m) else m, device=dev, dtype=torch.float64)
        stack[r, 1 : t.shape[0] + 1, 1 : t.shape[1] + 1] = t
    ii = stack.cumsum(1).cumsum(2).reshape(len(maps), -1)
    stride = wmax + 1
    rg = torch.as_tensor(np.asarray(region, np.int64), device=dev)

    def sums(bb: np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(bb, device=dev)
        x0, y0, x1, y1 = t.unbind(1)
        g = lambda y, x: ii[rg, y * stride + x]  # noqa: E731
        return g(y1, x1) - g(y0, x1) - g(y1, x0) + g(y0, x0)

    inner = _inner_boxes(b, margin)
    area = torch.as_tensor(((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).astype(np.float64), device=dev)
    a_in = torch.as_tensor(((inner[:, 2] - inner[:, 0]) * (inner[:, 3] - inner[:, 1])).astype(np.float64), device=dev)
    total, s_in = sums(b), sums(inner)
    a_out = area - a_in
    mean_in = s_in / a_in
    mean_out = torch.where(a_out > 0, (total - s_in) / a_out.clamp(min=1), mean_in)
    return (total / area).cpu().numpy(), (mean_in - mean_out).cpu().numpy()


def _select_level(
    maps: list[np.ndarray],
    offsets: np.ndarray,
    parents: np.ndarray,
    lv: LevelParams,
    margin: float,
    cover_border: bool,
    device=None,
    owners: np.ndarray | None = None,
):
    """Score and greedily select candidates in several regions at once.

    maps[i] is the saliency map of crop i whose top-left is offsets[i] (x, y) in image
    pixels; parents[i] is the region (x0, y0, x1, y1, image px) candidates' centres must
    lie in. ``device``: a CUDA torch device scores all regions in one batched torch op.
    Returns boxes in image pixels, ranking scores, region index per box.
    """
    all_local, all_boxes, all_reg, all_thr = [], [], [], []
    for i, m in enumerate(maps):
        h, w = m.shape
        cand = _candidates(h, w, lv, cover_border)
        if len(cand) == 0:
            continue
        thr = lv.apv_threshold * float(m.mean()) if lv.adaptive_apv else lv.apv_threshold
        cand_img = cand + np.array([offsets[i][0], offsets[i][1]] * 2, np.int32)
        px0, py0, px1, py1 = parents[i]
        if (px0, py0, px1, py1) != (offsets[i][0], offsets[i][1], offsets[i][0] + w, offsets[i][1] + h):
            cx2 = cand_img[:, 0] + cand_img[:, 2]  # twice the centre
            cy2 = cand_img[:, 1] + cand_img[:, 3]
            inside = (cx2 >= 2 * px0) & (cx2 < 2 * px1) & (cy2 >= 2 * py0) & (cy2 < 2 * py1)
            cand, cand_img = cand[inside], cand_img[inside]
            if len(cand) == 0:
                continue
        all_local.append(cand.astype(np.int64))
        all_boxes.append(cand_img)
        all_reg.append(np.full(len(cand), i, np.int64))
        all_thr.append(np.full(len(cand), thr))
    if not all_boxes:
        return np.zeros((0, 4), np.int32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    boxes = np.concatenate(all_boxes)
    reg = np.concatenate(all_reg)
    thr = np.concatenate(all_thr)
    if device is not None and getattr(device, "type", str(device)) != "cpu":
        apv, sid = score_apv_id_torch(maps, np.concatenate(all_local), reg, margin, device)
    else:  # one integral image per region (numpy), no loop per box
        parts = [_apv_id(_integral(maps[r[0]]), loc, margin) for loc, r in zip(all_local, all_reg)]
        apv = np.concatenate([p[0] for p in parts])
        sid = np.concatenate([p[1] for p in parts])
    valid = apv > thr if lv.apv_threshold >= 0 else np.ones(len(boxes), bool)
    rank = sid if lv.rank == "id" else apv
    if lv.pooled and owners is not None:
        # one budget per IMAGE: k x its number of parent regions
        n_reg = np.bincount(owners, minlength=owners.max() + 1)
        grp = owners[reg]
        idx = greedy_select_grouped(boxes, rank, grp, (lv.k * n_reg[grp]) if lv.k > 0 else 0, lv.overlap, valid=valid)
    else:
        # k patches per REGION (per image at level 1, per level-1 patch at level 2)
        idx = greedy_select_grouped(boxes, rank, reg, lv.k, lv.overlap, valid=valid)
    return boxes[idx], rank[idx].astype(np.float32), reg[idx]


def _tile_level1(images, regions, maps, cfgs, backend):
    """Level-1 maps blended with maps stitched from overlapping tiles (config.level1_tiles)."""
    jobs, owners = [], []
    for ri, (i, x0, y0, x1, y1) in enumerate(regions):
        cfg = cfgs[i]
        if cfg.level1_tiles <= 0:
            continue
        h, w = y1 - y0, x1 - x0
        t = int(round(cfg.level1_tiles * max(cfg.levels[0].sizes)))
        t = min(t, h, w)
        if t >= max(h, w):
            continue
        tiles = candidate_grid(h, w, t, max(t // 2, 1), cover_border=True)
        for tb in tiles:
            jobs.append(np.ascontiguousarray(images[i][y0 + tb[1]:y0 + tb[3], x0 + tb[0]:x0 + tb[2]]))
            owners.append((ri, tb))
    if not jobs:
        return maps
    tile_maps = backend.predict_batch(jobs)
    acc = {ri: np.zeros_like(maps[ri]) for ri, _ in owners}
    cnt = {ri: np.zeros_like(maps[ri]) for ri, _ in owners}
    for (ri, tb), tm in zip(owners, tile_maps):
        tm = _as_map(tm, (tb[3] - tb[1], tb[2] - tb[0]), getattr(backend, "name", "?"))
        acc[ri][tb[1]:tb[3], tb[0]:tb[2]] += tm
        cnt[ri][tb[1]:tb[3], tb[0]:tb[2]] += 1.0
    out = list(maps)
    for ri in acc:
        out[ri] = 0.5 * maps[ri] + 0.5 * acc[ri] / np.maximum(cnt[ri], 1.0)
    return out


def select_patches_batch(
    images: Sequence[np.ndarray], config: SelectionConfig, backend: SaliencyBackend, device=None
) -> list[Selection]:
    """Patch selection (thesis §3.1, Algorithm 2) for several images at once.

    For every level: saliency maps are predicted with ``backend.predict_batch`` for all
    regions of all images at once (whole images at level 1, every selected level-1 patch
    at level 2 -- the saliency is *recomputed* on the crop, §3.1.3), all candidates are
    scored with integral images, filtered with S_apv (Eq. 3.1) and greedily selected by
    S_id (Eq. 3.2) with the overlap rule, at most ``k`` per region.

    Args:
        images: list of (H_i, W_i, 3) uint8 RGB images (sizes may differ).
        config: a :class:`SelectionConfig`; scaled to each image's width inside.
        backend: a :class:`~mining.saliency.base.SaliencyBackend`.
        device: where candidates are scored; default: the backend's ``device``
            attribute if it has one (SimpleNet on CUDA -> the torch path of
            :func:`score_apv_id_torch`, batched over all regions of all images), else
            numpy on CPU. Results are identical either way.
    Returns:
        one :class:`Selection` per image, boxes ordered by level then selection order.
        An image smaller than the smallest level-1 patch gets one whole-frame patch
        (level 1, score 0). An image where no level-1 candidate passes the S_apv filter
        (e.g. a constant saliency map) gets an empty selection, as in Algorithm 2.
    Raises:
        ValueError: an image is not (H, W, 3) uint8, or the backend returns a map of the
            wrong shape.
    """
    images = list(images)
    for im in images:
        check_image(im)
    if device is None:
        device = getattr(backend, "device", None)
    n = len(images)
    cfgs = [config.scaled(im.shape[1], im.shape[0]) for im in images]
    out: list[Selection | None] = [None] * n
    per_image: list[list[tuple[np.ndarray, np.ndarray, int]]] = [[] for _ in range(n)]
    # level 1 inputs: whole images that can hold at least one level-1 patch
    active = []
    for i, (im, cfg) in enumerate(zip(images, cfgs)):
        h, w = im.shape[:2]
        if min(cfg.levels[0].sizes) > min(h, w):
            out[i] = _whole_frame(h, w)
        else:
            active.append(i)
    # region state: (image index, x0, y0, x1, y1)
    regions = [(i, 0, 0, images[i].shape[1], images[i].shape[0]) for i in active]
    nlev = len(config.levels)
    for li in range(nlev):
        if not regions:
            break
        bounds = []
        for (i, x0, y0, x1, y1) in regions:
            ctx = cfgs[i].context if li > 0 else 0.0
            if ctx > 0:
                H, W = images[i].shape[:2]
                mx, my = int(round(ctx * (x1 - x0))), int(round(ctx * (y1 - y0)))
                bounds.append((max(x0 - mx, 0), max(y0 - my, 0), min(x1 + mx, W), min(y1 + my, H)))
            else:
                bounds.append((x0, y0, x1, y1))
        crops = [np.ascontiguousarray(images[r[0]][b[1]:b[3], b[0]:b[2]]) for r, b in zip(regions, bounds)]
        maps = backend.predict_batch(crops)
        maps = [_as_map(m, c.shape[:2], getattr(backend, "name", "?")) for m, c in zip(maps, crops)]
        if li == 0:
            maps = _tile_level1(images, regions, maps, cfgs, backend)
        offsets = np.array([(b[0], b[1]) for b in bounds], np.int64)
        parents = np.array([r[1:] for r in regions], np.int64)
        # all images share the config's level structure; sizes may differ per image width
        boxes_l, scores_l, reg_l = [], [], []
        by_cfg: dict[tuple, list[int]] = {}
        for ri, r in enumerate(regions):
            by_cfg.setdefault(cfgs[r[0]].levels[li], []).append(ri)
        for lv, ris in by_cfg.items():
            cfg0 = cfgs[regions[ris[0]][0]]
            b, s, rr = _select_level(
                [maps[j] for j in ris], offsets[ris], parents[ris], lv, cfg0.margin, cfg0.cover_border, device,
                owners=np.array([regions[j][0] for j in ris], np.int64),
            )
            boxes_l.append(b)
            scores_l.append(s)
            reg_l.append(np.asarray(ris, np.int64)[rr] if len(rr) else rr)
        b = np.concatenate(boxes_l)
        s = np.concatenate(scores_l)
        rr = np.concatenate(reg_l)
        new_regions = []
        for j in range(len(b)):
            img_i = regions[rr[j]][0]
            per_image[img_i].append((b[j], s[j], li + 1))
            x0, y0, x1, y1 = (int(v) for v in b[j])
            new_regions.append((img_i, x0, y0, x1, y1))
        regions = new_regions
    for i in active:
        cfg = cfgs[i]
        emit = set(cfg.emit_levels) if cfg.emit_levels is not None else None
        items = [t for t in per_image[i] if emit is None or t[2] in emit]
        if not items:  # nothing passed the S_apv filter (e.g. a blank frame)
            out[i] = Selection(np.zeros((0, 4), np.int32), np.zeros(0, np.int8), np.zeros(0, np.float32))
            continue
        boxes = np.stack([t[0] for t in items]).astype(np.int32)
        scores = np.array([t[1] for t in items], np.float32)
        levels = np.array([t[2] for t in items], np.int8)
        # drop duplicates (the same level-2 box selected in two overlapping level-1 regions)
        _, first = np.unique(boxes, axis=0, return_index=True)
        keep = np.sort(first)
        out[i] = Selection(boxes[keep], levels[keep], scores[keep])
    return out  # type: ignore[return-value]


def select_patches(image: np.ndarray, config: SelectionConfig, backend: SaliencyBackend) -> Selection:
    """Select patches in one image (thesis §3.1, Algorithm 2; hierarchy §3.1.3).

    Args:
        image: (H, W, 3) uint8 RGB.
        config: a :class:`SelectionConfig` (e.g. ``get_preset("hierarchical-filtered")``),
            scaled to the image width inside.
        backend: saliency backend producing (H, W) float32 maps in [0, 1].
    Returns:
        a :class:`Selection`; boxes in image pixels, no duplicates. An image smaller than
        the smallest level-1 patch yields a single whole-frame patch at level 1.
    Raises:
        ValueError: image not (H, W, 3) uint8; backend map of the wrong shape.
    """
    return select_patches_batch([image], config, backend)[0]
