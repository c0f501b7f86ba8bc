"""The Ray driver of a mining run: checks, actor pool, shard dispatch, retries, progress.

Order of work (:func:`run_mining`):

1. Fail fast, before Ray: settings (:mod:`mining.validate`: numbers >= 1, selector / preset /
   saliency names, CLIP weights, ``--output`` writable, ``--input`` has shards). Each problem
   is one line (:class:`mining.errors.SettingsError` or ``WeightsError``).
2. A saliency backend that needs an epitome gets one before any actor starts
   (:func:`mining.epitome.resolve.resolve_epitome`: ``--epitome``, the root's latest, one trained
   on the run's first frames, or the fallback to ``sr-bms``; one line says which), passed to the
   actors in ``MineConfig.epitome`` and env ``MINING_EPITOME``.
3. Connect (:func:`mining.connect.connect`) and size the pool from what is *free*
   (``ray.available_resources()``) and ``num_actors``.
4. Start the actors and dispatch shards as soon as the first one is ready; actors that come up
   later join the pool. While actors wait for resources, a line every ``pending_report_s``
   seconds says what they want and what is free. No actor ready within ``startup_timeout``
   seconds: :class:`mining.errors.StartupTimeout`.
5. Attempts are counted per shard. A shard whose task failed is retried (after a backoff) on any
   actor; an actor that died is restarted by Ray and gets new work only after it answers again,
   so a restart is never charged to another shard.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

from mining.errors import SettingsError, StartupTimeout, user_error
from mining.pipeline import MineConfig, ShardMiner, actor_env
from mining.progress import ProgressCounter, ProgressMeter
from mining.shards import ShardRef
from mining.stages import STAGES
from mining.store import ShardOutput, compact_shards_table, publish, shard_states, write_shard

log = logging.getLogger(__name__)

PENDING_REPORT_S = float(os.environ.get("MINING_PENDING_REPORT_S", "30"))
PROGRESS_EVERY_S = float(os.environ.get("MINING_PROGRESS_S", "10"))
DEFAULT_STARTUP_TIMEOUT_S = 600.0


def plan_pool(free: dict, total: dict, *, num_actors: int | None, cpus_per_actor: int | None,
              use_gpu: bool | None, n_todo: int) -> tuple[int, dict]:
    """(number of actors, actor resource options) from the *free* resources.

    GPU actors (``num_gpus=1``) when ``use_gpu`` or (None and the cluster has GPUs): one per free
    GPU (at least one). CPU actors: ``cpus_per_actor`` each (default: the free CPUs split over
    ``num_actors``, at least 1), as many as fit in the free CPUs (at least one). ``num_actors``
    overrides the count; never more actors than shards.
    """
    if use_gpu or (use_gpu is None and total.get("GPU", 0) > 0):
        opts = {"num_gpus": 1, "num_cpus": cpus_per_actor or 1}
        n = num_actors or max(1, int(free.get("GPU", 0)))
    else:
        free_cpu = int(free.get("CPU", 0))
        cpa = cpus_per_actor or max(1, free_cpu // (num_actors or 1))
        opts = {"num_cpus": cpa}
        n = num_actors or max(1, free_cpu // cpa)
    return max(1, min(n, n_todo)), opts


def _free(keys=("CPU", "GPU")) -> dict:
    import ray

    a = ray.available_resources()
    return {k: round(a.get(k, 0.0), 2) for k in keys if k in a or k == "CPU"}


def _fail_record(root: str, cfg: MineConfig, ref: ShardRef, reason: str, attempts: int) -> dict:
    out = ShardOutput(shard=ref.uri, date=cfg.date, run_id=cfg.run_id, model=f"{cfg.clip_model}",
                      dim=1, random_init=cfg.clip_random_init)
    out.add_error(ref.uri, "shard", f"gave up after {attempts} attempts: {reason}")
    out.extra = {"attempts": attempts}
    return write_shard(root, out, status="failed", gen=ref.gen)


def _incremental_dirs(root: str, refs: list[ShardRef], images_per_dir_shard: int) -> list[ShardRef]:
    """Image-folder chunks made of the files no committed ``dir`` shard holds yet (see
    :func:`mining.shards.incremental_dir_refs`); the committed chunks' members come from their records."""
    import json

    import pyarrow.compute as pc

    from mining.shards import incremental_dir_refs

    if not any(r.kind == "dir" for r in refs):
        return refs
    bases = sorted({r.uri.split("#", 1)[0] + "#" for r in refs if r.kind == "dir"})
    st = shard_states(root, columns=("shard", "status", "record"), prefixes=bases)
    st = st.filter(pc.is_in(st.column("status"), pa_strings(["committed", "partial"])))
    covered: set[str] = set()
    for r in st.column("record").to_pylist():
        covered.update(json.loads(r).get("members", ()))
    return incremental_dir_refs(refs, covered, images_per_dir_shard)


