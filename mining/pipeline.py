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
                                               then the Parquet parts + ledger record

Why explicit actors and not Ray Data ``map_batches``: the unit of work, of retry and of
commit is one *shard*. With explicit actors each shard's outputs are written at
deterministic paths and committed to the ledger by the actor that mined it, a failed
shard is retried as a whole on a (restarted) actor, and a shard that fails every time
becomes one ``failed`` ledger record plus an errors row. Ray Data names output files
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
from mining.shards import ShardRef, list_shards
from mining.stages import HOST_STAGES, STAGES, StageTimer
from mining.store import ShardOutput, committed_shards, image_row, write_shard

log = logging.getLogger(__name__)

DEFAULT_FRAME_BATCH = {"cuda": 32, "cpu": 4}

# Settings the actors need from the driver's environment. Actors on a cluster started with
# `ray start` do not inherit the driver's environment, so these travel in the actor's
# runtime_env (merged by Ray with the job's runtime_env).
PASS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
            "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MINING_S3_RETRIES", "HF_HOME", "HF_HUB_OFFLINE",
            "OPEN_CLIP_CACHE_DIR", "MINING_LTRP_CHECKPOINT", "MINING_MAE_CHECKPOINT", "MINING_RANKER_ARCH",
            "MINING_MAE_ARCH", "MINING_RANKER_RANDOM_INIT", "MINING_KPP_RATIO")


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
    """The saliency map backend for ``cfg.selector`` (one selector, several map sources)."""
    from mining.saliency.base import get_backend

    if cfg.selector == "saliency":
        return get_backend(cfg.saliency)
    if cfg.selector in ("ltrp", "kpp"):
        from mining.ranking import backend_from_args

        return backend_from_args(cfg.selector, ltrp_checkpoint=cfg.ltrp_checkpoint, mae_checkpoint=cfg.mae_checkpoint,
                                 kpp_ratio=cfg.kpp_ratio, random_init=cfg.ranker_random_init, device=cfg.device)
    raise ValueError(f"unknown selector {cfg.selector!r}; use saliency, ltrp or kpp")


class ShardMiner:
    """Mines shards: loads the selector and CLIP once, then streams shard after shard.

    Args:
        cfg: a :class:`MineConfig` (resolved: date and run_id set).
        writer_thread: build the Arrow columns in a writer thread (default) or in the main loop.
    Raises:
        mining.embed.WeightsError: CLIP weights cannot be loaded (never falls back to random).
        ValueError: unknown ``select_impl``.
    """

    def __init__(self, cfg: MineConfig, writer_thread: bool = True):
        import torch

        from mining import selection
        from mining.embed import ClipEmbedder, ClipSpec
        from mining.select_device import IMPLS
        from mining.select_stage import FrameSelector

        self.cfg = cfg = cfg.resolved()  # idempotent: keeps a given date / run_id
        if self.cfg.select_impl is not None and self.cfg.select_impl not in IMPLS:
            raise ValueError(f"unknown select_impl {self.cfg.select_impl!r}; use one of {IMPLS} or None")
        self.embedder = ClipEmbedder(ClipSpec(cfg.clip_model, cfg.clip_pretrained, cfg.clip_random_init), device=cfg.device)
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
        """Mine one shard end to end and commit it to ``root``'s ledger.

        Returns:
            the ledger record, with ``stage_s`` (work seconds per stage: read, decode, select,
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
                batcher.flush()                              # embed the rest
        finally:
            writer.close()                                   # write: the last column blocks
        if source.read_error is not None:
            e = source.read_error
            out.add_error(ref.uri, "read", f"shard read failed after {len(out.images)} frames: {type(e).__name__}: {e}")
            if not out.images:
                raise e
        t0 = time.perf_counter()
        import resource

        out.extra = {"selection": {"selector": cfg.selector, "preset": cfg.preset, "saliency": cfg.saliency,
                                   "overrides": cfg.selection_overrides, "impl": self.selector.impl},
                     "frame_batch": self.frame_batch, "decode_threads": self.decode_threads,
                     "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                     "forward_s": round(self.embedder.pop_forward_seconds(), 4),  # model forward inside "embed"
                     "wait_s": round(timer.get("wait"), 4), "frames": n_frames}
        record = write_shard(root, out, commit=False)
        timer.add("write", time.perf_counter() - t0)
        host_s = sum(timer.get(k) for k in HOST_STAGES)
        record.update(stage_s=timer.stage_s(), host_s=round(host_s, 4),
                      host_ms_per_frame=round(1e3 * host_s / max(1, n_frames), 3),
                      wall_s=round(time.perf_counter() - t_start, 4))
        if commit:
            from mining.store import commit_record

            commit_record(root, record)
        return record

    def _frame_rows(self, frames: list, out: ShardOutput) -> list:
        """Errors and images rows of a batch's frames; returns the frames that have patches to embed."""
        ok = []
        for f in frames:
            rec = f.rec
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


