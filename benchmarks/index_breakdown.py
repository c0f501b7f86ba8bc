"""Where the batch-1 time of an ``ivfpq-refine`` query goes, next to ScaNN doing the same work (issue 18).

Usage::

    python benchmarks/index_breakdown.py --n 1000000 --scann          # ~10 min on 2 cores
    python benchmarks/index_breakdown.py --n 200000 --index /tmp/b.faiss  # keep the built index for reruns

What it does, in one process, one thread (faiss, torch and ScaNN):

1. Builds the product's ``ivfpq-refine`` index for ``--n`` synthetic 512-d vectors
   (:mod:`mining.index.synthetic`, the data of ``benchmarks/index.py``) at ``--budget-bytes-per-vector``
   with :func:`mining.index.sizing.plan_index`, :func:`mining.index.core.train_index` and
   :func:`mining.index.core.add_vectors` (score-aware codes), writes the float16 refine file with
   :func:`mining.index.search.write_refine` and memory-maps it back with
   :func:`mining.index.search.open_refine`, as a query actor does.
2. Tunes nprobe / k_factor on the first half of the queries with :func:`mining.index.core.tune` (the
   product's rule) and reports recall@16 on the other half.
3. Times the product's search path (faiss ``IndexRefine`` over ``IndexPreTransform(OPQ, IVF fast-scan)``)
   and each of its stages, query after query, so that each stage meets the caches a real query meets:
   normalise, OPQ rotation, coarse quantizer, fast-scan of the probed lists (``search_preassigned``),
   and the float16 re-rank (the whole search minus the IVF search for the same candidates).
4. Times a fused variant of the same search: the coarse step as one BLAS matrix-vector product over
   the centroids plus ``argpartition`` (faiss' flat quantizer runs a scalar loop with a heap at
   batch 1), and the re-rank as a torch gather of the float16 rows plus one matrix-vector product.
   Same candidates and exact scores, so the same recall; it measures how much of the time is glue.
5. With ``--scann``: ScaNN (tree of 2,000 leaves) at its 1M configuration (anisotropic hashing with
   2 dims per 4-bit block, 128 B of codes, float32 re-order), and with 4 dims per block (64 B of codes,
   our code size) plus float32 re-order: ScaNN doing our amount of work.  leaves and re-order depth
   are tuned on the same tuning queries, recall and latency (the fastest setting whose mean recall
   reaches the target plus 0.005: ``benchmarks/index.py``'s ``tune_scann``).

6. With ``--rabitq``: faiss' RaBitQ (``IndexIVFRaBitQFastScan``, 1 bit per dimension, same IVF2048 and the same
   float16 re-rank from the memory-mapped refine file, tuned by the product's :func:`mining.index.core.tune`):
   over all 512 dims (a 64 B code + 8 B of per-vector factors: over an 80 B budget at 1M), and after an
   uncentred PCA to 448 dims (56 B + 8 B: inside it).  The PCA must be uncentred: faiss' ``PCAMatrix``
   subtracts the mean, which changes inner-product rankings (measured: it never reached 0.95).
   A candidate for the first pass, not the product's path.

Timings are medians over ``--repeats`` passes of the held-out queries, one query per call.
The last printed line is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import faiss
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mining.index import core, sizing  # noqa: E402
from mining.index.search import open_refine, prefault_refine, write_refine  # noqa: E402
from mining.index.synthetic import ClusteredMixture  # noqa: E402

K = 16


def build(x: np.ndarray, plan: sizing.IndexPlan, args) -> faiss.Index:
    """The product's ivfpq-refine index for x, or the one cached at ``--index``."""
    if args.index and os.path.exists(args.index):
        return faiss.read_index(args.index)
    n = len(x)
    rng = np.random.default_rng(args.seed)
    idx = core.train_index(plan, x[np.sort(rng.choice(n, plan.n_train, replace=False))], seed=args.seed)
    core.add_vectors(idx, x, np.arange(n, dtype=np.int64))
    if args.index:
        faiss.write_index(idx, args.index)
    return idx


def _median_ms(samples) -> float:
    return round(1e3 * float(np.median(samples)), 4)


