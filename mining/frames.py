"""The frame source: the reader stage of a mining actor (shard bytes -> batches of decoded frames).

Threads (all stopped by :meth:`FrameSource.close`)::

    reader thread   iter_shard(ref) -> records            (time in iter_shard: stage "read")
    CUDA:  decode thread   up to ``frame_batch`` records -> ONE batched nvJPEG call on a side
           stream -> FrameBatch of (3, H, W) uint8 device tensors          (stage "decode")
    CPU:   thread pool     per frame: Pillow decode (+ selection, when the caller passes
           ``select_one``)                                    (stages "decode", "select")

Design decisions (and why):

* **Batched nvJPEG, EXIF applied by us.** ``torchvision.io.decode_jpeg(list, device="cuda")``
  decodes a whole batch in one call (hardware JPEG engines on A100/H100/H200), but its
  ``apply_exif_orientation`` is implemented on CPU only; the orientation is read from the
  header (Pillow, no pixel decode) and applied on the device with flips / rot90 /
  transposes (:func:`exif_orient`), so boxes refer to the upright frame as on CPU.
* **Only what nvJPEG surely decodes right goes to nvJPEG**: JPEG, Pillow mode RGB or L,
  ending with the EOI marker, under the pixel limit. CMYK/YCCK (Adobe's inverted CMYK is
  undone by Pillow only), truncated files (nvJPEG may fill them silently), other formats
  and anything the batched call rejects go through :func:`mining.decode.decode_image` in
  the thread pool and are uploaded, so errors carry Pillow's precise reason.
* **A side CUDA stream for decode.** The decode thread's allocations and kernels run on its
  own stream; a batch carries an event that the consumer's stream waits on (and its tensors
  are ``record_stream``-ed there), so decoding batch k+1 overlaps selection/CLIP of batch k.
* **Frames stay in shard order** (futures consumed in submission order): the CLIP batches,
  hence the embeddings, are the same on every rerun.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import io
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from mining.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from mining.shards import Record, ShardRef, iter_shard
from mining.stages import StageTimer

_END = object()
_JPEG_SOI = b"\xff\xd8\xff"


@dataclass
class Frame:
    """One frame of a shard on its way through the actor.

    Attributes:
        rec: the shard record (URI, metadata, sidecar error).
        image: (3, H, W) uint8 RGB tensor of the upright frame (device on CUDA, host on CPU;
            None when it could not be decoded).
        error: (stage, reason) when the frame is not mined: stage "read" | "decode" | "select".
        selection: its :class:`mining.selection.Selection` once selected.
    """

    rec: Record
    image: torch.Tensor | None = None
    error: tuple[str, str] | None = None
    selection: object | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels, (0, 0) when not decoded."""
        return (0, 0) if self.image is None else (int(self.image.shape[2]), int(self.image.shape[1]))


@dataclass
class FrameBatch:
    """Consecutive frames of one shard, in shard order (error frames included).

    ``ready``: CUDA event recorded on the decode stream after the batch was decoded (None on CPU).
    """

    frames: list[Frame]
    ready: object | None = None

    def wait(self) -> None:
        """Make the current CUDA stream wait for the decode of this batch (no host sync) and mark
        the frames as used there; call it once on every stream that reads the frames."""
        if self.ready is None:
            return
        imgs = [f.image for f in self.frames if f.image is not None and f.image.is_cuda]
        if not imgs:
            return
        cur = torch.cuda.current_stream(imgs[0].device)
        cur.wait_event(self.ready)
        for t in imgs:
            t.record_stream(cur)


# --------------------------------------------------------------------------- decode helpers

