"""What the cluster has mined, what the index holds, and whether the query actor is up.

    python -m jobs.status --address ray://127.0.0.1:10001 --data s3://fleet/mined --index /mnt/fleet/index
    python -m jobs.status --address http://127.0.0.1:8265 --data ... --index ...   # as a Ray job
    python -m jobs.status --data ... --index ...     # inside a submitted job / on the head (RAY_ADDRESS)

Prints:

- the ledger's last nights (``--nights``, default 7), one line per ingest date: committed shards,
  failed shards, frames, patches, errors;
- the index: current version, number of vectors, kind, dimension, bytes of the version, number
  of versions kept;
- the query actor (``rare-object-query`` in namespace ``mining``): its ``health()``, or
  "not running" when there is no such actor.

The work stays inside the cluster: the ledger and the index manifest are read by a Ray task
(0 CPUs, so it also runs on a head with ``CPU: 0``) with the cluster's own S3 credentials; the
client only receives the small summary.  With an ``http://`` address the whole command runs as a
Ray job (``python -m jobs.status`` on the cluster, installed package) and its output is printed.

Exit codes: 0 printed; 2 cannot connect / bad arguments / the job failed.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m jobs.status", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=None,
                   help="ray://<head>:10001 (Ray client), http://<head>:8265 (run as a job), a GCS address, "
                        "or unset: $RAY_ADDRESS / the cluster this job runs in")
    p.add_argument("--data", default=None, help="dataset root whose ledger to summarise")
    p.add_argument("--index", default=None, help="index root")
    p.add_argument("--nights", type=int, default=7, help="how many ingest dates to show (default 7)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the cluster (default 120)")
    args = p.parse_args(argv)
    if args.nights < 0:
        p.error("--nights must be >= 0")

    from mining.status import print_status, run_status_job

    if args.address and args.address.startswith(("http://", "https://")):
        rest = list(argv)
        if "--address" in rest:
            i = rest.index("--address")
            del rest[i:i + 2]
        rest = [a for a in rest if not a.startswith("--address=")]
        try:
            return run_status_job(args.address, rest, args.timeout)
        except (ConnectionError, RuntimeError) as e:
            print(f"error: cannot run the status job at {args.address}: {e}", file=sys.stderr)
            return 2
    return print_status(args.address, args.data, args.index, args.nights, timeout_s=args.timeout, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
