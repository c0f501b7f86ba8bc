"""Router mode of ``benchmarks/query.py`` (issue 18): query latency through the query actor (the router)
and its shard actors on a local Ray cluster, including the Ray round trip.

    nice -n 10 python benchmarks/query.py --router --n 200000 --shard-counts 1,4,8

Data: ``--n`` synthetic clustered 512-d vectors (:class:`mining.index.synthetic.ClusteredMixture`)
written as a real mining store over ``--days`` nights (one store shard per night), then indexed as
three ``ivfpq-refine`` versions with 1, 4 and 8 date-range shards on the SAME trained codebooks
(``mining.index.build_index(shards=1)``, then ``stream.build_sharded(shards=S, trained_id=...)``); each
shard keeps its own tuned params. Built once, cached under ``--cache-dir``.

With ``--index-root ROOT --store STORE`` the versions already in ROOT are served instead (the newest
sharded version per S; e.g. the 5M versions of ``benchmarks/index.py --shards 1,4,8 --keep``), the
queries' exact truth streamed over STORE; ``--n`` is then only a label.

Serving: ``mining.query_actor.start_actor`` on a local ``ray.init(num_cpus=2)`` (the router, CLIP
ViT-B-16 random-init towers for the 512-d space) with one shard actor per shard; the router moves
between the versions with ``reload(version)`` (the nightly path). Queries are raw 512-d embeddings
from the same mixture (``embedding``: no CLIP forward pass, so the numbers are the serving path:
Ray call -> router -> every shard actor's top-k -> merge -> metadata, dedup, result table -> Ray reply).
Workloads per S: ``--queries`` sequential calls (batch 1, 1 client) and ``--clients`` client threads
each running a bounded loop of ``--queries-per-client`` calls. Recall@16 of the router's answers
against exact search over all vectors is reported per S (dedup off for it).

The last line is one JSON object (``mode: "router"``, per-S p50 / p99 / qps at 1 and 16 clients, and the
bytes the shard actors prefaulted or why they served cold: ``prefault_bytes``, ``prefault_skipped``).
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import sys
import time
import warnings

import numpy as np

K = 16


def _pct(v, p) -> float:
    return round(float(np.percentile(np.asarray(v, np.float64), p)), 3)


def build_versions(n: int, dim: int, days: int, shard_counts: list[int], cache_dir: str):
    """The store + index root under ``cache_dir`` (built once). Returns (root, {"S": version, "trained": id},
    (n, dim) float32 normalised vectors as stored (float16 round trip), (n,) int64 their patch ids)."""
    import mining.index as mi
    from mining.index import core, stream
    from mining.index.synthetic import ClusteredMixture
    from mining.store import ShardOutput, patch_columns, write_shard

    base = os.path.join(cache_dir, f"router-n{n}-d{dim}-days{days}")
    store, root, done = os.path.join(base, "store"), os.path.join(base, "index"), os.path.join(base, "versions.json")
    versions = json.load(open(done)) if os.path.exists(done) else {}
    mix = ClusteredMixture(dim, seed=0)
    xs, ids = [], []
    per = n // days
    t0 = time.perf_counter()
    for d in range(days):
        x = mix.sample(per, seed=100 + d).astype(np.float16)
        uri = f"/bench/night-{d:02d}"
        m = len(x)
        uris = [f"{uri}/img{i:06d}.jpg" for i in range((m + 9) // 10)]
        i = np.arange(m)
        cols = patch_columns(uris, i // 10, np.stack([i % 10, np.zeros(m), i % 10 + 8, np.full(m, 8)], 1),
                             np.ones(m), np.ones(m, np.float32))
        if not versions:
            out = ShardOutput(shard=uri, date=f"2026-10-{d + 1:02d}", run_id="bench", model="synthetic", dim=dim)
            out.add_patch_block(cols, x)
            write_shard(store, out)
        xs.append(core.normalize(x.astype(np.float32)))
        ids.append(cols.patch_ids.astype(np.int64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in shard_counts:
            if str(s) in versions:
                continue
            print(f"building the {s}-shard version of {n} x {dim} ...", file=sys.stderr, flush=True)
            if "trained" not in versions:
                m = mi.build_index(store, root, shards=s, use_ray=False, verbose=False, uniqueness=False)
                versions["trained"] = m["trained"]
            else:
                m = stream.build_sharded(store, root, shards=s, trained_id=versions["trained"], use_ray=False,
                                         verbose=False)
            versions[str(s)] = m["version"]
            json.dump(versions, open(done, "w"))
    print(f"data ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return root, versions, np.concatenate(xs), np.concatenate(ids)


def existing_versions(root: str, store: str, shard_counts: list[int], queries: np.ndarray):
    """``--index-root``/``--store`` mode: for each S, the newest sharded version of ``root`` with S shards
    (e.g. the versions ``benchmarks/index.py --shards 1,4,8 --keep`` leaves), and the exact top-16 of
    ``queries`` (Q, D) float32 over the store's committed patches, streamed in record batches (the store
    is never held whole: 5M x 512 float32 would be 10 GB). Returns (root, {"S": version}, (Q, 16) int64 ids)."""
    from mining.index import core, publish
    from mining.store import embeddings_from_arrow, open_patches

    versions = {}
    for v in publish.list_versions(root):  # oldest first: later ones win
        m = publish.read_manifest(root, v)
        if m.get("layout") == "sharded" and len(m["shards"]) in shard_counts:
            versions[str(len(m["shards"]))] = v
    missing = [s for s in shard_counts if str(s) not in versions]
    if missing:
        raise SystemExit(f"error: {root} has no sharded version with {missing} shards")
    t0 = time.perf_counter()
    gs = gi = None
    for b in open_patches(store).to_batches(columns=["patch_id", "embedding"], batch_size=200_000):
        x = core.normalize(embeddings_from_arrow(b.column("embedding")).astype(np.float32))
        s_, i_ = core.exact_topk(queries, x, b.column("patch_id").to_numpy().astype(np.int64), K)
        gs, gi = (s_, i_) if gs is None else core.merge_topk(gs, gi, s_, i_, K)
    print(f"exact top-{K} of {len(queries)} queries over {store} in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr, flush=True)
    return root, versions, gi


def run_router(args) -> int:
    """The router benchmark (see module doc); prints one line per workload and the JSON line last."""
    import ray

    from mining.index import core
    from mining.index.synthetic import ClusteredMixture
    from mining.query import query_info, timings_of
    from mining.query_actor import start_actor

    counts = [int(c) for c in args.shard_counts.split(",")]
    Q = ClusteredMixture(args.dim, seed=0).sample(args.queries + args.clients * args.queries_per_client + 64, seed=7)
    Q = core.normalize(Q)
    if args.index_root:
        root, versions, truth = existing_versions(args.index_root, args.store, counts, Q[:64])
        from mining.index import publish

        args.n = int(publish.read_manifest(root, versions[str(counts[0])])["n"])
    else:
        root, versions, X, ids = build_versions(args.n, args.dim, args.days, counts, args.cache_dir)
        truth = core.exact_topk(Q[:64], X, ids, K)[1]
        del X, ids
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING", namespace="mining")
    name = f"rare-object-query-bench-{os.getpid()}"
    results = {}
    try:
        t0 = time.perf_counter()
        actor, h = start_actor(root, clip_model="ViT-B-16", clip_random_init=True, num_gpus=0, num_cpus=0.5,
                               max_concurrency=args.clients, shard_cpus=0.1, name=name)
        print(f"router up in {time.perf_counter() - t0:.1f} s (version {h['version']})", flush=True)

        def call(v):
            t = time.perf_counter()
            r = ray.get(actor.embedding.remote(v, K), timeout=120)
            return (time.perf_counter() - t) * 1e3, r

        for s in counts:
            t0 = time.perf_counter()
            rel = ray.get(actor.reload.remote(versions[str(s)]), timeout=600)
            hs = ray.get(actor.health.remote())
            assert hs["version"] == versions[str(s)] and len(hs["serving"]["actors"]) == s, hs["serving"]
            reload_s = time.perf_counter() - t0
            got = ray.get([actor.embedding.remote(q, K, None, False) for q in Q[:64]])  # no dedup: recall
            recall = core.recall_at_k(np.stack([t.column("patch_id").to_numpy() for t in got]), truth, K)
            for q in Q[64:80]:
                call(q)  # warm up
            one = [call(q) for q in Q[64:64 + args.queries]]
            rest = Q[64 + args.queries:]
            chunks = [rest[c * args.queries_per_client:(c + 1) * args.queries_per_client] for c in range(args.clients)]
            tw = time.perf_counter()
            with cf.ThreadPoolExecutor(args.clients) as ex:
                many = [x for part in ex.map(lambda qs: [call(q) for q in qs], chunks) for x in part]
            wall16 = time.perf_counter() - tw
            pf = [a.get("prefault") or {} for a in hs["serving"]["actors"]]
            r = {"shards": s, "actors": len(hs["serving"]["actors"]), "reload_s": round(reload_s, 2),
                 "recall_at_16": round(float(recall), 4),
                 # each shard actor's prefault (bytes read into the page cache, or why it served cold)
                 "prefault_bytes": sum(int(p.get("bytes") or 0) for p in pf),
                 "prefault_skipped": sorted({str(p["skipped"]) for p in pf if p.get("skipped")})}
            for tag, res, wall in (("c1", one, None), (f"c{args.clients}", many, wall16)):
                lat = [m for m, _ in res]
                search = [timings_of(t)["search_ms"] for _, t in res]
                inside = [timings_of(t)["total_ms"] for _, t in res]
                r[tag] = {"n": len(lat), "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99),
                          "qps": round(len(lat) / (wall or sum(lat) / 1e3), 1),
                          "router_total_p50_ms": _pct(inside, 50), "fanout_search_p50_ms": _pct(search, 50)}
            assert all(query_info(t)["index_version"] == versions[str(s)] for _, t in one + many)
            results[str(s)] = r
            print(f"S={s}: recall@16 {r['recall_at_16']:.4f}  reload {r['reload_s']} s | 1 client: p50 "
                  f"{r['c1']['p50_ms']} ms p99 {r['c1']['p99_ms']} ms ({r['c1']['qps']} q/s; in router "
                  f"{r['c1']['router_total_p50_ms']} ms, fan-out search {r['c1']['fanout_search_p50_ms']} ms) | "
                  f"{args.clients} clients: p50 {r[f'c{args.clients}']['p50_ms']} ms p99 "
                  f"{r[f'c{args.clients}']['p99_ms']} ms ({r[f'c{args.clients}']['qps']} q/s)", flush=True)
            del rel
    finally:
        try:
            ray.kill(ray.get_actor(name, namespace="mining"), no_restart=True)
        except Exception:  # noqa: BLE001
            pass
        ray.shutdown()
    print(json.dumps({"mode": "router", "n": args.n, "index_root": args.index_root, "dim": args.dim, "k": K, "days": args.days,
                      "clients": args.clients, "queries": args.queries, "queries_per_client": args.queries_per_client,
                      "cpus": os.cpu_count(), "load_avg_end": round(os.getloadavg()[0], 1), "results": results}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``benchmarks/query.py --router ...``: parse the router-mode flags and run :func:`run_router`."""
    import argparse

    ap = argparse.ArgumentParser(prog="benchmarks/query.py --router", description=__doc__.split("\n\n")[0])
    ap.add_argument("--router", action="store_true")
    ap.add_argument("--n", type=int, default=200_000, help="synthetic vectors")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--days", type=int, default=8, help="nights in the store (date-range shards group them)")
    ap.add_argument("--shard-counts", default="1,4,8")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--queries", type=int, default=200, help="batch-1 sequential queries per S")
    ap.add_argument("--queries-per-client", type=int, default=25)
    ap.add_argument("--cache-dir", default="/tmp/mining-query-bench")
    ap.add_argument("--index-root", default=None,
                    help="serve this root's existing sharded versions (one per S) instead of building; needs --store")
    ap.add_argument("--store", default=None, help="with --index-root: the store it was built from (for exact truth)")
    args = ap.parse_args(argv)
    if bool(args.index_root) != bool(args.store):
        ap.error("--index-root and --store go together")
    warnings.simplefilter("ignore")
    import logging

    logging.disable(logging.WARNING)
    return run_router(args)
