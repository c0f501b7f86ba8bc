"""The per-shard mining runner and its Ray driver.

Data flow inside one actor (one per GPU, or per ``cpus_per_actor`` CPUs without a GPU)::

    shard reader thread ──(bounded queue)──> decode thread pool ──> select (saliency + §3.1 selector)
        ──> crop + resize on the device ──> CLIP (bf16 autocast on GPU, batches across frames)
        ──> ShardOutput ──> write parts ──> commit ledger record

Why explicit actors and not Ray Data ``map_batches``: the unit of work, of retry and of
commit is one *shard*. With explicit actors each shard's outputs are written at
deterministic paths and committed to the ledger by the actor that mined it, a failed
shard is retried as a whole on a (restarted) actor, and a shard that fails every time
becomes one ``failed`` ledger record plus an errors row. Ray Data names output files
``{uuid}_{block}`` and appends (a rerun duplicates rows), aborts the dataset on the
first UDF error by default, and its checkpointing is beta (see ../shared/NOTES.md).
"""
from __future__ import annotations

import concurrent.futures as cf
import datetime as _dt
import json
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from mining.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image, decode_image_device
from mining.shards import ShardRef, iter_shard, list_shards
from mining.store import ShardOutput, committed_shards, make_image_id, make_patch_id, read_ledger, shard_key, write_shard

log = logging.getLogger(__name__)

STAGES = ("read", "decode", "select", "embed", "write")

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


