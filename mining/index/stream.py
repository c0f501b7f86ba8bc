"""Streaming, sharded index builds and nightly adds (issue 18, items 1-2), on Ray or in-process.

``build_sharded`` (``build_index(..., shards=S)`` / ``streaming=True``):

1. **plan** from the ledger counts only (``mining.store.read_ledger``): N, D -> :func:`~mining.index.sizing.plan_index`
   for the whole N (one set of codebooks shared by all shards);
2. **sample** N_train + 256 rows uniformly over all committed fragments: global row numbers are
   drawn in the driver from the counts, Ray tasks read the rows (one task per part group) and
   return them as object refs that the driver never resolves;
3. **train** in one task (a GPU task when the cluster has a GPU: ``core.train_index`` trains
   k-means there): OPQ, coarse k-means, PQ; at >= 32 768 lists the coarse quantizer becomes an HNSW
   graph over the centroids for assignment (``core.use_hnsw_quantizer``).  The task writes
   ``trained/<id>/`` (codebooks + tuning queries) and returns only its id;
4. **encode**: one task per part (a group of consecutive committed fragments of at most
   ``part_max_vectors`` vectors, inside one shard's date range): ``mining.index.parts.encode_part``
   writes the part's lists and its sorted float16 run under ``<root>/.parts-<build>/``. The codes
   are score-aware (``mining.index.anisotropic``, torch), so on a cluster with GPUs each encode task
   takes ``ENCODE_GPU_SHARE`` of one and encodes on the device;
5. **merge**: one task per shard (``parts.merge_to_shard``): streams the parts into
   ``shards/<id>/`` and tunes the shard; then the driver publishes the version (manifests only)
   and deletes the parts.

The driver holds the ledger records, counts and small result dicts: its memory does not grow
with the number of vectors (measured in benchmarks/RESULTS.md).  Tasks run with ``num_cpus=1``,
``max_calls=1`` (a fresh worker per task: its peak RSS is the task's own, and memory is returned)
and ``max_retries=2`` (each task writes only its own directory, so a retry is idempotent).

Shards are **date ranges**: the ledger is sorted by (date, shard) and cut into S contiguous groups of
about equal counts (``source.group_records``); see :mod:`mining.index.layout` for why.

``update_sharded`` (nightly, ``update_index`` on a sharded version): the committed fragments that
no shard holds become ONE new shard (or ceil(n / TARGET_SHARD_VECTORS) shards for a huge night),
encoded with the frozen codebooks; old shard files are never rewritten.  Retrain (a full new
build) when N >= ``growth_factor`` x the N trained for or the quantisation error drifted, as for the
single index.  Then the **compaction policy** (:func:`compaction_plan`, on unless ``compact=False``)
merges runs of small old shards into one.
"""
from __future__ import annotations

import datetime as _dt
import math
import os
import shutil
import tempfile
import time
import uuid

import faiss
import numpy as np

from mining.fs import get_fs, is_local, join
from mining.index import core, layout, parts, publish, sizing

PART_MAX_VECTORS = 250_000  # encode task memory ~ part * (2D + 80) B: 280 MB at D=512
TARGET_SHARD_VECTORS = 4_000_000  # a shard actor: ~72 B/vector resident (290 MB) + 1 KB/vector refine file (4 GB, mmapped)
COMPACT_SMALL_VECTORS = TARGET_SHARD_VECTORS // 4  # a shard below this is "small"
COMPACT_MIN_RUN = 4  # compact when at least this many consecutive old shards are small
N_TUNE_QUERIES = 256
TASK_OPTIONS = {"num_cpus": 1, "max_retries": 2, "max_calls": 1}
# encode tasks on a cluster with GPUs take this share of one, so the score-aware encoder
# (mining.index.anisotropic, torch) runs on the device: 4 tasks per GPU, each with <= 4.3 GB of tables
ENCODE_GPU_SHARE = 0.25


# --------------------------------------------------------------------------- task plumbing

