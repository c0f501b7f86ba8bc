"""The patch batcher (mapper stage) and the patch writer (writer stage) of a mining actor.

    frames + selections ──crop_boxes──> pending crops ──flush: CLIP──> embeddings (device)
        ──non-blocking copy to pinned host memory + CUDA event──> writer thread
        ──wait event, build Arrow columns──> ShardOutput

Design decisions (and why):

* **All boxes of all frames of a batch in a few ops** (:func:`crop_boxes`): boxes are grouped
  by (frame shape, box w, box h) across the batch; each group is ONE advanced-indexing gather
  (broadcast index tensors, nothing of size n*h*w is materialised) and ONE bicubic
  antialiased ``interpolate``. A fleet batch has 3-4 groups, so a 32-frame batch costs ~10
  kernel launches instead of ~35 per frame. The values equal
  :meth:`mining.embed.ClipEmbedder.crops_from_image` exactly (same uint8 pixels, same
  float32 interpolation per sample; tests/test_batcher.py).
* **Full CLIP batches**: a flush embeds whole multiples of ``batch_size`` and keeps the
  remainder pending (with its rows), so every forward but the shard's last is full.
* **No blocking ``.cpu()`` in the main loop**: on CUDA the flush launches the forward,
  casts the L2-normalised embeddings to float16 on the device (the stored dtype; same
  rounding as casting on the host), starts a non-blocking copy into pinned memory and
  records an event. The writer thread waits on that event and builds the Arrow columns
  (patch ids are blake2b hashes: per-patch host work that now overlaps the GPU). On CPU
  the same code path runs; the "event" is None.
* **Bounded writer queue** (``max_pending`` flushes): a slow writer slows the main loop
  instead of holding unbounded pinned memory.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mining.stages import StageTimer
from mining.store import ShardOutput, patch_columns

_END = object()


# --------------------------------------------------------------------------- crops

def _index(a: np.ndarray, dev: torch.device) -> torch.Tensor:
    """int64 index tensor on ``dev``; on CUDA through pinned memory with a non-blocking copy
    (a plain copy from pageable memory would synchronise the stream, i.e. wait for CLIP)."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
    if dev.type == "cuda":
        return t.pin_memory().to(dev, non_blocking=True)
    return t if dev.type == "cpu" else t.to(dev)


def crop_boxes(frames: Sequence[torch.Tensor], boxes: Sequence[np.ndarray], size: int,
               device: torch.device | str | None = None) -> torch.Tensor:
    """Cut every box of every frame from the full-resolution frames and resize it to (size, size).

    Args:
        frames: F (3, H_f, W_f) uint8 RGB tensors on one device (views are fine).
        boxes: F int arrays (n_f, 4): x0, y0, x1, y1 pixels of frame f, x1/y1 exclusive.
        size: output side S in pixels (the CLIP input side).
        device: where the result goes (default: the frames' device).
    Returns:
        (N, 3, S, S) float32 in [0, 255], N = sum n_f, rows in frame order then box order;
        bicubic with antialias (CLIP's PIL preprocessing) where a box is not S x S.
    Raises:
        ValueError: F frames but a different number of box arrays, or a box that is empty
            or not inside its frame.
    """
    if len(frames) != len(boxes):
        raise ValueError(f"{len(frames)} frames but {len(boxes)} box arrays")
    dev = torch.device(device) if device is not None else (frames[0].device if len(frames) else torch.device("cpu"))
    bx = [np.asarray(b, dtype=np.int64).reshape(-1, 4) for b in boxes]
    n = sum(len(b) for b in bx)
    out = torch.empty((n, 3, size, size), dtype=torch.float32, device=dev)
    if n == 0:
        return out
    fidx = np.repeat(np.arange(len(frames)), [len(b) for b in bx])
    b = np.concatenate(bx)
    hw = np.array([tuple(f.shape[1:]) for f in frames], dtype=np.int64).reshape(-1, 2)  # (F, 2) H, W
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    bad = (w < 1) | (h < 1) | (b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > hw[fidx, 1]) | (b[:, 3] > hw[fidx, 0])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"box {b[i].tolist()} is empty or outside its {hw[fidx[i], 1]}x{hw[fidx[i], 0]} frame")
    # frames of one shape are stacked channels-last (one frame: a view, no copy)
    shapes: dict[tuple[int, int], list[int]] = {}
    for f, s in enumerate(map(tuple, hw.tolist())):
        shapes.setdefault(s, []).append(f)
    local = np.empty(len(frames), dtype=np.int64)
    for fs in shapes.values():
        local[fs] = np.arange(len(fs))
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(zip(hw[fidx, 0].tolist(), hw[fidx, 1].tolist(), w.tolist(), h.tolist())):
        groups.setdefault(key, []).append(i)
    stacks: dict[tuple[int, int], torch.Tensor] = {}
    for (fh, fw, bw, bh), rows in groups.items():
        st = stacks.get((fh, fw))
        if st is None:
            hwc = [frames[f].to(dev, non_blocking=True).permute(1, 2, 0) for f in shapes[(fh, fw)]]
            st = stacks[(fh, fw)] = hwc[0].unsqueeze(0) if len(hwc) == 1 else torch.stack(hwc)
        r = np.asarray(rows)
        fl = _index(local[fidx[r]], dev).view(-1, 1, 1)
        ys = (_index(b[r, 1], dev).view(-1, 1) + torch.arange(bh, device=dev)).unsqueeze(2)
        xs = (_index(b[r, 0], dev).view(-1, 1) + torch.arange(bw, device=dev)).unsqueeze(1)
        g = st[fl, ys, xs]  # (n, bh, bw, 3) uint8: one gather for the whole group
        x = g.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        if (bh, bw) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        out[_index(r, dev)] = x.clamp_(0, 255)
    return out


