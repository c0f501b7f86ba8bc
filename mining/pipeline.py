"""The per-shard mining runner and its Ray driver.

Data flow inside one actor (one per GPU, or per ``cpus_per_actor`` CPUs without a GPU), read
like clip-retrieval's runner: reader -> mapper -> writer, each stage timed (``stage_s``)::

    FrameSource (mining/frames.py)      read: shard reader thread (iter_shard)
                                        decode: CUDA: batched nvJPEG thread; CPU: thread pool
    select_frames (mining/select_device.py)
                                        select: CUDA: one call per frame batch on the device;
                                                CPU: per frame in the decode pool
    PatchBatcher (mining/batcher.py)    crop: all boxes of a frame batch, grouped by size
                                        embed: CLIP (bf16 autocast on GPU), full batches
    PatchWriter (mining/batcher.py)     write: writer thread -> Arrow column blocks,
                                               then the data files + the Delta shard commit

Why explicit actors and not Ray Data ``map_batches``: the unit of work, of retry and of
commit is one *shard*. With explicit actors each shard's outputs are written at
deterministic paths and committed (one Delta commit to the ``shards`` table) by the actor that mined it, a failed
shard is retried as a whole on a (restarted) actor, and a shard that fails every time
becomes one ``failed`` shard commit plus an errors row. Ray Data names output files
``{uuid}_{block}`` and appends (a rerun duplicates rows), aborts the dataset on the
first UDF error by default, and its checkpointing is beta (see ../shared/NOTES.md).

Why the stages are split this way (issue 13; target >= 10,000 patches/s per H200):

* GPU time must not add to host time. On CUDA nothing in the main loop waits for the device:
  frames are decoded on a side stream, selected and cropped on the device, CLIP's output is
  copied back without blocking and turned into rows by the writer thread. The host work per
  frame (reading bytes, building Arrow columns, writing) is reported as ``host_s`` and
  ``host_ms_per_frame`` in every ledger record, so a benchmark shows the host ceiling.
* Frames move in batches (``frame_batch``, 32 on CUDA): one nvJPEG call, one selection call,
  a few crop/resize ops per batch instead of per frame. On CPU a small batch (4) only
  groups the crops; the parallelism comes from the pool.
* CPU actors use all their cores: decode and selection run per frame in a pool of
  ``decode_threads`` threads (default: the actor's CPUs; Pillow, OpenCV and numpy release
  the GIL), torch's intra-op threads are set to the same count for CLIP; weight-free
  saliency backends get one instance per thread (mining/select_stage.py).
* Selection runs on its own CUDA stream: ``select_frames`` returns host arrays, so it syncs
  once per batch; on the CLIP stream that sync would also wait for the previous batch's
  forward. On a second stream it waits for its own kernels only, and CLIP of batch k
  overlaps selection of batch k+1. Host->device index copies go through pinned memory
  for the same reason (:func:`mining.batcher.crop_boxes`).
* A batch whose selection fails is selected again frame by frame, so one bad frame costs
  one errors row, as before the batching (:class:`mining.select_stage.FrameSelector`).
  ``select_impl=None`` picks the device's default; if that one is not available
  (NotImplementedError), the actor uses ``numpy``; an explicitly requested one fails the shard.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from mining.decode import DEFAULT_MAX_PIXELS
from mining.epitome.resolve import BOOTSTRAP_FRAMES, BOOTSTRAP_STEPS
from mining.shards import ShardRef
from mining.stages import HOST_STAGES, STAGES, StageTimer
from mining.store import ShardOutput, image_row, write_shard

log = logging.getLogger(__name__)

DEFAULT_FRAME_BATCH = {"cuda": 32, "cpu": 4}

# Settings the actors need from the driver's environment. Actors on a cluster started with
# `ray start` do not inherit the driver's environment, so these travel in the actor's
# runtime_env (merged by Ray with the job's runtime_env).
PASS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
            "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MINING_S3_RETRIES", "HF_HOME", "HF_HUB_OFFLINE",
            "OPEN_CLIP_CACHE_DIR", "MINING_LTRP_CHECKPOINT", "MINING_MAE_CHECKPOINT", "MINING_RANKER_ARCH",
            "MINING_MAE_ARCH", "MINING_RANKER_RANDOM_INIT", "MINING_KPP_RATIO", "MINING_EPITOME",
            "MINING_FAULT_EXIT_BEFORE_COMMIT")


def actor_env() -> dict:
    """The driver's S3 / model-cache settings to pass to actors (``runtime_env["env_vars"]``)."""
    return {k: os.environ[k] for k in PASS_ENV if k in os.environ}