class Parts:
    """The faiss objects of an ``OPQ..,IVF..,PQ..x4fsr`` index and its refine rows."""

    def __init__(self, idx: faiss.Index, refine: faiss.Index, vectors: np.ndarray):
        self.idx, self.refine, self.vectors = idx, refine, vectors
        self.opq = faiss.downcast_VectorTransform(idx.chain.at(0))
        self.ivf = faiss.downcast_index(faiss.extract_index_ivf(idx))
        self.rot = faiss.vector_to_array(self.opq.A).reshape(self.opq.d_out, self.opq.d_in)
        self.centroids = self.ivf.quantizer.reconstruct_n(0, self.ivf.nlist)  # (nlist, d_out), rotated space
        self.full = faiss.IndexRefine(idx, refine)

    def set(self, params: dict) -> None:
        core.set_params(self.idx, params)
        self.full.k_factor = float(params["k_factor"])

    def product(self, q: np.ndarray, k: int = K) -> np.ndarray:
        """The product's path (PatchIndex.search): normalise, IndexRefine."""
        return self.full.search(core.normalize(q, dim=self.idx.d), k)[1]

    def staged(self, q1: np.ndarray, nprobe: int, cand: int) -> list[float]:
        """One query through faiss' IVF stages (normalise, OPQ, coarse, scan); seconds per stage."""
        t = [time.perf_counter()]
        qn = core.normalize(q1, dim=self.idx.d)
        t.append(time.perf_counter())
        y = self.opq.apply(qn)
        t.append(time.perf_counter())
        dc, a = self.ivf.quantizer.search(y, nprobe)
        t.append(time.perf_counter())
        self.ivf.search_preassigned(y, cand, a, dc)
        t.append(time.perf_counter())
        return list(np.diff(t))

    def fused(self, q1: np.ndarray, nprobe: int, cand: int, stages: list | None = None) -> np.ndarray:
        """The same search with a BLAS coarse step and a torch re-rank; returns (K,) row ids."""
        import torch

        t = [time.perf_counter()]
        qn = core.normalize(q1, dim=self.idx.d)[0]
        y = self.rot @ qn
        cs = self.centroids @ y
        t.append(time.perf_counter())
        a = np.argpartition(-cs, nprobe)[:nprobe]
        t.append(time.perf_counter())
        _, lab = self.ivf.search_preassigned(y[None], cand, a[None].astype(np.int64), cs[a][None])
        t.append(time.perf_counter())
        lab = lab[0][lab[0] >= 0]
        rows = torch.from_numpy(self.vectors).index_select(0, torch.from_numpy(lab))
        s = torch.mv(rows.float(), torch.from_numpy(qn)).numpy()
        t.append(time.perf_counter())
        top = np.argpartition(-s, K)[:K] if len(s) > K else np.arange(len(s))
        out = lab[top[np.argsort(-s[top])]]
        t.append(time.perf_counter())
        if stages is not None:
            stages.append(list(np.diff(t)))
        return out


def time_ours(parts: Parts, params: dict, qeval: np.ndarray, repeats: int) -> dict:
    """Batch-1 medians. Each way of searching gets its own pass over the held-out queries, so that no
    query finds its lists or refine rows in the cache from an earlier call (the held-out queries touch
    far more than the 32 MiB L3 of this machine)."""
    nprobe, cand = int(params["nprobe"]), int(K * params["k_factor"])
    parts.set(params)
    whole, ivf_stage, staged, fused_stages, fused_whole = [], [], [], [], []
    for _ in range(repeats):
        for i in range(len(qeval)):
            t0 = time.perf_counter()
            parts.product(qeval[i:i + 1])
            whole.append(time.perf_counter() - t0)
        for i in range(len(qeval)):
            qn = core.normalize(qeval[i:i + 1], dim=parts.idx.d)
            t0 = time.perf_counter()
            parts.idx.search(qn, cand)
            ivf_stage.append(time.perf_counter() - t0)
        for i in range(len(qeval)):
            staged.append(parts.staged(qeval[i:i + 1], nprobe, cand))
        for i in range(len(qeval)):
            t0 = time.perf_counter()
            parts.fused(qeval[i:i + 1], nprobe, cand, fused_stages)
            fused_whole.append(time.perf_counter() - t0)
    st, fs = np.array(staged), np.array(fused_stages)
    product_ms, ivf_ms = _median_ms(whole), _median_ms(ivf_stage)
    return {
        "product_ms": product_ms,
        "stages_ms": {"normalise": _median_ms(st[:, 0]), "opq": _median_ms(st[:, 1]),
                      "coarse_faiss_flat": _median_ms(st[:, 2]), "scan_preassigned": _median_ms(st[:, 3]),
                      "ivf_stage": ivf_ms, "rerank_and_rest": round(product_ms - ivf_ms, 4)},
        "fused_ms": _median_ms(fused_whole),
        "fused_stages_ms": {"normalise_rotate_coarse_blas": _median_ms(fs[:, 0]), "select_lists": _median_ms(fs[:, 1]),
                            "scan_preassigned": _median_ms(fs[:, 2]), "rerank_torch": _median_ms(fs[:, 3]),
                            "top_k": _median_ms(fs[:, 4])},
        "fused_ids": np.stack([parts.fused(qeval[i:i + 1], nprobe, cand) for i in range(len(qeval))]),
    }


