"""Streaming, sharded index builds on a local Ray cluster (issue 18): ``benchmarks/index.py --shards S [--streaming]``.

Data: ``--n`` synthetic clustered 512-d vectors (:mod:`mining.index.synthetic`) written as a real mining
store (Delta tables, ``--fragment`` patches per committed store fragment, spread over ``--days`` nights)
by Ray tasks, which also return the exact top-16 of the queries over their vectors: the benchmark
process (the build's driver) never holds the vectors.  Queries: ``--tune-queries`` + ``--queries`` from
the same mixture, another seed; recall@16 on the ``--queries`` against exact inner-product search.

For each S of ``--shards`` (e.g. ``1,4,8``): ``mining.index.build_index(store, root, shards=S,
use_ray=True)``; the first S trains the codebooks, the others reuse them (``trained_id``): the same
vectors, queries and codebooks.  Measured: the driver's RSS, sampled every 0.1 s during the build
(psutil), and the largest task peak RSS (``ru_maxrss`` of each task's fresh worker, from the manifest; it
counts the touched pages of memory-mapped inputs too) and peak anonymous RSS (sampled ``RssAnon``),
CPU seconds (tasks + driver), wall time; then recall@16, batch-1 and batch-64 ms/query of the opened
``ShardedIndex`` (1 OpenMP thread, shards searched one after the other), and recall with the S=1
version's tuned parameters applied to every shard.  One JSON line per S, then a summary line.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import threading
import time

import numpy as np

K = 16


def _gen_task(n: int, start: int, dim: int, seed: int, store: str, fragment: int, days: int, n_total: int,
              queries: np.ndarray) -> dict:
    """Generate vectors [start, start+n), write them as committed-later store fragments; exact top-16 of the queries."""
    from mining.index import core
    from mining.index.synthetic import ClusteredMixture
    from mining.store import ShardOutput, patch_columns, write_shard

    mix = ClusteredMixture(dim, seed=seed)
    x = mix.sample(n, seed=seed + 1 + 7919 * (start // max(1, n)))
    recs, gs, gi = [], None, None
    for f0 in range(0, n, fragment):
        g0 = start + f0
        day = min(days - 1, g0 * days // n_total)
        date = f"2026-10-{day + 1:02d}"
        xs = x[f0:f0 + fragment]
        m = len(xs)
        uri = f"/bench/frag-{g0:010d}"
        uris = [f"{uri}/img{i:06d}.jpg" for i in range((m + 9) // 10)]
        i = np.arange(m)
        boxes = np.stack([i % 10, np.zeros(m), i % 10 + 8, np.full(m, 8)], 1)
        cols = patch_columns(uris, i // 10, boxes, np.ones(m), np.ones(m, np.float32))
        out = ShardOutput(shard=uri, date=date, run_id="bench", model="synthetic", dim=dim)
        out.add_patch_block(cols, xs.astype(np.float16))
        recs.append(write_shard(store, out, commit=False))
        xn = core.normalize(xs.astype(np.float16).astype(np.float32))  # what the index sees (stored float16)
        s, ii = core.exact_topk(queries, xn, cols.patch_ids.astype(np.int64), K)
        gs, gi = (s, ii) if gs is None else core.merge_topk(gs, gi, s, ii, K)
    return {"records": recs, "gt": (gs, gi)}


def make_store(args, queries: np.ndarray, store: str) -> tuple[np.ndarray, float]:
    """Write (or reuse) the synthetic store; returns (exact top-16 ids of the queries, seconds)."""
    import ray

    from mining.index import core
    from mining.store import commit_record

    marker = os.path.join(store, "bench.json")
    want = {"n": args.n, "dim": args.dim, "seed": args.seed, "fragment": args.fragment, "days": args.days,
            "queries": int(len(queries))}
    if os.path.exists(marker):
        m = json.load(open(marker))
        if m["params"] == want:
            return np.load(os.path.join(store, "bench_gt.npy")), 0.0
        shutil.rmtree(store)
    t0 = time.perf_counter()
    chunk = max(args.fragment, (250_000 // args.fragment) * args.fragment)
    gen = ray.remote(num_cpus=1, max_calls=1)(_gen_task)
    qref = ray.put(queries)
    refs = [gen.remote(min(chunk, args.n - s), s, args.dim, args.seed, store, args.fragment, args.days, args.n, qref)
            for s in range(0, args.n, chunk)]
    gs = gi = None
    for r in ray.get(refs):
        for rec in r["records"]:
            commit_record(store, rec)
        s, i = r["gt"]
        gs, gi = (s, i) if gs is None else core.merge_topk(gs, gi, s, i, K)
    np.save(os.path.join(store, "bench_gt.npy"), gi)
    json.dump({"params": want}, open(marker, "w"))
    return gi, time.perf_counter() - t0


class RssSampler:
    """Peak RSS (MB) of this process, sampled every ``period`` s while running."""

    def __init__(self, period: float = 0.1):
        import psutil

        self.proc, self.period, self.peak, self._stop = psutil.Process(), period, 0.0, threading.Event()

    def __enter__(self):
        self.start_mb = self.proc.memory_info().rss / 2**20
        self.peak = self.start_mb
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss / 2**20)
            time.sleep(self.period)

    def __exit__(self, *a):
        self._stop.set()
        self.t.join()


def _timings(ix, q, n_timing: int) -> tuple[float, float]:
    t1 = []
    for i in range(min(n_timing, len(q))):
        t0 = time.perf_counter()
        ix.search(q[i:i + 1], K)
        t1.append(time.perf_counter() - t0)
    b = q[:64]
    t64 = []
    for _ in range(5):
        t0 = time.perf_counter()
        ix.search(b, K)
        t64.append((time.perf_counter() - t0) / len(b))
    return 1e3 * float(np.median(t1)), 1e3 * float(np.median(t64))


def run(args) -> list[dict]:
    """The ``--shards`` / ``--streaming`` benchmark (see module docstring); returns the rows (also printed)."""
    import faiss
    import ray

    import mining.index as mi
    from mining.index import core, sizing
    from mining.index.synthetic import ClusteredMixture

    faiss.omp_set_num_threads(args.threads or 1)
    if args.max_nlist:  # a smaller coarse quantizer than the sizing rule's (k-means cost ~ n_train x nlist)
        orig = sizing.choose_nlist
        sizing.choose_nlist = lambda n: min(orig(n), args.max_nlist)
    shard_counts = [int(s) for s in str(args.shards or 1).split(",")]
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    base = args.workdir or f"/tmp/idxbench-{args.n}"
    store, root = os.path.join(base, "store"), os.path.join(base, "index")
    mix = ClusteredMixture(args.dim, seed=args.seed)
    q = core.normalize(mix.sample(args.queries + args.tune_queries, seed=args.seed + 2))
    qeval = q[args.tune_queries:]
    gt, gen_s = make_store(args, qeval, store)
    print(f"# store {store}: n={args.n}, generated in {gen_s:.1f} s", flush=True)
    shutil.rmtree(root, ignore_errors=True)
    budget = int(args.budget_bytes_per_vector * args.n) if args.budget_bytes_per_vector else None
    rows, trained_id, single_params = [], None, None
    for S in shard_counts:
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        with RssSampler() as rss:
            t0 = time.perf_counter()
            if trained_id:
                from mining.index import stream

                m = stream.build_sharded(store, root, shards=S, trained_id=trained_id, use_ray=True,
                                         recall_target=args.recall_target, part_max_vectors=args.part_vectors,
                                         uniqueness=args.uniqueness)
            else:
                m = mi.build_index(store, root, shards=S, use_ray=True, memory_budget_bytes=budget,
                                   recall_target=args.recall_target, seed=args.seed, part_max_vectors=args.part_vectors,
                                   uniqueness=args.uniqueness)
            wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        trained_id = trained_id or m["trained"]
        ix = mi.open_index(root, m["version"])
        recall = core.recall_at_k(ix.search(qeval, K)[1], gt, K)
        ms1, ms64 = _timings(ix, qeval, args.timing_queries)
        row = {"n": m["n"], "shards": len(m["shards"]), "kind": "ivfpq-refine", "factory": m["factory"],
               "recall_at_16": round(recall, 4), "bytes_per_vector": m["bytes_per_vector"],
               "ms_per_query": round(ms1, 3), "ms_per_query_batch64": round(ms64, 3),
               "driver_peak_rss_mb": round(rss.peak, 1), "driver_rss_at_start_mb": round(rss.start_mb, 1),
               "max_task_peak_rss_mb": m["build_stats"]["max_task_peak_rss_mb"],
               "max_task_peak_anon_mb": m["build_stats"].get("max_task_peak_anon_mb"), "tasks": m["build_stats"]["tasks"],
               "build_s": round(wall, 1), "task_cpu_s": m["build_stats"]["task_cpu_s"],
               "driver_cpu_s": round(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, 1),
               "train_s": m.get("train_s") if S == shard_counts[0] else 0.0,
               "shard_params": [s.params for s in ix.shards], "shard_n": [s["n"] for s in m["shards"]],
               "refine_disk_bytes_per_vector": round(sum(s["bytes"] for s in m["shards"]) / m["n"] - m["bytes_per_vector"], 1),
               "streaming": True, "nlist_cap": args.max_nlist or None, "part_vectors": args.part_vectors,
               "uniqueness": m.get("uniqueness")}
        if single_params is None:
            single_params = ix.shards[0].params
        else:
            ix.set_params(single_params)
            row["recall_at_16_with_single_params"] = round(core.recall_at_k(ix.search(qeval, K)[1], gt, K), 4)
            row["ms_per_query_with_single_params"] = round(_timings(ix, qeval, args.timing_queries)[0], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del ix
    ray.shutdown()
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return rows
