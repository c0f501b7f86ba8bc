"""Nightly incremental mining: new shards -> patches -> index -> query-actor reload.

    python -m jobs.nightly --input <prefix> --output <root> [--date YYYY-MM-DD] [--index <index root>]

Same model and selection options as ``jobs.mine``. ``--refresh-epitome`` (off by default) then
retrains the epitome on the night's shards (``jobs.train_epitome``'s library function, a short run
from the current version) and writes a new version to ``<output>/models/epitome/`` for the next night. Safe to rerun: a second run the
same night does nothing and says so. Submit it with a date-derived submission id
(``jobs.submit_nightly``) so a scheduler that fires twice cannot run the night twice.
"""
from __future__ import annotations

import argparse
import json
import sys

from jobs._common import add_clip_args, add_epitome_args, add_runtime_args, add_selection_args, fail, mine_config, runtime_kwargs, setup_logging


def build_parser() -> argparse.ArgumentParser:
    from mining.nightly import REFRESH_EPITOME_STEPS

    p = argparse.ArgumentParser(prog="python -m jobs.nightly", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="the night's shards: prefix, glob or files (local or s3://)")
    p.add_argument("--output", required=True, help="dataset root (local or s3://)")
    p.add_argument("--date", default=None, help="ingest date YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--index", default=None, help="index root to grow (omit to skip the index step)")
    p.add_argument("--no-reload", action="store_true", help="do not tell the query actor to reload")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line at the end")
    p.add_argument("--refresh-epitome", action="store_true",
                   help="after mining, retrain the epitome on the night's shards (starting from the current one) and "
                        "write a new version to <output>/models/epitome/ for the next night (off by default)")
    p.add_argument("--refresh-epitome-steps", type=int, default=REFRESH_EPITOME_STEPS,
                   help=f"optimiser steps of --refresh-epitome (default {REFRESH_EPITOME_STEPS})")
    add_selection_args(p)
    add_epitome_args(p)
    add_clip_args(p)
    add_runtime_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()

    from mining.errors import SettingsError
    from mining.nightly import format_nightly, run_nightly

    cfg = mine_config(args)
    try:
        if args.refresh_epitome_steps < 1:
            raise SettingsError(f"--refresh-epitome-steps must be >= 1 (got {args.refresh_epitome_steps})")
        s = run_nightly(args.input, args.output, cfg, index_root=args.index, reload_actor=not args.no_reload,
                        refresh=args.refresh_epitome, refresh_steps=args.refresh_epitome_steps, **runtime_kwargs(args))
    except Exception as e:  # noqa: BLE001 - user errors become one line + exit 2, others propagate
        return fail(e)
    print(format_nightly(s))
    if args.json:
        print(json.dumps({k: v for k, v in s.items() if k != "actors"}, default=str))
    return 0 if s["shards_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