# --------------------------------------------------------------------------- Ray driver

def _ray_init(address: str | None, runtime_env: dict | None = None):
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
    else:
        ray.init(runtime_env=runtime_env)  # RAY_ADDRESS (set under `ray job submit`) or a new local cluster


def _fail_record(root: str, cfg: MineConfig, ref: ShardRef, reason: str, attempts: int) -> dict:
    out = ShardOutput(shard=ref.uri, date=cfg.date, run_id=cfg.run_id, model=f"{cfg.clip_model}",
                      dim=1, random_init=cfg.clip_random_init)
    out.add_error(ref.uri, "shard", f"gave up after {attempts} attempts: {reason}")
    out.extra = {"attempts": attempts}
    return write_shard(root, out, status="failed")


def run_mining(input_spec: str, output_root: str, cfg: MineConfig, *, address: str | None = None,
               num_actors: int | None = None, cpus_per_actor: int | None = None, max_attempts: int = 3,
               images_per_dir_shard: int = 64, progress: bool = True, shards: list[ShardRef] | None = None,
               use_gpu: bool | None = None) -> dict:
    """Mine every uncommitted shard of ``input_spec`` into ``output_root`` on a Ray cluster.

    One actor per GPU (``num_gpus=1``); without GPUs, ``num_actors`` CPU actors of
    ``cpus_per_actor`` CPUs each. Shards are dispatched one at a time per actor
    (dynamic load balancing); an actor that dies is restarted by Ray (``max_restarts=-1``)
    and its shard is retried; a shard that fails ``max_attempts`` times becomes a
    ``failed`` ledger record and an errors row, and the rest of the run completes.
    Already-committed shards are skipped, so a rerun mines only what is missing.

    ``use_gpu``: None detects GPUs in the cluster now; True asks for ``num_gpus=1`` actors
    even when none is up yet (an autoscaling cluster with ``min_workers: 0`` then launches GPU
    workers for them; use with ``num_actors``); False forces CPU actors.

    Returns:
        summary dict: shards_total, shards_skipped, shards_mined, shards_failed, images, patches,
        errors, wall_s, images_per_s, patches_per_s, stage_s (summed over shards), run_id, date.
    Raises:
        mining.embed.WeightsError: CLIP weights cannot be loaded (raised before mining starts).
        FileNotFoundError / ValueError: bad ``input_spec``.
    """
    import ray

    cfg = cfg.resolved()
    t0 = time.perf_counter()
    refs = shards if shards is not None else list_shards(input_spec, images_per_dir_shard=images_per_dir_shard)
    done = committed_shards(output_root)
    todo = [r for r in refs if r.uri not in done]
    summary: dict[str, Any] = {"run_id": cfg.run_id, "date": cfg.date, "shards_total": len(refs),
                               "shards_skipped": len(refs) - len(todo), "shards_mined": 0, "shards_failed": 0,
                               "images": 0, "patches": 0, "errors": 0, "stage_s": dict.fromkeys(STAGES, 0.0),
                               "failed": []}
    if not todo:
        summary.update(wall_s=round(time.perf_counter() - t0, 3), images_per_s=0.0, patches_per_s=0.0)
        return summary
    _ray_init(address)
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if use_gpu or (use_gpu is None and gpus > 0):
        opts = {"num_gpus": 1, "num_cpus": cpus_per_actor or 1}
        n = num_actors or max(1, gpus)
    else:
        cpa = cpus_per_actor or max(1, int(res.get("CPU", 1)) // (num_actors or 1))
        opts = {"num_cpus": cpa}
        n = num_actors or max(1, int(res.get("CPU", 1)) // cpa)
    n = max(1, min(n, len(todo)))
    Actor = ray.remote(ShardMiner)
    renv = {"env_vars": actor_env()}
    actors = [Actor.options(max_restarts=-1, max_task_retries=0, runtime_env=renv, **opts).remote(cfg) for _ in range(n)]
    # surface weight / config errors once, clearly, before any shard is dispatched
    try:
        infos = ray.get([a.info.remote() for a in actors])
    except Exception as e:  # noqa: BLE001
        for a in actors:
            ray.kill(a)
        msg = str(e)
        from mining.embed import WeightsError

        marker = "WeightsError: "
        if marker in msg:
            raise WeightsError(msg.split(marker, 1)[1].strip().splitlines()[0]) from None
        raise
    summary["actors"] = infos
    if progress:
        print(f"mining {len(todo)} shards ({summary['shards_skipped']} already committed) with {n} actor(s) "
              f"on {infos[0]['device']}, model {infos[0]['model']}, batch {infos[0]['batch_size']}", flush=True)

    t_mine = time.perf_counter()  # excludes actor start-up (model load)
    queue_: list[tuple[ShardRef, int]] = [(r, 1) for r in todo]
    running: dict = {}
    free = list(range(n))
    done_count = 0

    def dispatch():
        while free and queue_:
            i = free.pop(0)
            ref, attempt = queue_.pop(0)
            running[actors[i].mine_shard.remote(ref, output_root)] = (i, ref, attempt)

    dispatch()
    while running:
        ready, _ = ray.wait(list(running), num_returns=1)
        fut = ready[0]
        i, ref, attempt = running.pop(fut)
        free.append(i)
        try:
            rec = ray.get(fut)
        except Exception as e:  # noqa: BLE001 - actor death, task error: retry the whole shard
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            if attempt < max_attempts:
                log.warning("shard %s attempt %d failed (%s); retrying", ref.uri, attempt, reason)
                if progress:
                    print(f"  retry {attempt + 1}/{max_attempts}: {ref.uri} ({reason[:200]})", flush=True)
                time.sleep(min(2 ** attempt * 0.5, 10))
                queue_.append((ref, attempt + 1))
            else:
                _fail_record(output_root, cfg, ref, reason, attempt)
                summary["shards_failed"] += 1
                summary["errors"] += 1
                summary["failed"].append({"shard": ref.uri, "reason": reason})
                if progress:
                    print(f"  FAILED after {attempt} attempts: {ref.uri}: {reason[:300]}", flush=True)
            dispatch()
            continue
        dispatch()
        done_count += 1
        summary["shards_mined"] += 1
        summary["images"] += rec["num_images"]
        summary["patches"] += rec["num_patches"]
        summary["errors"] += rec["num_errors"]
        for k, v in rec.get("stage_s", {}).items():
            summary["stage_s"][k] += v
        summary["forward_s"] = summary.get("forward_s", 0.0) + rec.get("forward_s", 0.0)
        summary["host_s"] = summary.get("host_s", 0.0) + rec.get("host_s", 0.0)
        if progress:
            el = time.perf_counter() - t0
            print(f"  [{done_count}/{len(todo)}] {rec['shard_key']}: {rec['num_images']} images, {rec['num_patches']} patches, "
                  f"{rec['num_errors']} errors in {rec['wall_s']:.1f} s | total {summary['images']} images, "
                  f"{summary['images'] / el:.2f} images/s", flush=True)
    for a in actors:
        ray.kill(a)
    wall = time.perf_counter() - t0
    summary["stage_s"] = {k: round(v, 3) for k, v in summary["stage_s"].items()}
    mine_wall = time.perf_counter() - t_mine
    summary.update(wall_s=round(wall, 3), images_per_s=round(summary["images"] / wall, 3),
                   patches_per_s=round(summary["patches"] / wall, 3), startup_s=round(t_mine - t0, 3),
                   mining_wall_s=round(mine_wall, 3), num_actors=n)
    return summary


def format_summary(s: dict) -> str:
    """One human-readable summary block for the end of a run."""
    lines = [
        f"run {s['run_id']} (date {s['date']}): {s['shards_mined']} shards mined, {s['shards_skipped']} skipped "
        f"(already committed), {s['shards_failed']} failed of {s['shards_total']}",
        f"images {s['images']}, patches {s['patches']}, errors {s['errors']}, wall {s['wall_s']:.1f} s, "
        f"{s['images_per_s']:.2f} images/s, {s['patches_per_s']:.1f} patches/s",
    ]
    if s.get("stage_s"):
        lines.append("actor time per stage (s, summed over shards): " + ", ".join(f"{k} {v:.1f}" for k, v in s["stage_s"].items()))
    return "\n".join(lines)
