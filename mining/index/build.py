"""Building, publishing and nightly-updating the patch index from the mining store.

``build_index``: sample training vectors uniformly across all committed shards -> choose the
factory string (:mod:`mining.index.sizing`) -> train (GPU when faiss sees one) -> add groups of
shards in parallel (Ray tasks, global patch ids via ``add_with_ids``) -> merge (``core.merge_indexes``, or
``merge_ondisk`` for big indexes) -> tune nprobe / efSearch / k_factor on held-out queries to the
recall target -> publish a new version atomically (:mod:`mining.index.publish`).

``update_index`` (:mod:`mining.index.update`): add the committed shards that the current version does not include, with the
frozen codebooks (``trained.faiss`` of the version), and publish a new version; retrain (a full
``build_index``) when N has grown >= 4x since training or the quantisation error of the new
vectors drifted past ``drift_ratio`` x the error measured at training time.

Both also write ``uniqueness.parquet`` into the version before it is published (unless
``uniqueness=False``): the kNN uniqueness of every patch, searched on the finished, tuned index
(:mod:`mining.index.uniqueness`, after FiftyOne Brain's ``compute_uniqueness``). The version's
``meta.arrow`` carries the patches' ``novelty`` column (null for parts mined without an epitome
or before the column existed).
"""
from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import time
import warnings

import faiss
import numpy as np
import pyarrow as pa

from mining.index import core, publish, sizing
from mining.index.search import (INDEX_FILE, META_COLUMNS, META_FILE, PARAMS_FILE, REFINE_FILE, TRAINED_FILE,
                                 PatchIndex, open_refine, write_meta, write_refine)
from mining.index.source import (check_unique_patch_ids, committed_records, group_records, read_shard,
                                 sample_vectors, shard_vectors)
from mining.store import dataset_info

log = logging.getLogger(__name__)

K_EVAL = 16  # recall@16, as the thesis' precision@16
N_TUNE_QUERIES = 256  # held-out queries for tuning / recall at publish
ONDISK_MERGE_MIN_BYTES = 4 << 30  # "auto" merge: on-disk merge when the IVF index would exceed 4 GiB ...
ONDISK_BUDGET_FRACTION = 0.5  # ... or half the memory budget
GROWTH_RETRAIN = 4.0  # retrain when N >= 4x the N the codebooks were trained for
DRIFT_RATIO = 1.5  # retrain when quantisation error of new data > 1.5x the error at training
DRIFT_SAMPLE = 4096  # new vectors sampled to measure drift
QUERIES_FILE = "tune_queries.npy"
TRUTH_FILE = "tune_truth.npz"


# --------------------------------------------------------------------------- one part (a Ray task)

def add_part(trained: np.ndarray | None, data_root: str, records: list[dict], queries: np.ndarray, k: int,
             keep_vectors: bool, part_path: str | None = None) -> dict:
    """Read a group of shards, add them (global patch ids) to a copy of the trained index.

    Args:
        trained: serialised trained empty index, or None (HNSW: vectors are added by the driver).
        queries: (Q, D) tuning queries: the part also returns their exact top-k over its vectors.
        keep_vectors: return the float16 vectors (ivfpq-refine's exact store, HNSW).
        part_path: write the filled index there (on-disk merge) instead of returning it.
    Returns: dict(index=uint8 array | None, path=str | None, meta=pa.Table, vectors=(n, D) float16 | None,
        gt=(scores, ids), n=int).
    """
    index = core.deserialize(trained) if trained is not None else None
    metas, vecs = [], []
    gt_s = np.full((len(queries), k), core.MISSING_SCORE, np.float32)
    gt_i = np.full((len(queries), k), -1, np.int64)
    for rec in records:
        t = read_shard(data_root, rec, list(META_COLUMNS) + ["embedding"])
        x = shard_vectors(t)
        ids = t.column("patch_id").to_numpy().astype(np.int64)
        if index is not None:
            core.add_vectors(index, x, ids)
        if len(queries):
            s, i = core.exact_topk(queries, x, ids, k)
            gt_s, gt_i = core.merge_topk(gt_s, gt_i, s, i, k)
        metas.append(t.select(list(META_COLUMNS)))
        if keep_vectors:
            vecs.append(x.astype(np.float16))
    out = {"meta": pa.concat_tables(metas), "vectors": np.concatenate(vecs) if vecs else None,
           "gt": (gt_s, gt_i), "n": sum(m.num_rows for m in metas), "index": None, "path": None}
    if index is not None:
        if part_path:
            faiss.write_index(index, part_path)
            out["path"] = part_path
        else:
            out["index"] = core.serialize(index)
    return out


