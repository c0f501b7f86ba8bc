"""Index benchmark: recall@16 vs exact search, bytes/vector, ms/query (batch 1 and 64), build time.

Usage::

    python benchmarks/index.py --n 200000 --kind ivfpq-refine
    python benchmarks/index.py --n 200000 --all            # side-by-side table -> benchmarks/RESULTS.md
    python benchmarks/index.py --data /tmp/gtsdb_mined --all   # real mined embeddings (mining.store)

Data: synthetic clustered unit vectors of dim 512 (:mod:`mining.index.synthetic`, a mixture of
anisotropic clusters) or the embeddings of a mined dataset (``--data``).  Queries come from the same
distribution but are not in the database (synthetic: other sample seed; ``--data``: a held-out
random subset of the vectors, removed from the database).  ``--tune-queries`` of them tune
nprobe/efSearch/k_factor to ``--recall-target`` (the same rule as the index build), the other
``--queries`` measure recall.  Ground truth: exact inner-product top-16 over the same database.

Each distinct index is built once: ``ivfpq`` (8-bit PQ, approximate scores) and ``ivfpq-refine``
(4-bit fast-scan PQ whose k * k_factor candidates faiss' ``IndexRefine`` re-ranks with the exact
float16 vectors of a memory-mapped refine file, the library's search path) are separate indexes;
``hnsw`` (tuned efSearch) and the thesis' ``HNSW32`` row (faiss' default efSearch=16) share one
graph; ``flat`` is the thesis' exhaustive index.  Timings are medians; batch-1 over
``--timing-queries`` single calls, batch-64 over 5 repeats.  The last printed line is JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import os
import sys
import tempfile
import time

import faiss
import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mining.index import core, sizing  # noqa: E402
from mining.index.search import REFINE_FILE, PatchIndex, open_refine, write_refine  # noqa: E402
from mining.index.synthetic import ClusteredMixture  # noqa: E402

K = 16
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
BEGIN, END = "<!-- index:begin -->", "<!-- index:end -->"
NOTES = (
    "index B/vector = size of the written FAISS index / N (what is resident in RAM); + disk B/vector = the "
    "float16 exact vectors of ivfpq-refine (refine.faiss, memory-mapped by faiss: page cache, not anonymous memory). "
    "`ivfpq` (8-bit PQ) and `ivfpq-refine` (4-bit fast-scan PQ, labels = rows, faiss IndexRefine) are separate "
    "indexes; ivfpq-refine's build_s includes writing the refine file; `hnsw` and the thesis' "
    "HNSW32 row share one graph (the thesis row keeps faiss' default efSearch=16). OPQ training budget: "
    "`mining/index/core.py` (OPQ_NITER, OPQ_NITER_PQ_0, OPQ_MAX_TRAIN), the same for the thesis' OPQ64_128,PQ64 row. "
    "Timings: medians, 1 OpenMP thread, on a machine shared with other jobs, so absolute build times are "
    "pessimistic; the last column holds the tuned search parameters (recall target 0.95 on separate tuning queries)."
)


def load_data(args):
    if args.data:
        from mining.store import embeddings_from_arrow, open_patches
        t = open_patches(args.data).to_table(columns=["patch_id", "embedding"])
        x = core.normalize(embeddings_from_arrow(t.column("embedding")), what="embeddings")
        rng = np.random.default_rng(args.seed)
        perm = rng.permutation(len(x))
        nq = min(args.queries + args.tune_queries, max(2, len(x) // 10))
        q, x = x[perm[:nq]], x[perm[nq:]]
        if args.n:
            x = x[: args.n]
        return x, q, f"mined embeddings from {args.data}"
    mix = ClusteredMixture(args.dim, seed=args.seed)
    x = mix.sample(args.n, seed=args.seed + 1)
    q = mix.sample(args.queries + args.tune_queries, seed=args.seed + 2)
    return x, q, f"synthetic ClusteredMixture(dim={args.dim}, seed={args.seed})"


class Row:
    def __init__(self, name, kind, factory, index, search, build_s, nbytes, n, params=None, extra_bytes=0, note="",
                 fixed_bytes=0):
        self.name, self.kind, self.factory, self.index = name, kind, factory, index
        self.search, self.build_s, self.nbytes, self.n = search, build_s, nbytes, n
        self.params, self.extra_bytes, self.note = params or {}, extra_bytes, note
        self.fixed_bytes = fixed_bytes  # size of the trained, empty index (centroids, OPQ, codebooks)


def index_bytes(index) -> int:
    with tempfile.NamedTemporaryFile(suffix=".faiss") as f:
        faiss.write_index(index, f.name)
        return os.path.getsize(f.name)


def faiss_search(index, params):
    def fn(q, k, p=None):
        core.set_params(index, {**params, **(p or {})})
        return index.search(q, k)
    return fn


def measure(row: Row, qeval, gt, timing_queries: int):
    s, ids = row.search(qeval, K, row.params)
    recall = core.recall_at_k(ids, gt, K)
    t1 = []
    for i in range(min(timing_queries, len(qeval))):
        t0 = time.perf_counter()
        row.search(qeval[i:i + 1], K, row.params)
        t1.append(time.perf_counter() - t0)
    b = qeval[:64]
    t64 = []
    for _ in range(5):
        t0 = time.perf_counter()
        row.search(b, K, row.params)
        t64.append((time.perf_counter() - t0) / len(b))
    return {
        "name": row.name, "kind": row.kind, "factory": row.factory, "n": row.n,
        "recall_at_16": round(recall, 4),
        "bytes_per_vector": round(row.nbytes / row.n, 1),
        "extra_disk_bytes_per_vector": round(row.extra_bytes / row.n, 1),
        "fixed_bytes": int(row.fixed_bytes),
        "marginal_bytes_per_vector": round((row.nbytes - row.fixed_bytes) / row.n, 1),
        "ms_per_query": round(1e3 * float(np.median(t1)), 3),
        "ms_per_query_batch64": round(1e3 * float(np.median(t64)), 3),
        "build_s": round(row.build_s, 1),
        "params": row.params, "note": row.note,
    }


def build_rows(kinds, x, ids, qtune, gt_tune, args, tmpdir):
    """Yield Row objects, building each distinct index once."""
    n, d = x.shape
    rng = np.random.default_rng(args.seed)
    want = set(kinds)
    if want & {"flat", "thesis-exhaustive"}:
        with core.Timer() as t:
            idx = faiss.index_factory(d, "IDMap,Flat", faiss.METRIC_INNER_PRODUCT)
            core.add_vectors(idx, x, ids)
        nb = index_bytes(idx)
        if "flat" in want:
            yield Row("flat (= thesis exhaustive)", "flat", "IDMap,Flat", idx, faiss_search(idx, {}), t.s, nb, n)
        del idx
        gc.collect()
    if want & {"hnsw", "thesis-hnsw32"}:
        plan = sizing.plan_index(n, d, "hnsw")
        with core.Timer() as t:
            idx = core.train_index(plan, x[:1])
            core.add_vectors(idx, x, ids)
        nb = index_bytes(idx)
        if "hnsw" in want:
            p, r = core.tune("hnsw", idx, lambda q, k, pp: faiss_search(idx, pp)(q, k)[1], qtune, gt_tune,
                             k=K, recall_target=args.recall_target)
            yield Row("hnsw (HNSW32, tuned efSearch)", "hnsw", plan.factory, idx, faiss_search(idx, {}), t.s, nb, n, p)
        if "thesis-hnsw32" in want:
            yield Row("thesis HNSW32 (efSearch=16)", "hnsw", plan.factory, idx, faiss_search(idx, {}), t.s, nb, n,
                      {"efSearch": 16}, note="same graph as hnsw")
        del idx
        gc.collect()
    for kind in [kd for kd in ("ivfpq", "ivfpq-refine") if kd in want]:
        # ivfpq: 8-bit PQ, approximate scores; ivfpq-refine: 4-bit fast-scan PQ candidates re-ranked by
        # faiss.IndexRefine with the exact float16 vectors (memory-mapped refine file), as mining.index builds it
        budget = args.budget_bytes_per_vector * n if args.budget_bytes_per_vector else None
        plan = sizing.plan_index(n, d, kind, memory_budget_bytes=budget)
        if args.factory:  # explore other IVF-PQ shapes with the same training sample size
            plan.factory = args.factory
            plan.fast_scan = "fs" in args.factory.rsplit(",", 1)[-1]
        sel = rng.choice(n, plan.n_train, replace=False)
        with core.Timer() as t_train:
            trained = core.train_index(plan, x[np.sort(sel)], seed=args.seed)
        fixed = index_bytes(trained)
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        # the codes: the product's default encoding (core.default_eta), or each --eta in turn on the same codebooks
        etas = [core.default_eta(trained)] if args.eta is None else [float(e) for e in args.eta.split(",")]
        variants = [(qz, eta) for qz in args.quantizer.split(",") for eta in etas]
        refine_s = None
        for qz, eta in variants:
            idx = faiss.clone_index(trained) if len(variants) > 1 else trained
            if qz == "hnsw":  # the coarse step as an HNSW graph over the same centroids
                core.use_hnsw_quantizer(idx)
            codes = "faiss' nearest-codeword codes" if eta == 1 else f"score-aware codes, eta {eta:g}"
            codes += ", HNSW coarse quantizer" if qz == "hnsw" else ""
            with core.Timer() as t_add:
                if kind == "ivfpq":
                    core.add_vectors(idx, x, ids, eta=eta)
                else:  # labels = rows of the patch_id-sorted version
                    rows = np.empty(n, np.int64)
                    rows[order] = np.arange(n)
                    core.add_vectors(idx, x, rows, eta=eta)
            build = t_train.s + t_add.s
            nb = index_bytes(idx)
            print(f"# {kind} {plan.factory} ({codes}): train {t_train.s:.1f} s on {plan.n_train} vectors, "
                  f"add {t_add.s:.1f} s", flush=True)
            if kind == "ivfpq":
                p, r = core.tune("ivfpq", idx, lambda q, k, pp: faiss_search(idx, pp)(q, k)[1], qtune, gt_tune,
                                 k=K, recall_target=args.recall_target, nlist=plan.nlist)
                yield Row(f"ivfpq ({codes})", "ivfpq", plan.factory, idx, faiss_search(idx, {}), build, nb, n, p,
                          fixed_bytes=fixed)
            else:
                path = os.path.join(tmpdir, REFINE_FILE)
                if refine_s is None:  # written once; every row's build time includes it
                    with core.Timer() as t_ref:
                        write_refine(path, x, order)
                    refine_s = t_ref.s
                refine, vec = open_refine(path)
                meta = pa.table({"patch_id": sorted_ids})
                pidx = PatchIndex(idx, meta, {"kind": "ivfpq-refine", "refine": "fp16"}, {}, vec, refine=refine)

                def refine_search(q, k, pp, pidx=pidx):
                    if pp != pidx.params:
                        pidx.set_params(pp)
                    return pidx.search(q, k)

                p, r = core.tune("ivfpq-refine", idx, lambda q, k, pp: refine_search(q, k, pp)[1], qtune, gt_tune,
                                 k=K, recall_target=args.recall_target, nlist=plan.nlist)
                row = Row(f"ivfpq-refine (IndexRefine, float16 refine file; {codes})", "ivfpq-refine",
                          plan.factory + " + refine fp16", idx, refine_search, build + refine_s, nb, n, p,
                          extra_bytes=os.path.getsize(path), fixed_bytes=fixed)
                row.note = time_split(idx, pidx, p, qtune, args.timing_queries)
                yield row
                if args.refine2:
                    yield from two_stage_refine_rows(idx, pidx, refine, p, x, order, sorted_ids, qtune, gt_tune, args,
                                                     tmpdir, build + refine_s, nb, fixed)
                del pidx, refine, vec
            del idx
            gc.collect()
        del trained
        gc.collect()
    if args.scann:
        yield from scann_rows(x, ids, qtune, gt_tune, args, tmpdir)
    if "sq8" in want:
        plan = sizing.plan_index(n, d, "sq8")
        with core.Timer() as t:
            idx = core.train_index(plan, x[rng.choice(n, plan.n_train, replace=False)], seed=args.seed)
            core.add_vectors(idx, x, ids)
        yield Row("sq8", "sq8", plan.factory, idx, faiss_search(idx, {}), t.s, index_bytes(idx), n)
        del idx
        gc.collect()
    if "thesis-opq-pq" in want:
        # the thesis' "PQ64": OPQ to 128 dims then PQ64, exhaustive scan. OPQ training is slow on 2
        # cores (NOTES: 353 s on 50k), so it trains on --opq-train vectors.
        # D = 512: OPQ64_128,PQ64 as in the thesis; other D keep its shape (dimension / 4, 2 dims per sub-quantizer)
        factory = f"IDMap,OPQ{d // 8}_{d // 4},PQ{d // 8}"
        nt = min(n, args.opq_train)
        with core.Timer() as t:
            idx = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
            opq = faiss.downcast_VectorTransform(faiss.downcast_index(idx.index).chain.at(0))
            core.configure_opq(opq)  # same OPQ training budget as our ivfpq rows
            idx.train(x[np.sort(rng.choice(n, nt, replace=False))])
            core.add_vectors(idx, x, ids)
        yield Row(f"thesis {factory[6:]} (exhaustive)", "pq", factory, idx, faiss_search(idx, {}), t.s,
                  index_bytes(idx), n, note=f"trained on {nt}")
        del idx
        gc.collect()


def time_split(idx, pidx, params, q, n_timing: int) -> str:
    """Where batch-1 time goes in ivfpq-refine: the IVF fast-scan search for k * k_factor candidates alone
    (same nprobe) vs the whole search (+ float16 re-rank in IndexRefine, row -> patch_id map)."""
    pidx.set_params(params)
    cand = int(K * params.get("k_factor", sizing.DEFAULT_K_FACTOR))
    t_ivf, t_all = [], []
    for i in range(min(n_timing, len(q))):
        t0 = time.perf_counter()
        idx.search(q[i:i + 1], cand)
        t_ivf.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        pidx.search(q[i:i + 1], K)
        t_all.append(time.perf_counter() - t0)
    a, b = 1e3 * float(np.median(t_ivf)), 1e3 * float(np.median(t_all))
    return f"time split (batch 1): IVF scan for {cand} candidates {a:.3f} ms, re-rank + rest {b - a:.3f} ms of {b:.3f} ms"


def two_stage_refine_rows(idx, pidx, refine, params, x, order, sorted_ids, qtune, gt_tune, args, tmpdir, build_s, nb,
                          fixed):
    """Item 4 of issue 18: a cheaper first re-rank. The IVF's k * k1 * k2 candidates are re-ranked with an
    8-bit scalar quantizer (``SQ8``, 512 B/vector at D=512, memory-mapped like the fp16 file), its top
    k * k2 with the exact float16 vectors: ``IndexRefine(IndexRefine(ivf, sq8, k1), fp16, k2)``.  The
    total candidates and nprobe stay those tuned for the one-stage refine; k2 in (2, 4, 8)."""
    d = x.shape[1]
    sq = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    with core.Timer() as t:
        sq.train(x[np.random.default_rng(0).choice(len(x), min(len(x), 65_536), replace=False)])
        for s0 in range(0, len(x), 65_536):
            sq.add(np.ascontiguousarray(x[order[s0:s0 + 65_536]]))
        path = os.path.join(tmpdir, "refine_sq8.faiss")
        faiss.write_index(sq, path)
        del sq
    sq = faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC)
    core.set_params(idx, params)
    total = int(params.get("k_factor", sizing.DEFAULT_K_FACTOR))
    for k2 in (2, 4, 8):
        if k2 >= total:
            continue
        inner = faiss.IndexRefine(idx, sq)
        inner.k_factor = float(total // k2)
        outer = faiss.IndexRefine(inner, refine)
        outer.k_factor = float(k2)

        def search(q, k, pp=None, outer=outer):
            sc, rows = outer.search(q, k)
            return sc, np.where(rows < 0, -1, sorted_ids[np.maximum(rows, 0)])

        yield Row(f"ivfpq-refine, 2-stage: SQ8 on {total * K}, fp16 on {k2 * K}", "ivfpq-refine2",
                  f"{pidx.index.__class__.__name__} + SQ8 + fp16", idx, search, build_s + t.s, nb, len(x),
                  {**params, "k1": total // k2, "k2": k2}, extra_bytes=os.path.getsize(path) + 2 * d * len(x),
                  fixed_bytes=fixed)


SCANN_CONFIGS = (
    # (row name, AH dims per block, float32 re-order): ScaNN README's ~1M configuration, and the same tree with
    # 4 dims/block (512 / 4 blocks x 4 bits = 64 B of codes per vector) and no re-order, the ScaNN that fits the
    # issue's <= 80 B/vector resident budget (its re-order keeps the float32 dataset in memory, 2 KB/vector)
    ("ScaNN (tree 2000 + AH 2 dims/block + float32 re-order)", 2, True),
    ("ScaNN at <= 80 B/vector (tree 2000 + AH 4 dims/block, no re-order)", 4, False),
)


def _scann_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scann")
    except PackageNotFoundError:
        return "?"


def scann_searcher(x: np.ndarray, dims_per_block: int, reorder_depth: int | None = None):
    """A ScaNN searcher over x (n, d) float32, dot product: tree of 2,000 leaves + asymmetric hashing
    (``dims_per_block`` dims per 4-bit block, anisotropic threshold 0.2) [+ exact float32 re-order of up to
    ``reorder_depth`` candidates, which keeps the float32 dataset in memory]; trained with one thread."""
    import scann

    b = (scann.scann_ops_pybind.builder(x, K, "dot_product")
         .tree(num_leaves=2000, num_leaves_to_search=100, training_sample_size=min(len(x), 250_000))
         .score_ah(dims_per_block, anisotropic_quantization_threshold=0.2))
    return (b.reorder(reorder_depth) if reorder_depth else b).set_n_training_threads(1).build()


def tune_scann(recall, latency, leaves_grid, depths, target: float):
    """ScaNN's search settings by the rule of our other rows' tuning, on the tuning queries: for each
    leaves_to_search in ``leaves_grid`` the smallest re-order depth whose ``recall(leaves, depth)`` reaches
    ``target`` + 0.005, and of those the one with the lowest ``latency(leaves, depth)``.
    Returns (best (latency, leaves, depth) or None when none reaches it, tried [(recall, leaves, depth)])."""
    best, tried = None, []
    for leaves in leaves_grid:
        for depth in depths:
            r = recall(leaves, depth)
            tried.append((r, leaves, depth))
            if r >= target + 0.005:
                cand = (latency(leaves, depth), leaves, depth)
                best = min(best, cand, key=lambda c: c[0]) if best else cand
                break
    return best, tried


def scann_rows(x, ids, qtune, gt_tune, args, tmpdir):
    """ScaNN (Guo et al. 2020, "Accelerating Large-Scale Inference with Anisotropic Vector Quantization") on
    the same vectors, one row per :data:`SCANN_CONFIGS` (:func:`scann_searcher`). leaves_to_search (and the
    re-order depth) are tuned on the tuning queries to the same recall target (:func:`tune_scann`; when none
    reaches it, the setting with the best recall). Single query calls (``searcher.search``): one thread."""
    n = len(x)
    for name, dims_per_block, reorder in SCANN_CONFIGS:
        with core.Timer() as t:
            searcher = scann_searcher(x, dims_per_block, 200 if reorder else None)
        sdir = os.path.join(tmpdir, f"scann{dims_per_block}{int(reorder)}")
        os.makedirs(sdir, exist_ok=True)
        searcher.serialize(sdir)
        nbytes = sum(os.path.getsize(os.path.join(sdir, f)) for f in os.listdir(sdir))

        def search(q, k, pp, searcher=searcher):
            kw = {"pre_reorder_num_neighbors": pp["reorder"]} if pp.get("reorder") else {}
            out = [searcher.search(qq, final_num_neighbors=k, leaves_to_search=pp["leaves"], **kw) for qq in q]
            return np.stack([o[1] for o in out]).astype(np.float32), ids[np.stack([o[0] for o in out]).astype(np.int64)]

        def params(leaves, depth):
            return {"leaves": leaves, **({"reorder": depth} if depth else {})}

        def latency(leaves, depth, search=search):
            ts = []
            for i in range(min(64, len(qtune))):
                t0 = time.perf_counter()
                search(qtune[i:i + 1], K, params(leaves, depth))
                ts.append(time.perf_counter() - t0)
            return float(np.median(ts))

        best, tried = tune_scann(lambda le, de, search=search: core.recall_at_k(search(qtune, K, params(le, de))[1], gt_tune, K),
                                 latency, (25, 50, 100, 200, 400), (50, 100, 200, 400) if reorder else (None,),
                                 args.recall_target)
        if best:
            pp, note = params(best[1], best[2]), ""
        else:
            top = max(r for r, _, _ in tried)
            pp = next(params(le, de) for r, le, de in tried if r >= top - 0.002)
            note = f"does not reach the recall target on the tuning queries (best {top:.4f}); "
        note += ("serialized size = resident (the re-order keeps the float32 dataset)" if reorder
                 else "serialized size = resident (codes, datapoint ids, tree)")
        yield Row(name, "scann", f"scann {_scann_version()}", None,
                  search, t.s, nbytes, n, pp, note=note)
        del searcher
        gc.collect()


def write_results(rows, meta):
    lines = [
        BEGIN,
        "## Index (issue 6)",
        "",
        f"Data: {meta['data']}; N = {meta['n']:,} database vectors, {meta['queries']} evaluation queries "
        f"(+{meta['tune_queries']} tuning queries), recall@16 against exact inner-product search on the same vectors. "
        f"Machine: {meta['machine']}. Run: `{meta['command']}` ({meta['date']}).",
        "",
        "| index | factory | recall@16 | index B/vector | of which fixed MB | + disk B/vector | ms/query (batch 1) | ms/query (batch 64) | build s | params |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | `{r['factory']}` | {r['recall_at_16']:.3f} | {r['bytes_per_vector']:.0f} | "
            f"{r['fixed_bytes'] / 1e6:.1f} | "
            f"{r['extra_disk_bytes_per_vector']:.0f} | {r['ms_per_query']:.3f} | {r['ms_per_query_batch64']:.3f} | "
            f"{r['build_s']:.1f} | {json.dumps(r['params']) if r['params'] else '-'} {('; ' + r['note']) if r['note'] else ''} |"
        )
    lines += ["", meta.get("notes", ""), END]
    block = "\n".join(lines)
    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n\n"
    if BEGIN in text and END in text:
        pre, rest = text.split(BEGIN, 1)
        post = rest.split(END, 1)[1]
        text = pre + block + post
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = RESULTS + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, RESULTS)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200_000, help="database vectors (synthetic; cap for --data)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--kind", default="ivfpq-refine", choices=list(sizing.KINDS) + ["thesis-opq-pq", "thesis-hnsw32"])
    ap.add_argument("--all", action="store_true", help="all kinds + the thesis' reference rows; writes RESULTS.md")
    ap.add_argument("--no-write", action="store_true", help="with --all: do not touch RESULTS.md")
    ap.add_argument("--data", default=None, help="mined dataset root (mining.store) instead of synthetic vectors")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--tune-queries", type=int, default=200)
    ap.add_argument("--timing-queries", type=int, default=100)
    ap.add_argument("--recall-target", type=float, default=0.95)
    ap.add_argument("--opq-train", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-bytes-per-vector", type=float, default=None,
                    help="memory budget of the IVF rows in bytes per vector (the sizing rule picks M), e.g. 80")
    ap.add_argument("--factory", default=None, help="override the IVF-PQ factory string (ivfpq rows), e.g. OPQ64_512,IVF1024,PQ64x8")
    ap.add_argument("--threads", type=int, default=0, help="OpenMP threads for faiss (0: faiss default)")
    ap.add_argument("--shards", default=None,
                    help="issue 18: streaming, sharded build on a local Ray cluster (benchmarks/index_sharded.py); "
                         "S or a list like 1,4,8 (same vectors, queries and codebooks)")
    ap.add_argument("--streaming", action="store_true", help="the streaming build (implied by --shards; default 1 shard)")
    ap.add_argument("--fragment", type=int, default=50_000, help="--shards: patches per committed store fragment")
    ap.add_argument("--days", type=int, default=16, help="--shards: nights the fragments are spread over")
    ap.add_argument("--part-vectors", type=int, default=250_000, help="--shards: vectors per encode task")
    ap.add_argument("--ray-cpus", type=int, default=2, help="--shards: CPUs of the local Ray cluster")
    ap.add_argument("--max-nlist", type=int, default=None, help="--shards: cap the sizing rule's nlist (training time)")
    ap.add_argument("--workdir", default=None, help="--shards: store + index directory (default /tmp/idxbench-<n>)")
    ap.add_argument("--keep", action="store_true", help="--shards: keep the store and index afterwards")
    ap.add_argument("--uniqueness", action="store_true",
                    help="--shards: also compute the kNN uniqueness parts (N searches per build; off by default, the "
                         "rows measure the index build)")
    ap.add_argument("--scann", action="store_true",
                    help="with --kind ivfpq-refine: also ScaNN on the same vectors (pip install '.[ann-peers]') and the "
                         "2-stage SQ8 -> fp16 refine rows")
    ap.add_argument("--eta", default=None,
                    help="ivfpq rows: score-aware encoding weight(s), comma-separated, each a row on the same codebooks "
                         "(1 = faiss' own codes; default: the product's, mining.index.core.default_eta)")
    ap.add_argument("--quantizer", default="flat",
                    help="ivfpq rows: coarse quantizer(s), comma-separated: flat, hnsw (core.use_hnsw_quantizer on "
                         "the trained index); every quantizer x --eta pair is a row")
    ap.add_argument("--refine2", action="store_true", help="with --kind ivfpq-refine: add the 2-stage SQ8 -> fp16 refine rows")
    args = ap.parse_args(argv)
    if set(args.quantizer.split(",")) - {"flat", "hnsw"}:
        ap.error(f"--quantizer: unknown coarse quantizer in {args.quantizer!r} (flat, hnsw)")
    if args.shards or args.streaming:
        import index_sharded

        rows = index_sharded.run(args)
        print(json.dumps({**rows[0], "rows": rows}))
        return
    if args.threads:
        faiss.omp_set_num_threads(args.threads)

    t0 = time.perf_counter()
    x, q, data_desc = load_data(args)
    n, d = x.shape
    ids = np.arange(n, dtype=np.int64) * 7 + 3  # non-contiguous ids, as patch ids are
    qtune, qeval = q[: args.tune_queries], q[args.tune_queries:]
    gt_tune = core.exact_topk(qtune, x, ids, K)[1]
    gt_eval = core.exact_topk(qeval, x, ids, K)[1]
    print(f"# data: {data_desc}; n={n} d={d}; data+ground truth {time.perf_counter() - t0:.1f} s", flush=True)

    kinds = ["flat", "hnsw", "thesis-hnsw32", "ivfpq", "ivfpq-refine", "sq8", "thesis-opq-pq"] if args.all else [args.kind]
    results = []
    with tempfile.TemporaryDirectory() as tmpdir:
        for row in build_rows(kinds, x, ids, qtune, gt_tune, args, tmpdir):
            res = measure(row, qeval, gt_eval, args.timing_queries)
            results.append(res)
            print(json.dumps(res), flush=True)
    if args.all and not args.no_write:
        write_results(results, {
            "data": data_desc, "n": n, "queries": len(qeval), "tune_queries": len(qtune),
            "machine": f"{os.cpu_count()} CPU cores shared with other jobs, faiss {faiss.__version__}, "
                       f"{faiss.omp_get_max_threads()} OpenMP threads, no GPU",
            "command": "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "notes": NOTES,
        })
    main_row = next((r for r in results if r["kind"] == "ivfpq-refine"), results[0])
    print(json.dumps({k: main_row[k] for k in ("kind", "n", "recall_at_16", "bytes_per_vector", "ms_per_query", "build_s")}
                     | {"ms_per_query_batch64": main_row["ms_per_query_batch64"],
                        "rows": [{k: r[k] for k in ("name", "recall_at_16", "bytes_per_vector", "ms_per_query", "build_s")} for r in results]}
                     if args.all else
                     {k: main_row[k] for k in ("kind", "n", "recall_at_16", "bytes_per_vector", "ms_per_query", "build_s", "ms_per_query_batch64")}
                     # the in-process build: the driver is the process (its ru_maxrss), and there are no tasks
                     | {"shards": 1, "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                        "max_task_peak_rss_mb": None}
                     | ({"rows": [{k: r[k] for k in ("name", "recall_at_16", "bytes_per_vector",
                                                                  "extra_disk_bytes_per_vector", "ms_per_query", "build_s",
                                                                  "params", "note")} for r in results]}
                        if len(results) > 1 else {})))


if __name__ == "__main__":
    main()