# --------------------------------------------------------------------------- pending rows

def _cat(blocks: list, dtype, shape: tuple) -> np.ndarray:
    if not blocks:
        return np.zeros((0,) + shape[1:], dtype)
    return np.concatenate([np.asarray(x, dtype).reshape(shape) for x in blocks])


@dataclass
class PatchRows:
    """Row columns of pending patches (no patch ids yet: the writer hashes them).

    Attributes:
        image_uris: (F,) frame URIs. frame: (N,) int32 index into ``image_uris``.
        boxes: (N, 4) int32. levels: (N,) int8. scores: (N,) float32.
        novelty: (N,) float32 epitome novelty (nats), NaN where the selection had none
            (written as null); None at construction means all NaN.
    """

    image_uris: list[str]
    frame: np.ndarray
    boxes: np.ndarray
    levels: np.ndarray
    scores: np.ndarray
    novelty: np.ndarray | None = None

    def __post_init__(self):
        if self.novelty is None:
            self.novelty = np.full(len(self.frame), np.nan, np.float32)

    def __len__(self) -> int:
        return len(self.frame)

    @classmethod
    def from_selections(cls, image_uris: Sequence[str], selections: Sequence) -> "PatchRows":
        counts = [len(s.boxes) for s in selections]
        nov = [s.novelty if getattr(s, "novelty", None) is not None else np.full(n, np.nan, np.float32)
               for s, n in zip(selections, counts)]
        return cls(list(image_uris), np.repeat(np.arange(len(counts), dtype=np.int32), counts),
                   _cat([s.boxes for s in selections], np.int32, (-1, 4)),
                   _cat([s.levels for s in selections], np.int8, (-1,)),
                   _cat([s.scores for s in selections], np.float32, (-1,)),
                   _cat(nov, np.float32, (-1,)))

    @classmethod
    def concat(cls, parts: Sequence["PatchRows"]) -> "PatchRows":
        if len(parts) == 1:
            return parts[0]
        offs = np.cumsum([0] + [len(p.image_uris) for p in parts[:-1]])
        return cls([u for p in parts for u in p.image_uris],
                   np.concatenate([p.frame + o for p, o in zip(parts, offs)]).astype(np.int32),
                   np.concatenate([p.boxes for p in parts]), np.concatenate([p.levels for p in parts]),
                   np.concatenate([p.scores for p in parts]), np.concatenate([p.novelty for p in parts]))

    def take(self, sl: slice) -> "PatchRows":
        """Rows ``sl`` with only the frames they use."""
        used, frame = np.unique(self.frame[sl], return_inverse=True)
        return PatchRows([self.image_uris[i] for i in used.tolist()], frame.astype(np.int32).reshape(-1),
                         self.boxes[sl], self.levels[sl], self.scores[sl], self.novelty[sl])


# --------------------------------------------------------------------------- writer

