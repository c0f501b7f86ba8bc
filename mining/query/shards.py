"""Shard actors, and :class:`ShardSet`: the router's view of one sharded index version (issue 18).

A sharded version (``"layout": "sharded"``, :mod:`mining.index.layout`) is served by one Ray actor
per group of ``shards_per_actor`` consecutive shards (date order). Each :class:`ShardActor` opens its
shards with :func:`mining.index.open_shard`: a local root is memory-mapped in place; an ``s3://``
root is first downloaded into a local cache directory (``cache_dir``, default
:func:`mining.index.layout.default_cache_dir`; files already there with the right size are skipped,
shards being immutable, so a reload fetches only the new night's shard). An actor answers
``search(Q, k)`` (its shards' top-k merged by score) and ``vectors(ids)`` (exact vectors of the ids
it owns, for the re-rank and the max / sum multi-example scores).

:class:`ShardSet` has the ``PatchIndex`` interface the query engine reads (``search``, ``metadata``,
``reconstruct_exact``, ``dim``, ``ntotal``, ``version``, ``manifest``, ``kind``), so an
:class:`~mining.query.snapshot.IndexSnapshot` over it is an ordinary snapshot and every query kind
(text, image, examples, embedding, novel, campaign) runs unchanged: ``search`` asks every actor for
its top ``fetch`` and merges them by score (:func:`mining.index.layout.merge_shard_results`, the
merge the in-process :class:`~mining.index.ShardedIndex` uses), and ``reconstruct_exact`` asks the
owning actors.

Design decisions:

- **The router keeps the metadata, the actors keep the index.** Filters, per-image dedup and the
  result table need patch_id -> image / box / date for candidates from every shard, so the router
  maps each shard's ``meta.arrow`` (from s3 only that file and the shard manifest are fetched)
  and holds the lookup arrays (about 32 B/vector: ids, boxes, codes) plus 9 B/vector of
  ownership map here. The actors hold the bulk: IVF codes and the float16 refine rows
  (2 * D B/vector). Past ~100M vectors per router the metadata step would move to the actors
  (not built).
- **Actors are anonymous and owned by the router**: fate-shared with it (a restarted router
  starts a fresh set; none are leaked), released by the router with ``ray.kill`` once a version
  is retired and drained (:class:`mining.query.router.RouterEngine`), and by Ray's reference
  counting if a set is dropped without :meth:`ShardSet.close`.
- **A dead shard actor is restarted by Ray** (``max_restarts=-1``; ``__init__`` reopens the SAME
  shard ids, so a restart never changes the version it serves). ``max_task_retries=0``: a call in
  flight when it dies is not silently replayed.
- **Failure policy: fail, not degrade.** A query that does not get every actor's answer within
  ``timeout_s`` (actor dead / restarting / too slow) raises :class:`ShardUnavailableError` with one
  line naming the actor, its shards and the version; the caller retries. Why not a partial
  result with ``missing_shards``: shards are nights, and a silently missing night reads as "no
  rare objects that night" to a miner; a partial top-k also breaks "a query sees one version".
  Calls submitted while an actor restarts are queued by Ray and answered once it is back, so a
  restart shorter than ``timeout_s`` only delays queries.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)


class ShardUnavailableError(RuntimeError):
    """A shard actor did not answer (dead, restarting or slower than the timeout); the query was not
    answered, retry it. The message is one line."""


@dataclass(frozen=True)
class ServingConfig:
    """How a router serves sharded versions.

    Attributes:
        shards_per_actor: shards per shard actor (>= 1; consecutive shards in the manifest's order).
        shard_cpus: CPUs reserved per shard actor (>= 0; fractions allowed).
        cache_dir: local directory for shards of an ``s3://`` root (None: default_cache_dir(root)).
        timeout_s: seconds a query waits for every shard actor (> 0) before ShardUnavailableError.
        start_timeout_s: seconds a (re)load waits for a new version's actors to be ready.
        faiss_threads: OpenMP threads per shard actor (1: the parallelism is concurrent queries).
        prefault: each shard actor reads its refine files into the page cache before it reports ready
            (:func:`mining.index.search.prefault_refine`), when they fit in half the node's available
            memory; else it serves cold and says so in health (``prefault``).
    """

    shards_per_actor: int = 1
    shard_cpus: float = 1.0
    cache_dir: str | None = None
    timeout_s: float = 30.0
    start_timeout_s: float = 600.0
    faiss_threads: int | None = 1
    prefault: bool = True

    def check(self) -> "ServingConfig":
        """Returns self. Raises ValueError (one line naming the setting) for an unusable value."""
        if isinstance(self.shards_per_actor, bool) or not isinstance(self.shards_per_actor, int) \
                or self.shards_per_actor < 1:
            raise ValueError(f"--shards-per-actor must be an integer >= 1, got {self.shards_per_actor!r}")
        if not (self.shard_cpus >= 0) or not np.isfinite(self.shard_cpus):
            raise ValueError(f"--shard-cpus must be >= 0, got {self.shard_cpus!r}")
        if not (self.timeout_s > 0) or not (self.start_timeout_s > 0):
            raise ValueError(f"--shard-timeout must be > 0, got {self.timeout_s!r}")
        if self.cache_dir is not None and os.path.exists(self.cache_dir) and not os.path.isdir(self.cache_dir):
            raise ValueError(f"--cache-dir {self.cache_dir!r} exists and is not a directory")
        return self


def group_shards(shard_ids: Sequence[str], per_actor: int) -> list[list[str]]:
    """Consecutive groups of ``per_actor`` shard ids (the last may be smaller). Raises ValueError when
    ``per_actor`` < 1 or there is no shard."""
    if per_actor < 1:
        raise ValueError(f"shards per actor must be >= 1, got {per_actor}")
    ids = list(shard_ids)
    if not ids:
        raise ValueError("a sharded version lists no shards")
    return [ids[i:i + per_actor] for i in range(0, len(ids), per_actor)]


class ShardActor:
    """Actor body (wrapped with ``ray.remote`` by :class:`ShardSet`): one group of shards of a version.

    Args:
        root: index root (local or ``s3://``). shard_ids: the shards it serves.
        version: the version they belong to (reported in health and errors only).
        cache_dir: local cache for an s3 root (None: the default cache of the root).
        faiss_threads: OpenMP threads (None: library default).
        prefault: touch the shards' refine files before serving (see :class:`ServingConfig`).
    Raises:
        FileNotFoundError: a shard does not exist (the actor then fails to start).
    """

    def __init__(self, root: str, shard_ids: Sequence[str], version: str, cache_dir: str | None = None,
                 faiss_threads: int | None = 1, prefault: bool = True):
        import ray

        from mining.index import ShardedIndex, open_shard

        t0 = time.perf_counter()
        if faiss_threads:
            import faiss

            faiss.omp_set_num_threads(int(faiss_threads))
        self.root, self.shard_ids, self.version = root, list(shard_ids), version
        shards = [open_shard(root, sid, cache_dir=cache_dir) for sid in self.shard_ids]
        self.index = ShardedIndex(shards, {"shards": [{"id": s} for s in self.shard_ids]}, version=version)
        self.paths = [s.path for s in shards]
        self.prefault = _prefault(shards) if prefault else {"skipped": "off"}
        self.load_s = time.perf_counter() - t0
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecated property; still the one that says "restarted"
                self.restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        except Exception:
            self.restarted = False
        self.searches = 0

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of its shards: ((Q, k) float32 cosine scores desc, (Q, k) int64 patch ids, -1 = none).
        ``queries``: (Q, D) float32, normalised by the router. Raises ValueError as PatchIndex.search."""
        self.searches += 1
        return self.index.search(queries, int(k))

    def vectors(self, patch_ids: np.ndarray) -> np.ndarray:
        """(n,) int64 ids it owns -> (n, D) float32 exact normalised vectors. Raises KeyError otherwise."""
        return self.index.reconstruct_exact(patch_ids)

    def health(self) -> dict:
        """{"ok", "version", "shards", "ntotal", "pid", "restarted", "load_s", "searches", "paths", "prefault"}."""
        return {"ok": True, "version": self.version, "shards": self.shard_ids, "ntotal": self.index.ntotal,
                "pid": os.getpid(), "restarted": self.restarted, "load_s": round(self.load_s, 3),
                "searches": self.searches, "paths": self.paths, "prefault": self.prefault}


def _prefault(shards) -> dict:
    """Prefault the refine files of ``shards`` (PatchIndex list) while they fit in half of the node's
    available memory (``psutil``), in shard order. Returns {"bytes", "seconds", "skipped"}: bytes
    touched, seconds spent, and None or why some were skipped."""
    import psutil

    budget = psutil.virtual_memory().available // 2
    out = {"bytes": 0, "seconds": 0.0, "skipped": None}
    for s in shards:
        r = s.prefault(max_bytes=budget - out["bytes"])
        if r["skipped"] == "too large":
            out["skipped"] = "refine files larger than half the available memory: served cold"
            log.warning("shard %s: %s", s.path, out["skipped"])
            break
        out["bytes"] += r["bytes"]
        out["seconds"] = round(out["seconds"] + r["seconds"], 3)
    return out


def _shard_meta(root: str, shard_id: str, cache_dir: str | None) -> pa.Table:
    """The memory-mapped ``meta.arrow`` of one shard (:func:`mining.index.layout.shard_meta`)."""
    from mining.index import layout

    return layout.shard_meta(root, shard_id, cache_dir)


class ShardSet:
    """One sharded version served by shard actors, with the ``PatchIndex`` interface (see module doc).

    Starts the actors, maps the shards' metadata meanwhile, then waits until every actor answers
    ``health`` (so a ShardSet is complete before a router swaps it in).

    Args:
        root: index root (local or ``s3://``). version / manifest: the version and its manifest.
        config: :class:`ServingConfig`.
    Raises:
        ShardUnavailableError: an actor did not come up within ``config.start_timeout_s`` (its
            error, e.g. a missing shard, is in the message); the started actors are killed.
        FileNotFoundError: a shard's metadata is missing. ValueError: the manifest records no dim.
    """

    def __init__(self, root: str, version: str, manifest: dict, config: ServingConfig | None = None):
        import ray

        from mining.index import core

        self.config = cfg = (config or ServingConfig()).check()
        self.root, self.version, self.manifest = root, version, manifest
        self.kind = manifest.get("kind")
        from mining.index.layout import fetch_version_files

        self.path = fetch_version_files(root, version, manifest, cfg.cache_dir)  # uniqueness parts (mining.novel)
        self.params: dict = {}
        self._normalize = core.normalize
        self.dim = int(manifest.get("dim") or 0)
        if not self.dim:
            raise ValueError(f"index version {version} records no dim")
        self.groups = group_shards([s["id"] for s in manifest["shards"]], cfg.shards_per_actor)
        cls = ray.remote(ShardActor)
        opts = dict(max_restarts=-1, max_task_retries=0, num_cpus=cfg.shard_cpus, max_concurrency=8)
        self.actors = [cls.options(**opts).remote(root, g, version, cfg.cache_dir, cfg.faiss_threads, cfg.prefault)
                       for g in self.groups]
        try:
            metas, owners = [], []
            for gi, g in enumerate(self.groups):
                for sid in g:
                    m = _shard_meta(root, sid, cfg.cache_dir)
                    metas.append(m)
                    owners.append(np.full(m.num_rows, gi, np.int32))
            table = pa.concat_tables(metas, promote_options="default")
            ids = table.column("patch_id").to_numpy() if table.num_rows else np.zeros(0, np.int64)
            order = np.argsort(ids, kind="stable")
            self._meta = table.take(pa.array(order)) if len(ids) and np.any(np.diff(ids) < 0) else table
            self._ids = np.ascontiguousarray(ids[order], np.int64)
            self._owner = np.concatenate(owners)[order] if owners else np.zeros(0, np.int32)
            self.ntotal = len(self._ids)
            self.started = self._get([a.health.remote() for a in self.actors], cfg.start_timeout_s, "start")
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ calls
    def _get(self, refs: list, timeout_s: float, what: str, groups: Sequence[int] | None = None) -> list:
        """ray.get of one call per actor (``groups[i]``: the actor index of ``refs[i]``, default all in
        order), sharing one deadline. Raises ShardUnavailableError naming the first actor that died or
        did not answer in time."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError

        deadline = time.monotonic() + timeout_s
        out = []
        for gi, ref in zip(range(len(refs)) if groups is None else groups, refs):
            try:
                out.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
            except (RayActorError, GetTimeoutError) as e:
                why = f"no answer within {timeout_s:.0f} s" if isinstance(e, GetTimeoutError) else \
                    " ".join(str(e).split())[:240]
                raise ShardUnavailableError(
                    f"shard actor {gi + 1}/{len(self.groups)} (shards {','.join(self.groups[gi])}) of index version "
                    f"{self.version} is unavailable, {what} failed; retry (a dead shard actor is restarted): "
                    f"{type(e).__name__}: {why}") from None
        return out

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k nearest patches over every shard actor: ((Q, k) float32 scores desc, (Q, k) int64 ids, -1 =
        none). ``queries`` (Q, D) float, normalised here. Raises ShardUnavailableError, ValueError."""
        from mining.index.layout import merge_shard_results

        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        q = self._normalize(queries, dim=self.dim, what="queries")
        res = self._get([a.search.remote(q, int(k)) for a in self.actors], self.config.timeout_s, "search")
        return merge_shard_results(res, int(k))

    def metadata(self) -> pa.Table:
        """Every shard's metadata, sorted by patch_id (memory-mapped columns where no sort was needed)."""
        return self._meta

    def reconstruct_exact(self, patch_ids) -> np.ndarray:
        """(n,) int64 ids -> (n, D) float32 exact normalised vectors from the owning actors.
        Raises KeyError for ids not in this version, ShardUnavailableError."""
        ids = np.asarray(patch_ids, dtype=np.int64).reshape(-1)
        out = np.zeros((len(ids), self.dim), np.float32)
        if not len(ids):
            return out
        pos = np.minimum(np.searchsorted(self._ids, ids), max(len(self._ids) - 1, 0))
        found = (self._ids[pos] == ids) if len(self._ids) else np.zeros(len(ids), bool)
        if not found.all():
            raise KeyError(f"patch ids not in version {self.version}: {ids[~found][:5].tolist()}")
        owner = self._owner[pos]
        groups = np.unique(owner)
        refs = [self.actors[g].vectors.remote(ids[owner == g]) for g in groups]
        for g, v in zip(groups, self._get(refs, self.config.timeout_s, "re-rank", groups.tolist())):
            out[owner == g] = v
        return out

    # ------------------------------------------------------------------ admin
    def health(self, timeout_s: float = 10.0) -> list[dict]:
        """One dict per actor: its ``health()``, or {"ok": False, "shards", "error"} when it does not answer."""
        import ray

        refs = [a.health.remote() for a in self.actors]
        out = []
        for g, ref in zip(self.groups, refs):
            try:
                out.append(ray.get(ref, timeout=timeout_s))
            except Exception as e:  # noqa: BLE001 - reported, not raised
                out.append({"ok": False, "shards": g, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
        return out

    def close(self) -> None:
        """Kill the actors for good (no restart). Queries still running on them fail; the router only
        closes a set no query holds. Idempotent."""
        import ray

        for a in getattr(self, "actors", []):
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []

    def __repr__(self) -> str:
        return (f"ShardSet(version={self.version!r}, shards={sum(map(len, self.groups))}, actors={len(self.actors)}, "
                f"ntotal={self.ntotal}, dim={self.dim})")
