"""The router: a :class:`~mining.query.engine.QueryEngine` whose sharded versions are served by shard
actors (issue 18, item 3). The query actor (:mod:`mining.query_actor`, name ``rare-object-query``)
runs one; its public methods and API are unchanged.

- **Per version**: a sharded version (``"layout": "sharded"``) is opened as an
  :class:`~mining.query.snapshot.IndexSnapshot` over a :class:`~mining.query.shards.ShardSet`
  (its shard actors + the router's metadata); a legacy single-index version is opened in-process,
  as before. The query path is the engine's: encode once, ``search`` (for a ShardSet: every
  actor's top ``fetch``, merged by score), then :func:`~mining.query.engine.rank_hits` (filters,
  exact re-rank through the actors' ``vectors``, per-image dedup) -- the seam described in
  :mod:`mining.query.engine`, entered through the snapshot's index rather than by overriding
  ``_search``, so the novel and campaign paths (which call the index directly) go through the
  actors too.
- **Atomic reload across shards**: :meth:`RouterEngine.reload` builds the new version's ShardSet
  completely (new actors started and answering, metadata mapped) BEFORE the swap, which is one
  reference assignment; a failure leaves the old version serving. Every query runs inside
  :meth:`RouterEngine.pinned`: it takes the current snapshot once (per thread) and every step of
  that query reads it, so a query sees exactly one version's shard set. The old set is retired at
  the swap and its actors are killed when the last query pinning it finishes (immediately when
  none does).
- **Shard actor failures**: see :mod:`mining.query.shards` (fail with one line,
  :class:`~mining.query.shards.ShardUnavailableError`; Ray restarts the actor).
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Iterator

from mining.query.engine import QueryEngine
from mining.query.shards import ServingConfig, ShardSet
from mining.query.snapshot import IndexSnapshot

log = logging.getLogger(__name__)


class RouterEngine(QueryEngine):
    """A QueryEngine that serves sharded versions through shard actors (Ray must be initialised).

    Args:
        index_root: index root (local or ``s3://``).
        serving: :class:`~mining.query.shards.ServingConfig` (shard grouping, CPUs, cache, timeouts).
        kwargs: the other :class:`~mining.query.engine.QueryEngine` arguments (version, clip,
            device, config, embedder, load_embedder).
    Raises:
        as QueryEngine, plus ShardUnavailableError when a shard actor does not start and
        ValueError for a bad ``serving`` setting.
    """

    def __init__(self, index_root: str, *, serving: ServingConfig | None = None, **kwargs):
        self.serving = (serving or ServingConfig()).check()
        self._pin = threading.local()
        self._pin_lock = threading.Lock()
        self._inflight: dict[int, int] = {}      # id(snapshot) -> queries pinning it
        self._retired: dict[int, IndexSnapshot] = {}
        self.retired_closed = 0
        super().__init__(index_root, **kwargs)

    # ------------------------------------------------------------------ versions
    def _open_snapshot(self, version: str | None) -> IndexSnapshot:
        """Sharded version -> snapshot over a ShardSet (actors started and ready); legacy -> in-process."""
        from mining.index.layout import LAYOUT_SHARDED, read_version_manifest

        v, manifest = read_version_manifest(self.index_root, version)
        if manifest.get("layout") != LAYOUT_SHARDED:
            return super()._open_snapshot(v)
        shards = ShardSet(self.index_root, v, manifest, self.serving)
        try:
            return IndexSnapshot(shards, self.index_root)
        except BaseException:
            shards.close()
            raise

    @property
    def snapshot(self) -> IndexSnapshot:
        """The snapshot this thread's query pinned (:meth:`pinned`), else the current one."""
        snap = getattr(self._pin, "snap", None)
        return self._snap if snap is None else snap

    @contextlib.contextmanager
    def pinned(self) -> Iterator[IndexSnapshot]:
        """Run one query on one version: pins the current snapshot for this thread (nested calls reuse
        it) and keeps a retired version's actors alive until the block ends."""
        if getattr(self._pin, "snap", None) is not None:
            yield self._pin.snap
            return
        with self._pin_lock:
            snap = self._snap
            self._inflight[id(snap)] = self._inflight.get(id(snap), 0) + 1
        self._pin.snap = snap
        try:
            yield snap
        finally:
            self._pin.snap = None
            close = None
            with self._pin_lock:
                n = self._inflight[id(snap)] - 1
                if n:
                    self._inflight[id(snap)] = n
                else:
                    del self._inflight[id(snap)]
                    close = self._retired.pop(id(snap), None)
            if close is not None:
                self._close(close)

    def reload(self, version: str | None = None) -> dict:
        """Open the newest (or given) version completely, swap it in, retire the old one (its shard
        actors are killed once no query pins it). Returns QueryEngine.reload's dict plus
        ``"retired"`` ("closed" | "draining" | None). On error the old version keeps serving."""
        old = self._snap
        out = super().reload(version)
        out["retired"] = None
        if out["swapped"]:
            with self._pin_lock:
                busy = self._inflight.get(id(old), 0) > 0
                if busy:
                    self._retired[id(old)] = old
            if not busy:
                self._close(old)
            out["retired"] = "draining" if busy else "closed"
        return out

    def _close(self, snap: IndexSnapshot) -> None:
        close = getattr(snap.index, "close", None)
        if close is not None:
            close()
            self.retired_closed += 1
            log.info("released the shard actors of version %s", snap.version)

    def close(self) -> None:
        """Kill the current and retired versions' shard actors (the router is going away)."""
        with self._pin_lock:
            snaps = [self._snap, *self._retired.values()]
            self._retired.clear()
        for s in snaps:
            self._close(s)

    # ------------------------------------------------------------------ state
    def serving_info(self, timeout_s: float = 10.0) -> dict:
        """{"layout": "sharded" | "single", "shards", "actors": [per-actor health], "draining": n retired
        versions still pinned, "retired_closed": n, "config"} of the current version."""
        snap = self._snap
        out = {"draining": len(self._retired), "retired_closed": self.retired_closed,
               "config": {k: getattr(self.serving, k) for k in ("shards_per_actor", "shard_cpus", "cache_dir",
                                                                 "timeout_s")}}
        if isinstance(snap.index, ShardSet):
            actors = snap.index.health(timeout_s)
            return {"layout": "sharded", "shards": sum(len(g) for g in snap.index.groups), "actors": actors, **out}
        return {"layout": "single", "shards": 1, "actors": [], **out}