class PatchWriter:
    """The writer stage: embeddings + rows -> Arrow column blocks of a :class:`ShardOutput`.

    Args:
        out: the shard's output (only this writer adds patch blocks to it).
        timer: its host work goes to stage "write".
        threaded: True: a writer thread (waits on each flush's CUDA event); False: in the caller.
        max_pending: flushes queued before :meth:`put` blocks.
    Raises (from :meth:`close`): the first exception the writer hit.
    """

    def __init__(self, out: ShardOutput, timer: StageTimer, *, threaded: bool = True, max_pending: int = 4):
        self.out, self.timer = out, timer
        self._err: BaseException | None = None
        self._q: queue.Queue | None = None
        self._t: threading.Thread | None = None
        if threaded:
            self._q = queue.Queue(maxsize=max(1, max_pending))
            self._t = threading.Thread(target=self._loop, name="patch-writer", daemon=True)
            self._t.start()

    def put(self, emb: torch.Tensor, ready, rows: PatchRows) -> None:
        """Queue one flush: ``emb`` (N, D) float16 host tensor (filled once ``ready``, a CUDA event
        or None, has completed) and its N rows."""
        if self._err is not None:
            raise self._err
        item = (emb, ready, rows)
        if self._q is None:
            self._write(item)
        else:
            self._q.put(item)

    def _write(self, item) -> None:
        emb, ready, rows = item
        if ready is not None:
            ready.synchronize()  # the device->host copy of this flush is done
        t0 = time.perf_counter()
        e = emb.numpy()
        if emb.is_pinned():
            e = e.copy()  # give the pinned block back to the caching host allocator
        cols = patch_columns(rows.image_uris, rows.frame, rows.boxes, rows.levels, rows.scores, rows.novelty)
        self.out.add_patch_block(cols, e)
        self.timer.add("write", time.perf_counter() - t0)

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is _END:
                return
            if self._err is None:
                try:
                    self._write(item)
                except BaseException as e:  # noqa: BLE001 - re-raised by put/close; keep draining
                    self._err = e

    def close(self) -> None:
        """Wait until every queued flush is written; re-raise the writer's first error."""
        if self._t is not None and self._t.is_alive():
            self._q.put(_END)
            self._t.join()
        if self._err is not None:
            raise self._err


# --------------------------------------------------------------------------- batcher

class PatchBatcher:
    """Pending crops of a shard and their CLIP flush.

    Args:
        embedder: a :class:`mining.embed.ClipEmbedder` (its device, input side, forward).
        batch_size: patches per CLIP forward.
        writer: where embeddings + rows go. timer: stages "crop" and "embed".
    """

    def __init__(self, embedder, batch_size: int, writer: PatchWriter, timer: StageTimer):
        self.embedder, self.batch_size, self.writer, self.timer = embedder, max(1, int(batch_size)), writer, timer
        self._px: list[torch.Tensor] = []
        self._rows: list[PatchRows] = []
        self.pending = 0

    def add(self, images: Sequence[torch.Tensor], image_uris: Sequence[str], selections: Sequence) -> int:
        """Crop the selected boxes of a batch of frames and queue them; flushes full CLIP batches.

        Args:
            images: F (3, H, W) uint8 frames. image_uris: their URIs. selections: their Selections.
        Returns:
            the number of patches queued.
        """
        if not len(images):
            return 0
        with self.timer.time("crop"):
            px = crop_boxes(images, [s.boxes for s in selections], self.embedder.image_size, self.embedder.device)
            rows = PatchRows.from_selections(image_uris, selections)
        self._px.append(px)
        self._rows.append(rows)
        self.pending += len(rows)
        if self.pending >= self.batch_size:
            self.flush(final=False)
        return len(rows)

    def flush(self, final: bool = True) -> None:
        """Embed the pending patches (all of them if ``final``, else whole ``batch_size`` multiples)."""
        n = self.pending if final else (self.pending // self.batch_size) * self.batch_size
        if n == 0:
            return
        with self.timer.time("embed"):
            px = torch.cat(self._px) if len(self._px) > 1 else self._px[0]
            rows = PatchRows.concat(self._rows)
            if n < len(rows):
                self._px, self._rows = [px[n:]], [rows.take(slice(n, None))]
                px, rows = px[:n], rows.take(slice(0, n))
            else:
                self._px, self._rows = [], []
            self.pending -= n
            emb = self.embedder.encode_pixels(px, self.batch_size, dtype=torch.float16)
            ready = None
            if emb.is_cuda:
                host = torch.empty(emb.shape, dtype=emb.dtype, pin_memory=True)
                host.copy_(emb, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
                emb = host
        self.writer.put(emb, ready, rows)
