"""Score-aware PQ encoding (mining.index.anisotropic.encode) on a torch device vs the CPU (issue 18).

Usage (the GPU check; also a smoke run here with --device cpu)::

    python benchmarks/encode_device.py --device cuda --n 1000000      # 1M x 512 residuals, PQ128x4
    python benchmarks/encode_device.py --device cpu --n 65536 --cpu-n 65536

The codebooks are faiss' own: a ``ProductQuantizer(D, D/4, 4)`` trained on a sample of the same
ClusteredMixture vectors (the encoder's input is the vector itself here, i.e. the non-residual case;
the cost is the same).  Reported: vectors/s on the device and on the CPU (the CPU on ``--cpu-n``
vectors, extrapolated per vector), the fraction of codes on which both agree (float rounding decides
near-ties differently; anything far below 0.99 is a bug) and the score-aware loss of each.
FLOPs per vector: the two (M, K, dsub) tables, 2 x 2 x D x K = 32,768 at D = 512, K = 16, plus
``sweeps`` x M x K x 5 for the coordinate descent.  Last line: JSON.
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

from mining.index import anisotropic  # noqa: E402
from mining.index.synthetic import ClusteredMixture  # noqa: E402


def loss(x, codes, cb, eta):
    m = cb.shape[0]
    rec = cb[np.arange(m)[None, :], codes.astype(np.int64)].reshape(len(x), -1)
    r = x - rec
    return float(((r * r).sum(1) + (eta - 1) * (r * x).sum(1) ** 2).mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--cpu-n", type=int, default=65_536, help="vectors encoded on the CPU for the comparison")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--eta", type=float, default=anisotropic.DEFAULT_ETA)
    args = ap.parse_args(argv)
    mix = ClusteredMixture(args.dim, seed=0)
    x = mix.sample(args.n, seed=1)
    pq = faiss.ProductQuantizer(args.dim, args.dim // 4, 4)
    pq.train(x[:min(len(x), 65_536)])
    cb = faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)
    anisotropic.encode(x[:1024], x[:1024], cb, eta=args.eta, device=args.device)  # warm-up (CUDA context, kernels)
    t0 = time.perf_counter()
    dev = anisotropic.encode(x, x, cb, eta=args.eta, device=args.device)
    if args.device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    t_dev = time.perf_counter() - t0
    m = min(args.cpu_n, args.n)
    t0 = time.perf_counter()
    cpu = anisotropic.encode(x[:m], x[:m], cb, eta=args.eta, device="cpu")
    t_cpu = time.perf_counter() - t0
    agree = float((dev[:m] == cpu).mean())
    out = {"device": args.device, "n": args.n, "dim": args.dim, "M": int(pq.M), "eta": args.eta,
           "vectors_per_s_device": round(args.n / t_dev), "vectors_per_s_cpu": round(m / t_cpu),
           "speedup": round((args.n / t_dev) / (m / t_cpu), 1), "codes_agree": round(agree, 5),
           "loss_device": round(loss(x[:m], dev[:m], cb, args.eta), 6), "loss_cpu": round(loss(x[:m], cpu, cb, args.eta), 6)}
    print(f"encode {args.n} x {args.dim} on {args.device}: {out['vectors_per_s_device']:,} vectors/s; "
          f"CPU {out['vectors_per_s_cpu']:,} vectors/s ({out['speedup']}x); codes agree {agree:.4%}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
