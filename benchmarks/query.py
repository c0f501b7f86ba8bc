#!/usr/bin/env python
"""Query latency benchmark: text, image and 8-example queries, 1 and 8 concurrent clients.

    nice -n 10 python benchmarks/query.py                         # 1M x 512 synthetic IVF index, ViT-B-16 towers
    nice -n 10 python benchmarks/query.py --n 200000 --clients 1  # smaller / quicker
    python benchmarks/query.py --index <index root>               # a real index built by jobs.build_index
    nice -n 10 python benchmarks/query.py --router --n 200000 --shard-counts 1,4,8   # issue 18: see query_router.py

What is measured: :class:`mining.query.QueryEngine` in this process (the code the query actor
runs), called from 1 or 8 client threads. Each query reports its own split (``timings`` in the
result's schema metadata): ``encode`` (CLIP text / image tower, or the text cache), ``search``
(FAISS), ``rerank_dedup`` (exact re-rank of the candidates + per-image overlap dedup, §3.3.1),
``metadata`` (patch id -> image/box/date lookups in the memory-mapped Arrow metadata and the
result table). ``non_encoder`` = total - encode.

The synthetic index (default): ``n`` unit vectors drawn around ``nlist`` cluster centres that share
a common direction (pairwise cosine ~0.3, like CLIP patch embeddings), stored in a FAISS
``IndexIVFFlat`` (inner product) whose coarse centroids ARE those centres, each vector added to its
own centre's inverted list (``invlists.add_entries``): building a k-means IVF or an HNSW
graph over 1M x 512 does not fit the time on 2 shared cores, and the search cost of the resulting
index (nprobe lists scanned) is the same. Metadata: one Arrow IPC file (``meta.arrow``, memory-mapped)
with patch_id, image_id, image_uri, date, box and level, 30 patches per frame, 30 dates. Built
once and cached under ``--cache-dir``.

The CLIP towers are ViT-B-16 with RANDOM weights (no weights are available here; the cost per
forward pass is the real one). Images: GTSDB frames from ../shared/data/gtsdb with random boxes.

The last line is one JSON object: ``p50_ms``, ``p99_ms``, ``qps`` of the headline workload (text
queries, 1 client, end to end, encoder included) and every workload's numbers under ``results``.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import glob
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OBJECTS = ["deer", "road narrows sign", "ambulance", "horse", "fallen tree", "tractor", "cyclist", "roadworks",
           "stop sign", "dog", "pedestrian crossing", "traffic light", "bus", "wheelchair", "snow plow",
           "speed limit 20 sign", "moose", "child with a ball", "police car", "overturned truck"]
CONDITIONS = ["at night", "in rain", "in fog", "at dusk", "in snow"]


# --------------------------------------------------------------------------- synthetic index

class SyntheticIndex:
    """A ``mining.index.PatchIndex``-compatible IVF-Flat index over synthetic vectors (see module doc).

    ``search(q (Q, D) float32, k) -> (scores (Q, k) float32, patch_ids (Q, k) int64)``;
    ``metadata()`` -> memory-mapped Arrow table; ``reconstruct_exact(ids) -> (n, D) float32``.
    """

    def __init__(self, n: int, dim: int, nlist: int, nprobe: int, cache_dir: str, seed: int = 0, model: str = ""):
        import faiss
        import pyarrow as pa
        import pyarrow.ipc as ipc

        d = os.path.join(cache_dir, f"n{n}-d{dim}-l{nlist}-s{seed}")
        os.makedirs(d, exist_ok=True)
        ipath, mpath, cpath = (os.path.join(d, f) for f in ("index.faiss", "meta.arrow", "centers.npy"))
        t0 = time.perf_counter()
        if not (os.path.exists(ipath) and os.path.exists(mpath) and os.path.exists(cpath)):
            self._build(n, dim, nlist, seed, ipath, mpath, cpath)
            self.build_s = time.perf_counter() - t0
        else:
            self.build_s = 0.0
        t1 = time.perf_counter()
        self.index = faiss.read_index(ipath)
        self.index.make_direct_map()
        self.index.nprobe = nprobe
        self._meta = ipc.open_file(pa.memory_map(mpath)).read_all()
        self.centers = np.load(cpath)
        self.load_s = time.perf_counter() - t1
        self.version = f"synthetic-{n}"
        self.dim, self.ntotal = dim, self.index.ntotal
        self.manifest = {"kind": "ivf-flat", "n": n, "dim": dim, "nlist": nlist, "nprobe": nprobe,
                         "models": [model] if model else [], "random_init": True, "data_root": "synthetic"}
        self.seed = seed

    @staticmethod
    def _build(n, dim, nlist, seed, ipath, mpath, cpath):
        import faiss
        import pyarrow as pa
        import pyarrow.ipc as ipc

        print(f"building synthetic IVF-Flat index: {n} x {dim}, nlist {nlist} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        rng = np.random.default_rng(seed)
        m = rng.standard_normal(dim).astype(np.float32)
        m /= np.linalg.norm(m)
        c = 0.55 * m + rng.standard_normal((nlist, dim), dtype=np.float32) / np.sqrt(dim)
        centers = (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)
        np.save(cpath, centers)
        quant = faiss.IndexFlatIP(dim)
        quant.add(centers)
        index = faiss.IndexIVFFlat(quant, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        assert index.is_trained
        w = np.arange(1, nlist + 1, dtype=np.float64) ** -0.5  # uneven list sizes, like real data
        w /= w.sum()
        chunk = 65_536
        for s in range(0, n, chunk):
            b = min(chunk, n - s)
            lab = rng.choice(nlist, size=b, p=w).astype(np.int64)
            x = centers[lab] + 0.8 * rng.standard_normal((b, dim), dtype=np.float32) / np.sqrt(dim)
            x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
            ids = np.arange(s, s + b, dtype=np.int64)
            order = np.argsort(lab, kind="stable")
            lab_s, ids_s = lab[order], np.ascontiguousarray(ids[order])
            codes = np.ascontiguousarray(x[order]).view(np.uint8)
            bounds = np.flatnonzero(np.diff(lab_s)) + 1
            for a, z in zip(np.r_[0, bounds], np.r_[bounds, b]):
                index.invlists.add_entries(int(lab_s[a]), int(z - a), faiss.swig_ptr(ids_s[a:z]),
                                           faiss.swig_ptr(codes[a:z]))
            index.ntotal += b
        faiss.write_index(index, ipath)
        # metadata: 30 patches per frame, 30 ingest dates, sorted by patch_id (= row)
        schema = pa.schema([("patch_id", pa.int64()), ("image_id", pa.string()), ("image_uri", pa.string()),
                            ("shard", pa.string()), ("date", pa.string()), ("x0", pa.int32()), ("y0", pa.int32()),
                            ("x1", pa.int32()), ("y1", pa.int32()), ("level", pa.int8())])
        with ipc.new_file(mpath, schema) as wtr:
            for s in range(0, n, chunk):
                r = np.arange(s, min(n, s + chunk), dtype=np.int64)
                img = r // 30
                day = (img * 30) // max(1, n)
                dates = [f"2026-01-{int(dd) + 1:02d}" for dd in day]
                size = rng.integers(224, 449, len(r))
                x0 = rng.integers(0, 1360 - size)
                y0 = rng.integers(0, 800 - size)
                wtr.write_table(pa.table({
                    "patch_id": r, "image_id": [f"{int(i):016x}" for i in img],
                    "image_uri": [f"s3://fleet/frames/{d}/{int(i):09d}.jpg" for d, i in zip(dates, img)],
                    "shard": [f"s3://fleet/shards/{d}/{int(i) // 1000:06d}.tar" for d, i in zip(dates, img)],
                    "date": dates, "x0": x0.astype(np.int32), "y0": y0.astype(np.int32),
                    "x1": (x0 + size).astype(np.int32), "y1": (y0 + size).astype(np.int32),
                    "level": np.ones(len(r), np.int8)}, schema=schema))
        print(f"built in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    def search(self, q, k):
        return self.index.search(np.ascontiguousarray(q, np.float32), k)

    def metadata(self):
        return self._meta

    def reconstruct_exact(self, ids):
        ids = np.asarray(ids, np.int64)
        if len(ids) == 0:
            return np.zeros((0, self.dim), np.float32)
        return self.index.reconstruct_batch(ids)

    def sample_queries(self, n: int, seed: int = 7) -> np.ndarray:
        rng = np.random.default_rng(seed)
        lab = rng.integers(0, len(self.centers), n)
        x = self.centers[lab] + 0.8 * rng.standard_normal((n, self.dim), dtype=np.float32) / np.sqrt(self.dim)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# --------------------------------------------------------------------------- runner

def pct(v, p):
    return float(np.percentile(np.asarray(v, np.float64), p)) if len(v) else float("nan")


def run_workload(fn, items, clients: int) -> dict:
    """Run ``fn(item)`` for every item from ``clients`` threads; latency per query + split."""
    from mining.query import timings_of

    lat, tims = [], []

    def one(it):
        t0 = time.perf_counter()
        t = fn(it)
        return (time.perf_counter() - t0) * 1e3, timings_of(t)

    t0 = time.perf_counter()
    if clients == 1:
        res = [one(it) for it in items]
    else:
        with cf.ThreadPoolExecutor(clients) as ex:
            res = list(ex.map(one, items))
    wall = time.perf_counter() - t0
    for ms, tm in res:
        lat.append(ms)
        tims.append(tm)
    non_enc = [t["total_ms"] - t["encode_ms"] for t in tims]
    out = {"n": len(items), "clients": clients, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
           "qps": len(items) / wall, "non_encoder_p50_ms": pct(non_enc, 50), "non_encoder_p99_ms": pct(non_enc, 99)}
    for s in ("encode_ms", "search_ms", "rerank_dedup_ms", "metadata_ms"):
        out[s.replace("_ms", "") + "_p50_ms"] = pct([t[s] for t in tims], 50)
    out["search_p99_ms"] = pct([t["search_ms"] for t in tims], 99)
    out["non_encoder_cpu_p50_ms"] = pct([t["non_encoder_cpu_ms"] for t in tims], 50)
    out["non_encoder_cpu_p99_ms"] = pct([t["non_encoder_cpu_ms"] for t in tims], 99)
    out["cache_hit_rate"] = float(np.mean([bool(t.get("cache_hit")) for t in tims]))
    return out


def main() -> int:
    if "--router" in sys.argv[1:]:  # issue 18: through the router actor and its shard actors
        from query_router import main as router_main

        return router_main(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="synthetic index size (vectors)")
    ap.add_argument("--nlist", type=int, default=4096)
    ap.add_argument("--nprobe", type=int, default=8)
    ap.add_argument("--index", help="benchmark a real index root (mining.index.open_index) instead")
    ap.add_argument("--clip-model", default="ViT-B-16", help="CLIP towers (random weights); its dim sets the index dim")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--clients", default="1,8")
    ap.add_argument("--text-queries", type=int, default=30)
    ap.add_argument("--image-queries", type=int, default=10)
    ap.add_argument("--example-queries", type=int, default=4)
    ap.add_argument("--embedding-queries", type=int, default=400)
    ap.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "gtsdb" / "images"))
    ap.add_argument("--cache-dir", default="/tmp/mining-query-bench")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--faiss-threads", type=int, default=1,
                    help="FAISS OpenMP threads (1, as in the query actor: clients are the parallelism)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    import logging

    logging.disable(logging.WARNING)
    import torch

    from mining.embed import ClipEmbedder, ClipSpec
    from mining.query import QueryConfig, QueryEngine

    import faiss

    faiss.omp_set_num_threads(args.faiss_threads)
    t0 = time.perf_counter()
    if args.index:
        engine = QueryEngine(args.index, config=QueryConfig())
        emb = engine.embedder
        desc = {"index": args.index, "kind": engine.snapshot.kind}
        sample = lambda n: engine.snapshot.index.reconstruct_exact(  # noqa: E731
            engine.snapshot.patch_ids[np.random.default_rng(7).integers(0, engine.snapshot.ntotal, n)])
    else:
        emb = ClipEmbedder(ClipSpec(args.clip_model, None, True))
        idx = SyntheticIndex(args.n, emb.dim, args.nlist, args.nprobe, args.cache_dir, args.seed, emb.model_id)
        engine = QueryEngine(index=idx, embedder=emb, config=QueryConfig(rerank=True))
        desc = {"index": "synthetic", "kind": "IVF%d,Flat nprobe=%d" % (args.nlist, args.nprobe),
                "build_s": round(idx.build_s, 1), "load_s": round(idx.load_s, 1)}
        sample = idx.sample_queries
    snap = engine.snapshot
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other jobs share this machine)")
    print(f"index: {snap.ntotal} vectors, dim {snap.dim}, {desc}; engine ready in {time.perf_counter() - t0:.1f} s; "
          f"CLIP {emb.model_id} on {emb.device}, torch threads {torch.get_num_threads()}", flush=True)

    k = args.k
    if not args.index:  # recall of the synthetic IVF search against exact search, 20 queries
        qs = idx.sample_queries(20, seed=99)
        _, got = idx.search(qs, k)
        best = np.full((20, k), -np.inf, np.float32)
        best_i = np.full((20, k), -1, np.int64)
        for s0 in range(0, idx.ntotal, 131_072):
            ids = np.arange(s0, min(idx.ntotal, s0 + 131_072))
            sc = qs @ idx.reconstruct_exact(ids).T
            cat_s, cat_i = np.concatenate([best, sc], 1), np.concatenate([best_i, np.broadcast_to(ids, sc.shape)], 1)
            top = np.argsort(-cat_s, axis=1)[:, :k]
            best, best_i = np.take_along_axis(cat_s, top, 1), np.take_along_axis(cat_i, top, 1)
        desc["recall_at_k"] = round(float(np.mean([len(set(a) & set(b)) / k for a, b in zip(got, best_i)])), 3)
        print(f"search recall@{k} vs exact (20 queries): {desc['recall_at_k']}", flush=True)

    rng = np.random.default_rng(args.seed)
    texts = [f"a {o} {c}" for o in OBJECTS for c in CONDITIONS]
    texts = [texts[i] for i in rng.permutation(len(texts))][:args.text_queries]
    files = sorted(glob.glob(os.path.join(args.images, "*.jpg")))[:64]
    frames = [open(f, "rb").read() for f in files]

    def rand_box():
        s = int(rng.integers(224, 449))
        x, y = int(rng.integers(0, 1360 - s)), int(rng.integers(0, 800 - s))
        return (x, y, x + s, y + s)

    images = [(frames[int(rng.integers(len(frames)))], rand_box()) for _ in range(args.image_queries)]
    examples = [[{"image": frames[int(rng.integers(len(frames)))], "box": rand_box()} for _ in range(8)]
                for _ in range(args.example_queries)]
    vectors = list(sample(args.embedding_queries))
    k = args.k

    # warm up every path (also fills nothing in the text cache: warm-up texts are not reused)
    engine.text("warm up", k)
    engine.image(frames[0], (0, 0, 224, 224), k)
    engine.embedding(vectors[0], k)
    engine.examples(examples[0][:2], k)

    results = {}
    for clients in [int(c) for c in args.clients.split(",")]:
        engine._cache.clear()
        work = [
            ("text", lambda t: engine.text(t, k), texts),
            ("text_cached", lambda t: engine.text(t, k), texts),
            ("image", lambda it: engine.image(it[0], it[1], k), images),
            ("examples8_mean", lambda ex: engine.examples(ex, k, mode="mean"), examples),
            ("examples8_max", lambda ex: engine.examples(ex, k, mode="max"), examples),
            ("embedding", lambda v: engine.embedding(v, k), vectors),
        ]
        for name, fn, items in work:
            r = run_workload(fn, items, clients)
            results[f"{name}@{clients}"] = r
            print(f"{name:>15} clients={clients}  n={r['n']:4d}  p50 {r['p50_ms']:8.2f} ms  p99 {r['p99_ms']:8.2f} ms  "
                  f"{r['qps']:8.1f} q/s | split p50: encode {r['encode_p50_ms']:7.2f}  search {r['search_p50_ms']:5.2f}"
                  f"  rerank+dedup {r['rerank_dedup_p50_ms']:5.2f}  metadata {r['metadata_p50_ms']:5.2f}  "
                  f"non-encoder {r['non_encoder_p50_ms']:5.2f} (p99 {r['non_encoder_p99_ms']:5.2f}, "
                  f"CPU p50 {r['non_encoder_cpu_p50_ms']:5.2f})  "
                  f"cache hits {r['cache_hit_rate']:.0%}", flush=True)
    head = results.get("text@1") or next(iter(results.values()))
    summary = {"load_avg_end": round(os.getloadavg()[0], 1), "p50_ms": round(head["p50_ms"], 3), "p99_ms": round(head["p99_ms"], 3), "qps": round(head["qps"], 2),
               "headline": "text query, 1 client, end to end (encoder included)", "n": snap.ntotal, "dim": snap.dim,
               "k": k, "clip": emb.model_id, "device": str(emb.device), **desc,
               "results": {n: {kk: (round(v, 3) if isinstance(v, float) else v) for kk, v in r.items()}
                           for n, r in results.items()}}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
