"""Start (or stop) the named, detached query actor ``rare-object-query`` in namespace ``mining``.

    python -m jobs.serve_query --index <index root> [--address <ray address>]   # start / get
    python -m jobs.serve_query --reload [--address ...]                          # hot-swap to CURRENT
    python -m jobs.serve_query --stop [--address ...]                            # remove it
    ray job submit --working-dir . -- python -m jobs.serve_query --index s3://bucket/index

The actor is created with ``get_if_exists=True`` (a second start returns the running one),
``lifetime="detached"`` (it outlives this job) and ``max_restarts=-1`` (Ray restarts it when it
dies; the restart reloads the CURRENT index version). It asks for one GPU when the cluster has
GPUs (``--num-gpus`` overrides) and falls back to CPU when torch sees none. CLIP defaults to the
model recorded in the index manifest. Prints the actor's ``health()`` as one JSON line.

A sharded index version is served by shard actors that the query actor (the router) starts and
owns: one per ``--shards-per-actor`` shards (default 1), ``--shard-cpus`` CPUs each, shards of an
``s3://`` root fetched into ``--cache-dir``; a query that a shard actor cannot answer within
``--shard-timeout`` seconds fails with one line (see ``mining.query.shards``). Bad settings exit 2
with one line on stderr.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.serve_query", description=__doc__.split("\n\n")[0])
    p.add_argument("--index", help="index root (local or s3://); required to start")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS / the job's cluster / local)")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--stop", action="store_true", help="kill the actor (no restart)")
    act.add_argument("--reload", action="store_true", help="ask the running actor to switch to the newest version")
    act.add_argument("--health", action="store_true", help="print the running actor's health")
    p.add_argument("--clip-model", help="CLIP model (default: the one recorded in the index manifest)")
    p.add_argument("--clip-pretrained", help="open_clip tag or checkpoint path (default: from the manifest)")
    p.add_argument("--clip-random-init", action="store_true", help="random CLIP weights (smoke runs only)")
    p.add_argument("--allow-prefix", action="append", default=[],
                   help="URI prefix image queries may read (repeatable; default none: bytes only)")
    p.add_argument("--k-cap", type=int, default=1000, help="largest k per query")
    p.add_argument("--overlap", type=float, default=0.0,
                   help="dedup threshold: intersection / area of the larger box (0 = any overlap, thesis §3.3.1)")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs for the actor (default 1 if the cluster has GPUs)")
    p.add_argument("--num-cpus", type=float, default=1, help="CPUs reserved for the actor (default 1)")
    p.add_argument("--max-concurrency", type=int, default=8, help="concurrent queries in the actor")
    p.add_argument("--faiss-threads", type=int, default=1,
                   help="OpenMP threads in the actor (FAISS and the torch CPU towers share them; default 1)")
    p.add_argument("--shards-per-actor", type=int, default=1,
                   help="sharded index versions: shards served by each shard actor (default 1: one actor per shard)")
    p.add_argument("--shard-cpus", type=float, default=1.0, help="CPUs reserved per shard actor (default 1)")
    p.add_argument("--cache-dir", default=None,
                   help="local cache for the shards of an s3:// index root (default $MINING_INDEX_CACHE or "
                        "/tmp/mining-index-cache, per root)")
    p.add_argument("--shard-timeout", type=float, default=30.0,
                   help="seconds a query waits for every shard actor before failing with one line (default 30)")
    p.add_argument("--no-prefault", action="store_true",
                   help="shard actors do not read their refine files into the page cache before serving "
                        "(default: they do, when the files fit in half the node's available memory)")
    p.add_argument("--name", default=None, help="actor name (default rare-object-query)")
    p.add_argument("--namespace", default=None, help="namespace (default mining)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mining.query_cli import serve_query

    action = "stop" if args.stop else "reload" if args.reload else "health" if args.health else "start"
    return serve_query(args.address, action=action, index=args.index, name=args.name, namespace=args.namespace,
                       clip_model=args.clip_model, clip_pretrained=args.clip_pretrained,
                       clip_random_init=args.clip_random_init, allowed_prefixes=args.allow_prefix, k_cap=args.k_cap,
                       dedup_overlap=args.overlap, num_gpus=args.num_gpus, num_cpus=args.num_cpus,
                       max_concurrency=args.max_concurrency, faiss_threads=args.faiss_threads,
                       shards_per_actor=args.shards_per_actor, shard_cpus=args.shard_cpus, cache_dir=args.cache_dir,
                       shard_timeout_s=args.shard_timeout, prefault=not args.no_prefault)


if __name__ == "__main__":
    sys.exit(main())
