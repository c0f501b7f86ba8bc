"""Convert a store root from the per-shard JSON ledger layout to the Delta Lake store (issue 15).

    python -m jobs.migrate_store --root s3://fleet/mined [--keep-old]

Every ledger record's parts are committed to the Delta tables exactly once (rerun after an
interruption: committed shards are no-ops); then the old part files are deleted and ``ledger/`` is
moved to ``ledger-migrated/`` (``--keep-old`` keeps both). Exit codes: 0 done; 2 bad arguments or
nothing to migrate.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.migrate_store", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="dataset root (local directory or s3://bucket/prefix)")
    p.add_argument("--keep-old", action="store_true", help="keep the old part files and ledger/")
    a = p.parse_args(argv)
    from mining.migrate import migrate_store

    try:
        migrate_store(a.root, keep_old=a.keep_old)
    except (FileNotFoundError, ValueError) as e:
        print(f"migrate_store: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