def scann_rows(x, qtune, gt_tune, qeval, gt_eval, args):
    """The two ScaNN rows (module docstring), built by ``benchmarks/index.py``'s :func:`scann_searcher` and
    tuned by its :func:`tune_scann` on the tuning queries (latency timed on them too); recall and
    latency reported on the held-out queries."""
    from index import scann_searcher, tune_scann  # benchmarks/index.py (this script's directory)

    rows = []
    for name, dims, depths in (("ScaNN AH 2 dims/block (128 B codes) + float32 re-order", 2, (50, 100, 200, 400)),
                               ("ScaNN AH 4 dims/block (64 B codes, ours) + float32 re-order", 4, (128, 256, 512, 1024))):
        t0 = time.perf_counter()
        searcher = scann_searcher(x, dims, max(depths))
        build_s = time.perf_counter() - t0

        def run(q, leaves, depth, searcher=searcher):
            return np.stack([searcher.search(qq, final_num_neighbors=K, leaves_to_search=leaves,
                                             pre_reorder_num_neighbors=depth)[0] for qq in q]).astype(np.int64)

        def ms(q, leaves, depth, searcher=searcher):
            ts = []
            for _ in range(args.repeats):
                for qq in q:
                    t1 = time.perf_counter()
                    searcher.search(qq, final_num_neighbors=K, leaves_to_search=leaves, pre_reorder_num_neighbors=depth)
                    ts.append(time.perf_counter() - t1)
            return _median_ms(ts)

        best, _ = tune_scann(lambda le, de, run=run: core.recall_at_k(run(qtune, le, de), gt_tune, K),
                             lambda le, de, ms=ms: ms(qtune, le, de), (25, 50, 100, 200), depths, args.recall_target)
        if best is None:
            rows.append({"name": name, "note": "does not reach the recall target on the tuning queries"})
            continue
        _, leaves, depth = best
        rows.append({"name": name, "leaves": leaves, "reorder": depth, "ms_per_query": ms(qeval, leaves, depth),
                     "recall_at_16": round(core.recall_at_k(run(qeval, leaves, depth), gt_eval, K), 4),
                     "build_s": round(build_s, 1)})
        print(rows[-1], flush=True)
        del searcher
    return rows


def uncentred_pca(xt: np.ndarray, d_out: int) -> faiss.LinearTransform:
    """A (d_out, D) projection on the top eigenvectors of ``xt.T @ xt / n`` (no mean subtracted, no bias),
    so that inner products are kept up to the dropped energy.  xt: (n, D) float32."""
    w, v = np.linalg.eigh(xt.T.astype(np.float64) @ xt / len(xt))
    lt = faiss.LinearTransform(xt.shape[1], d_out, False)
    faiss.copy_array_to_vector(np.ascontiguousarray(v[:, ::-1][:, :d_out].T, dtype=np.float32).ravel(), lt.A)
    lt.is_trained = True
    return lt