def _run_tasks(use_ray: bool, fn, arglist: list[tuple], *, resources: dict | None = None) -> list:
    """Run ``fn(*args)`` for each args tuple: Ray tasks (``TASK_OPTIONS``) or in this process, in order."""
    if not use_ray:
        return [fn(*a) for a in arglist]
    import ray

    remote = ray.remote(**{**TASK_OPTIONS, **(resources or {})})(fn)
    return ray.get([remote.remote(*a) for a in arglist])


def _gpu_share(use_ray: bool, share: float) -> dict:
    """``{"num_gpus": share}`` when the Ray cluster has GPUs, else ``{}`` (Ray hides GPUs from tasks that ask for none)."""
    if not use_ray:
        return {}
    import ray

    return {"num_gpus": share} if ray.cluster_resources().get("GPU", 0) > 0 else {}


def _local_or_tmp(uri: str) -> tuple[str, bool]:
    """(local dir to write ``uri``'s files into, whether it must be uploaded afterwards)."""
    if is_local(uri):
        return layout._local_path(uri), False
    return tempfile.mkdtemp(prefix="mining-index-"), True


def _fetch_trained(out_root: str, trained_id: str, tmp: str) -> tuple[str, np.ndarray]:
    """(local trained.faiss path, tuning queries) of ``trained_id`` (downloaded into ``tmp`` for s3 roots)."""
    uri = layout.trained_uri(out_root, trained_id)
    d = layout._local_path(uri) if is_local(out_root) else os.path.join(tmp, "trained")
    if not is_local(out_root):
        layout.download_dir(uri, d, [layout.TRAINED_FILE, layout.TUNE_QUERIES])
    return os.path.join(d, layout.TRAINED_FILE), np.load(os.path.join(d, layout.TUNE_QUERIES))


# --------------------------------------------------------------------------- sample + train

def _sample_task(data_root: str, items: list[tuple[dict, np.ndarray]]) -> np.ndarray:
    """Rows ``picks`` of each record: (m, D) float32 normalised."""
    from mining.index.source import read_shard, shard_vectors
    import pyarrow as pa

    out = [shard_vectors(read_shard(data_root, rec, ["embedding"]).take(pa.array(p))) for rec, p in items if len(p)]
    return np.concatenate(out) if out else np.zeros((0, int(items[0][0]["embedding_dim"])), np.float32)