def actor_cpus() -> int:
    """CPUs this process may use: the Ray actor's assigned ``CPU`` resource, else its CPU affinity."""
    try:
        import ray

        if ray.is_initialized():
            n = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if n:
                return max(1, int(round(n)))
    except Exception:  # noqa: BLE001 - not in a worker, or an older Ray: fall back to affinity
        pass
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


@dataclass
class MineConfig:
    """Everything a mining actor needs; picklable, recorded in every ledger record.

    Selection: ``selector`` is ``saliency`` (thesis hierarchy with the ``saliency`` backend),
    ``ltrp`` or ``kpp`` (learned / training-free patch ranking feeding the same selector);
    ``select_impl`` is ``torch`` | ``numpy`` | None (the device's default, see
    :func:`mining.select_device.default_impl`).
    CLIP: ``clip_model`` (open_clip name), ``clip_pretrained`` (tag or checkpoint path),
    ``clip_random_init`` (explicit smoke-run opt-in).
    Throughput: ``frame_batch`` frames per decode/select/crop batch (None: 32 on CUDA, 4 on
    CPU); ``decode_threads`` (None: the actor's CPUs); ``prefetch`` frames read ahead.
    Epitome (backends that need one, :func:`mining.epitome.resolve.needs_epitome`): ``epitome``
    model file, else the driver resolves one (:func:`mining.epitome.resolve.resolve_epitome`:
    the root's latest, a bootstrap on the run's first frames unless ``epitome_bootstrap`` is
    False, or the fallback to ``sr-bms``).
    """

    preset: str | None = None            # None: mining.selection.DEFAULT_PRESET
    saliency: str | None = None          # None: mining.selection.DEFAULT_SALIENCY
    selector: str = "saliency"
    selection_overrides: dict = field(default_factory=dict)
    select_impl: str | None = None       # "torch" | "numpy" | None: default_impl(device)
    ltrp_checkpoint: str | None = None
    mae_checkpoint: str | None = None
    kpp_ratio: float = 0.25
    ranker_random_init: bool = False
    epitome: str | None = None           # epitome model file; None: resolved by the driver (mining.epitome.resolve)
    epitome_bootstrap: bool = True       # a root without an epitome: train one on the run's first frames
    epitome_bootstrap_frames: int = BOOTSTRAP_FRAMES   # ... on this many frames
    epitome_bootstrap_steps: int = BOOTSTRAP_STEPS     # ... for this many optimiser steps
    clip_model: str = "ViT-B-16"
    clip_pretrained: str | None = "openai"
    clip_random_init: bool = False
    batch_size: int | None = None        # patches per CLIP forward (None: from free memory)
    device: str | None = None            # None: cuda when available else cpu
    decode_threads: int | None = None    # None: the actor's CPU count
    frame_batch: int | None = None       # frames per decode/select batch (None: DEFAULT_FRAME_BATCH)
    prefetch: int = 8                    # frames read ahead per actor
    max_pixels: int = DEFAULT_MAX_PIXELS
    date: str | None = None              # ingest date partition (YYYY-MM-DD); None: today (UTC)
    run_id: str | None = None

    def resolved(self) -> "MineConfig":
        from mining import selection

        c = MineConfig(**asdict(self))
        c.preset = c.preset or selection.DEFAULT_PRESET
        c.saliency = c.saliency or selection.DEFAULT_SALIENCY
        c.date = c.date or _dt.datetime.now(_dt.timezone.utc).date().isoformat()
        c.run_id = c.run_id or f"{c.date}-{uuid.uuid4().hex[:8]}"
        if c.clip_random_init:
            c.clip_pretrained = None
        return c


def make_backend(cfg: MineConfig):
    """The saliency map backend for ``cfg.selector`` (one selector, several map sources).

    One registry call for every selector; the MineConfig fields -> backend kwargs mapping is
    :data:`mining.registry.OPTION_KWARGS`. Raises ValueError (unknown selector, ranker without
    weights) or KeyError (unknown saliency backend).
    """
    from mining.registry import backend_from_config

    return backend_from_config(cfg)