def rabitq_rows(x, refine, qtune, gt_tune, qeval, gt_eval, nlist: int, args) -> list[dict]:
    """The RaBitQ rows (module docstring item 6)."""
    rows, rng = [], np.random.default_rng(args.seed)
    xt = x[np.sort(rng.choice(len(x), min(len(x), 50 * nlist), replace=False))]
    for d_out in (512, 448):
        inner = faiss.index_factory(d_out, f"IVF{nlist},RaBitQfs", faiss.METRIC_INNER_PRODUCT)
        lt = uncentred_pca(xt, d_out) if d_out < x.shape[1] else None
        idx = faiss.IndexPreTransform(lt, inner) if lt is not None else inner
        t0 = time.perf_counter()
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        idx.train(xt)
        for s in range(0, len(x), 65_536):
            idx.add(x[s:s + 65_536])
        faiss.omp_set_num_threads(1)
        build_s = time.perf_counter() - t0
        full = faiss.IndexRefine(idx, refine)

        def search_fn(qq, k, params, idx=idx, full=full):
            core.set_params(idx, params)
            full.k_factor = float(params["k_factor"])
            return full.search(core.normalize(qq, dim=x.shape[1]), k)[1]

        params, _ = core.tune("ivfpq-refine", idx, search_fn, qtune, gt_tune, k=K,
                              recall_target=args.recall_target, nlist=nlist)
        ts = []
        for _ in range(args.repeats):
            for i in range(len(qeval)):
                t1 = time.perf_counter()
                search_fn(qeval[i:i + 1], K, params)
                ts.append(time.perf_counter() - t1)
        name = f"faiss IVF{nlist},RaBitQfs (1 bit/dim) over " + ("512 dims" if lt is None else f"uncentred PCA{d_out}")
        rows.append({"name": name + " + float16 re-rank", "params": params, "ms_per_query": _median_ms(ts),
                     "recall_at_16": round(core.recall_at_k(search_fn(qeval, K, params), gt_eval, K), 4),
                     "bytes_per_vector": round(len(faiss.serialize_index(idx)) / len(x), 1), "build_s": round(build_s, 1)})
        print(rows[-1], flush=True)
        del full, idx, inner
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=400, help="half tune, half held out")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-bytes-per-vector", type=float, default=80.0)
    ap.add_argument("--recall-target", type=float, default=0.95)
    ap.add_argument("--index", default="", help="cache the built index at this path (reused when it exists)")
    ap.add_argument("--scann", action="store_true", help="add the ScaNN rows (pip install scann)")
    ap.add_argument("--rabitq", action="store_true", help="add the faiss RaBitQ rows (module docstring, item 6)")
    args = ap.parse_args(argv)
    if args.n < sizing.PQ_MIN_TRAIN or args.queries < 4:  # below it the plan has no OPQ stage to time
        ap.error(f"need --n >= {sizing.PQ_MIN_TRAIN} (an OPQ plan) and --queries >= 4")
    if args.repeats < 1 or args.budget_bytes_per_vector <= 0 or not 0 < args.recall_target <= 1:
        ap.error("need --repeats >= 1, --budget-bytes-per-vector > 0 and 0 < --recall-target <= 1")
    faiss.omp_set_num_threads(1)
    import torch

    torch.set_num_threads(1)
    mix = ClusteredMixture(512, seed=args.seed)
    x = mix.sample(args.n, seed=args.seed + 1)
    q = mix.sample(args.queries, seed=args.seed + 2)
    rows = np.arange(args.n, dtype=np.int64)
    gt = core.exact_topk(q, x, rows, K)[1]
    half = args.queries // 2
    qtune, qeval, gt_tune, gt_eval = q[:half], q[half:], gt[:half], gt[half:]
    plan = sizing.plan_index(args.n, 512, "ivfpq-refine", memory_budget_bytes=int(args.budget_bytes_per_vector * args.n))
    with core.Timer() as tb:
        idx = build(x, plan, args)
    ivf = faiss.extract_index_ivf(idx)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "refine.faiss")
        write_refine(path, x)
        refine, vectors = open_refine(path)
        prefault_refine(refine, path=path)
        parts = Parts(idx, refine, vectors)

        def search_fn(qq, k, params, parts=parts):
            parts.set(params)
            return parts.product(qq, k)

        params, tune_recall = core.tune("ivfpq-refine", idx, search_fn, qtune, gt_tune, k=K,
                                        recall_target=args.recall_target, nlist=ivf.nlist)
        parts.set(params)
        recall = core.recall_at_k(parts.product(qeval), gt_eval, K)
        ours = time_ours(parts, params, qeval, args.repeats)
        fused_recall = core.recall_at_k(ours.pop("fused_ids"), gt_eval, K)
        b_per_v = len(faiss.serialize_index(idx)) / args.n
        result = {"n": args.n, "factory": plan.factory,
                  "bytes_per_vector": round(b_per_v, 1), "params": params, "recall_at_16": round(recall, 4),
                  "fused_recall_at_16": round(fused_recall, 4), "build_s": round(tb.s, 1), **ours}
        print(json.dumps(result), flush=True)
        if args.rabitq:
            result["rabitq"] = rabitq_rows(x, refine, qtune, gt_tune, qeval, gt_eval, ivf.nlist, args)
        del parts, refine, vectors
    if args.scann:
        result["scann"] = scann_rows(x, qtune, gt_tune, qeval, gt_eval, args)
    result["cpus"] = os.cpu_count()
    result["load_avg_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
