"""Stage names and the thread-safe stage timer of a mining actor.

Stages of one shard, in data-flow order (``stage_s`` of every ledger record)::

    read    fetch the shard's bytes (reader thread: time inside ``iter_shard``)
    decode  bytes -> frames (pool threads on CPU; the nvJPEG decode thread on CUDA)
    select  patch selection (pool threads on CPU; the main loop, batched, on CUDA)
    crop    cut + resize every box of a frame batch (main loop)
    embed   CLIP forward (main loop; on CUDA the time to launch it, the device time is ``forward_s``)
    write   build the Arrow columns of the patches (writer thread) + write the Parquet parts

Each stage's seconds are *work* seconds summed over the threads that ran it. Stages run
concurrently, so their sum can exceed the shard's ``wall_s``; ``wait_s`` (not a stage)
is how long the main loop sat waiting for frames.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

STAGES = ("read", "decode", "select", "crop", "embed", "write")
HOST_STAGES = ("read", "write")
"""Stages that stay on the host on the device path (their sum is the record's ``host_s``)."""


class StageTimer:
    """Seconds per stage, added from any thread.

    Args:
        stages: the stage names reported by :meth:`stage_s` (others may be added, e.g. ``wait``).
    """

    def __init__(self, stages=STAGES):
        self._stages = tuple(stages)
        self._s: dict[str, float] = dict.fromkeys(self._stages, 0.0)
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._s[stage] = self._s.get(stage, 0.0) + float(seconds)

    @contextmanager
    def time(self, stage: str):
        """``with timer.time("crop"): ...`` adds the block's wall seconds to ``stage``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def get(self, stage: str) -> float:
        with self._lock:
            return self._s.get(stage, 0.0)

    def stage_s(self, ndigits: int = 4) -> dict[str, float]:
        """{stage: seconds} of the named stages, rounded."""
        with self._lock:
            return {k: round(self._s[k], ndigits) for k in self._stages}