class ShardMiner:
    """Mines shards: loads the selector and CLIP once, then streams shard after shard.

    Args:
        cfg: a :class:`MineConfig` (resolved: date and run_id set).
        writer_thread: build the Arrow columns in a writer thread (default) or in the main loop.
        progress: None, or the name of a :class:`mining.progress.ProgressCounter` actor (same
            namespace): each frame batch reports ``add(frames, patches)`` to it (fire and forget;
            the driver aggregates). A name, not a handle: Ray warns about restartable actors whose
            constructor arguments live in the object store.
    Raises:
        mining.embed.WeightsError: CLIP weights cannot be loaded (never falls back to random).
        ValueError: unknown ``select_impl``.
    """

    def __init__(self, cfg: MineConfig, writer_thread: bool = True, progress: Any = None):
        import torch

        from mining import selection
        from mining.embed import ClipEmbedder, ClipSpec
        from mining.select_device import IMPLS
        from mining.select_stage import FrameSelector

        self.cfg = cfg = cfg.resolved()  # idempotent: keeps a given date / run_id
        if self.cfg.select_impl is not None and self.cfg.select_impl not in IMPLS:
            raise ValueError(f"unknown select_impl {self.cfg.select_impl!r}; use one of {IMPLS} or None")
        self.embedder = ClipEmbedder(ClipSpec(cfg.clip_model, cfg.clip_pretrained, cfg.clip_random_init), device=cfg.device,
                                     warn_random=False)  # the driver warns once per command
        self.progress = None
        if progress:
            import ray

            self.progress = ray.get_actor(progress)
        self.device = self.embedder.device
        self.on_cuda = self.device.type == "cuda"
        self.selector = FrameSelector(selection.get_preset(self.cfg.preset, **self.cfg.selection_overrides),
                                      make_backend(self.cfg), impl=self.cfg.select_impl, device=self.device,
                                      backend_factory=lambda: make_backend(self.cfg))
        self.batch_size = cfg.batch_size or self.embedder.default_batch_size()
        self.cpus = actor_cpus()
        self.decode_threads = max(1, self.cfg.decode_threads or self.cpus)
        self.frame_batch = max(1, self.cfg.frame_batch or DEFAULT_FRAME_BATCH["cuda" if self.on_cuda else "cpu"])
        if not self.on_cuda:
            torch.set_num_threads(self.cpus)
            if self.decode_threads > 1:
                # the pool runs one frame per thread: OpenCV's own thread pool inside each
                # thread would oversubscribe the actor's cores (measured: 2 threads x OpenCV
                # threads ran slower than 1 thread on 2 cores)
                import cv2

                cv2.setNumThreads(1)
        self.writer_thread = writer_thread
        self.device_path = self.on_cuda  # batched decode + batched selection (settable: tests run it on CPU)
        self._sel_stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        self.embedder.pop_forward_seconds()

    def info(self) -> dict:
        """Device, model id, embedding dim, batch sizes, threads, hostname and CUDA_VISIBLE_DEVICES of this actor."""
        import socket

        return {"device": str(self.device), "model": self.embedder.model_id, "dim": self.embedder.dim,
                "batch_size": self.batch_size, "frame_batch": self.frame_batch, "select_impl": self.selector.impl,
                "cpus": self.cpus, "decode_threads": self.decode_threads, "host": socket.gethostname(),
                "pid": os.getpid(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    # ------------------------------------------------------------------ one shard
    def mine_shard(self, ref: ShardRef, root: str, *, commit: bool = True) -> dict:
        """Mine one shard end to end and commit it to ``root``'s store (:mod:`mining.store`).

        Returns:
            the commit record, with ``stage_s`` (work seconds per stage: read, decode, select,
            crop, embed, write; see :mod:`mining.stages`), ``wall_s``, ``wait_s`` (main loop
            waiting for frames), ``forward_s`` (CLIP forward, device time on CUDA), ``host_s``
            (read + write seconds) and ``host_ms_per_frame``.
        Raises:
            whatever aborts the whole shard (I/O after retries, OOM, an unavailable explicit
            ``select_impl``); per-frame problems become errors rows instead.
        """
        import torch

        from mining.batcher import PatchBatcher, PatchWriter
        from mining.frames import FrameSource

        cfg = self.cfg
        t_start = time.perf_counter()
        timer = StageTimer(STAGES)
        from mining.shards import shard_fingerprint

        fingerprint = shard_fingerprint(ref)   # before reading: a replaced object is re-mined next time
        out = ShardOutput(shard=ref.uri, date=cfg.date, run_id=cfg.run_id, model=self.embedder.model_id,
                          dim=self.embedder.dim, random_init=cfg.clip_random_init)
        writer = PatchWriter(out, timer, threaded=self.writer_thread)
        batcher = PatchBatcher(self.embedder, self.batch_size, writer, timer)
        source = FrameSource(ref, self.device, frame_batch=self.frame_batch, prefetch=cfg.prefetch,
                             threads=self.decode_threads, max_pixels=cfg.max_pixels, timer=timer,
                             select_one=None if self.device_path else self.selector.select_one,
                             batched=self.device_path)
        n_frames = 0
        try:
            with source:
                for batch in source:                         # read + decode (+ select on CPU)
                    if self.device_path:                     # select, on its own CUDA stream
                        with torch.cuda.stream(self._sel_stream) if self.on_cuda else contextlib.nullcontext():
                            batch.wait()
                            self.selector.select_batch(batch.frames, timer)
                    batch.wait()
                    ok = self._frame_rows(batch.frames, out)
                    batcher.add([f.image for f in ok], [f.rec.image_uri for f in ok],
                                [f.selection for f in ok])   # crop (+ embed full CLIP batches)
                    n_frames += len(batch.frames)
                    if self.progress is not None:            # per-frame progress, aggregated in the driver
                        self.progress.add.remote(len(batch.frames), sum(len(f.selection.boxes) for f in ok))
                batcher.flush()                              # embed the rest
        finally:
            writer.close()                                   # write: the last column blocks
        if source.read_error is not None:
            # transient (S3 5xx after retries, a timeout, a reset connection): fail the attempt, never
            # commit a partly read shard; the driver retries it (a corrupt tar is no exception: its
            # records carry ``corrupt`` and the shard is committed "partial", see below)
            raise source.read_error
        t0 = time.perf_counter()
        import resource

        out.extra = {"selection": {"selector": cfg.selector, "preset": cfg.preset, "saliency": cfg.saliency,
                                   "overrides": cfg.selection_overrides, "impl": self.selector.impl},
                     "frame_batch": self.frame_batch, "decode_threads": self.decode_threads,
                     "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                     "forward_s": round(self.embedder.pop_forward_seconds(), 4),  # model forward inside "embed"
                     "wait_s": round(timer.get("wait"), 4), "frames": n_frames}
        if ref.kind == "dir":   # which image files this chunk covers (a grown folder mines only new files)
            out.extra["members"] = list(ref.members)
        record = write_shard(root, out, commit=False, gen=ref.gen, fingerprint=fingerprint,
                             status="partial" if out.status == "partial" else "committed")
        timer.add("write", time.perf_counter() - t0)
        host_s = sum(timer.get(k) for k in HOST_STAGES)
        record.update(stage_s=timer.stage_s(), host_s=round(host_s, 4),
                      host_ms_per_frame=round(1e3 * host_s / max(1, n_frames), 3),
                      wall_s=round(time.perf_counter() - t_start, 4))
        fault = os.environ.get("MINING_FAULT_EXIT_BEFORE_COMMIT")
        if fault and not os.path.exists(fault):   # fault injection for the tests: die once between the
            open(fault, "w").close()              # data write and the Delta commit, like a SIGKILL there
            os._exit(137)
        if commit:
            from mining.store import commit_record

            commit_record(root, record)
        return record

    def _frame_rows(self, frames: list, out: ShardOutput) -> list:
        """Errors and images rows of a batch's frames; returns the frames that have patches to embed."""
        ok = []
        for f in frames:
            rec = f.rec
            if getattr(rec, "corrupt", False):
                out.status = "partial"
            if rec.sidecar_error:
                out.add_error(rec.image_uri, "sidecar", rec.sidecar_error)
            w, h = f.size
            kw = dict(shard=out.shard, date=out.date, run_id=out.run_id, width=w, height=h, metadata=rec.metadata)
            if f.error is not None:
                stage, reason = f.error
                out.add_error(rec.image_uri, stage, reason)
                out.images.append(image_row(rec.image_uri, status="error", reason=reason, **kw))
                continue
            boxes = np.asarray(f.selection.boxes).reshape(-1, 4)
            reason = ""
            if len(boxes) == 1 and tuple(boxes[0].tolist()) == (0, 0, w, h):
                reason = "smaller than the smallest patch: one whole-frame patch"
            out.images.append(image_row(rec.image_uri, num_patches=len(boxes), status="ok", reason=reason, **kw))
            if len(boxes):
                ok.append(f)
        return ok


# --------------------------------------------------------------------------- the driver lives in mining/driver.py

def __getattr__(name: str):
    """``run_mining`` / ``format_summary`` are importable from here too (moved to :mod:`mining.driver`)."""
    if name in ("run_mining", "format_summary"):
        from mining import driver

        return getattr(driver, name)
    raise AttributeError(name)
