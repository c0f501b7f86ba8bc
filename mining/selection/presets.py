"""Selection configurations of :mod:`mining.selection`: the per-level parameters
(:class:`LevelParams`), a whole configuration (:class:`SelectionConfig`), the thesis' presets
(Appendix A, Tables A.1-A.4, unchanged) and the improved hierarchical ones, and
:func:`get_preset`.  Parameters are stated for 3848 x 2168 frames, as in the thesis.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence


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
