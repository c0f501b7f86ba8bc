"""Build (or nightly-update) the patch index: ``python -m jobs.build_index --data <root> --out <index root>``.

Thin wrapper: parse arguments, connect to Ray, call :func:`mining.index.build_index` (or
:func:`mining.index.update_index` with ``--update``), print a summary; the last line is the
manifest as JSON.

Examples::

    python -m jobs.build_index --data /tmp/gtsdb_mined --out /tmp/gtsdb_index            # auto kind
    python -m jobs.build_index --data s3://bucket/mined --out /srv/index --kind ivfpq-refine \\
        --memory-budget 8GiB --recall-target 0.95 --address ray://head:10001
    python -m jobs.build_index --data ... --out ... --update     # nightly: add new shards / retrain
    python -m jobs.build_index --data s3://bucket/mined --out s3://bucket/index --shards 8   # sharded, streaming

Every new version also gets ``uniqueness.parquet``: the kNN uniqueness of every patch
(:mod:`mining.index.uniqueness`, after FiftyOne Brain's ``compute_uniqueness``; N searches of 4
neighbours on the finished index); ``--no-uniqueness`` skips it.
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jobs.build_index",
                                 description="Build the FAISS patch index from the committed shards of a mining store.")
    ap.add_argument("--data", required=True, help="mining store root (local path or s3://...)")
    ap.add_argument("--out", required=True, help="index root: versions/<v>/ + CURRENT (local; s3:// with --shards/--streaming)")
    ap.add_argument("--kind", default=None, choices=["auto", "flat", "hnsw", "ivfpq", "ivfpq-refine", "sq8"])
    ap.add_argument("--memory-budget", default=None, help="resident memory budget of the index, e.g. 8GiB, 500MB")
    ap.add_argument("--recall-target", type=float, default=0.95, help="recall@16 vs exact search to tune for")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", type=int, default=None, help="parallel add parts (default: Ray cluster CPUs)")
    ap.add_argument("--merge", default="auto", choices=["auto", "memory", "ondisk"])
    ap.add_argument("--update", action="store_true", help="nightly: add new shards with frozen codebooks (or retrain)")
    ap.add_argument("--address", default=None, help="Ray address (ray://host:10001 or host:6379); default: RAY_ADDRESS, else a new local Ray on 127.0.0.1")
    ap.add_argument("--no-ray", action="store_true", help="run the add parts in this process")
    ap.add_argument("--no-uniqueness", action="store_true",
                    help="do not compute the kNN uniqueness of every patch (uniqueness.parquet; N index searches)")
    ap.add_argument("--shards", type=int, default=None,
                    help="build a sharded version of S date-range shards with the streaming build (ivfpq-refine; "
                         "the --out root may then be s3://)")
    ap.add_argument("--streaming", action="store_true",
                    help="streaming build (no driver gather) with the default shard count, ceil(N / 4M)")
    ap.add_argument("--part-vectors", type=int, default=None,
                    help="streaming build: vectors per encode task (its memory bound), default 250000")
    ap.add_argument("--no-compact", action="store_true", help="--update of a sharded version: skip the compaction policy")
    args = ap.parse_args(argv)
    bad = _check(args)
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2

    from mining.index import build_index, parse_bytes, update_index

    use_ray = False
    if not args.no_ray:
        from mining.connect import connect

        connect(args.address)
        use_ray = True
    budget = parse_bytes(args.memory_budget)
    if args.update:
        kw = {"kind": args.kind} if args.kind else {}  # else: the kind the current version was requested with
        if budget is not None:
            kw["memory_budget_bytes"] = budget
        if args.shards or args.streaming:  # no version yet: build a sharded one
            kw.update(shards=args.shards, streaming=True, part_max_vectors=args.part_vectors)
        m = update_index(args.data, args.out, use_ray=use_ray, n_parts=args.parts, seed=args.seed,
                         recall_target=args.recall_target, uniqueness=not args.no_uniqueness,
                         compact=not args.no_compact, **kw)
    else:
        m = build_index(args.data, args.out, kind=args.kind or "auto", memory_budget_bytes=budget,
                        recall_target=args.recall_target, seed=args.seed, use_ray=use_ray,
                        n_parts=args.parts, merge=args.merge, uniqueness=not args.no_uniqueness,
                        shards=args.shards, streaming=args.streaming, part_max_vectors=args.part_vectors)
    if m.get("random_init"):
        print("WARNING: this index holds embeddings from RANDOMLY INITIALISED CLIP weights: results are not semantic",
              file=sys.stderr)
    print(f"index version {m['version']} ({'new' if m.get('changed') else 'unchanged'}): kind={m['kind']} "
          f"factory={m['factory']} n={m['n']} dim={m['dim']} params={m['params']} "
          f"recall@{m.get('recall_k', 16)}={m['recall_at_publish']} {m['bytes_per_vector']} B/vector "
          f"build {m['build_s']} s retrained={m.get('retrained')}")
    summary = {k: m.get(k) for k in ("version", "changed", "kind", "factory", "n", "dim", "params", "recall_at_publish",
                                     "bytes_per_vector", "build_s", "retrained", "random_init", "models", "uniqueness")}
    if m.get("layout") == "sharded":
        summary.update(layout="sharded", shards=len(m["shards"]), build_stats=m.get("build_stats"))
    print(json.dumps(summary, sort_keys=True))
    return 0


def _check(args) -> str | None:
    """One-line reason why these settings cannot work, or None."""
    sharded = args.shards is not None or args.streaming
    if args.shards is not None and args.shards < 1:
        return f"--shards must be >= 1, got {args.shards}"
    if args.part_vectors is not None and args.part_vectors < 1:
        return f"--part-vectors must be >= 1, got {args.part_vectors}"
    if args.part_vectors is not None and not sharded:
        return "--part-vectors needs --shards or --streaming"
    if sharded and args.kind not in (None, "auto", "ivfpq-refine"):
        return f"--shards/--streaming build ivfpq-refine indexes only, not --kind {args.kind}"
    if sharded and args.merge == "ondisk":
        return "--merge ondisk is for the single-index build; --shards/--streaming merge parts per shard"
    if "://" in args.out and not args.out.startswith("file://") and not sharded and not args.update:
        return f"an s3:// index root ({args.out}) needs --shards or --streaming (single-index versions are local)"
    return None


if __name__ == "__main__":
    sys.exit(main())
