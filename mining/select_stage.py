"""The select stage of a mining actor: :func:`mining.select_device.select_frames` with per-frame isolation.

* CUDA: :meth:`FrameSelector.select_batch`, one ``select_frames`` call per frame batch (device
  tensors); if the batch fails (a bad frame, OOM), the frames are selected one by one so
  that one bad frame becomes one ``select`` errors row.
* CPU: :meth:`FrameSelector.select_one`, called per frame in the decode pool
  (:class:`mining.frames.FrameSource`). Weight-free backends get one instance per thread (an
  OpenCV saliency object is not documented as thread-safe); learned backends (torch modules
  in eval mode) are shared.
* ``impl=None`` uses :func:`mining.select_device.default_impl` of the device; if that
  implementation raises NotImplementedError, the selector logs it and uses ``numpy`` from
  then on. An implementation asked for explicitly is never replaced: its NotImplementedError
  fails the shard.
* **Novelty** (issue 14): when the backend is the ``epitome`` backend or an ensemble with an
  epitome member (:func:`mining.epitome.backend.find_epitome_member`), every Selection gets
  ``novelty`` (M,) float32: the mean raw epitome NLL inside each selected box, from the
  full-frame NLL map of the frame tensor the selection saw
  (:meth:`~mining.epitome.backend.EpitomeSaliency.box_novelty`; the patches table's
  ``novelty`` column). It is computed per frame after its selection, in the same stage (and
  timer) on both paths; a frame whose novelty fails becomes a ``select`` errors row like a
  frame whose selection fails. Without an epitome member ``novelty`` stays None (null column).
  Cost: the epitome backend keeps only the maps of its *last* ``predict_tensors`` call, and
  the selection's level-1 call sees a view of the frame and is followed by the level-2 crop
  calls, so ``box_novelty`` recomputes the frame's NLL map once (one ``Epitome.nll_map`` per
  frame, ``Epitome.flops_per_pixel`` x working pixels; same values, deterministic).
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

import numpy as np

from mining.select_device import default_impl, select_frames
from mining.stages import StageTimer

log = logging.getLogger(__name__)


class FrameSelector:
    """Selects patches in decoded frames.

    Args:
        config: the :class:`mining.selection.SelectionConfig`.
        backend: the saliency backend used by the main loop (and shared when not weight-free).
        impl: ``"torch"`` | ``"numpy"`` | None (the device's default).
        device: the actor's torch device.
        backend_factory: builds another instance of the backend (per-thread copies).
    Attributes:
        impl: the implementation in use (recorded in every ledger record).
    """

    def __init__(self, config, backend, *, impl: str | None, device, backend_factory: Callable | None = None):
        self.config, self.backend = config, backend
        self.impl = impl or default_impl(device)
        self._auto = impl is None
        self._factory = backend_factory
        self._local = threading.local()

    def run(self, images: list, backend=None) -> list:
        """``select_frames(images)`` -> one Selection per (3, H, W) uint8 tensor, with ``novelty``
        set when the backend has an epitome member (see the module docstring)."""
        backend = backend or self.backend
        impl = self.impl
        try:
            sels = select_frames(images, self.config, backend, impl=impl)
        except NotImplementedError as e:
            if not self._auto or impl == "numpy":
                raise
            log.warning("selection impl %r unavailable (%s); this actor uses 'numpy'", impl, e)
            self.impl = "numpy"
            sels = select_frames(images, self.config, backend, impl="numpy")
        return add_novelty(images, sels, backend)

    def thread_backend(self):
        """The backend for the calling thread (its own instance if weight-free, else the shared one)."""
        if self._factory is None or not getattr(self.backend, "weight_free", False):
            return self.backend
        b = getattr(self._local, "backend", None)
        if b is None:
            b = self._local.backend = self._factory()
        return b

    def select_one(self, image):
        """CPU path, in a pool thread: (3, H, W) uint8 host tensor -> Selection (exceptions propagate)."""
        return self.run([image], self.thread_backend())[0]

    def select_batch(self, frames: list, timer: StageTimer) -> None:
        """CUDA path: sets ``selection`` (or a ("select", reason) ``error``) on every decoded frame
        of ``frames`` (:class:`mining.frames.Frame`) that has neither yet.

        Raises:
            NotImplementedError: the implementation is unavailable and was asked for explicitly.
        """
        todo = [f for f in frames if f.error is None and f.selection is None]
        if not todo:
            return
        with timer.time("select"):
            try:
                sels = self.run([f.image for f in todo])
            except NotImplementedError:
                raise
            except Exception:  # noqa: BLE001 - one bad frame (or OOM) fails the batch: isolate it
                log.warning("batched selection failed; selecting %d frames one by one", len(todo), exc_info=True)
                sels = []
                for f in todo:
                    try:
                        sels.append(self.run([f.image])[0])
                    except NotImplementedError:
                        raise
                    except Exception as e:  # noqa: BLE001 - becomes this frame's errors row
                        sels.append(e)
        for f, s in zip(todo, sels):
            if isinstance(s, Exception):
                f.error = ("select", f"selection failed: {type(s).__name__}: {s}")
            else:
                f.selection = s


def add_novelty(images: list, selections: list, backend) -> list:
    """Set ``novelty`` on each Selection from the backend's epitome member (no-op without one).

    Args:
        images: the (3, H, W) uint8 frame tensors the selection ran on (native pixels).
        selections: their :class:`mining.selection.Selection` objects (changed in place).
        backend: the saliency backend used for the selection.
    Returns:
        ``selections``; each has ``novelty`` (M,) float32 (nats per K x K working-resolution
        patch, one per box) when ``backend`` is or holds an ``epitome`` backend, else None.
    Raises:
        whatever :meth:`~mining.epitome.backend.EpitomeSaliency.box_novelty` raises.
    """
    from mining.epitome.backend import find_epitome_member

    member = find_epitome_member(backend)
    if member is None:
        return selections
    for im, sel in zip(images, selections):
        if len(sel.boxes):
            sel.novelty = np.asarray(member.box_novelty(im, sel.boxes), np.float32).reshape(-1)
        else:
            sel.novelty = np.zeros(0, np.float32)
    return selections
