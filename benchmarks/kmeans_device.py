"""Coarse k-means of an IVF index: faiss on the CPU vs :mod:`mining.index.kmeans` on a torch device (issue 18).

Usage (the GPU check; on this project's GPU machine faiss is the CPU wheel, torch has CUDA)::

    python benchmarks/kmeans_device.py --device cuda                      # 102,400 x 512 -> IVF2048, as at 1M-5M
    python benchmarks/kmeans_device.py --device cuda --nlist 16384 --n-train 1048576 --skip-faiss
    python benchmarks/kmeans_device.py --device cpu --n-train 20000 --nlist 256   # smoke run here

Both train the same empty ``IVF{nlist},PQ{D/4}x4fsr`` (inner product, spherical k-means, the project's
``new_index`` settings) on the same ClusteredMixture sample; reported: seconds of the coarse k-means
(``train_coarse`` vs faiss' whole ``train`` minus its PQ part, measured by training the PQ alone on the
torch-trained quantizer), the quantisation error of each trained index on held-out vectors, and list
imbalance.  FLOPs of one assignment pass: 2 x n_train x nlist x D.  Last line: JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import faiss
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mining.index import core, sizing  # noqa: E402
from mining.index.synthetic import ClusteredMixture  # noqa: E402


def imbalance(index, x) -> float:
    ivf = faiss.extract_index_ivf(index)
    _, a = ivf.quantizer.search(x, 1)
    h = np.bincount(a.ravel(), minlength=ivf.nlist).astype(np.float64)
    return float(ivf.nlist * (h ** 2).sum() / h.sum() ** 2)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="torch device of mining.index.kmeans (cuda | cpu)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--nlist", type=int, default=2048)
    ap.add_argument("--n-train", type=int, default=102_400)
    ap.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: faiss' default)")
    ap.add_argument("--skip-faiss", action="store_true", help="only the device k-means (a large nlist on few cores)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    mix = ClusteredMixture(args.dim, seed=args.seed)
    x = core.normalize(mix.sample(args.n_train, seed=args.seed + 1))
    held = core.normalize(mix.sample(4096, seed=args.seed + 2))
    m = max(1, args.dim // 4)
    plan = sizing.IndexPlan(kind="ivfpq-refine", dim=args.dim, n=args.n_train, factory=f"IVF{args.nlist},PQ{m}x4fsr",
                            n_train=args.n_train, nlist=args.nlist, pq_m=m, pq_nbits=4, refine="fp16", fast_scan=True)
    out = {"device": args.device, "dim": args.dim, "nlist": args.nlist, "n_train": args.n_train,
           "faiss_threads": faiss.omp_get_max_threads(), "flops_per_assignment_pass": 2 * args.n_train * args.nlist * args.dim}
    t0 = time.perf_counter()
    dev = core.train_index(plan, x, seed=args.seed, gpu=False, kmeans_device=args.device)
    out["device_train_s"] = round(time.perf_counter() - t0, 3)
    ivf = faiss.extract_index_ivf(dev)
    pq_only = core.new_index(plan)  # the PQ part alone, on the same centroids: what faiss adds on the CPU either way
    piv = faiss.extract_index_ivf(pq_only)
    piv.quantizer.add(ivf.quantizer.reconstruct_n(0, ivf.nlist))
    t0 = time.perf_counter()
    pq_only.train(x)
    out["pq_train_s"] = round(time.perf_counter() - t0, 3)
    out["device_kmeans_s"] = round(out["device_train_s"] - out["pq_train_s"], 3)
    out["device_quant_error"] = round(core.quantization_error(dev, held), 6)
    out["device_imbalance"] = round(imbalance(dev, x), 3)
    if not args.skip_faiss:
        t0 = time.perf_counter()
        ref = core.train_index(plan, x, seed=args.seed, gpu=False, kmeans_device=None) if core.kmeans_device() == "cpu" \
            else None
        if ref is None:  # this machine would pick a device itself: force faiss' CPU training
            ref = core.new_index(plan)
            ref.train(x)
        out["faiss_cpu_train_s"] = round(time.perf_counter() - t0, 3)
        out["faiss_cpu_kmeans_s"] = round(out["faiss_cpu_train_s"] - out["pq_train_s"], 3)
        out["faiss_cpu_quant_error"] = round(core.quantization_error(ref, held), 6)
        out["faiss_cpu_imbalance"] = round(imbalance(ref, x), 3)
        out["kmeans_speedup"] = round(out["faiss_cpu_kmeans_s"] / max(out["device_kmeans_s"], 1e-6), 2)
    for k_, v in out.items():
        print(f"{k_}: {v}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