@dataclass
class MineConfig:
    """Everything a mining actor needs; picklable, recorded in every ledger record.

    Selection: ``selector`` is ``saliency`` (thesis hierarchy with the ``saliency`` backend),
    ``ltrp`` or ``kpp`` (learned / training-free patch ranking feeding the same selector).
    CLIP: ``clip_model`` (open_clip name), ``clip_pretrained`` (tag or checkpoint path),
    ``clip_random_init`` (explicit smoke-run opt-in).
    """

    preset: str | None = None            # None: mining.selection.DEFAULT_PRESET
    saliency: str | None = None          # None: mining.selection.DEFAULT_SALIENCY
    selector: str = "saliency"
    selection_overrides: dict = field(default_factory=dict)
    ltrp_checkpoint: str | None = None
    mae_checkpoint: str | None = None
    kpp_ratio: float = 0.25
    ranker_random_init: bool = False
    clip_model: str = "ViT-B-16"
    clip_pretrained: str | None = "openai"
    clip_random_init: bool = False
    batch_size: int | None = None        # patches per CLIP forward (None: from free memory)
    device: str | None = None            # None: cuda when available else cpu
    decode_threads: int = 2
    prefetch: int = 8                    # decoded frames in flight per actor
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
    Raises:
        mining.embed.WeightsError: CLIP weights cannot be loaded (never falls back to random).
    """

    def __init__(self, cfg: MineConfig):
        from mining import selection
        from mining.embed import ClipEmbedder, ClipSpec

        self.cfg = cfg if cfg.run_id else cfg.resolved()
        self.embedder = ClipEmbedder(ClipSpec(cfg.clip_model, cfg.clip_pretrained, cfg.clip_random_init), device=cfg.device)
        self.device = self.embedder.device
        self.backend = make_backend(self.cfg)
        self.sel_config = selection.get_preset(self.cfg.preset, **self.cfg.selection_overrides)
        self.batch_size = cfg.batch_size or self.embedder.default_batch_size()
        self.embedder.pop_forward_seconds()
        self._select = selection.select_patches

    def info(self) -> dict:
        """Device, model id, embedding dim, batch size, hostname and CUDA_VISIBLE_DEVICES of this actor."""
        import socket

        return {"device": str(self.device), "model": self.embedder.model_id, "dim": self.embedder.dim,
                "batch_size": self.batch_size, "host": socket.gethostname(), "pid": os.getpid(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    # ------------------------------------------------------------------ one shard
    def mine_shard(self, ref: ShardRef, root: str, *, commit: bool = True) -> dict:
        """Mine one shard end to end and commit it to ``root``'s ledger.

        Returns:
            the ledger record, with ``stage_s`` (seconds per stage: read, decode, select,
            embed, write) and ``wall_s``.
        Raises:
            whatever aborts the whole shard (I/O after retries, OOM); per-frame problems
            become errors rows instead.
        """
        cfg = self.cfg
        self._shard_uri = ref.uri
        t_start = time.perf_counter()
        stage = dict.fromkeys(STAGES, 0.0)
        out = ShardOutput(shard=ref.uri, date=cfg.date, run_id=cfg.run_id, model=self.embedder.model_id,
                          dim=self.embedder.dim, random_init=cfg.clip_random_init)
        out.extra = {"selection": {"selector": cfg.selector, "preset": cfg.preset, "saliency": cfg.saliency,
                                   "overrides": cfg.selection_overrides}}

        q: queue.Queue = queue.Queue(maxsize=max(2, cfg.prefetch))
        stop = threading.Event()
        read_err: list[BaseException] = []

        def reader():
            try:
                for rec in iter_shard(ref):
                    while not stop.is_set():
                        try:
                            q.put(rec, timeout=0.5)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except BaseException as e:  # noqa: BLE001 - surfaced in the consumer
                read_err.append(e)
            finally:
                q.put(None)

        on_gpu = self.device.type == "cuda"

        def decode(rec):
            """-> (record, (H, W, 3) uint8 numpy frame, device tensor (3, H, W) or None, error, seconds)."""
            t0 = time.perf_counter()
            try:
                if on_gpu:
                    # nvJPEG on the device (EXIF applied); the selector gets a host copy, the crops
                    # are cut from the device-resident frame (no second upload)
                    dev = decode_image_device(rec.data, self.device, max_pixels=cfg.max_pixels)
                    return rec, dev.permute(1, 2, 0).cpu().numpy(), dev, None, time.perf_counter() - t0
                return rec, decode_image(rec.data, max_pixels=cfg.max_pixels), None, None, time.perf_counter() - t0
            except DecodeError as e:
                return rec, None, None, e.reason, time.perf_counter() - t0

        rt = threading.Thread(target=reader, name=f"read-{ref.uri[-20:]}", daemon=True)
        rt.start()
        pool = cf.ThreadPoolExecutor(max_workers=max(1, cfg.decode_threads), thread_name_prefix="decode")
        pending_px: list = []       # crops waiting for a CLIP batch
        pending_rows: list[list[dict]] = []
        n_pending = 0

        def flush():
            nonlocal pending_px, pending_rows, n_pending
            if not n_pending:
                return
            import torch

            t0 = time.perf_counter()
            px = torch.cat(pending_px) if len(pending_px) > 1 else pending_px[0]
            emb = self.embedder.embed_pixels(px, batch_size=self.batch_size)
            stage["embed"] += time.perf_counter() - t0
            rows = [r for rs in pending_rows for r in rs]
            out.patches.extend(rows)
            out.embeddings.append(emb.astype(np.float16))
            pending_px, pending_rows, n_pending = [], [], 0

        try:
            inflight: list[cf.Future] = []
            done_reading = False
            while True:
                # keep up to `prefetch` frames decoding
                while not done_reading and len(inflight) < max(1, cfg.prefetch):
                    t0 = time.perf_counter()
                    rec = q.get()
                    stage["read"] += time.perf_counter() - t0
                    if rec is None:
                        done_reading = True
                        break
                    if rec.sidecar_error:
                        out.add_error(rec.image_uri, "sidecar", rec.sidecar_error)
                    if rec.error is not None:
                        out.add_error(rec.image_uri, rec.error[0], rec.error[1])
                        out.images.append(self._image_row(rec, None, 0, "error", rec.error[1]))
                        continue
                    inflight.append(pool.submit(decode, rec))
                if not inflight:
                    break
                t0 = time.perf_counter()
                fut = inflight.pop(0)
                rec, image, dev_image, err, dec_s = fut.result()
                stage["decode"] += dec_s
                if err is not None:
                    out.add_error(rec.image_uri, "decode", err)
                    out.images.append(self._image_row(rec, None, 0, "error", err))
                    continue
                n_pending += self._mine_frame(rec, image, out, stage, pending_px, pending_rows, dev_image)
                if n_pending >= self.batch_size:
                    flush()
            flush()
            if read_err:
                e = read_err[0]
                out.add_error(ref.uri, "read", f"shard read failed after {len(out.images)} frames: {type(e).__name__}: {e}")
                if not out.images:
                    raise e
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
        t0 = time.perf_counter()
        import resource

        out.extra["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        out.extra["stage_s"] = {k: round(v, 4) for k, v in stage.items()}
        out.extra["forward_s"] = round(self.embedder.pop_forward_seconds(), 4)  # model forward inside "embed"
        out.extra["wall_s"] = round(time.perf_counter() - t_start, 4)
        record = write_shard(root, out, commit=False)
        stage["write"] += time.perf_counter() - t0
        record["stage_s"]["write"] = round(stage["write"], 4)
        record["wall_s"] = round(time.perf_counter() - t_start, 4)
        if commit:
            from mining.store import commit_record

            commit_record(root, record)
        return record

    def _image_row(self, rec, image, n, status, reason) -> dict:
        h, w = (image.shape[:2] if image is not None else (0, 0))
        return dict(image_id=make_image_id(rec.image_uri), image_uri=rec.image_uri, shard=self._shard_uri,
                    date=self.cfg.date, width=int(w), height=int(h), num_patches=int(n), status=status,
                    reason=reason or "", metadata=json.dumps(rec.metadata or {}, sort_keys=True, default=str),
                    run_id=self.cfg.run_id)

    def _mine_frame(self, rec, image: np.ndarray, out: ShardOutput, stage: dict, pending_px: list, pending_rows: list,
                    dev_image=None) -> int:
        """Select, crop and queue one frame's patches for embedding; returns how many were queued."""
        import torch

        t0 = time.perf_counter()
        try:
            sel = self._select(image, self.sel_config, self.backend)
        except Exception as e:  # noqa: BLE001 - one bad frame must not cost the shard
            stage["select"] += time.perf_counter() - t0
            reason = f"selection failed: {type(e).__name__}: {e}"
            out.add_error(rec.image_uri, "select", reason)
            out.images.append(self._image_row(rec, image, 0, "error", reason))
            return 0
        stage["select"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        image_id = make_image_id(rec.image_uri)
        boxes = np.asarray(sel.boxes, dtype=np.int64).reshape(-1, 4)
        if dev_image is not None:
            t = dev_image
        else:
            t = torch.from_numpy(image).permute(2, 0, 1)
            if self.device.type == "cuda":
                t = t.pin_memory()  # async host->device copy overlapping the previous batch's compute
        px = self.embedder.crops_from_image(t, boxes)
        stage["embed"] += time.perf_counter() - t0
        rows = []
        for b, lvl, s in zip(boxes.tolist(), np.asarray(sel.levels).tolist(), np.asarray(sel.scores).tolist()):
            rows.append(dict(patch_id=make_patch_id(image_id, b, lvl), image_id=image_id, image_uri=rec.image_uri,
                             shard=out.shard, date=out.date, x0=b[0], y0=b[1], x1=b[2], y1=b[3], level=int(lvl),
                             score=float(s), model=out.model, run_id=out.run_id))
        pending_px.append(px)
        pending_rows.append(rows)
        status, reason = "ok", ""
        h, w = image.shape[:2]
        if len(boxes) == 1 and tuple(boxes[0]) == (0, 0, w, h):
            status, reason = "ok", "smaller than the smallest patch: one whole-frame patch"
        out.images.append(self._image_row(rec, image, len(rows), status, reason))
        return len(rows)


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
