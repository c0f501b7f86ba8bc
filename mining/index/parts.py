"""Encoded parts and their streaming merge into an index shard (issue 18, item 2).

An **encode task** (:func:`encode_part`) reads a group of committed store fragments one at a time,
adds their vectors with the frozen trained codebooks to a copy of the trained index (coarse
assignment + PQ encoding, ids = patch_ids), and writes the part::

    <part>/index.faiss   the part's inverted lists (labels = patch_ids)
    <part>/ids.npy       its patch_ids, sorted ascending (int64)
    <part>/vectors.npy   its float16 exact vectors in the same order: a sorted run
    <part>/meta.arrow    its metadata rows in the same order

Memory of an encode task: the part's float16 rows (2·D bytes/vector, preallocated from the ledger
counts), its codes + ids (M/2 + 8 bytes/vector) and one store fragment in float32 while it is added:
about ``part_vectors * (2D + 80) + fragment * 4D`` bytes, **bounded by the part size, not by N**.

The **merge** (:func:`merge_to_shard`) turns parts -- or old shards, for compaction -- into one shard
directory (the per-version format of :mod:`mining.index.search`):

1. ids: the inputs' sorted ids are concatenated and argsorted (a k-way merge of sorted runs done as
   one stable argsort of 8-byte keys: 28 bytes/vector of the shard for ids, order and source);
   duplicate patch_ids inside a shard raise ValueError;
2. ``meta.arrow`` and ``refine.faiss`` are written in chunks of 65 536 rows in merged order: each input
   is read in increasing row order (it is a sorted run), so the reads are sequential per input and
   nothing but one chunk of rows is in memory.  The same chunks give the exact top-16 of the tuning
   queries inside the shard (its ground truth);
3. ``index.faiss``: the inputs' lists are relabelled to rows of the shard (``core.relabel_ivf``) and
   appended all at once by ``core.merge_indexes`` (``core.merge_block_lists``: faiss' own
   ``merge_into`` overflows the heap on fast-scan lists of >= block_size entries).  4-bit fast-scan
   lists are block-packed (``BlockInvertedLists``) and cannot go through
   ``OnDiskInvertedLists``/``merge_ondisk`` (faiss 1.15), so the merged lists are held in memory:
   M/2 + 8 bytes/vector of the *shard* -- what a shard actor holds when it serves the shard -- twice
   while merging (the inputs' lists and the merged ones);
4. per-shard tuning (nprobe, k_factor) on the shared tuning queries against the shard's ground
   truth (``core.tune``), ``params.json``, ``tune_truth.npz``, then ``manifest.json`` last.

Merge memory is therefore ~ (28 + M/2 + 8) bytes/vector of the shard + one input + one chunk: bounded
by the shard size, which the build and the compaction policy cap (:mod:`mining.index.stream`).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import resource
import threading
import time

import faiss
import numpy as np
import pyarrow as pa

from mining.index import core, publish
from mining.index.search import (INDEX_FILE, META_COLUMNS, META_FILE, PARAMS_FILE, REFINE_FILE, PatchIndex, open_refine,
                                 read_meta, refine_header, write_meta)

PART_IDS = "ids.npy"
PART_VECTORS = "vectors.npy"
SHARD_TRUTH = "tune_truth.npz"
MERGE_CHUNK = 65_536
K_EVAL = 16


_ANON_PEAK = {"kb": 0, "thread": None}


def _rss_anon_kb() -> int:
    """This process's anonymous resident memory (``RssAnon`` of /proc/self/status, KiB; 0 where absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def start_anon_sampler(period_s: float = 0.05) -> None:
    """Sample ``RssAnon`` every ``period_s`` seconds in a daemon thread (once per process), for
    :func:`task_stats`' ``peak_anon_mb``. Why: ``ru_maxrss`` also counts the file-backed pages of
    memory-mapped inputs a task streams through (part vectors, refine files: page cache, evictable),
    so it overstates what a task needs; the anonymous peak is the memory it cannot give back."""
    if _ANON_PEAK["thread"] is not None:
        return

    def run():
        while True:
            _ANON_PEAK["kb"] = max(_ANON_PEAK["kb"], _rss_anon_kb())
            time.sleep(period_s)

    t = threading.Thread(target=run, name="anon-rss-sampler", daemon=True)
    _ANON_PEAK["thread"] = t
    t.start()


