"""Frames for epitome training: shard streams, the working-resolution reservoir (issue 14 item 2).

* :class:`FrameStream`: decoded frames of a list of shards (the mining readers,
  :mod:`mining.shards` + :mod:`mining.decode`: image directories, tars, Parquet, local or
  ``s3://``), in order, resumable at a (shard, record) position;
* :func:`to_working_u8`: a native frame at the epitome's working resolution, as uint8;
* :class:`Reservoir`: at most ``capacity`` such frames, a uniform sample of the stream
  (Algorithm R). Memory bound: ``capacity * 3 * ceil(H/scale) * ceil(W/scale)`` bytes (13 MB
  for 256 frames of 1360 x 800 at scale 8). Quantising working-resolution pixels to uint8
  changes them by at most 1/510, far below the epitome's smallest standard deviation
  (sqrt(min_var) = 0.03).

Used by the Ray Train job (:mod:`mining.epitome.job`) and by the mining driver's bootstrap of a
fresh root (:mod:`mining.epitome.resolve`).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from mining.epitome.model import Epitome


def fixed_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """glibc only: serve allocations >= ``nbytes`` with mmap, returned to the OS when freed.

    Why: glibc raises its mmap threshold after the first large free, so each frame's big
    temporaries (13 MB float copies of a 1360 x 800 frame) come from the heap, and the small
    reservoir frames allocated between them keep the heap from shrinking: measured, 100 GTSDB
    frames into the reservoir grew the RSS by 1.4 GB, and by 21 MB with the threshold fixed at 1 MB.
    A no-op where ``mallopt`` is unavailable.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, int(nbytes))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class FrameStream:
    """Decoded frames of a list of shards, in order, resumable at a (shard, record) position.

    Args:
        refs: the shards (:class:`mining.shards.ShardRef`).
        position: ``(shard index, records consumed in it)`` to start after.
        max_pixels: decompression-bomb limit (:func:`mining.decode.decode_image`).
    Attributes:
        position: where the next record comes from; errors: records that could not be decoded.

    Iterating yields (H, W, 3) uint8 RGB numpy frames; unreadable records and shards are
    counted in ``errors`` and skipped. Creating one fixes the process' mmap threshold
    (:func:`fixed_mmap_threshold`), so that holding many small frames stays bounded in memory.
    """

    def __init__(self, refs: Sequence, position: tuple[int, int] = (0, 0), max_pixels: int | None = None):
        from mining.decode import DEFAULT_MAX_PIXELS

        self.refs, self.position, self.errors = list(refs), tuple(position), 0
        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS
        fixed_mmap_threshold()

    def __iter__(self) -> Iterator:
        from mining.decode import DecodeError, decode_image
        from mining.shards import iter_shard

        for si in range(self.position[0], len(self.refs)):
            skip = self.position[1] if si == self.position[0] else 0
            try:
                for ri, rec in enumerate(iter_shard(self.refs[si])):
                    if ri < skip:
                        continue
                    self.position = (si, ri + 1)
                    if rec.error is not None:
                        self.errors += 1
                        continue
                    try:
                        im = decode_image(rec.data, max_pixels=self.max_pixels)
                    except DecodeError:
                        self.errors += 1
                        continue
                    yield im
            except (OSError, ValueError):  # an unreadable shard: skip it, like mining records it
                self.errors += 1
            self.position = (si + 1, 0)


def to_working_u8(model: Epitome, image, device) -> torch.Tensor:
    """(H, W, 3) uint8 numpy frame -> (3, ceil(H/scale), ceil(W/scale)) uint8 tensor on ``device``."""
    t = torch.from_numpy(image).permute(2, 0, 1).to(device)
    return model.to_working(t).mul_(255).round_().clamp_(0, 255).to(torch.uint8)


class Reservoir:
    """At most ``capacity`` frames, a uniform sample of all frames added (Algorithm R).

    Args:
        capacity: the bound (frames).
        seed: RNG seed of the replacement choices.
    """

    def __init__(self, capacity: int, seed: int):
        self.capacity, self.frames, self.seen = int(capacity), [], 0
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, frame: torch.Tensor) -> None:
        self.seen += 1
        if len(self.frames) < self.capacity:
            self.frames.append(frame)
            return
        j = int(torch.randint(self.seen, (1,), generator=self.gen))
        if j < self.capacity:
            self.frames[j] = frame

    def state_dict(self) -> dict:
        return {"frames": [f.cpu() for f in self.frames], "seen": self.seen, "gen": self.gen.get_state()}

    def load_state_dict(self, d: dict, device) -> None:
        self.frames = [f.to(device) for f in d["frames"]]
        self.seen = int(d["seen"])
        self.gen.set_state(d["gen"])
