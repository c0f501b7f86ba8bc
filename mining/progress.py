"""Progress of a mining run: frame/patch counts from the actors, aggregated and printed by the driver.

Each mining actor calls ``ProgressCounter.add(frames, patches)`` once per frame batch (fire and
forget); the driver reads the totals every few seconds and prints one line with frames/s,
patches/s and an ETA. Plain lines (not a redrawn bar) so that they read the same in a terminal,
in ``ray job logs`` and in CI logs.
"""
from __future__ import annotations

import time


class ProgressCounter:
    """Actor body: running totals of frames and patches (``num_cpus=0``; ``add`` is cheap)."""

    def __init__(self):
        self.frames = 0
        self.patches = 0

    def add(self, frames: int, patches: int) -> None:
        self.frames += int(frames)
        self.patches += int(patches)

    def totals(self) -> tuple[int, int]:
        """(frames, patches) reported so far."""
        return self.frames, self.patches


def fmt_eta(seconds: float | None) -> str:
    """``H:MM:SS``, or ``?`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class ProgressMeter:
    """Driver side: turns counter totals and shard completions into progress lines.

    Args:
        shards: shards to mine in this run.
        frames_total: frames in those shards when known (directory shards), else None: the
            total is then estimated from the frames per finished shard.
        t0: when mining started (``time.perf_counter()``), the origin of the rates.
    """

    def __init__(self, shards: int, frames_total: int | None, t0: float | None = None):
        self.shards = shards
        self.frames_total = frames_total
        self.t0 = time.perf_counter() if t0 is None else t0
        self.shards_done = 0
        self.frames_done_shards = 0   # frames of finished shards (for the estimate)

    def shard_done(self, frames: int) -> None:
        self.shards_done += 1
        self.frames_done_shards += int(frames)

    def total_frames(self) -> int | None:
        if self.frames_total is not None:
            return self.frames_total
        if self.shards_done:
            return int(round(self.frames_done_shards / self.shards_done * self.shards))
        return None

    def line(self, frames: int, patches: int) -> str:
        """``[2/5 shards] 130/320 frames (41%) | 6.1 frames/s, 212 patches/s | ETA 0:00:31``."""
        el = max(1e-6, time.perf_counter() - self.t0)
        fps, pps = frames / el, patches / el
        total = self.total_frames()
        if total:
            pct = f" ({min(100, 100 * frames // max(1, total))}%)"
            eta = fmt_eta((total - frames) / fps) if fps > 0 else "?"
            done = f"{frames}/{total}{'' if self.frames_total is not None else '~'} frames{pct}"
        else:
            eta, done = "?", f"{frames} frames"
        return (f"  [{self.shards_done}/{self.shards} shards] {done} | {fps:.1f} frames/s, {pps:.0f} patches/s "
                f"| ETA {eta}")
