"""Patch selection over device-resident frames: ONE entry point, two implementations.

:func:`select_frames` takes a batch of decoded frames as (3, H, W) uint8 tensors (on the
GPU in a GPU actor) and returns one :class:`mining.selection.Selection` per frame.

* ``impl="torch"``: the §3.1 selector written as batched torch ops on the frames' device
  (this file): saliency maps from ``backend.predict_tensors``, candidates scored from
  integral images, greedy overlap selection over all regions of all frames at once.
* ``impl="numpy"``: the reference path, :func:`mining.selection.select_patches_batch`
  on host copies of the frames.

``impl=None`` picks the default for the frames' device (:func:`default_impl`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from mining.saliency.base import SaliencyBackend
from mining.selection import Selection, SelectionConfig, select_patches_batch

IMPLS = ("torch", "numpy")


def default_impl(device) -> str:
    """The implementation the mining job uses on ``device`` (a torch device or its name)."""
    kind = getattr(device, "type", str(device)).split(":")[0]
    return "torch" if kind == "cuda" else "numpy"


def select_frames(frames: Sequence, config: SelectionConfig, backend: SaliencyBackend,
                  impl: str | None = None) -> list[Selection]:
    """Select patches in a batch of frames (thesis §3.1, Algorithm 2; hierarchy §3.1.3).

    Args:
        frames: a (B, 3, H, W) uint8 tensor or a list of (3, H_i, W_i) uint8 tensors, all on
            one device.
        config: a :class:`~mining.selection.SelectionConfig`, scaled to each frame's width.
        backend: any saliency backend.
        impl: ``"torch"``, ``"numpy"`` or None (:func:`default_impl` of the frames' device).
    Returns:
        one :class:`~mining.selection.Selection` per frame (numpy arrays on the host).
    Raises:
        ValueError: unknown ``impl``, frames not (3, H, W) uint8.
    """
    frames = list(frames)
    if not frames:
        return []
    impl = impl or default_impl(frames[0].device)
    if impl not in IMPLS:
        raise ValueError(f"unknown selection impl {impl!r}; use one of {IMPLS}")
    if impl == "numpy":
        host = [np.ascontiguousarray(f.permute(1, 2, 0).cpu().numpy()) for f in frames]
        return select_patches_batch(host, config, backend, device="cpu")
    return select_patches_torch(frames, config, backend)


def select_patches_torch(frames: list, config: SelectionConfig, backend: SaliencyBackend) -> list[Selection]:
    """The torch implementation of :func:`mining.selection.select_patches_batch` (see module docstring)."""
    raise NotImplementedError("torch selector: being written")