def _run_parts(use_ray: bool, trained, data_root, groups, queries, k, keep_vectors, part_paths):
    if not use_ray:
        return [add_part(trained, data_root, g, queries, k, keep_vectors, p) for g, p in zip(groups, part_paths)]
    import ray

    remote = ray.remote(num_cpus=1, max_retries=2)(add_part)  # idempotent: a retry rebuilds its part
    tref = ray.put(trained) if trained is not None else None
    qref = ray.put(queries)
    refs = [remote.remote(tref, data_root, g, qref, k, keep_vectors, p) for g, p in zip(groups, part_paths)]
    return ray.get(refs)


def _resolve_ray(use_ray: bool | None) -> bool:
    try:
        import ray
    except ImportError:
        return False
    if use_ray is None:
        return ray.is_initialized()
    if use_ray and not ray.is_initialized():
        from mining.connect import connect

        connect()
    return bool(use_ray)


def _train(plan, xtrain, seed, use_ray) -> faiss.Index:
    """Train in this process, or in a Ray task pinned to a GPU when the cluster has one."""
    if use_ray and plan.kind in sizing.IVF_KINDS:
        import ray

        if ray.cluster_resources().get("GPU", 0) > 0:
            def _remote_train(plan_d, x, seed):
                return core.serialize(core.train_index(sizing.IndexPlan(**plan_d), x, seed=seed))

            buf = ray.get(ray.remote(num_gpus=1)(_remote_train).remote(plan.to_dict(), xtrain, seed))
            return core.deserialize(buf)
    return core.train_index(plan, xtrain, seed=seed)


# --------------------------------------------------------------------------- fill + tune + publish

def _write_uniqueness(pidx: PatchIndex, data_root: str, records: list[dict], vdir: str) -> dict:
    """kNN uniqueness of every vector of ``pidx`` (one store read per shard) -> ``<vdir>/uniqueness.parquet``;
    returns the info recorded in the manifest (:func:`mining.index.uniqueness.uniqueness_of_index`)."""
    from mining.index.uniqueness import UNIQUENESS_FILE, uniqueness_of_index, write_uniqueness

    def blocks():
        for rec in records:
            t = read_shard(data_root, rec, ["patch_id", "embedding"])
            yield t.column("patch_id").to_numpy().astype(np.int64), shard_vectors(t)

    table, info = uniqueness_of_index(pidx, blocks())
    write_uniqueness(vdir, table)
    return {**info, "file": UNIQUENESS_FILE}


def _fill_tune_publish(data_root, out_root, *, plan, trained, records, base, queries, truth, manifest_extra,
                       recall_target, use_ray, n_parts, merge, memory_budget_bytes, t_start, log_fn,
                       uniqueness: bool = True) -> dict:
    version, staging = publish.stage(out_root)
    try:
        return _fill_tune_publish_inner(
            data_root, out_root, version, staging, plan=plan, trained=trained, records=records, base=base,
            queries=queries, truth=truth, manifest_extra=manifest_extra, recall_target=recall_target,
            use_ray=use_ray, n_parts=n_parts, merge=merge, memory_budget_bytes=memory_budget_bytes,
            t_start=t_start, log_fn=log_fn, uniqueness=uniqueness)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # CURRENT still points at the previous version
        raise


