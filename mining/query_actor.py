"""The named, detached Ray query actor ``rare-object-query`` (namespace ``mining``).

It holds the CLIP text and image towers (on GPU when the actor got one, else CPU), the current
index version and the Arrow patch metadata (memory-mapped), and serves :class:`mining.query.QueryEngine`
queries to anyone on the cluster: a Ray client (``ray://head:10001``), a submitted job, the
nightly job (which calls :meth:`QueryActor.reload`).

- Created with ``.options(name=ACTOR_NAME, namespace=NAMESPACE, lifetime="detached",
  get_if_exists=True, max_restarts=-1, max_task_retries=3, max_concurrency=...)``: it outlives the
  job that started it, a second start returns the running one, and a crashed or killed actor is
  restarted (``__init__`` reruns, reloading the CURRENT index version). Queries are read-only, so
  retrying one is safe.
- Threaded (``max_concurrency`` > 1): queries run concurrently (FAISS and torch release the GIL),
  and :meth:`reload` loads the new version in its own thread and swaps it in atomically while the
  in-flight queries finish on the old one.
- ``num_gpus``: 1 when the cluster has GPUs (override with ``num_gpus=``), else 0.
- **Router over shard actors** (issue 18): the engine is a :class:`mining.query.router.RouterEngine`.
  A sharded index version is served by shard actors the query actor starts and owns (one per
  ``shards_per_actor`` shards, each memory-mapping its shards, fetched from an ``s3://`` root into
  a local cache); it encodes a query once, merges the actors' top-k by score and applies the
  filters, re-rank and dedup itself. A reload starts the new version's actors before the atomic
  swap and releases the old ones when their last query ends; every query runs pinned to one
  version. A dead shard actor is restarted by Ray, and queries that need it meanwhile fail with a
  one-line :class:`mining.query.shards.ShardUnavailableError` (no partial results). Legacy
  single-index versions are served in-process, as before.

Bad queries raise :class:`mining.query.QueryError` inside the actor; Ray re-raises it at the caller
(``ray.get`` raises an exception that is both a ``RayTaskError`` and a ``QueryError``) and the
actor keeps serving.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any, Mapping, Sequence

import pyarrow as pa

ACTOR_NAME = "rare-object-query"
NAMESPACE = "mining"
DEFAULT_MAX_CONCURRENCY = 8

log = logging.getLogger(__name__)


class QueryActor:
    """Actor body (wrapped with ``ray.remote`` by :func:`start_actor`).

    Args:
        index_root: index directory (local or s3://), ``CURRENT`` names the version to load.
        shards_per_actor / shard_cpus / cache_dir / shard_timeout_s / prefault: how sharded versions are
            served (:class:`mining.query.shards.ServingConfig`).
        clip_model / clip_pretrained / clip_random_init: CLIP override; default = the manifest's model.
        allowed_prefixes: URI prefixes image queries may read (default: none, bytes only).
        k_cap: largest k. dedup_overlap: see ``QueryConfig``. device: torch device or None (auto).
        faiss_threads: OpenMP threads in the actor process (FAISS, and torch's CPU towers, which share
            the OpenMP pool); 1 = the parallelism comes from concurrent queries; None = library default.
    """

    def __init__(self, index_root: str, clip_model: str | None = None, clip_pretrained: str | None = None,
                 clip_random_init: bool = False, allowed_prefixes: Sequence[str] = (), k_cap: int = 1000,
                 dedup_overlap: float | None = 0.0, device: str | None = None, faiss_threads: int | None = 1,
                 shards_per_actor: int = 1, shard_cpus: float = 1.0, cache_dir: str | None = None,
                 shard_timeout_s: float = 30.0, prefault: bool = True):
        import ray

        from mining.embed import ClipSpec
        from mining.query import QueryConfig
        from mining.query.router import RouterEngine
        from mining.query.shards import ServingConfig

        logging.basicConfig(level=logging.INFO)
        t0 = time.perf_counter()
        if faiss_threads:
            import faiss

            # concurrent queries are the parallelism here; OpenMP inside one multi-query search
            # only adds synchronisation stalls on a busy node
            faiss.omp_set_num_threads(int(faiss_threads))
        self.index_root = index_root
        clip = None
        if clip_model:
            clip = ClipSpec(clip_model, None, True) if clip_random_init else ClipSpec(clip_model, clip_pretrained)
        cfg = QueryConfig(k_cap=int(k_cap), allowed_prefixes=tuple(allowed_prefixes or ()),
                          dedup_overlap=dedup_overlap)
        serving = ServingConfig(shards_per_actor=int(shards_per_actor), shard_cpus=float(shard_cpus),
                                cache_dir=cache_dir, timeout_s=float(shard_timeout_s), faiss_threads=faiss_threads,
                                prefault=bool(prefault))
        self.engine = RouterEngine(index_root, serving=serving, clip=clip, device=device, config=cfg)
        self.started_at = time.time()
        self.load_s = time.perf_counter() - t0
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self.served = 0
        self.errors = 0
        self.in_flight = 0
        self.reloads = 0
        ctx = ray.get_runtime_context()
        try:
            self.restarted = bool(ctx.was_current_actor_reconstructed)
        except Exception:
            self.restarted = False
        try:
            self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        except Exception:
            self.gpu_ids = []
        log.info("query actor up: index %s version %s (%d vectors, dim %d), CLIP %s on %s, %.1fs",
                 index_root, self.engine.version, self.engine.snapshot.ntotal, self.engine.snapshot.dim,
                 self.engine.embedder.model_id, self.engine.embedder.device, self.load_s)

    # ------------------------------------------------------------------ plumbing
    def _call(self, fn, *args, **kwargs) -> pa.Table:
        with self._lock:
            self.in_flight += 1
        try:
            with self.engine.pinned():  # the whole query on one index version
                out = fn(*args, **kwargs)
            with self._lock:
                self.served += 1
            return out
        except Exception:
            with self._lock:
                self.errors += 1
            raise
        finally:
            with self._lock:
                self.in_flight -= 1

    # ------------------------------------------------------------------ queries (see QueryEngine)
    def text(self, text: str, k: int = 16, filters: Mapping | None = None, dedup: bool = True,
             rerank: bool | None = None) -> pa.Table:
        """Text query -> result table (``mining.query.RESULT_SCHEMA``). Raises QueryError."""
        return self._call(self.engine.text, text, k, filters=filters, dedup=dedup, rerank=rerank)

    def image(self, image: bytes | str, box: Any = None, k: int = 16, filters: Mapping | None = None,
              dedup: bool = True, rerank: bool | None = None) -> pa.Table:
        """Image query (bytes, or a URI under the allowed prefixes) + optional box. Raises QueryError."""
        return self._call(self.engine.image, image, box, k, filters=filters, dedup=dedup, rerank=rerank)

    def examples(self, examples: Sequence[Any], k: int = 16, mode: str = "mean",
                 negatives: Sequence[Any] | None = None, negative_weight: float | None = None,
                 filters: Mapping | None = None, dedup: bool = True, rerank: bool | None = None) -> pa.Table:
        """Multi-example query (mean = Eq. 4.1, max, sum; negatives). Raises QueryError."""
        return self._call(self.engine.examples, examples, k, mode=mode, negatives=negatives,
                          negative_weight=negative_weight, filters=filters, dedup=dedup, rerank=rerank)

    def embedding(self, vector: Any, k: int = 16, filters: Mapping | None = None, dedup: bool = True,
                  rerank: bool | None = None) -> pa.Table:
        """Raw-embedding query ((D,) floats). Raises QueryError."""
        return self._call(self.engine.embedding, vector, k, filters=filters, dedup=dedup, rerank=rerank)

    def novel(self, k: int = 16, date_from: str | None = None, date_to: str | None = None, by: str | None = None,
              filters: Mapping | None = None) -> pa.Table:
        """Query-free mode: the k rarest patches of the date range, one per frame
        (``QueryEngine.novel``, :mod:`mining.novel`). Raises QueryError."""
        return self._call(self.engine.novel, k, date_from, date_to, by=by, filters=filters)

    def campaign(self, campaign: str, k: int = 16, method: str = "probe", filters: Mapping | None = None,
                 dedup: bool = True, candidates: int = 2000, data_root: str | None = None) -> pa.Table:
        """Relevance-feedback query of a campaign (``mining.campaign.campaign_query``). Raises QueryError."""
        from mining.campaign import campaign_query

        return self._call(campaign_query, self.engine, campaign, k=k, method=method, filters=filters, dedup=dedup,
                          candidates=candidates, data_root=data_root)

    def campaign_image_ids(self, campaign: str, data_root: str | None = None) -> list[str]:
        """Frames a campaign has labeled (excluded from its seed queries)."""
        from mining.labels import campaign_state

        root = data_root or self.engine.snapshot.manifest.get("data_root")
        return sorted(campaign_state(root, campaign).image_ids) if root else []

    # ------------------------------------------------------------------ admin
    def reload(self, version: str | None = None) -> dict:
        """Swap to the newest (or given) index version atomically; in-flight queries finish on the
        old one. Returns {"old", "new", "swapped", "load_s"}. On error the old version keeps serving."""
        with self._reload_lock:
            out = self.engine.reload(version)
            if out["swapped"]:
                self.reloads += 1
                log.info("query actor reloaded %s -> %s in %.2fs", out["old"], out["new"], out["load_s"])
            return out

    def health(self) -> dict:
        """Liveness + state: version, ntotal, dim, model, device, gpu_ids, served, errors, in_flight,
        reloads, restarted (True after a restart by Ray), pid, host, uptime_s, cache counters, and
        ``serving`` (layout, shard actors' health: pid, shards, restarted; see RouterEngine.serving_info)."""
        s = self.engine.stats()
        return {"ok": True, "index_root": self.index_root, **s, "gpu_ids": self.gpu_ids, "served": self.served,
                "errors": self.errors, "in_flight": self.in_flight, "reloads": self.reloads,
                "restarted": self.restarted, "pid": os.getpid(), "host": socket.gethostname(),
                "uptime_s": round(time.time() - self.started_at, 1), "load_s": round(self.load_s, 2),
                "k_cap": self.engine.config.k_cap, "allowed_prefixes": list(self.engine.config.allowed_prefixes),
                "serving": self.engine.serving_info()}


# --------------------------------------------------------------------------- helpers for drivers

def cluster_has_gpus() -> bool:
    """True when the connected Ray cluster advertises at least one GPU."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0)) > 0


def start_actor(index_root: str, *, clip_model: str | None = None, clip_pretrained: str | None = None,
                clip_random_init: bool = False, allowed_prefixes: Sequence[str] = (), k_cap: int = 1000,
                dedup_overlap: float | None = 0.0, num_gpus: float | None = None, num_cpus: float = 1,
                max_concurrency: int = DEFAULT_MAX_CONCURRENCY, faiss_threads: int | None = 1,
                shards_per_actor: int = 1, shard_cpus: float = 1.0, cache_dir: str | None = None,
                shard_timeout_s: float = 30.0, prefault: bool = True, name: str = ACTOR_NAME,
                namespace: str = NAMESPACE, wait_s: float = 600):
    """Get or create the named detached query actor and wait until it answers ``health()``.

    Must be called with ``ray.init`` done (any namespace). ``num_gpus`` None = 1 when the cluster
    has GPUs, else 0 (the actor falls back to CPU when torch sees no CUDA device). ``shards_per_actor``,
    ``shard_cpus``, ``cache_dir``, ``shard_timeout_s``, ``prefault``: how it serves sharded versions (its
    shard actors; :class:`mining.query.shards.ServingConfig`).

    Returns:
        (actor handle, health dict).
    Raises:
        ray.exceptions.GetTimeoutError: not healthy within ``wait_s`` seconds.
        ray.exceptions.RayActorError: the constructor failed (bad index root, weights, ...).
    """
    import ray

    if num_gpus is None:
        num_gpus = 1 if cluster_has_gpus() else 0
    cls = ray.remote(QueryActor)
    actor = cls.options(name=name, namespace=namespace, lifetime="detached", get_if_exists=True,
                        max_restarts=-1, max_task_retries=3, max_concurrency=int(max_concurrency),
                        num_gpus=num_gpus, num_cpus=num_cpus).remote(
        index_root, clip_model, clip_pretrained, clip_random_init, list(allowed_prefixes), k_cap, dedup_overlap,
        None, faiss_threads, shards_per_actor, shard_cpus, cache_dir, shard_timeout_s, prefault)
    health = ray.get(actor.health.remote(), timeout=wait_s)
    return actor, health


def get_actor(name: str = ACTOR_NAME, namespace: str = NAMESPACE, timeout_s: float = 30):
    """Handle of the running query actor (``ray.init`` must be done).

    Raises:
        LookupError: no such actor (start it with ``python -m jobs.serve_query --index <root>``).
    """
    import ray

    deadline = time.time() + timeout_s
    while True:
        try:
            return ray.get_actor(name, namespace=namespace)
        except ValueError:
            if time.time() >= deadline:
                raise LookupError(f"no actor {name!r} in namespace {namespace!r}; start it with "
                                  f"`python -m jobs.serve_query --index <index root> --address <ray address>`") from None
            time.sleep(0.5)


def stop_actor(name: str = ACTOR_NAME, namespace: str = NAMESPACE) -> bool:
    """Kill the query actor for good (no restart). Returns False when none was running."""
    import ray

    try:
        actor = ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    ray.kill(actor, no_restart=True)
    return True


def reload_actor(version: str | None = None, name: str = ACTOR_NAME, namespace: str = NAMESPACE,
                 timeout_s: float = 600, lookup_timeout_s: float = 30) -> dict:
    """Ask the running query actor to hot-swap to the newest index version (the nightly job calls this).

    Returns:
        the actor's reply ``{"old", "new", "swapped", "load_s"}``.
    Raises:
        LookupError: no such actor within ``lookup_timeout_s`` seconds.
        ray.exceptions.GetTimeoutError: no reply within ``timeout_s`` seconds.
    """
    import ray

    return ray.get(get_actor(name, namespace, timeout_s=lookup_timeout_s).reload.remote(version), timeout=timeout_s)
