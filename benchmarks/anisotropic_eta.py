"""Choose the score-aware encoding weight eta (mining.index.anisotropic) by k-fold cross-validation.

One set of codebooks (the product's plan for N: OPQ + IVF + 4-bit fast-scan PQ, trained as
mining.index.core.train_index does) encodes the same database once per candidate eta; the queries
are split into k folds.  For each fold, eta is chosen on the other k-1 folds (highest recall@16
after the exact re-rank of the IVF's top R candidates at nprobe P) and scored on the held-out fold.
Reported: per-eta recall mean and spread over folds, the eta each fold chose, and its held-out
recall.  The check on data the choice never saw: the same chosen eta on vectors and queries of a
second mixture (another seed: other cluster centres, bases and sizes), trained and encoded afresh.

    python benchmarks/anisotropic_eta.py --n 200000 --folds 5

Ends with one JSON line.
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

K = 16


def recall_after_rerank(index, x, q, gt, cand: int) -> np.ndarray:
    """(nq,) recall@16 of the exact re-rank of each query's top ``cand`` IVF candidates (labels = rows of x)."""
    _, rows = index.search(q, cand)
    out = np.empty(len(q))
    for i in range(len(q)):
        r = rows[i][rows[i] >= 0]
        top = r[np.argsort(-(x[r] @ q[i]))[:K]]
        out[i] = len(np.intersect1d(top, gt[i])) / K
    return out


def per_eta(mix_seed: int, args, etas):
    mix = ClusteredMixture(args.dim, seed=mix_seed)
    x = mix.sample(args.n, seed=1)
    q = mix.sample(args.queries, seed=2)
    rows = np.arange(args.n, dtype=np.int64)
    gt = core.exact_topk(q, x, rows, K)[1]
    plan = sizing.plan_index(args.n, args.dim, "ivfpq-refine", memory_budget_bytes=80 * args.n)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    trained = core.train_index(plan, x[np.sort(rng.choice(args.n, plan.n_train, replace=False))], seed=0)
    print(f"# mixture {mix_seed}: {plan.factory}, trained in {time.perf_counter() - t0:.0f} s", flush=True)
    res = {}
    for eta in etas:
        idx = faiss.clone_index(trained)
        t0 = time.perf_counter()
        core.add_vectors(idx, x, rows, eta=eta)
        faiss.extract_index_ivf(idx).nprobe = args.nprobe
        res[eta] = recall_after_rerank(idx, x, q, gt, args.candidates)
        print(f"#   eta {eta:g}: add {time.perf_counter() - t0:.1f} s, recall@16 after re-rank of "
              f"{args.candidates} = {res[eta].mean():.4f}", flush=True)
        del idx
    return plan, res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1_000)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--etas", default="1,2,4,8,16")
    ap.add_argument("--candidates", type=int, default=512, help="R: IVF candidates re-ranked exactly")
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    etas = [float(e) for e in args.etas.split(",")]
    plan, res = per_eta(0, args, etas)
    folds = np.array_split(np.random.default_rng(0).permutation(args.queries), args.folds)
    chosen, held = [], []
    for f in range(args.folds):
        train_q = np.concatenate([folds[g] for g in range(args.folds) if g != f])
        best = max(etas, key=lambda e: res[e][train_q].mean())
        chosen.append(best)
        held.append(float(res[best][folds[f]].mean()))
    table = {f"{e:g}": {"mean": round(float(np.mean([res[e][fo].mean() for fo in folds])), 4),
                        "std_over_folds": round(float(np.std([res[e][fo].mean() for fo in folds])), 4)} for e in etas}
    for e, v in table.items():
        print(f"eta {e}: recall@16 after re-rank of {args.candidates}: {v['mean']:.4f} +- {v['std_over_folds']:.4f} over folds")
    print(f"chosen per fold: {chosen}; held-out recall {np.mean(held):.4f} +- {np.std(held):.4f}")
    eta_star = max(set(chosen), key=chosen.count)
    _, unseen = per_eta(7, args, sorted({1.0, eta_star}))
    print(f"unseen mixture: eta 1 {unseen[1.0].mean():.4f}, eta {eta_star:g} {unseen[eta_star].mean():.4f}")
    print(json.dumps({"n": args.n, "factory": plan.factory, "candidates": args.candidates, "nprobe": args.nprobe,
                      "per_eta": table, "chosen_per_fold": chosen, "heldout_recall_mean": round(float(np.mean(held)), 4),
                      "heldout_recall_std": round(float(np.std(held)), 4), "eta": eta_star,
                      "unseen_mixture": {"eta_1": round(float(unseen[1.0].mean()), 4),
                                         f"eta_{eta_star:g}": round(float(unseen[eta_star].mean()), 4)}}))


if __name__ == "__main__":
    main()