def pa_strings(values: list[str]):
    import pyarrow as pa

    return pa.array(values, pa.string())


def plan_shards(root: str, refs: list[ShardRef]) -> list[ShardRef]:
    """The shards of ``refs`` to mine, each with the store generation its commit will carry.

    From the ``shards`` table (latest generation per shard): not there -> gen 1; ``committed`` -> skipped;
    ``failed`` -> retried as gen + 1; ``partial`` (a corrupt shard) -> retried as gen + 1 only when its
    content fingerprint (size + ETag / mtime) changed since, else skipped.
    """
    import dataclasses

    from mining.shards import shard_fingerprint

    st = shard_states(root, columns=("shard", "gen", "status", "fingerprint"), shards=[r.uri for r in refs]).to_pylist()
    by = {r["shard"]: r for r in st}
    todo = []
    for ref in refs:
        r = by.get(ref.uri)
        if r is None:
            todo.append(ref)
        elif r["status"] == "failed":
            todo.append(dataclasses.replace(ref, gen=int(r["gen"]) + 1))
        elif r["status"] == "partial":
            try:
                fp = shard_fingerprint(ref)
            except OSError:
                fp = r["fingerprint"]            # cannot tell now: leave it for a later run
            if fp != r["fingerprint"]:
                todo.append(dataclasses.replace(ref, gen=int(r["gen"]) + 1, fingerprint=fp))
    return todo


def _reason(e: BaseException) -> str:
    ue = user_error(e)
    if ue is not None:
        return f"{type(ue).__name__}: {ue}"
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"


