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

Layout (one concern per file): :mod:`mining.selection.presets` (configurations and the thesis'
presets), :mod:`mining.selection.scores` (candidate grid, Eq. 3.1/3.2 scores, overlap, greedy
selection), :mod:`mining.selection.hierarchy` (the batched hierarchy and :class:`Selection`).
Everything is importable from ``mining.selection`` as before.
"""
from __future__ import annotations

from mining.selection.hierarchy import (  # noqa: F401
    Selection,
    _tile_level1,
    _whole_frame,
    score_apv_id_torch,
    select_patches,
    select_patches_batch,
)
from mining.selection.presets import (  # noqa: F401
    DEFAULT_PRESET,
    DEFAULT_SALIENCY,
    PRESETS,
    LevelParams,
    SelectionConfig,
    get_preset,
)
from mining.selection.scores import (  # noqa: F401
    _apv_id,
    _integral,
    candidate_grid,
    greedy_select,
    greedy_select_grouped,
    overlap_larger,
    score_apv,
    score_id,
)

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