def exif_orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1..8) to a (C, H, W) tensor, as ``PIL.ImageOps.exif_transpose``.

    Returns a tensor on the same device (a view for 1; a copy otherwise); unknown values -> unchanged.
    """
    o = int(orientation or 1)
    if o == 2:
        return image.flip(2)
    if o == 3:
        return image.flip(1, 2)
    if o == 4:
        return image.flip(1)
    if o == 5:
        return image.transpose(1, 2).contiguous()
    if o == 6:
        return torch.rot90(image, -1, dims=(1, 2)).contiguous()
    if o == 7:
        return image.transpose(1, 2).flip(1, 2)
    if o == 8:
        return torch.rot90(image, 1, dims=(1, 2)).contiguous()
    return image


def probe_jpeg(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int, int] | None:
    """Header check for the nvJPEG path: (width, height, EXIF orientation) of the stored frame,
    or None when the frame must go through Pillow (not a JPEG, mode other than RGB/L, no EOI
    marker at the end, unreadable header).

    Raises:
        DecodeError: a JPEG header with more than ``max_pixels`` pixels (as :func:`decode_image`).
    """
    if not data or not data.startswith(_JPEG_SOI) or not data[-64:].rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                return None
            w, h = im.size
            orientation = int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - Pillow gives the precise error later
        return None
    if w * h > max_pixels:
        raise DecodeError(f"decompression bomb refused: {w}x{h} = {w * h} pixels > limit {max_pixels}")
    return w, h, orientation


def _nvjpeg(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    # apply_exif_orientation is CPU-only in torchvision; orientation is applied by exif_orient
    out = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=False)
    return list(out)


def upload(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    """(H, W, 3) uint8 host frame -> contiguous (3, H, W) uint8 tensor on ``device``."""
    t = torch.from_numpy(arr)
    if t.device != device:
        t = t.to(device)
    return t.permute(2, 0, 1).contiguous() if device.type != "cpu" else t.permute(2, 0, 1)


def decode_batch(datas: Sequence[bytes], device, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 pool: cf.Executor | None = None,
                 jpeg_decoder: Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]] = _nvjpeg,
                 ) -> list[torch.Tensor | DecodeError]:
    """Decode a batch of encoded frames onto ``device``: JPEGs in one batched call, the rest per frame.

    Args:
        datas: encoded frames (any format :func:`mining.decode.decode_image` reads).
        device: target device; on CUDA the JPEGs go to nvJPEG (``torchvision.io.decode_jpeg`` on a
            list). On CPU (tests) the same call runs libjpeg-turbo.
        max_pixels: decompression-bomb limit, checked from the header before any pixel decode.
        pool: executor for the per-frame Pillow fallbacks (None: in this thread).
        jpeg_decoder: the batched JPEG decoder (list of 1-D uint8 CPU tensors -> list of (3, H, W)).
    Returns:
        one entry per input, in order: a (3, H, W) uint8 upright RGB tensor on ``device``, or the
        :class:`DecodeError` that frame raised.
    """
    dev = torch.device(device)
    out: list = [None] * len(datas)
    jpeg: list[tuple[int, tuple[int, int, int]]] = []
    rest: list[int] = []
    for i, d in enumerate(datas):
        try:
            p = probe_jpeg(d, max_pixels)
        except DecodeError as e:
            out[i] = e
            continue
        if p is None:
            rest.append(i)
        else:
            jpeg.append((i, p))
    if jpeg:
        enc = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i, _ in jpeg]
        try:
            dec = jpeg_decoder(enc, dev)
        except Exception:  # noqa: BLE001 - one bad frame fails the batched call: retry one by one
            dec = []
            for e in enc:
                try:
                    dec.append(jpeg_decoder([e], dev)[0])
                except Exception:  # noqa: BLE001 - Pillow below gives the reason
                    dec.append(None)
        for (i, (w, h, orient)), t in zip(jpeg, dec):
            if t is None or tuple(t.shape) != (3, h, w):
                rest.append(i)
            else:
                out[i] = exif_orient(t, orient)

    def pil(i):
        try:
            return decode_image(datas[i], max_pixels=max_pixels)
        except DecodeError as e:
            return e

    rest.sort()
    arrs = list(pool.map(pil, rest)) if pool is not None and len(rest) > 1 else [pil(i) for i in rest]
    for i, a in zip(rest, arrs):
        out[i] = a if isinstance(a, DecodeError) else upload(a, dev)
    return out


# --------------------------------------------------------------------------- the source

class FrameSource:
    """Batches of decoded frames of one shard (see the module docstring for the threads).

    Args:
        ref: the shard. device: the actor's torch device.
        frame_batch: frames per yielded batch. prefetch: records (CUDA) / frames (CPU) in flight.
        threads: decode pool threads. max_pixels: decompression-bomb limit.
        timer: where read / decode / select / wait seconds go.
        select_one: per-frame path only: ``(3, H, W) uint8 tensor -> Selection``, run in the pool
            right after decode; an exception becomes the frame's ("select", reason) error, except
            NotImplementedError, which aborts the shard.
        batched: decode in batches in the decode thread (None: on CUDA). ``True`` on a CPU device
            runs the device path with libjpeg-turbo instead of nvJPEG (tests).
    Attributes:
        read_error: the exception that ended reading early (None: the shard was read to its end).
    Raises (from iteration):
        whatever the decode thread / pool raised that is not a per-frame problem (e.g. CUDA OOM).
    """

    def __init__(self, ref: ShardRef, device, *, frame_batch: int, prefetch: int, threads: int,
                 max_pixels: int = DEFAULT_MAX_PIXELS, timer: StageTimer | None = None,
                 select_one: Callable | None = None, batched: bool | None = None):
        self.ref = ref
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        self.batched = self.on_cuda if batched is None else bool(batched)
        self.frame_batch = max(1, int(frame_batch))
        self.threads = max(1, int(threads))
        self.max_pixels = max_pixels
        self.timer = timer or StageTimer()
        self.select_one = select_one
        self.read_error: BaseException | None = None
        self._fatal: BaseException | None = None
        self._stop = threading.Event()
        self._pool = cf.ThreadPoolExecutor(self.threads, thread_name_prefix="decode")
        window = max(int(prefetch), self.frame_batch) if self.batched else max(int(prefetch), 2 * self.threads)
        self._rq: queue.Queue = queue.Queue(maxsize=max(2, window))   # records (batched) / futures (per frame)
        self._bq: queue.Queue = queue.Queue(maxsize=2)                 # batched: decoded FrameBatches
        self._threads = [threading.Thread(target=self._read, name=f"read-{ref.uri[-20:]}", daemon=True)]
        if self.batched:
            self._threads.append(threading.Thread(target=self._decode_loop, name="batch-decode", daemon=True))
        self._reader_done = False

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "FrameSource":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the threads and the pool (idempotent); frames not yet consumed are dropped."""
        self._stop.set()
        for q in (self._rq, self._bq):
            try:
                while True:
                    q.get_nowait()
            except queue.Empty:
                pass
        for t in self._threads:
            if t.is_alive():
                t.join(timeout=30)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _put(self, q: queue.Queue, item) -> bool:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _get(self, q: queue.Queue):
        t0 = time.perf_counter()
        while True:
            try:
                item = q.get(timeout=0.2)
                break
            except queue.Empty:
                if self._stop.is_set():
                    item = _END
                    break
        self.timer.add("wait", time.perf_counter() - t0)
        return item

    # ------------------------------------------------------------------ reader thread
    def _read(self) -> None:
        it = iter_shard(self.ref)
        try:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                rec = next(it, None)
                self.timer.add("read", time.perf_counter() - t0)
                if rec is None:
                    break
                item = rec if self.batched else self._pool.submit(self._host_frame, rec)
                if not self._put(self._rq, item):
                    return
        except BaseException as e:  # noqa: BLE001 - surfaced by the runner as a read error
            self.read_error = e
        finally:
            self._put(self._rq, _END)

    # ------------------------------------------------------------------ per frame (CPU): decode (+ select)
    def _host_frame(self, rec: Record) -> Frame:
        if rec.error is not None or rec.data is None:
            return Frame(rec, error=rec.error or ("read", "no data"))
        t0 = time.perf_counter()
        try:
            arr = decode_image(rec.data, max_pixels=self.max_pixels)
        except DecodeError as e:
            self.timer.add("decode", time.perf_counter() - t0)
            return Frame(rec, error=("decode", e.reason))
        frame = Frame(rec, image=torch.from_numpy(arr).permute(2, 0, 1))
        t1 = time.perf_counter()
        self.timer.add("decode", t1 - t0)
        if self.select_one is not None:
            try:
                frame.selection = self.select_one(frame.image)
            except NotImplementedError:
                raise
            except Exception as e:  # noqa: BLE001 - one bad frame must not cost the shard
                frame.error = ("select", f"selection failed: {type(e).__name__}: {e}")
            self.timer.add("select", time.perf_counter() - t1)
        return frame

    def _iter_host(self) -> Iterator[FrameBatch]:
        batch: list[Frame] = []
        while True:
            fut = self._get(self._rq)
            if fut is _END:
                break
            t0 = time.perf_counter()
            frame = fut.result()
            self.timer.add("wait", time.perf_counter() - t0)
            batch.append(frame)
            if len(batch) >= self.frame_batch:
                yield FrameBatch(batch)
                batch = []
        if batch:
            yield FrameBatch(batch)

    # ------------------------------------------------------------------ batched (CUDA): nvJPEG
    def _take(self) -> list[Record]:
        recs: list[Record] = []
        while len(recs) < self.frame_batch and not self._reader_done:
            try:
                item = self._rq.get(timeout=0.2)
            except queue.Empty:
                if self._stop.is_set():
                    break
                continue
            if item is _END:
                self._reader_done = True
            else:
                recs.append(item)
        return recs

    def _decode_loop(self) -> None:
        stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        try:
            while not self._stop.is_set():
                recs = self._take()
                if not recs:
                    break
                t0 = time.perf_counter()
                frames = [Frame(r, error=r.error or ("read", "no data")) if (r.error or r.data is None) else Frame(r)
                          for r in recs]
                todo = [f for f in frames if f.error is None]
                ready = None
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    dec = decode_batch([f.rec.data for f in todo], self.device, max_pixels=self.max_pixels,
                                       pool=self._pool)
                    if stream is not None:
                        ready = torch.cuda.Event()
                        ready.record(stream)
                for f, d in zip(todo, dec):
                    if isinstance(d, DecodeError):
                        f.error = ("decode", d.reason)
                    else:
                        f.image = d
                self.timer.add("decode", time.perf_counter() - t0)
                if not self._put(self._bq, FrameBatch(frames, ready=ready)):
                    return
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            self._fatal = e
        finally:
            self._put(self._bq, _END)

    def _iter_device(self) -> Iterator[FrameBatch]:
        while True:
            b = self._get(self._bq)
            if b is _END:
                break
            yield b

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[FrameBatch]:
        yield from (self._iter_device() if self.batched else self._iter_host())
        if self._fatal is not None:
            raise self._fatal