def _train_task(out_root: str, trained_id: str, plan_d: dict, seed: int, nq: int, meta: dict, *samples) -> dict:
    """Train the codebooks on the sampled rows; write ``trained/<id>/`` (manifest last). Returns its manifest."""
    t0 = time.perf_counter()
    parts.start_anon_sampler()
    plan = sizing.IndexPlan(**plan_d)
    x = np.concatenate(samples)
    x = x[np.random.default_rng(seed).permutation(len(x))]
    queries, xtrain = x[:nq], x[nq:] if len(x) > nq else x
    trained = core.train_index(plan, xtrain, seed=seed)
    if plan.nlist >= core.HNSW_QUANTIZER_MIN_NLIST:
        core.use_hnsw_quantizer(trained)
    train_s = time.perf_counter() - t0
    qerr = core.quantization_error(trained, queries[:4096])
    uri = layout.trained_uri(out_root, trained_id)
    d, upload = _local_or_tmp(uri)
    staging = d + ".staging" if not upload else d
    os.makedirs(staging, exist_ok=True)
    faiss.write_index(trained, os.path.join(staging, layout.TRAINED_FILE))
    np.save(os.path.join(staging, layout.TUNE_QUERIES), queries)
    kmeans_device = core.kmeans_device()
    man = {"id": trained_id, "plan": plan.to_dict(), "n_train_sample": int(len(xtrain)), "quant_error": round(qerr, 6),
           "train_s": round(train_s, 3), "seed": seed, "kmeans_device": kmeans_device,
           "gpu": kmeans_device != "cpu", "faiss_version": faiss.__version__,
           "hnsw_quantizer": plan.nlist >= core.HNSW_QUANTIZER_MIN_NLIST,
           "score_aware_eta": core.default_eta(trained),  # how the encode tasks choose codes (mining.index.anisotropic)
           "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **meta}
    publish.write_json_atomic(os.path.join(staging, publish.MANIFEST), man)
    if upload:
        layout.upload_dir(staging, uri)
        shutil.rmtree(staging, ignore_errors=True)
    else:
        os.replace(staging, d)
    return {**man, "stats": parts.task_stats(t0)}


def train_codebooks(data_root: str, out_root: str, records: list[dict], plan: sizing.IndexPlan, *, seed: int,
                    use_ray: bool, part_max_vectors: int = PART_MAX_VECTORS, nq: int = N_TUNE_QUERIES) -> dict:
    """Sample (tasks), train (one task), write ``trained/<id>/``.  Returns the trained manifest (+ ``stats``)."""
    counts = np.array([r["num_patches"] for r in records], np.int64)
    total = int(counts.sum())
    want = min(total, plan.n_train + nq)
    picks = np.sort(np.random.default_rng(seed).choice(total, size=want, replace=False))
    offs = np.concatenate([[0], np.cumsum(counts)])
    items = []
    for i, rec in enumerate(records):
        lo, hi = np.searchsorted(picks, [offs[i], offs[i + 1]])
        items.append((rec, picks[lo:hi] - offs[i]))
    groups = _part_groups(records, part_max_vectors)
    by_rec = {id(r): it for r, it in zip(records, items)}
    arglist = [(data_root, [by_rec[id(r)] for r in g]) for g in groups]
    trained_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    meta = {"n_trained": total, "dim": plan.dim}
    if use_ray:
        import ray

        sample = ray.remote(**TASK_OPTIONS)(_sample_task)
        refs = [sample.remote(*a) for a in arglist]  # the driver passes refs on, never the rows
        train = ray.remote(**{**TASK_OPTIONS, **_gpu_share(True, 1)})(_train_task)
        return ray.get(train.remote(out_root, trained_id, plan.to_dict(), seed, nq, meta, *refs))
    samples = [_sample_task(*a) for a in arglist]
    return _train_task(out_root, trained_id, plan.to_dict(), seed, nq, meta, *samples)


# --------------------------------------------------------------------------- encode + merge

def _part_groups(records: list[dict], part_max_vectors: int) -> list[list[dict]]:
    """Consecutive records grouped into parts of <= part_max_vectors vectors (a bigger record is its own part)."""
    groups, cur, acc = [], [], 0
    for r in records:
        if cur and acc + r["num_patches"] > part_max_vectors:
            groups.append(cur)
            cur, acc = [], 0
        cur.append(r)
        acc += r["num_patches"]
    if cur:
        groups.append(cur)
    return groups


def _encode_task(out_root: str, trained_id: str, data_root: str, records: list[dict], part_uri: str) -> dict:
    t0 = time.perf_counter()
    parts.start_anon_sampler()
    tmp = tempfile.mkdtemp(prefix="mining-enc-")
    try:
        trained_path, _ = _fetch_trained(out_root, trained_id, tmp)
        d, upload = (os.path.join(tmp, "part"), True) if not is_local(part_uri) else (layout._local_path(part_uri), False)
        info = parts.encode_part(trained_path, data_root, records, d)
        if upload:
            layout.upload_dir(d, part_uri)
        return {**info, "uri": part_uri, "stats": parts.task_stats(t0)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _merge_task(out_root: str, trained_id: str, inputs: list[tuple[str, str]], shard_id: str, info: dict,
                recall_target: float) -> dict:
    """Merge inputs [(uri, "part" | "shard")] into ``shards/<shard_id>/`` (local: staged + renamed; s3: manifest last)."""
    t0 = time.perf_counter()
    parts.start_anon_sampler()
    tmp = tempfile.mkdtemp(prefix="mining-merge-")
    try:
        trained_path, queries = _fetch_trained(out_root, trained_id, tmp)
        plan = sizing.IndexPlan(**layout.read_json(join(layout.trained_uri(out_root, trained_id), publish.MANIFEST))["plan"])
        local_inputs = []
        for j, (uri, kind) in enumerate(inputs):
            if is_local(uri):
                local_inputs.append((layout._local_path(uri), kind))
            else:
                d = os.path.join(tmp, f"in{j}")
                layout.download_dir(uri, d)
                local_inputs.append((d, kind))
        final = layout.shard_uri(out_root, shard_id)
        out = os.path.join(tmp, "out") if not is_local(out_root) else os.path.join(
            os.path.dirname(layout._local_path(final)), ".staging-" + shard_id)
        man = parts.merge_to_shard(local_inputs, trained_path, out, queries=queries, plan=plan,
                                   recall_target=recall_target, info={**info, "id": shard_id, "trained": trained_id})
        if is_local(out_root):
            os.replace(out, layout._local_path(final))
        else:
            layout.upload_dir(out, final)
        return {"entry": {k: man[k] for k in ("id", "n", "date_min", "date_max", "bytes")},
                "manifest": {k: man[k] for k in ("params", "recall_at_publish", "index_bytes", "merge_s", "store_shards")},
                "stats": parts.task_stats(t0)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_shards(data_root: str, out_root: str, trained_id: str, shard_groups: list[list[dict]], *, use_ray: bool,
                 recall_target: float, part_max_vectors: int = PART_MAX_VECTORS) -> tuple[list[dict], list[dict]]:
    """Encode + merge ``shard_groups`` (lists of store records, each a date range) into new shards.

    Returns: (version manifest entries [{"id", "n", "date_min", "date_max", "bytes"}], task results)."""
    build = uuid.uuid4().hex[:10]
    pdir = join(out_root, f".parts-{build}")
    plan_parts = [[(g, join(pdir, f"s{si:03d}-p{pi:04d}")) for pi, g in enumerate(_part_groups(recs, part_max_vectors))]
                  for si, recs in enumerate(shard_groups)]
    try:
        enc = _run_tasks(use_ray, _encode_task, [(out_root, trained_id, data_root, g, uri)
                                                  for sp in plan_parts for g, uri in sp],
                         resources=_gpu_share(use_ray, ENCODE_GPU_SHARE))
        merges = []
        for si, recs in enumerate(shard_groups):
            dates = sorted(r["date"] for r in recs)
            sid = layout.new_shard_id(dates[0], dates[-1])
            info = {"date_min": dates[0], "date_max": dates[-1], "store_shards": sorted(r["shard"] for r in recs)}
            merges.append((out_root, trained_id, [(uri, "part") for _, uri in plan_parts[si]], sid, info, recall_target))
        res = _run_tasks(use_ray, _merge_task, merges)
    finally:
        fs, path = get_fs(pdir)
        if fs.exists(path):
            fs.rm(path, recursive=True)
    return [r["entry"] for r in res], enc + res


def compact_shards(out_root: str, trained_id: str, entries: list[dict], runs: list[list[int]], *, use_ray: bool,
                   recall_target: float) -> tuple[list[dict], list[dict]]:
    """Merge each run of old shards (indices into ``entries``) into one new shard; returns (new entries, task results).
    The old shard directories are not touched (versions that list them keep working)."""
    merges = []
    for run in runs:
        olds = [entries[i] for i in run]
        smans = [layout.read_json(join(layout.shard_uri(out_root, e["id"]), publish.MANIFEST)) for e in olds]
        dmin, dmax = min(e["date_min"] for e in olds), max(e["date_max"] for e in olds)
        info = {"date_min": dmin, "date_max": dmax, "store_shards": sorted(s for m in smans for s in m["store_shards"]),
                "compacted_from": [e["id"] for e in olds]}
        merges.append((out_root, trained_id, [(layout.shard_uri(out_root, e["id"]), "shard") for e in olds],
                       layout.new_shard_id(dmin, dmax), info, recall_target))
    res = _run_tasks(use_ray, _merge_task, merges)
    first = {run[0]: r["entry"] for run, r in zip(runs, res)}
    dropped = {i for run in runs for i in run[1:]}
    return [first.get(i, e) for i, e in enumerate(entries) if i not in dropped], res


def compaction_plan(entries: list[dict], *, small_vectors: int = COMPACT_SMALL_VECTORS,
                    target_vectors: int = TARGET_SHARD_VECTORS, min_run: int = COMPACT_MIN_RUN,
                    keep_newest: int = 1) -> list[list[int]]:
    """Which old shards to merge: runs of indices into ``entries`` (date order).

    Policy: a shard is *small* when it holds fewer than ``small_vectors`` vectors.  Every maximal run of
    consecutive small shards, not counting the newest ``keep_newest`` (tonight's shard stays a pure add,
    so the nightly cost is one shard), is merged when it has at least ``min_run`` members, cut greedily
    into groups of at most ``target_vectors`` vectors with at least 2 shards each.  With the defaults a
    night of ~100k patches stays its own shard until 4 such nights exist, then they become one.
    Returns: [] when nothing is due.
    """
    cut = max(0, len(entries) - keep_newest)
    runs, cur = [], []
    for i in range(cut):
        if entries[i]["n"] < small_vectors:
            cur.append(i)
        else:
            runs.append(cur)
            cur = []
    runs.append(cur)
    out = []
    for run in runs:
        if len(run) < min_run:
            continue
        grp, acc = [], 0
        for i in run:
            if grp and acc + entries[i]["n"] > target_vectors:
                if len(grp) >= 2:
                    out.append(grp)
                grp, acc = [], 0
            grp.append(i)
            acc += entries[i]["n"]
        if len(grp) >= 2:
            out.append(grp)
    return out


# --------------------------------------------------------------------------- versions

def _publish(data_root: str, out_root: str, entries: list[dict], tman: dict, results: list[dict], *, t0: float,
             recall_target: float, extra: dict, log_fn, use_ray: bool, uniqueness: bool = True,
             parent: dict | None = None) -> dict:
    """Duplicate check + uniqueness parts (:mod:`mining.index.shard_uniqueness`; ``parent``: the version
    they are updated from, None = computed from scratch), then the version's manifest and CURRENT."""
    from mining.index import shard_uniqueness
    from mining.store import dataset_info

    info = dataset_info(data_root, warn=False)
    plan = sizing.IndexPlan(**tman["plan"])
    n = sum(e["n"] for e in entries)
    merged = {r["entry"]["id"]: r["manifest"] for r in results if "entry" in r}
    for e in entries:  # shards of the previous version: their own manifests (small JSON reads)
        if e["id"] not in merged:
            merged[e["id"]] = layout.read_json(join(layout.shard_uri(out_root, e["id"]), publish.MANIFEST))
    recalls = [merged[e["id"]]["recall_at_publish"] for e in entries]
    index_bytes = sum(merged[e["id"]]["index_bytes"] for e in entries)
    stats = [r["stats"] for r in results if "stats" in r]
    version = publish.new_version_name()
    try:
        uniq = shard_uniqueness.compute(out_root, version, entries, parent, uniqueness=uniqueness, log_fn=log_fn,
                                        run_tasks=lambda fn, args: _run_tasks(use_ray, fn, args))
    except BaseException:
        shard_uniqueness.cleanup(out_root, version)
        raise
    manifest = {
        "layout": layout.LAYOUT_SHARDED, "version": version, "kind": plan.kind, "factory": plan.factory,
        "plan": tman["plan"], "n": n, "dim": plan.dim, "metric": "inner_product (cosine on L2-normalised vectors)",
        "models": info["models"], "random_init": bool(info["random_init"]), "data_root": data_root,
        "shards": entries, "trained": tman["id"], "trained_version": tman["id"], "n_trained": tman["n_trained"],
        "quant_error": tman["quant_error"], "recall_target": recall_target, "recall_k": parts.K_EVAL,
        # per-shard recall on each shard's own top-16 (the version's recall is measured by benchmarks/index.py)
        "recall_at_publish": round(min(recalls), 4) if recalls else None, "params": {},
        "refine": "fp16", "ondisk": False, "store_shards_n": None,
        "bytes_per_vector": round(index_bytes / max(1, n), 1),
        "build_stats": {"tasks": len(stats), "max_task_peak_rss_mb": max((s["peak_rss_mb"] for s in stats), default=0),
                        "max_task_peak_anon_mb": max((s.get("peak_anon_mb", 0) for s in stats), default=0),
                        "task_cpu_s": round(sum(s["cpu_s"] for s in stats), 1)},
        "build_s": round(time.perf_counter() - t0, 3),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "faiss_version": faiss.__version__, "gpu": tman.get("gpu", False), "changed": True, "uniqueness": uniq,
        "used_ray": bool(extra.pop("_used_ray", False)), **extra,
    }
    publish.publish_small_version(out_root, version, manifest, {"params.json": {}})
    log_fn(f"published {version}: sharded {plan.kind} {plan.factory} n={n} shards={len(entries)} "
           f"min shard recall@16={manifest['recall_at_publish']} build {manifest['build_s']:.1f} s")
    return manifest


def build_sharded(data_root: str, out_root: str, *, kind: str = "ivfpq-refine", shards: int | None = None,
                  memory_budget_bytes: int | None = None, recall_target: float = 0.95, seed: int = 0,
                  use_ray: bool | None = None, part_max_vectors: int = PART_MAX_VECTORS, trained_id: str | None = None,
                  verbose: bool = True, extra_manifest: dict | None = None, uniqueness: bool = True) -> dict:
    """Streaming build of a NEW sharded version (see module docstring).

    Args:
        shards: number of date-range shards (None: ceil(N / TARGET_SHARD_VECTORS)).
        trained_id: reuse ``trained/<id>/`` codebooks (same root) instead of training.
        part_max_vectors: vectors per encode task (its memory bound).
        uniqueness: kNN uniqueness parts for every patch (one task per shard, :mod:`mining.index.shard_uniqueness`);
            the duplicate patch_id check across shards runs either way. Others as :func:`mining.index.build_index`.
    Returns: the version manifest (``"layout": "sharded"``).
    Raises: ValueError: kind other than ivfpq-refine/auto, shards < 1, dim mismatch with ``trained_id``.
        FileNotFoundError: nothing committed.
    """
    from mining.index.build import _resolve_ray
    from mining.index.source import committed_records
    from mining.store import dataset_info

    t0 = time.perf_counter()
    log_fn = print if verbose else (lambda *a: None)
    if kind not in ("auto", "ivfpq-refine"):
        raise ValueError(f"sharded/streaming builds are ivfpq-refine only (got kind={kind!r})")
    if shards is not None and (isinstance(shards, bool) or int(shards) < 1):
        raise ValueError(f"shards must be >= 1, got {shards!r}")
    if part_max_vectors < 1:
        raise ValueError(f"part_max_vectors must be >= 1, got {part_max_vectors}")
    dataset_info(data_root, warn=True)
    records = committed_records(data_root)
    if not records:
        raise FileNotFoundError(f"no committed patches under {data_root!r}")
    n = sum(r["num_patches"] for r in records)
    dim = int(records[0]["embedding_dim"])
    use_ray = _resolve_ray(use_ray)
    if trained_id:
        tman = layout.read_json(join(layout.trained_uri(out_root, trained_id), publish.MANIFEST))
        if int(tman["plan"]["dim"]) != dim:
            raise ValueError(f"trained codebooks {trained_id} are for dim {tman['plan']['dim']}, the store has {dim}")
    else:
        plan = sizing.plan_index(n, dim, "ivfpq-refine", memory_budget_bytes)
        tman = train_codebooks(data_root, out_root, records, plan, seed=seed, use_ray=use_ray,
                               part_max_vectors=part_max_vectors)
        log_fn(f"trained {tman['id']}: {plan.factory} on {tman['n_train_sample']} vectors in {tman['train_s']:.1f} s")
    s = int(shards) if shards else max(1, math.ceil(n / TARGET_SHARD_VECTORS))
    from mining.index.source import group_records

    entries, results = build_shards(data_root, out_root, tman["id"], group_records(records, s), use_ray=use_ray,
                                    recall_target=recall_target, part_max_vectors=part_max_vectors)
    extra = {"requested_kind": kind, "retrained": "initial" if not trained_id else None, "seed": seed,
             "parent_version": publish.current_version(out_root), "memory_budget_bytes": memory_budget_bytes,
             "train_s": tman["train_s"], "_used_ray": use_ray, **(extra_manifest or {})}
    if "stats" in tman and not trained_id:
        results = results + [{"stats": tman["stats"]}]
    return _publish(data_root, out_root, entries, tman, results, t0=t0, recall_target=recall_target, extra=extra,
                    log_fn=log_fn, use_ray=use_ray, uniqueness=uniqueness)


def update_sharded(data_root: str, out_root: str, man: dict, *, growth_factor: float, drift_ratio: float,
                   force_retrain: bool = False, use_ray: bool | None = None, compact: bool = True,
                   recall_target: float | None = None, seed: int = 0, verbose: bool = True, uniqueness: bool = True,
                   **policy) -> dict:
    """Nightly add to a sharded version ``man``: new committed fragments -> new shard(s) with the frozen
    codebooks, old shards untouched; retrain on growth/drift; then :func:`compaction_plan` (``compact``).
    ``policy``: keyword overrides of :func:`compaction_plan` (small_vectors, target_vectors, min_run).
    ``uniqueness``: update the uniqueness parts incrementally from ``man``'s (old shards are searched in the
    new shards only; :mod:`mining.index.shard_uniqueness`).
    Returns: the new manifest, or ``{**man, "changed": False}`` when nothing is new."""
    from mining.index.build import DRIFT_SAMPLE, _resolve_ray
    from mining.index.source import committed_records, group_records, sample_vectors

    t0 = time.perf_counter()
    log_fn = print if verbose else (lambda *a: None)
    cur = man["version"]
    included = set()
    for sm in layout.shard_manifests(out_root, man):
        included |= set(sm["store_shards"])
    records = committed_records(data_root)
    new = [r for r in records if r["shard"] not in included]
    if not new:
        log_fn(f"index {cur}: no new committed shards")
        return {**man, "changed": False}
    use_ray = _resolve_ray(use_ray)
    recall_target = recall_target if recall_target is not None else man.get("recall_target", 0.95)
    tman = layout.read_json(join(layout.trained_uri(out_root, man["trained"]), publish.MANIFEST))
    n_new = sum(r["num_patches"] for r in new)
    reason = "forced" if force_retrain else ("growth" if man["n"] + n_new >= growth_factor * tman["n_trained"] else None)
    drift = None
    if reason is None and tman.get("quant_error", 0) > 0:
        tmp = tempfile.mkdtemp(prefix="mining-drift-")
        try:
            trained = faiss.read_index(_fetch_trained(out_root, man["trained"], tmp)[0])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        drift = core.quantization_error(trained, sample_vectors(data_root, new, DRIFT_SAMPLE, seed=seed + 7))
        if drift > drift_ratio * tman["quant_error"]:
            reason = "drift"
    if reason:
        log_fn(f"index {cur}: retraining ({reason})")
        return build_sharded(data_root, out_root, kind=man.get("requested_kind", "ivfpq-refine"),
                             shards=len(man["shards"]), memory_budget_bytes=man.get("memory_budget_bytes"),
                             recall_target=recall_target, seed=seed, use_ray=use_ray, verbose=verbose,
                             extra_manifest={"retrained": reason, "drift_quant_error": drift, "parent_version": cur},
                             uniqueness=uniqueness)
    target = policy.get("target_vectors", TARGET_SHARD_VECTORS)
    add_entries, results = build_shards(data_root, out_root, man["trained"],
                                        group_records(new, max(1, math.ceil(n_new / target))),
                                        use_ray=use_ray, recall_target=recall_target)
    entries = list(man["shards"]) + add_entries
    compacted = []
    if compact:
        runs = compaction_plan(entries, keep_newest=len(add_entries), **policy)
        if runs:
            compacted = [[entries[i]["id"] for i in run] for run in runs]
            entries, res = compact_shards(out_root, man["trained"], entries, runs, use_ray=use_ray,
                                          recall_target=recall_target)
            results += res
    extra = {"requested_kind": man.get("requested_kind"), "retrained": None, "parent_version": cur,
             "drift_quant_error": drift, "added_store_shards": sorted(r["shard"] for r in new),
             "added_shards": [e["id"] for e in add_entries], "compacted": compacted, "seed": man.get("seed"),
             "memory_budget_bytes": man.get("memory_budget_bytes"), "train_s": man.get("train_s"), "_used_ray": use_ray}
    return _publish(data_root, out_root, entries, tman, results, t0=t0, recall_target=recall_target, extra=extra,
                    log_fn=log_fn, use_ray=use_ray, uniqueness=uniqueness, parent=man)