def task_stats(t0: float) -> dict:
    """Peak RSS (MB, ``ru_maxrss`` of this process: anonymous + touched file-backed pages), peak anonymous
    RSS (MB, sampled by :func:`start_anon_sampler` when it was started, else the current value), CPU
    seconds of this process since it started, and wall seconds since ``t0``.  Build tasks run with
    ``max_calls=1`` (a fresh worker each), so the peaks are the task's own."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    anon = max(_ANON_PEAK["kb"], _rss_anon_kb())
    return {"peak_rss_mb": round(ru.ru_maxrss / 1024, 1), "peak_anon_mb": round(anon / 1024, 1),
            "cpu_s": round(ru.ru_utime + ru.ru_stime, 2), "wall_s": round(time.perf_counter() - t0, 2),
            "pid": os.getpid()}


def _write_npy_header(f, shape: tuple, dtype) -> None:
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                             "fortran_order": False, "shape": tuple(int(s) for s in shape)})


# --------------------------------------------------------------------------- encode

def encode_part(trained_path: str, data_root: str, records: list[dict], out_dir: str) -> dict:
    """Encode a group of committed store fragments into a part directory (see module docstring).

    Args:
        trained_path: local ``trained.faiss`` (the frozen codebooks). data_root: store root (local or s3).
        records: store commit records (``mining.store.read_ledger``) with ``files["patches"]`` and ``num_patches``.
        out_dir: local directory for the part (created).
    Returns: {"n", "date_min", "date_max", "store_shards": [...]}.
    Raises: ValueError when a fragment holds fewer rows than its record says (a store inconsistency).
    """
    from mining.index.source import read_shard, shard_vectors

    os.makedirs(out_dir, exist_ok=True)
    index = faiss.read_index(trained_path)
    n_total = sum(int(r["num_patches"]) for r in records)
    dim = int(records[0]["embedding_dim"])
    vec = np.empty((n_total, dim), np.float16)
    ids = np.empty(n_total, np.int64)
    metas, at = [], 0
    for rec in records:
        t = read_shard(data_root, rec, list(META_COLUMNS) + ["embedding"])
        if at + t.num_rows > n_total:
            raise ValueError(f"store fragment {rec['files']['patches']} has {t.num_rows} rows, its record says {rec['num_patches']}")
        x = shard_vectors(t)
        pid = t.column("patch_id").to_numpy().astype(np.int64)
        core.add_vectors(index, x, pid)
        vec[at:at + len(x)] = x
        ids[at:at + len(x)] = pid
        metas.append(t.select(list(META_COLUMNS)))
        at += len(x)
        del t, x
    vec, ids = vec[:at], ids[:at]
    order = np.argsort(ids, kind="stable")
    np.save(os.path.join(out_dir, PART_IDS), ids[order])
    with open(os.path.join(out_dir, PART_VECTORS), "wb") as f:
        _write_npy_header(f, (at, dim), np.float16)
        for s in range(0, at, MERGE_CHUNK):
            f.write(np.ascontiguousarray(vec[order[s:s + MERGE_CHUNK]]).tobytes())
    del vec
    meta = pa.concat_tables(metas, promote_options="default") if metas else pa.table({c: [] for c in META_COLUMNS})
    write_meta(os.path.join(out_dir, META_FILE), meta.take(pa.array(order)))
    faiss.write_index(index, os.path.join(out_dir, INDEX_FILE))
    dates = sorted(r["date"] for r in records)
    return {"n": int(at), "date_min": dates[0], "date_max": dates[-1], "store_shards": sorted(r["shard"] for r in records)}


# --------------------------------------------------------------------------- merge

class _Input:
    """One merge input: a part (labels = patch_ids) or a shard (labels = rows of its meta)."""

    def __init__(self, d: str, kind: str):
        if kind not in ("part", "shard"):
            raise ValueError(f"merge input kind must be part or shard, got {kind!r}")
        self.dir, self.kind = d, kind
        self.meta = read_meta(os.path.join(d, META_FILE))
        if kind == "part":
            self.ids = np.load(os.path.join(d, PART_IDS), mmap_mode="r")
            self.vectors = np.load(os.path.join(d, PART_VECTORS), mmap_mode="r")
        else:
            self.ids = np.asarray(self.meta.column("patch_id").to_numpy(), np.int64)
            self.vectors = open_refine(os.path.join(d, REFINE_FILE))[1]
        if len(self.ids) and np.any(np.diff(self.ids) < 0):
            raise ValueError(f"merge input {d} is not sorted by patch_id")

    def label_to_pid(self, labels: np.ndarray) -> np.ndarray:
        return labels if self.kind == "part" else np.asarray(self.ids)[labels]


def merge_to_shard(inputs: list[tuple[str, str]], trained_path: str, out_dir: str, *, queries: np.ndarray,
                   plan, recall_target: float, info: dict, k: int = K_EVAL, chunk: int = MERGE_CHUNK) -> dict:
    """Merge parts / shards into the shard directory ``out_dir`` (see module docstring); ``manifest.json`` last.

    Args:
        inputs: [(local dir, "part" | "shard")]. trained_path: local trained.faiss (same codebooks as the inputs).
        queries: (Q, D) float32 tuning queries. plan: the :class:`~mining.index.sizing.IndexPlan` of the codebooks.
        info: manifest fields of the shard (id, date_min, date_max, store_shards, trained, ...).
    Returns: the shard manifest (dict) with ``n``, ``params``, ``recall_at_publish``, ``bytes``, ``index_bytes``.
    Raises: ValueError on duplicate patch_ids inside the shard or unsorted inputs.
    """
    t0 = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    ins = [_Input(d, kind) for d, kind in inputs]
    counts = np.array([len(i.ids) for i in ins], np.int64)
    offs = np.concatenate([[0], np.cumsum(counts)])
    n = int(offs[-1])
    dim = int(plan.dim)
    all_ids = np.concatenate([np.asarray(i.ids, np.int64) for i in ins]) if ins else np.zeros(0, np.int64)
    order = np.argsort(all_ids, kind="stable")
    sorted_ids = all_ids[order]
    del all_ids
    dup = np.flatnonzero(np.diff(sorted_ids) == 0)
    if len(dup):
        raise ValueError(f"refusing to write index shard {info.get('id')}: {len(dup)} patch_id(s) occur more than once "
                         f"(e.g. {sorted_ids[dup[:3]].tolist()}; the same frames committed under several store shards)")
    src = (np.searchsorted(offs[1:], order, side="right")).astype(np.int32)

    # meta.arrow and refine.faiss, streamed in merged order; the shard's exact top-k of the queries on the way
    q = np.ascontiguousarray(queries, np.float32)
    gt_s = np.full((len(q), k), core.MISSING_SCORE, np.float32)
    gt_i = np.full((len(q), k), -1, np.int64)
    meta_all = pa.concat_tables([i.meta.select(list(META_COLUMNS)) if set(META_COLUMNS) <= set(i.meta.column_names)
                                 else i.meta for i in ins], promote_options="default")
    with pa.OSFile(os.path.join(out_dir, META_FILE), "wb") as sink, \
            open(os.path.join(out_dir, REFINE_FILE), "wb") as rf:
        writer = pa.ipc.new_file(sink, meta_all.schema)
        rf.write(refine_header(n, dim))
        for s in range(0, n, chunk):
            g, which = order[s:s + chunk], src[s:s + chunk]
            writer.write_table(meta_all.take(pa.array(g)))
            rows = np.empty((len(g), dim), np.float16)
            for j in np.unique(which):
                m = which == j
                rows[m] = ins[j].vectors[g[m] - offs[j]]
            rf.write(rows.tobytes())
            if len(q):
                sc, ii = core.exact_topk(q, rows, sorted_ids[s:s + chunk], k)
                gt_s, gt_i = core.merge_topk(gt_s, gt_i, sc, ii, k)
        writer.close()
    del meta_all, order, src

    # inverted lists: relabel each input to rows of this shard, then append them all in one call
    index = faiss.read_index(trained_path)
    inputs = []
    for inp in ins:
        part = faiss.read_index(os.path.join(inp.dir, INDEX_FILE))
        core.relabel_ivf(part, lambda a, inp=inp: np.searchsorted(sorted_ids, inp.label_to_pid(a)))
        inputs.append(part)
    core.merge_indexes(index, *inputs)
    del inputs
    faiss.write_index(index, os.path.join(out_dir, INDEX_FILE))
    del ins

    # tune this shard on the shared queries against its own ground truth
    refine, vec = open_refine(os.path.join(out_dir, REFINE_FILE))
    meta = read_meta(os.path.join(out_dir, META_FILE))
    pidx = PatchIndex(index, meta, {"kind": plan.kind, "refine": "fp16"}, {}, vec, refine=refine)

    def search_fn(qq, kk, params):
        pidx.set_params(params)
        return pidx.search(qq, kk)[1]

    if len(q) and n:
        params, recall = core.tune(plan.kind, index, search_fn, q, gt_i, k=k, recall_target=recall_target,
                                   nlist=plan.nlist)
    else:
        params, recall = {}, 1.0
    publish.write_json_atomic(os.path.join(out_dir, PARAMS_FILE), params)
    np.savez(os.path.join(out_dir, SHARD_TRUTH), scores=gt_s, ids=gt_i)
    files = [INDEX_FILE, REFINE_FILE, META_FILE, PARAMS_FILE, SHARD_TRUTH]
    nbytes = sum(os.path.getsize(os.path.join(out_dir, f)) for f in files)
    index_bytes = os.path.getsize(os.path.join(out_dir, INDEX_FILE))
    manifest = {
        **info,
        "layout": "shard",
        "kind": plan.kind,
        "factory": plan.factory,
        "plan": plan.to_dict(),
        "refine": "fp16",
        "ondisk": False,
        "n": n,
        "dim": dim,
        "params": params,
        "recall_at_publish": round(float(recall), 4),
        "recall_k": k,
        "recall_target": recall_target,
        "n_queries": int(len(q)),
        "index_bytes": int(index_bytes),
        "bytes_per_vector": round(index_bytes / max(1, n), 1),
        "bytes": int(nbytes),
        "merge_s": round(time.perf_counter() - t0, 2),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "faiss_version": faiss.__version__,
    }
    with open(os.path.join(out_dir, publish.MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    return manifest
