"""kNN uniqueness and the duplicate-patch check of a sharded index version (issue 18), as Ray tasks.

The single-index build writes ``uniqueness.parquet`` (:mod:`mining.index.uniqueness`, after FiftyOne
Brain's ``compute_uniqueness``: the weighted mean distance to a patch's K = 3 nearest neighbours,
divided by the version's maximum).  A sharded version computes the same statistic without gathering
anything on the driver:

* **One task per shard A** (:func:`_shard_task`) opens A's patch ids and exact float16 vectors (its
  refine file), searches them against each shard B it is given (one shard open at a time, with B's
  tuned parameters, K + 1 neighbours), keeps the best K + 1 by exact cosine across shards, and writes
  ``versions/<v>/uniqueness/<A>.parquet``: ``patch_id`` int64 (sorted), ``knn_distance`` float32 and
  the neighbour lists ``nb_id`` (K + 1 int64), ``nb_score`` (K + 1 float32).  Memory: one shard's
  index + (n_A, K + 1) neighbours; the driver holds the task results (a few numbers per shard).
* **Normalisation at read time**: ``uniqueness = knn_distance / max(knn_distance)`` over the version
  (:func:`mining.index.uniqueness.read_uniqueness` reads the parts), so no task needs the global
  maximum and nothing is rewritten for it.
* **Nightly adds are incremental and exact**: the patches of old shards already have their K + 1
  nearest neighbours among the old shards (stored in the parent version's parts); new patches can
  only come closer.  So an old shard (or a compacted shard, from the parts of the shards it merged)
  is searched against the **new** shards only and merged with its stored lists; a new shard is
  searched against every shard.  Cost per night: (old patches) x (search in the new shards) +
  (new patches) x (search in all shards), not N x (search in all shards).  A retrain builds a fresh
  version and recomputes everything (the parent has other codebooks, but its neighbour lists are
  exact cosines and would stay valid; recomputing keeps the rule simple).
* The neighbours are the ANN index's (the shards' tuned ``nprobe`` / ``k_factor`` with exact float16
  re-rank, asked for the 16 the shard was tuned for and the best K + 1 kept), as in the single-index
  build; self is dropped by id.
* **Duplicate patch ids across shards** (the same frames committed under two store shards) would make
  the router return a patch twice; the single-index build refuses such a store
  (:func:`mining.index.source.check_unique_patch_ids`).  Here every shard task also checks its ids
  against the shards it reads (sorted-array intersection, O(n_A + n_B)), so the pairs (new, all)
  are checked on every publish; a duplicate fails the publish with one line naming the shards.
"""
from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mining.fs import get_fs, is_local, join
from mining.index import layout, parts, publish
from mining.index.uniqueness import SEARCH_K, WEIGHTS, neighbour_distances, weighted_distance

UNIQ_DIR = "uniqueness"
BATCH = 16_384  # query rows per search call


class DuplicatePatchError(ValueError):
    """The same patch_id is in two shards of a version (one line: how many, which shards)."""


def part_uri(vuri: str, shard_id: str) -> str:
    """``<version uri>/uniqueness/<shard_id>.parquet``."""
    return join(vuri, UNIQ_DIR, f"{shard_id}.parquet")


def _read_parts(uris: list[str]) -> pa.Table | None:
    tables = []
    for u in uris:
        fs, path = get_fs(u)
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f))
    if not tables:
        return None
    t = pa.concat_tables(tables)
    order = np.argsort(t.column("patch_id").to_numpy(), kind="stable")
    return t.take(pa.array(order))