def run_mining(input_spec: str, output_root: str, cfg: MineConfig, *, address: str | None = None,
               num_actors: int | None = None, cpus_per_actor: int | None = None, max_attempts: int = 3,
               images_per_dir_shard: int = 64, progress: bool = True, shards: list[ShardRef] | None = None,
               use_gpu: bool | None = None, startup_timeout: float = DEFAULT_STARTUP_TIMEOUT_S,
               pending_report_s: float = PENDING_REPORT_S, progress_every_s: float = PROGRESS_EVERY_S) -> dict:
    """Mine every uncommitted shard of ``input_spec`` into ``output_root`` on a Ray cluster.

    One actor per free GPU (``num_gpus=1``); without GPUs, CPU actors of ``cpus_per_actor`` CPUs
    (see :func:`plan_pool`). Shards go one at a time to whichever actor is free; a shard that fails
    ``max_attempts`` times becomes a ``failed`` commit in the ``shards`` table and an errors row, and the rest of
    the run completes. Already-committed shards are skipped (a rerun mines only what is missing).

    ``use_gpu``: None detects GPUs in the cluster; True asks for ``num_gpus=1`` actors even when
    none is up yet (autoscaling from zero; use with ``num_actors``); False forces CPU actors.
    ``startup_timeout``: seconds to wait for the first actor (resources, model load).

    Returns:
        summary dict: shards_total, shards_skipped, shards_mined, shards_failed, images, patches,
        errors, wall_s, images_per_s, patches_per_s, stage_s (summed over shards), attempts
        ({shard: tries} of the shards tried more than once), run_id, date, output.
    Raises:
        mining.errors.SettingsError: bad settings, input or output (before Ray starts).
        mining.embed.WeightsError: CLIP weights cannot be loaded (before any shard).
        mining.errors.StartupTimeout: no actor started within ``startup_timeout`` seconds.
    """
    from mining.validate import check_mine_settings, list_input

    cfg = cfg.resolved()
    t0 = time.perf_counter()
    check_mine_settings(cfg, output_root, num_actors=num_actors, cpus_per_actor=cpus_per_actor,
                        max_attempts=max_attempts, images_per_dir_shard=images_per_dir_shard,
                        startup_timeout=startup_timeout)
    refs = shards if shards is not None else list_input(input_spec, images_per_dir_shard)
    refs = _incremental_dirs(output_root, refs, images_per_dir_shard)
    todo = plan_shards(output_root, refs)
    summary: dict[str, Any] = {"run_id": cfg.run_id, "date": cfg.date, "output": output_root,
                               "shards_total": len(refs), "shards_skipped": len(refs) - len(todo),
                               "shards_mined": 0, "shards_failed": 0, "images": 0, "patches": 0, "errors": 0,
                               "stage_s": dict.fromkeys(STAGES, 0.0), "failed": [], "attempts": {}}
    if not todo:
        summary["published"] = publish(output_root, months=[cfg.date[:7]])
        summary.update(wall_s=round(time.perf_counter() - t0, 3), images_per_s=0.0, patches_per_s=0.0)
        return summary
    epitome_env, how = _resolve_epitome(cfg, output_root, todo, progress)
    summary["epitome"] = {"path": cfg.epitome, "how": how} if how else None
    import ray

    from mining.connect import connect

    connect(address)
    free0 = ray.available_resources()
    n, opts = plan_pool(free0, ray.cluster_resources(), num_actors=num_actors,
                        cpus_per_actor=cpus_per_actor, use_gpu=use_gpu, n_todo=len(todo))
    counter_name = f"mining-progress-{cfg.run_id}" if progress else None
    counter = ray.remote(ProgressCounter).options(num_cpus=0, name=counter_name).remote() if progress else None
    Actor = ray.remote(ShardMiner)
    renv = {"env_vars": {**actor_env(), **epitome_env}}
    actors = [Actor.options(max_restarts=-1, max_task_retries=0, runtime_env=renv, **opts).remote(cfg, True, counter_name)
              for _ in range(n)]
    try:
        _dispatch_loop(ray, actors, opts, free0, todo, output_root, cfg, summary, max_attempts=max_attempts,
                       progress=progress, counter=counter, startup_timeout=startup_timeout,
                       pending_report_s=pending_report_s, progress_every_s=progress_every_s, t0=t0)
    finally:
        for a in actors + ([counter] if counter is not None else []):
            ray.kill(a, no_restart=True)
    summary["published"] = publish(output_root, months=[cfg.date[:7]])     # the data tables' Delta logs catch up (batched commits)
    compact_shards_table(output_root, months=[cfg.date[:7]])   # this run's month: sorted, one file
    wall = time.perf_counter() - t0
    summary["stage_s"] = {k: round(v, 3) for k, v in summary["stage_s"].items()}
    summary.update(wall_s=round(wall, 3), images_per_s=round(summary["images"] / wall, 3),
                   patches_per_s=round(summary["patches"] / wall, 3), num_actors=len(summary["actors"]))
    return summary


def _resolve_epitome(cfg: MineConfig, output_root: str, todo: list[ShardRef], progress: bool) -> tuple[dict, str | None]:
    """Settle the epitome of a run whose saliency needs one, before any actor starts (issue 14 item 5).

    Mutates the (resolved) ``cfg``: ``cfg.epitome`` becomes the model file, or, on fallback,
    ``cfg.saliency`` becomes ``sr-bms``. Prints one line saying which (see
    :func:`mining.epitome.resolve.resolve_epitome`).

    Returns:
        ``(the actors' extra env: MINING_EPITOME, how: given/root/bootstrap/fallback)``;
        ``({}, None)`` when the saliency needs no epitome.
    """
    from mining.epitome.resolve import FALLBACK_SALIENCY, needs_epitome, resolve_epitome

    if cfg.selector != "saliency" or not needs_epitome(cfg.saliency):
        return {}, None
    frames = None
    if cfg.epitome_bootstrap:
        import itertools

        from mining.epitome.stream import FrameStream

        def frames(n: int):
            return itertools.islice(FrameStream(todo, max_pixels=cfg.max_pixels), n)
    path, how = resolve_epitome(cfg.epitome, output_root, frames, print if progress else log.info,
                                bootstrap_frames=cfg.epitome_bootstrap_frames,
                                bootstrap_steps=cfg.epitome_bootstrap_steps, device=cfg.device)
    if path is None:
        cfg.saliency = FALLBACK_SALIENCY
        return {}, how
    cfg.epitome = path
    return {"MINING_EPITOME": path}, how


