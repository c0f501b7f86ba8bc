"""Nightly incremental mining: new shards -> patches -> index -> query-actor reload.

    python -m jobs.nightly --input <prefix> --output <root> [--date YYYY-MM-DD] [--index <index root>]

Same model and selection options as ``jobs.mine``. Safe to rerun: a second run the
same night does nothing and says so. Submit it with a date-derived submission id
(``jobs.submit_nightly``) so a scheduler that fires twice cannot run the night twice.
"""
from __future__ import annotations

import argparse
import json
import sys

from jobs._common import add_clip_args, add_runtime_args, add_selection_args, fail, mine_config, runtime_kwargs, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.nightly", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="the night's shards: prefix, glob or files (local or s3://)")
    p.add_argument("--output", required=True, help="dataset root (local or s3://)")
    p.add_argument("--date", default=None, help="ingest date YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--index", default=None, help="index root to grow (omit to skip the index step)")
    p.add_argument("--no-reload", action="store_true", help="do not tell the query actor to reload")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line at the end")
    add_selection_args(p)
    add_clip_args(p)
    add_runtime_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()

    from mining.nightly import format_nightly, run_nightly

    cfg = mine_config(args)
    try:
        s = run_nightly(args.input, args.output, cfg, index_root=args.index, reload_actor=not args.no_reload,
                        **runtime_kwargs(args))
    except Exception as e:  # noqa: BLE001 - user errors become one line + exit 2, others propagate
        return fail(e)
    print(format_nightly(s))
    if args.json:
        print(json.dumps({k: v for k, v in s.items() if k != "actors"}, default=str))
    return 0 if s["shards_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
