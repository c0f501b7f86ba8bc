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
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

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
        """``select_frames(images)`` -> one Selection per (3, H, W) uint8 tensor."""
        backend = backend or self.backend
        impl = self.impl
        try:
            return select_frames(images, self.config, backend, impl=impl)
        except NotImplementedError as e:
            if not self._auto or impl == "numpy":
                raise
            log.warning("selection impl %r unavailable (%s); this actor uses 'numpy'", impl, e)
            self.impl = "numpy"
            return select_frames(images, self.config, backend, impl="numpy")

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