def _dispatch_loop(ray, actors, opts, free0, todo, output_root, cfg, summary, *, max_attempts, progress, counter,
                   startup_timeout, pending_report_s, progress_every_s, t0) -> None:
    """Start-up and dispatch: see the module docstring. Fills ``summary`` in place."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    n = len(actors)
    want = {{"num_cpus": "CPU", "num_gpus": "GPU"}[k]: v for k, v in opts.items() if v}
    fit_at_start = min(int(free0.get(k, 0) // v) for k, v in want.items()) if want else n
    futs: dict = {a.info.remote(): ("ready", i, None, 0) for i, a in enumerate(actors)}
    pending = set(range(n))            # not yet answered info() once
    free: list[int] = []
    queue: list[tuple[float, ShardRef, int]] = [(0.0, r, 1) for r in todo]   # (not before, shard, attempt)
    summary["actors"] = []
    frames_known = [len(r.members) for r in todo if r.kind == "dir"]
    meter = ProgressMeter(len(todo), sum(frames_known) if len(frames_known) == len(todo) else None)
    t_start = time.perf_counter()
    last_pending = t_start
    last_progress = t_start
    t_mine = None
    alive = set(range(n))               # not dead for good
    probes: list[tuple[float, int]] = []  # (when, actor): readiness probes of restarting actors
    while queue or any(kind == "shard" for kind, *_ in futs.values()):
        now = time.perf_counter()
        for due in [p for p in probes if p[0] <= now]:
            probes.remove(due)
            futs[actors[due[1]].info.remote()] = ("ready", due[1], None, 0)
        while free and queue and queue[0][0] <= now:
            _, ref, attempt = queue.pop(0)
            i = free.pop(0)
            futs[actors[i].mine_shard.remote(ref, output_root)] = ("shard", i, ref, attempt)
        if not futs:                   # only back-off / probe waits left
            time.sleep(0.2)
            continue
        ready, _ = ray.wait(list(futs), num_returns=1, timeout=1.0)
        now = time.perf_counter()
        if not ready:
            if pending and not summary["actors"] and now - t_start > startup_timeout:
                raise StartupTimeout(
                    f"no mining actor could start within {startup_timeout:.0f} s (--startup-timeout): {len(pending)} "
                    f"actor(s) want {want} each; cluster has {_free()} free. Free resources (e.g. stop other actors) "
                    f"or lower --actors / --cpus-per-actor")
            if pending and now - last_pending >= pending_report_s:
                last_pending = now
                # actors that fitted in what was free at the start are loading, the others wait for resources
                waiting = max(0, len(pending) - max(0, fit_at_start - (n - len(pending))))
                if progress and waiting:
                    print(f"waiting for resources: {waiting} actor(s) want {want} each; cluster has {_free()} free "
                          f"({now - t_start:.0f} s, gives up after {startup_timeout:.0f} s without any actor)", flush=True)
                elif progress:
                    print(f"starting {len(pending)} actor(s) (loading the model; {now - t_start:.0f} s)", flush=True)
            if progress and counter is not None and t_mine is not None and now - last_progress >= progress_every_s:
                last_progress = now
                print(meter.line(*ray.get(counter.totals.remote())), flush=True)
            continue
        fut = ready[0]
        kind, i, ref, attempt = futs.pop(fut)
        if kind == "ready":
            try:
                info = ray.get(fut)
            except ActorUnavailableError:  # restarting: ask again shortly
                probes.append((time.perf_counter() + 0.5, i))
                continue
            except Exception as e:  # noqa: BLE001 - constructor failed or actor gone for good
                ue = user_error(e)
                if ue is not None:
                    raise ue from None  # weights / settings: one line, before any more shards
                pending.discard(i)
                alive.discard(i)
                log.warning("mining actor %d is gone: %s", i, _reason(e))
                if not alive:
                    raise RuntimeError(f"every mining actor failed; last error: {_reason(e)}") from None
                continue
            if i in pending:
                pending.discard(i)
                summary["actors"].append(info)
                if t_mine is None:
                    t_mine = time.perf_counter()
                    summary["startup_s"] = round(t_mine - t0, 3)
                    meter.t0 = last_progress = t_mine
                if progress:
                    print(f"actor {len(summary['actors'])}/{n} ready on {info['device']} ({info['host']}), model "
                          f"{info['model']}, batch {info['batch_size']}" +
                          (f"; mining {len(todo)} shards ({summary['shards_skipped']} already committed)"
                           if len(summary["actors"]) == 1 else ""), flush=True)
            free.append(i)
            continue
        try:
            rec = ray.get(fut)
        except Exception as e:  # noqa: BLE001 - task error or actor death: charge this shard only
            reason = _reason(e)
            summary["attempts"][ref.uri] = attempt
            if isinstance(e, (RayActorError, ActorUnavailableError)):
                # restarted by Ray; new work only once it answers again (a restart is charged to no other shard)
                probes.append((time.perf_counter() + 0.5, i))
            else:
                free.append(i)
            if attempt < max_attempts:
                log.warning("shard %s attempt %d failed (%s); retrying", ref.uri, attempt, reason)
                if progress:
                    print(f"  retry {attempt + 1}/{max_attempts}: {ref.uri} ({reason[:200]})", flush=True)
                queue.append((time.perf_counter() + min(2 ** attempt * 0.5, 10), ref, attempt + 1))
                queue.sort(key=lambda q: q[0])
            else:
                _fail_record(output_root, cfg, ref, reason, attempt)
                summary["shards_failed"] += 1
                summary["errors"] += 1
                summary["failed"].append({"shard": ref.uri, "reason": reason, "attempts": attempt})
                if progress:
                    print(f"  FAILED after {attempt} attempts: {ref.uri}: {reason[:300]}", flush=True)
            continue
        free.append(i)
        if attempt > 1:
            summary["attempts"][ref.uri] = attempt
        summary["shards_mined"] += 1
        for k in ("images", "patches", "errors"):
            summary[k] += rec[f"num_{k}"]
        for k, v in rec.get("stage_s", {}).items():
            summary["stage_s"][k] += v
        summary["forward_s"] = summary.get("forward_s", 0.0) + rec.get("forward_s", 0.0)
        summary["host_s"] = summary.get("host_s", 0.0) + rec.get("host_s", 0.0)
        meter.shard_done(rec.get("frames", rec["num_images"]))
        if progress:
            print(f"  shard {rec['shard_key']}: {rec['num_images']} images, {rec['num_patches']} patches, "
                  f"{rec['num_errors']} errors in {rec['wall_s']:.1f} s", flush=True)
            frames, patches = ray.get(counter.totals.remote()) if counter is not None else (0, 0)
            print(meter.line(max(frames, meter.frames_done_shards), patches), flush=True)
            last_progress = time.perf_counter()
    summary["mining_wall_s"] = round(time.perf_counter() - (t_mine or t_start), 3)


def next_command(s: dict) -> str:
    """The command to run after mining: build (or update) the index of the output."""
    out = s.get("output") or "<output>"
    idx = out.rstrip("/") + "-index" if not out.startswith("s3://") else "<index dir>"
    return f"python -m jobs.build_index --data {out} --out {idx}"


def format_summary(s: dict, *, with_next: bool = True) -> str:
    """The end-of-run block: counts, rates, time per stage, where the outputs are, the next command
    (``with_next=False``: no next command; the nightly job prints its own)."""
    lines = [
        f"run {s['run_id']} (date {s['date']}): {s['shards_mined']} shards mined, {s['shards_skipped']} skipped "
        f"(already committed), {s['shards_failed']} failed of {s['shards_total']}",
        f"images {s['images']}, patches {s['patches']}, errors {s['errors']}, wall {s['wall_s']:.1f} s, "
        f"{s['images_per_s']:.2f} images/s, {s['patches_per_s']:.1f} patches/s",
    ]
    if s.get("stage_s") and any(s["stage_s"].values()):
        lines.append("actor time per stage (s, summed over shards): " + ", ".join(f"{k} {v:.1f}" for k, v in s["stage_s"].items()))
    if s.get("output"):
        lines.append(f"outputs: {s['output']} (shards/, patches/, images/, errors/: Delta Lake tables)")
        if with_next:
            lines.append(f"next: {next_command(s)}")
    return "\n".join(lines)


__all__ = ["run_mining", "format_summary", "plan_pool", "next_command", "SettingsError", "StartupTimeout"]
