"""Relevance-feedback benchmark: a simulated labeling campaign on data with known ground truth.

Usage::

    python benchmarks/feedback.py                 # n = 100,000 (about 1 min on 2 cores)
    python benchmarks/feedback.py --n 1000000     # the fleet scale (about 4 GB of RAM)
    python benchmarks/feedback.py --write         # also the RESULTS.md block and docs/feedback_precision.png

Data: the index benchmark's synthetic clustered unit vectors (``mining.index.synthetic.ClusteredMixture``,
dim 512, 1000 anisotropic clusters of Zipf sizes, a shared common direction), i.e. what
``benchmarks/index.py`` measures recall on.

**The rare class** (pretrained CLIP is not available here, so semantics are planted): ``--rare`` vectors
(default 1000: 1 % of 100k, 0.1 % of 1M) are drawn uniformly from the database -- so they lie in every
cluster, in proportion to its size -- and shifted along ONE random unit direction u ("the object"),
``x <- normalise(x + alpha * u)`` (``--alpha`` 0.15). The concept is linear (a half-space along u) and
cuts across the clusters: a rare vector's nearest neighbours are mostly its own cluster's common
vectors, so one example is not enough (single-example precision is reported, and must stay < 0.9).

**The campaign** (``--campaigns`` independent ones, each seeded with one random rare vector, averaged):

- round 0: the labeler marks the top 50 hits of the single-example query (shared by all methods);
- rounds 1..5: each method scores with everything labeled so far and shows its top 50 hits among the
  vectors not yet labeled (campaign exclusion); the labeler marks them (ground truth), precision@50 is
  recorded, the labels are added.

Methods (``mining.probe``): ``single`` (the seed example, next pages), ``mean`` (thesis Eq. 4.1),
``mean_neg`` (mean - 0.5 * mean of negatives), ``probe`` (logistic regression on the labels). Every
method re-ranks an ANN candidate set exactly as ``jobs.query --campaign`` does: the union of the top
``--candidates`` of each of the method's search directions (a FAISS flat inner-product index here, so
candidate recall is not the variable being measured).

The last printed line is JSON: ``{"precision_at_50": {method: [round 1..5]}, "single_example_precision": ...}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mining.probe import METHODS, search_directions  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "RESULTS.md")
PLOT = os.path.join(os.path.dirname(HERE), "docs", "feedback_precision.png")
BEGIN, END = "<!-- feedback:begin -->", "<!-- feedback:end -->"


def make_data(n: int, rare: int, alpha: float, seed: int, dim: int = 512):
    """(X (n, dim) float32 unit rows, y (n,) bool rare mask, u (dim,) concept direction)."""
    from mining.index.synthetic import ClusteredMixture

    if not 0 < rare < n:
        raise ValueError(f"--rare must be in 1..n-1, got {rare} for n={n}")
    X = ClusteredMixture(dim, seed=seed).sample(n, seed=seed + 1)
    rng = np.random.default_rng(seed + 2)
    u = rng.standard_normal(dim).astype(np.float32)
    u /= np.linalg.norm(u)
    idx = rng.choice(n, rare, replace=False)
    X[idx] += alpha * u
    X[idx] /= np.linalg.norm(X[idx], axis=1, keepdims=True)
    y = np.zeros(n, bool)
    y[idx] = True
    return X, y, u


def top_unlabeled(index, X, Q, scorer, labeled: np.ndarray, k: int, candidates: int) -> np.ndarray:
    """Union of the ANN top-``candidates`` of every row of Q, minus labeled, re-ranked by scorer -> top k ids."""
    fetch = candidates
    while True:
        _, I = index.search(np.ascontiguousarray(Q, np.float32), min(fetch, len(X)))
        ids = np.unique(I[I >= 0])
        ids = ids[~labeled[ids]]
        if len(ids) >= k or fetch >= len(X):
            break
        fetch *= 4
    s = scorer(X[ids])
    order = np.lexsort((ids, -s))
    return ids[order[:k]]


def run_campaign(index, X, y, seed_id: int, *, rounds: int, k: int, candidates: int, C: float,
                 background: int, rng) -> dict:
    bg = X[rng.choice(len(X), background, replace=False)] if background else None
    labeled = np.zeros(len(X), bool)
    labeled[seed_id] = True
    q0 = X[seed_id][None]
    single_scorer = lambda Z: Z @ X[seed_id]  # noqa: E731
    hits0 = top_unlabeled(index, X, q0, single_scorer, labeled, k, candidates)
    p0 = float(y[hits0].mean())
    labeled[hits0] = True
    out = {"seed_precision": p0}
    for m in METHODS:
        lab = labeled.copy()
        pos = [seed_id] + [int(i) for i in hits0 if y[i]]
        neg = [int(i) for i in hits0 if not y[i]]
        precs, fit_s = [], 0.0
        for _ in range(rounds):
            t0 = time.perf_counter()
            Q, scorer = search_directions(m, X[pos], X[neg] if neg else None, C=C, background=bg)
            fit_s += time.perf_counter() - t0
            hits = top_unlabeled(index, X, Q, scorer, lab, k, candidates)
            precs.append(float(y[hits].mean()))
            lab[hits] = True
            pos += [int(i) for i in hits if y[i]]
            neg += [int(i) for i in hits if not y[i]]
        out[m] = precs
        out[m + "_fit_s"] = fit_s
    return out


def plot(res: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for m in METHODS:
        v = res["precision_at_50"][m]
        ax.plot(range(1, len(v) + 1), v, marker="o", label=m)
    ax.axhline(res["single_example_precision"], color="grey", ls=":", label="seed (1 example)")
    ax.axhline(0.9, color="k", lw=0.6, ls="--")
    ax.set_xlabel("feedback round")
    ax.set_ylabel("precision@50")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(range(1, len(res["precision_at_50"]["probe"]) + 1))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_results(res: dict, cmd: str) -> None:
    rounds = len(res["precision_at_50"]["probe"])
    lines = [BEGIN, "", f"Relevance feedback (simulated campaign, `{cmd}`; {res['date']}; {res['data']}):", "",
             "| method | " + " | ".join(f"round {r}" for r in range(1, rounds + 1)) + " | fit s (5 rounds) |",
             "|---|" + "---|" * (rounds + 1)]
    for m in METHODS:
        v = res["precision_at_50"][m]
        lines.append(f"| {m} | " + " | ".join(f"{x:.3f}" for x in v) + f" | {res['fit_s'][m]:.2f} |")
    lines += ["", f"precision@50 averaged over {res['campaigns']} campaigns; seed round (single example): "
              f"{res['single_example_precision']:.3f}. Plot: `docs/feedback_precision.png`.", "", END]
    block = "\n".join(lines)
    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n"
    if BEGIN in text and END in text:
        a, rest = text.split(BEGIN, 1)
        text = a + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(RESULTS, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100_000, help="database vectors (default 100000)")
    p.add_argument("--rare", type=int, default=1000, help="rare-class vectors (default 1000)")
    p.add_argument("--alpha", type=float, default=0.15, help="strength of the planted concept direction")
    p.add_argument("--campaigns", type=int, default=5, help="independent campaigns (seed examples) to average")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--k", type=int, default=50, help="hits the labeler marks per round")
    p.add_argument("--candidates", type=int, default=2000, help="ANN candidates per search direction")
    p.add_argument("--C", type=float, default=10.0, help="probe: inverse L2 regularisation (scikit-learn C)")
    p.add_argument("--background", type=int, default=2000,
                   help="probe: random collection vectors used as weak negatives (0 = labeled negatives only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", action="store_true", help="write the RESULTS.md block and docs/feedback_precision.png")
    args = p.parse_args(argv)
    if args.n < 1000 or args.k < 1 or args.rounds < 1 or args.campaigns < 1 or args.candidates < args.k:
        print("error: need --n >= 1000, --k >= 1, --rounds >= 1, --campaigns >= 1, --candidates >= --k",
              file=sys.stderr)
        return 2
    import faiss

    t0 = time.perf_counter()
    try:
        X, y, _ = make_data(args.n, args.rare, args.alpha, args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    index = faiss.IndexFlatIP(X.shape[1])
    index.add(X)
    print(f"data: n={args.n} rare={args.rare} alpha={args.alpha} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    rng = np.random.default_rng(args.seed + 3)
    seeds = rng.choice(np.nonzero(y)[0], args.campaigns, replace=False)
    runs = []
    for c, s in enumerate(seeds):
        r = run_campaign(index, X, y, int(s), rounds=args.rounds, k=args.k, candidates=args.candidates, C=args.C,
                         background=args.background, rng=rng)
        runs.append(r)
        print(f"campaign {c + 1}/{len(seeds)}: seed {r['seed_precision']:.2f} " +
              " ".join(f"{m}={[round(x, 2) for x in r[m]]}" for m in METHODS), file=sys.stderr)
    res = {
        "precision_at_50": {m: [round(float(np.mean([r[m][i] for r in runs])), 4) for i in range(args.rounds)]
                            for m in METHODS},
        "single_example_precision": round(float(np.mean([r["seed_precision"] for r in runs])), 4),
        "per_campaign": {m: [r[m] for r in runs] for m in METHODS},
        "fit_s": {m: round(float(np.mean([r[m + "_fit_s"] for r in runs])), 3) for m in METHODS},
        "n": args.n, "rare": args.rare, "alpha": args.alpha, "campaigns": args.campaigns, "k": args.k,
        "candidates": args.candidates, "C": args.C, "background": args.background, "wall_s": round(time.perf_counter() - t0, 1),
        "date": time.strftime("%Y-%m-%d"),
        "data": f"ClusteredMixture(512, seed={args.seed}), n={args.n}, {args.rare} rare vectors shifted by "
                f"alpha={args.alpha} along one random direction",
    }
    pr = res["precision_at_50"]
    print(f"{'method':<9} " + " ".join(f"r{i + 1:<5}" for i in range(args.rounds)), file=sys.stderr)
    for m in METHODS:
        print(f"{m:<9} " + " ".join(f"{v:<6.3f}" for v in pr[m]), file=sys.stderr)
    if args.write:
        cmd = "python benchmarks/feedback.py" + (f" --n {args.n}" if args.n != 100_000 else "") + " --write"
        plot(res, PLOT, f"precision@50 per feedback round (n={args.n:,}, {args.rare} rare, "
                        f"{args.campaigns} campaigns)")
        write_results(res, cmd)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
