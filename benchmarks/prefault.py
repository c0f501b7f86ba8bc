"""First queries after a (re)load, with and without prefaulting the refine file (issue 18, shard actors).

    python benchmarks/prefault.py --shard /tmp/idxbench-5m/index/shards/<id> --queries 200 --repeats 3

A shard actor memory-maps its shard's refine file (float16 rows, 2 * D bytes per vector); a query
re-ranks k * k_factor of those rows. Right after a nightly reload the file is not in the page cache,
so every re-ranked row that misses costs a disk read. :func:`mining.index.search.prefault_refine`
reads the file in order before the actor reports ready. This script measures both, side by side
and alternating, ``--repeats`` times:

- ``cold``: evict the refine file from the page cache (``posix_fadvise(DONTNEED)``, no root needed;
  ``evicted`` in the JSON says whether the kernel dropped the pages), open the shard, time the first
  ``--queries`` batch-1 searches;
- ``prefault``: evict, open, prefault (timed: ``prefault_s``), time the first ``--queries`` searches.

Queries: synthetic from :class:`mining.index.synthetic.ClusteredMixture` (``--seed``), 512-d like the
shard (``--dim`` otherwise). One OpenMP thread. Medians over repeats of each run's p50 / p99 / mean.
The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

K = 16


def evict(path: str) -> bool:
    """Ask the kernel to drop ``path``'s clean pages from the page cache. Returns True when
    ``posix_fadvise`` succeeded (the cold runs' first-query times show whether it took effect)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def first_queries(shard_dir: str, queries: np.ndarray, prefault: bool) -> dict:
    from mining.index.layout import _open_shard_dir
    ok = evict(os.path.join(shard_dir, "refine.faiss"))
    t0 = time.perf_counter()
    idx = _open_shard_dir(shard_dir)
    open_s = time.perf_counter() - t0
    pf = idx.prefault() if prefault else {"seconds": 0.0, "bytes": 0}
    ts = []
    for q in queries:
        t = time.perf_counter()
        idx.search(q[None], K)
        ts.append((time.perf_counter() - t) * 1e3)
    ts = np.asarray(ts)
    return {"evicted": ok, "open_s": round(open_s, 3), "prefault_s": pf["seconds"], "prefault_bytes": pf["bytes"],
            "p50_ms": float(np.percentile(ts, 50)), "p99_ms": float(np.percentile(ts, 99)),
            "mean_ms": float(ts.mean()), "first_ms": float(ts[0]), "params": idx.params}


def main(argv=None) -> int:
    import faiss

    from mining.index import core
    from mining.index.synthetic import ClusteredMixture

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shard", required=True, help="a local shard directory (index.faiss, refine.faiss, ...)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args(argv)
    if not os.path.isfile(os.path.join(args.shard, "refine.faiss")):
        print(f"error: {args.shard} has no refine.faiss", file=sys.stderr)
        return 2
    faiss.omp_set_num_threads(1)
    mix = ClusteredMixture(args.dim, seed=0)
    runs = {"cold": [], "prefault": []}
    for r in range(args.repeats):
        for mode in ("cold", "prefault"):
            q = core.normalize(mix.sample(args.queries, seed=args.seed + 100 * r + (mode == "prefault")))
            res = first_queries(args.shard, q, mode == "prefault")
            runs[mode].append(res)
            print(f"repeat {r} {mode:8s}: p50 {res['p50_ms']:.3f} ms  p99 {res['p99_ms']:.3f} ms  mean "
                  f"{res['mean_ms']:.3f} ms  first {res['first_ms']:.1f} ms  prefault {res['prefault_s']} s "
                  f"({res['prefault_bytes'] / 2**20:.0f} MiB)", flush=True)
    med = {m: {k: round(float(np.median([x[k] for x in v])), 3) for k in ("p50_ms", "p99_ms", "mean_ms", "first_ms",
                                                                          "prefault_s", "open_s")}
           for m, v in runs.items()}
    out = {"shard": args.shard, "queries": args.queries, "repeats": args.repeats,
           "refine_bytes": os.path.getsize(os.path.join(args.shard, "refine.faiss")),
           "params": runs["cold"][0]["params"], "evicted": all(x["evicted"] for v in runs.values() for x in v),
           "cold": med["cold"], "prefault": med["prefault"],
           "p50_ratio_cold_over_prefault": round(med["cold"]["p50_ms"] / med["prefault"]["p50_ms"], 2),
           "mean_ratio_cold_over_prefault": round(med["cold"]["mean_ms"] / med["prefault"]["mean_ms"], 2),
           "load_avg": round(os.getloadavg()[0], 1)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