def merge_neighbours(scores: np.ndarray, ids: np.ndarray, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k1`` columns per row by score, each neighbour id once.

    Args:
        scores: (n, c) float32 cosines (-inf = none). ids: (n, c) int64 (-1 = none). k1: columns kept.
    Returns: (n, k1) float32 scores descending, (n, k1) int64 ids (-1 / -inf padding).
    """
    n, c = ids.shape
    s = np.where(ids < 0, -np.inf, scores).astype(np.float32)
    order = np.argsort(-s, axis=1, kind="stable")
    s, i = np.take_along_axis(s, order, 1), np.take_along_axis(ids, order, 1)
    # the same id twice in a row (it came from two lists): keep the first (best) copy
    srt = np.sort(np.where(i < 0, np.iinfo(np.int64).min, i), axis=1)
    if c > 1 and np.any((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)):
        for r in np.flatnonzero(np.any((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0), axis=1)):
            _, first = np.unique(i[r], return_index=True)
            dup = np.ones(c, bool)
            dup[first] = False
            dup &= i[r] >= 0
            s[r, dup], i[r, dup] = -np.inf, -1
        order = np.argsort(-s, axis=1, kind="stable")
        s, i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    out_s = np.full((n, k1), -np.inf, np.float32)
    out_i = np.full((n, k1), -1, np.int64)
    m = min(k1, c)
    out_s[:, :m], out_i[:, :m] = s[:, :m], i[:, :m]
    out_i[~np.isfinite(out_s)] = -1
    return out_s, out_i


def _shard_task(out_root: str, shard_id: str, against: list[str], prev_uris: list[str], out_uri: str | None,
                k: int, cache_dir: str | None) -> dict:
    """Neighbours of shard ``shard_id``'s patches in the shards ``against`` (merged with the lists in
    ``prev_uris``) -> ``out_uri``, and the duplicate check against those shards.  ``out_uri`` None: the
    duplicate check only (uniqueness off: reads the shards' metadata, no index, no search)."""
    t0 = time.perf_counter()
    parts.start_anon_sampler()
    k1 = k + 1
    ids = np.asarray(layout.shard_meta(out_root, shard_id, cache_dir).column("patch_id").to_numpy(), np.int64)
    dups = {}
    for b_id in against:
        if b_id != shard_id:
            hit = np.intersect1d(ids, layout.shard_meta(out_root, b_id, cache_dir).column("patch_id").to_numpy(),
                                 assume_unique=True)
            if len(hit):
                dups[b_id] = int(len(hit))
    if dups or out_uri is None:  # a duplicate fails the publish; out_uri None: the check was all that was asked
        return {"shard": shard_id, "n": len(ids), "duplicates": dups, "stats": parts.task_stats(t0)}
    a = layout.open_shard(out_root, shard_id, cache_dir=cache_dir)
    best_s = np.full((len(ids), k1), -np.inf, np.float32)
    best_i = np.full((len(ids), k1), -1, np.int64)
    prev = _read_parts(prev_uris)
    if prev is not None and prev.num_rows:
        pid = prev.column("patch_id").to_numpy()
        pos = np.minimum(np.searchsorted(pid, ids), len(pid) - 1)
        ok = pid[pos] == ids
        nb_i = np.asarray(prev.column("nb_id").combine_chunks().flatten().to_numpy(), np.int64).reshape(-1, k1)
        nb_s = np.asarray(prev.column("nb_score").combine_chunks().flatten().to_numpy(), np.float32).reshape(-1, k1)
        best_s[ok], best_i[ok] = nb_s[pos[ok]], nb_i[pos[ok]]
    for b_id in against:
        b = a if b_id == shard_id else layout.open_shard(out_root, b_id, cache_dir=cache_dir)
        for s0 in range(0, len(ids), BATCH):
            x = a.reconstruct_exact(ids[s0:s0 + BATCH])
            s, i = b.search(x, max(k1, SEARCH_K))  # the depth the shard was tuned for; the best k1 are kept below
            sl = slice(s0, s0 + len(x))
            best_s[sl], best_i[sl] = merge_neighbours(np.concatenate([best_s[sl], s], 1),
                                                      np.concatenate([best_i[sl], i], 1), k1)
        del b
    r = weighted_distance(neighbour_distances(ids, best_s, best_i, k), WEIGHTS[:k]).astype(np.float32)
    table = pa.table({
        "patch_id": pa.array(ids, pa.int64()), "knn_distance": pa.array(r, pa.float32()),
        "nb_id": pa.FixedSizeListArray.from_arrays(pa.array(best_i.reshape(-1), pa.int64()), k1),
        "nb_score": pa.FixedSizeListArray.from_arrays(pa.array(best_s.reshape(-1), pa.float32()), k1)})
    fs, path = get_fs(out_uri)
    if is_local(out_uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.part-{os.getpid()}"
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            pq.write_table(table, f, compression="zstd")
    return {"shard": shard_id, "n": len(ids), "duplicates": {}, "searched": len(against),
            "max_knn_distance": float(r.max()) if len(r) else 0.0, "merged_parts": len(prev_uris),
            "stats": parts.task_stats(t0)}


def plan_tasks(out_root: str, entries: list[dict], parent: dict | None) -> list[tuple[str, list[str], list[str]]]:
    """(shard, shards to search, parent parts to merge) per shard of a new version (module docstring).

    Args:
        entries: the new version's shard entries ({"id", ...}). parent: the parent version's manifest
            (None, or one without uniqueness parts: everything is searched against everything).
    """
    ids = [e["id"] for e in entries]
    if not parent or parent.get("layout") != layout.LAYOUT_SHARDED or not (parent.get("uniqueness") or {}).get("parts"):
        return [(s, ids, []) for s in ids]
    pv = join(out_root, publish.VERSIONS, parent["version"])
    old = {e["id"] for e in parent["shards"]}
    srcs: dict[str, list[str]] = {}
    for s in ids:
        if s in old:
            srcs[s] = [s]
        else:
            m = layout.read_json(join(layout.shard_uri(out_root, s), publish.MANIFEST))
            cf = m.get("compacted_from") or []
            if cf and all(c in old for c in cf):
                srcs[s] = list(cf)
    new = [s for s in ids if s not in srcs]
    return [(s, new, [part_uri(pv, c) for c in srcs[s]]) if s in srcs else (s, ids, []) for s in ids]


def staging_uri(out_root: str, version: str) -> str:
    """Where a version's files go before its manifest commits it (local: the staging dir
    :func:`mining.index.publish.publish_small_version` renames; s3: the version prefix)."""
    if is_local(out_root):
        return os.path.join(layout._local_path(out_root), publish.VERSIONS, publish.STAGING_PREFIX + version)
    return join(out_root, publish.VERSIONS, version)


def compute(out_root: str, version: str, entries: list[dict], parent: dict | None, *, run_tasks, uniqueness: bool = True,
            k: int = len(WEIGHTS), cache_dir: str | None = None, log_fn=print) -> dict | None:
    """Duplicate check + (``uniqueness``) neighbour parts of a new sharded version, one task per shard.

    Args:
        entries: the version's shard entries. parent: the parent version's manifest (incremental) or None.
        run_tasks: ``run_tasks(fn, arglist) -> results`` (Ray tasks or in process).
    Returns: the manifest's ``"uniqueness"`` info (None when ``uniqueness`` is off).
    Raises: DuplicatePatchError: a patch_id in two shards (the version must not be published).
    """
    t0 = time.perf_counter()
    plan = plan_tasks(out_root, entries, parent)
    vuri = staging_uri(out_root, version)
    args = [(out_root, s, against, prev, part_uri(vuri, s) if uniqueness else None, k, cache_dir)
            for s, against, prev in plan]
    res = run_tasks(_shard_task, args)
    dups = {(r["shard"], b): n for r in res for b, n in r["duplicates"].items()}
    if dups:
        pairs = sorted({tuple(sorted(p)) for p in dups})
        total = max(dups.values())
        raise DuplicatePatchError(
            f"refusing to publish the index: {total}+ patch_id(s) occur in more than one shard (the same frames "
            f"committed under several store shards): {', '.join(f'{a} & {b}' for a, b in pairs[:4])}"
            + (f" and {len(pairs) - 4} more pairs" if len(pairs) > 4 else ""))
    if not uniqueness:
        return None
    info = {"k": k, "weights": list(WEIGHTS[:k]), "n": sum(r["n"] for r in res), "parts": UNIQ_DIR,
            "max_knn_distance": max((r["max_knn_distance"] for r in res), default=0.0),
            "incremental": any(r["merged_parts"] for r in res),
            "searches": sum(r["n"] * r["searched"] for r in res), "seconds": round(time.perf_counter() - t0, 3),
            "task_cpu_s": round(sum(r["stats"]["cpu_s"] for r in res), 1),
            "source": "FiftyOne Brain compute_uniqueness (neighbours method), per shard as Ray tasks; "
                      "normalised by the version maximum at read time"}
    log_fn(f"uniqueness: {info['n']} patches, {info['searches']} shard searches "
           f"({'incremental' if info['incremental'] else 'full'}), {info['seconds']:.1f} s")
    return info


def cleanup(out_root: str, version: str) -> None:
    """Remove the staged parts of a version that was not published (best effort)."""
    uri = staging_uri(out_root, version)
    if is_local(out_root):
        shutil.rmtree(uri, ignore_errors=True)
        return
    fs, path = get_fs(join(uri, UNIQ_DIR))
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except OSError:
        pass