def _fill_tune_publish_inner(data_root, out_root, version, staging, *, plan, trained, records, base, queries, truth,
                             manifest_extra, recall_target, use_ray, n_parts, merge, memory_budget_bytes, t_start, log_fn,
                             uniqueness=True):
    kind = plan.kind
    is_ivf = kind in sizing.IVF_KINDS
    # ivfpq-refine: the IVF labels are rows of the version's patch_id-sorted metadata (what faiss'
    # IndexRefine needs to find the exact vectors); parts are added with patch_ids and relabelled here
    rows_as_labels = plan.refine == "fp16"
    n_total = (base.ntotal if base else 0) + sum(r["num_patches"] for r in records)
    if merge == "auto":
        est = n_total * sizing.bytes_per_vector(kind, plan.dim, plan.pq_m or 64, plan.pq_nbits or 8)
        big = est > ONDISK_MERGE_MIN_BYTES or (memory_budget_bytes and est > ONDISK_BUDGET_FRACTION * memory_budget_bytes)
        merge = "ondisk" if (is_ivf and big and base is None and not rows_as_labels) else "memory"
    if merge == "ondisk" and (not is_ivf or base is not None):
        raise ValueError("on-disk merge is only for IVF kinds built from scratch")
    if merge == "ondisk" and rows_as_labels:
        raise ValueError("on-disk merge is not available for ivfpq-refine: its 4-bit fast-scan lists cannot be "
                         "held by faiss' OnDiskInvertedLists, and its labels are rewritten after the merge; use merge='memory'")
    ondisk = merge == "ondisk"
    if n_parts is None:
        n_parts = 1
        if use_ray:
            import ray

            n_parts = max(1, int(ray.available_resources().get("CPU", 1)))
    groups = group_records(records, n_parts)
    trained_buf = core.serialize(trained) if kind != "hnsw" else None
    keep_vectors = kind in ("hnsw", "ivfpq-refine")
    part_paths = [os.path.join(staging, f"part-{i}.faiss") if ondisk else None for i in range(len(groups))]
    k = K_EVAL

    t_add = time.perf_counter()
    parts = _run_parts(use_ray, trained_buf, data_root, groups, queries, k, keep_vectors, part_paths) if groups else []

    # metadata, sorted by patch_id (row r of the version = r-th smallest patch_id)
    base_meta = manifest_extra.pop("_base_meta", None)
    metas = ([base_meta] if base_meta is not None else []) + [p["meta"] for p in parts]
    # a base version from before the novelty column lacks it: promote (missing columns -> null)
    meta = pa.concat_tables(metas, promote_options="default") if metas else pa.table({c: [] for c in META_COLUMNS})
    pid = meta.column("patch_id").to_numpy().astype(np.int64)
    order = np.argsort(pid, kind="stable")
    meta = meta.take(pa.array(order))
    sorted_pid = pid[order]
    if len(pid) and np.any(np.diff(sorted_pid) == 0):
        warnings.warn(f"{int(np.sum(np.diff(sorted_pid) == 0))} duplicate patch_ids in {data_root}", UserWarning)
    write_meta(os.path.join(staging, META_FILE), meta)

    # merge, in ledger order (so n parts == one go)
    if ondisk:
        from faiss.contrib.ondisk import merge_ondisk

        index = core.deserialize(trained_buf)
        merge_ondisk(index, [p["path"] for p in parts], os.path.join(staging, "merged.ivfdata"))
        for p in parts:
            os.remove(p["path"])
    else:
        index = base if base is not None else (core.new_index(plan) if kind == "hnsw" else core.deserialize(trained_buf))
        if rows_as_labels and base is not None:  # old rows -> patch_ids -> new rows
            old_pid = np.asarray(base_meta.column("patch_id").to_numpy(), np.int64)
            core.relabel_ivf(index, lambda a: np.searchsorted(sorted_pid, old_pid[a]))
        part_indexes = []  # merged in one call: a fast-scan list is then rebuilt once (core.merge_block_lists)
        for p in parts:
            if kind == "hnsw":
                v = p["vectors"].astype(np.float32)
                v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
                core.add_vectors(index, v, p["meta"].column("patch_id").to_numpy().astype(np.int64))
            else:
                part_index = core.deserialize(p["index"])
                if rows_as_labels:  # patch_ids -> rows
                    core.relabel_ivf(part_index, lambda a: np.searchsorted(sorted_pid, a))
                part_indexes.append(part_index)
            p["index"] = None
        if part_indexes:
            core.merge_indexes(index, *part_indexes)
        del part_indexes
    add_s = time.perf_counter() - t_add

    # exact vectors (ivfpq-refine), in row order
    vectors, refine = None, None
    if rows_as_labels:
        base_vec = manifest_extra.pop("_base_vectors", None)
        chunks = ([base_vec] if base_vec is not None else []) + [p["vectors"] for p in parts]
        allv = np.concatenate([np.asarray(c) for c in chunks]) if chunks else np.zeros((0, plan.dim), np.float16)
        write_refine(os.path.join(staging, REFINE_FILE), allv, order)
        del allv
        refine, vectors = open_refine(os.path.join(staging, REFINE_FILE))
    manifest_extra.pop("_base_vectors", None)
    for p in parts:
        p["vectors"] = None

    # ground truth of the held-out queries over everything, then tune
    gt_s, gt_i = truth
    for p in parts:
        gt_s, gt_i = core.merge_topk(gt_s, gt_i, *p["gt"], k)
    pidx = PatchIndex(index, meta, {"kind": kind, "refine": plan.refine}, {}, vectors, refine=refine)

    def search_fn(q, kk, params):
        pidx.set_params(params)
        return pidx.search(q, kk)[1]

    params, recall = core.tune(kind, index, search_fn, queries, gt_i, k=k, recall_target=recall_target,
                               nlist=plan.nlist) if len(queries) else ({}, 1.0)
    if recall < recall_target:
        warnings.warn(f"{kind}: recall@{k} {recall:.3f} below target {recall_target} at the largest parameters tried",
                      UserWarning)
    core.set_params(index, params)

    # kNN uniqueness of every patch of this version, on the finished and tuned index
    uniq_info = None
    if uniqueness:
        shards = set(manifest_extra.get("_base_shards", [])) | {r["shard"] for r in records}
        uniq_info = _write_uniqueness(pidx, data_root, [r for r in committed_records(data_root) if r["shard"] in shards],
                                      staging)
        log_fn(f"uniqueness: {uniq_info['n']} patches, k={uniq_info['k']}, {uniq_info['seconds']:.1f} s")

    # write files
    faiss.write_index(index, os.path.join(staging, INDEX_FILE))
    faiss.write_index(trained, os.path.join(staging, TRAINED_FILE))
    publish.write_json_atomic(os.path.join(staging, PARAMS_FILE), params)
    np.save(os.path.join(staging, QUERIES_FILE), queries)
    np.savez(os.path.join(staging, TRUTH_FILE), scores=gt_s, ids=gt_i)
    index_bytes = sum(os.path.getsize(os.path.join(staging, f)) for f in (INDEX_FILE, "merged.ivfdata")
                      if os.path.exists(os.path.join(staging, f)))
    info = dataset_info(data_root, warn=False)
    kmeans_device = core.kmeans_device()
    manifest = {
        "version": version,
        "kind": kind,
        "factory": plan.factory,
        "plan": plan.to_dict(),
        "n": int(index.ntotal),
        "dim": plan.dim,
        "metric": "inner_product (cosine on L2-normalised vectors)",
        "models": info["models"],
        "random_init": bool(info["random_init"]),
        "data_root": data_root,
        "shards": sorted(manifest_extra.pop("_base_shards", [])) + sorted(r["shard"] for r in records),
        "params": params,
        "recall_at_publish": round(float(recall), 4),
        "recall_k": k,
        "recall_target": recall_target,
        "n_queries": int(len(queries)),
        "refine": plan.refine,
        "ondisk": ondisk,
        "index_bytes": int(index_bytes),
        "bytes_per_vector": round(index_bytes / max(1, index.ntotal), 1),
        "n_parts": len(groups),
        "used_ray": bool(use_ray),
        "add_s": round(add_s, 3),
        "build_s": round(time.perf_counter() - t_start, 3),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "faiss_version": faiss.__version__,
        "kmeans_device": kmeans_device, "gpu": kmeans_device != "cpu",
        "score_aware_eta": core.default_eta(index),  # mining.index.anisotropic (1.0: faiss' encoding)
        "changed": True,
        "uniqueness": uniq_info,
        **manifest_extra,
    }
    manifest["shards"] = sorted(set(manifest["shards"]))
    if not manifest.get("trained_version"):
        manifest["trained_version"] = version  # the codebooks were trained for this version
    publish.publish(out_root, version, staging, manifest)
    log_fn(f"published {version}: {kind} {plan.factory} n={manifest['n']} recall@{k}={recall:.3f} "
           f"params={params} {manifest['bytes_per_vector']} B/vector build {manifest['build_s']:.1f} s")
    return manifest


# --------------------------------------------------------------------------- public API

def build_index(data_root: str, out_root: str, *, kind: str = "auto", memory_budget_bytes: int | None = None,
                recall_target: float = 0.95, seed: int = 0, use_ray: bool | None = None,
                n_parts: int | None = None, merge: str = "auto", verbose: bool = True,
                extra_manifest: dict | None = None, uniqueness: bool = True, shards: int | None = None,
                streaming: bool = False, part_max_vectors: int | None = None) -> dict:
    """Train, fill, tune and publish a NEW index version from the committed shards of ``data_root``.

    Args:
        data_root: mining store root (local or s3://; only committed shards are read).
        out_root: local index root (``<out_root>/versions/<version>/...`` + ``CURRENT``).
        kind: "auto" or one of flat, hnsw, ivfpq, ivfpq-refine, sq8 (see :mod:`mining.index.sizing`).
        memory_budget_bytes: resident-memory budget of the index in bytes (None: no limit).
        recall_target: recall@16 against exact search that tuning aims for (held-out queries).
        seed: sampling / k-means seed. use_ray: run the add parts as Ray tasks (None: if Ray is
            initialised). n_parts: number of add parts (default: CPUs of the Ray cluster, 1 locally).
        merge: "auto" | "memory" | "ondisk" (IVF only; auto = on disk above 4 GiB or half the budget).
        extra_manifest: extra manifest fields (update_index records why it retrained).
        uniqueness: write ``uniqueness.parquet`` (kNN uniqueness of every patch, searched on the
            finished index: N searches of 4 neighbours, see :mod:`mining.index.uniqueness`); its
            info goes to ``manifest["uniqueness"]`` (None when skipped).
        shards / streaming: ``shards=S`` (or ``streaming=True``) builds a **sharded** version with the
            streaming build of :mod:`mining.index.stream` (ivfpq-refine only; S date-range shards, default
            ceil(N / 4M); no driver gather; uniqueness as one part per shard, by Ray tasks); ``part_max_vectors``
            caps an encode task.
            The index root may then be ``s3://``.
    Returns:
        the published manifest (dict; ``manifest["version"]``, ``["changed"] = True``).
    Raises:
        FileNotFoundError: no committed patches under data_root.
        ValueError: bad kind / budget / too few vectors for the kind.
    Emits a UserWarning when the embeddings come from random CLIP weights (``random_init`` in the manifest).
    """
    if shards is not None or streaming:
        from mining.index import stream

        return stream.build_sharded(data_root, out_root, kind=kind, shards=shards, memory_budget_bytes=memory_budget_bytes,
                                    recall_target=recall_target, seed=seed, use_ray=use_ray, verbose=verbose,
                                    part_max_vectors=part_max_vectors or stream.PART_MAX_VECTORS,
                                    extra_manifest=extra_manifest, uniqueness=uniqueness)
    t0 = time.perf_counter()
    log_fn = print if verbose else log.info
    if merge not in ("auto", "memory", "ondisk"):
        raise ValueError(f"merge must be auto, memory or ondisk, got {merge!r}")
    info = dataset_info(data_root, warn=True)
    if info["random_init"]:
        log_fn("WARNING: " + "embeddings were made with RANDOMLY INITIALISED CLIP weights: search results are not semantic")
    records = committed_records(data_root)
    if not records:
        raise FileNotFoundError(f"no committed patches under {data_root!r}")
    check_unique_patch_ids(data_root, records)
    n = sum(r["num_patches"] for r in records)
    dim = int(records[0]["embedding_dim"])
    plan = sizing.plan_index(n, dim, kind, memory_budget_bytes)
    use_ray = _resolve_ray(use_ray)
    for rule in plan.rules:
        log.info("sizing: %s", rule)

    nq = min(N_TUNE_QUERIES, n)
    n_train = plan.n_train
    sample = sample_vectors(data_root, records, n_train + nq if n_train + nq <= n else max(n_train, nq), seed=seed)
    queries = sample[:nq]
    xtrain = sample[nq:nq + n_train] if n_train + nq <= n else sample[:n_train]
    t_train = time.perf_counter()
    trained = _train(plan, xtrain if len(xtrain) else sample[:1], seed, use_ray)
    train_s = time.perf_counter() - t_train
    qerr = core.quantization_error(trained, queries[: min(len(queries), DRIFT_SAMPLE)])
    extra = {
        "requested_kind": kind,
        "n_trained": n,
        "n_train_sample": int(len(xtrain)),
        "quant_error": round(qerr, 6),
        "train_s": round(train_s, 3),
        "trained_version": None,  # filled below: this version
        "retrained": "initial",
        "parent_version": publish.current_version(out_root),
        "memory_budget_bytes": memory_budget_bytes,
        "seed": seed,
        **(extra_manifest or {}),
    }
    empty_truth = (np.full((nq, K_EVAL), core.MISSING_SCORE, np.float32), np.full((nq, K_EVAL), -1, np.int64))
    m = _fill_tune_publish(data_root, out_root, plan=plan, trained=trained, records=records, base=None,
                           queries=queries, truth=empty_truth, manifest_extra=extra, recall_target=recall_target,
                           use_ray=use_ray, n_parts=n_parts, merge=merge, memory_budget_bytes=memory_budget_bytes,
                           t_start=t0, log_fn=log_fn, uniqueness=uniqueness)
    return m
