"""Mine patches from image shards into a Parquet patch dataset (the main job).

    python -m jobs.mine --input <dir|glob|tar/parquet shards|s3://...> --output <root> [--address <ray>]

Runs on a new local Ray (bound to 127.0.0.1) when no address is given; submittable unchanged with
``ray job submit --working-dir . -- python -m jobs.mine ...``. Exit codes: 0 ok, 1 some shards
failed, 2 bad settings / weights / input / output, or no actor could start (one line on stderr).
"""
from __future__ import annotations

import argparse
import json
import sys

from jobs._common import add_clip_args, add_epitome_args, add_runtime_args, add_selection_args, fail, mine_config, runtime_kwargs, setup_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.mine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="shards: directory/prefix, glob, .tar/.parquet file(s), comma-separated")
    p.add_argument("--output", required=True, help="dataset root (local directory or s3://bucket/prefix)")
    p.add_argument("--date", default=None, help="ingest date partition YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line at the end")
    add_selection_args(p)
    add_epitome_args(p)
    add_clip_args(p)
    add_runtime_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    from mining.driver import format_summary, run_mining

    cfg = mine_config(args)
    try:
        summary = run_mining(args.input, args.output, cfg, **runtime_kwargs(args))
    except Exception as e:  # noqa: BLE001 - user errors become one line + exit 2, others propagate
        return fail(e)
    if cfg.clip_random_init:
        print("WARNING: CLIP weights were RANDOM (--clip-random-init): embeddings are not semantic")
    print(format_summary(summary))  # ends with the outputs and the next command
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "actors"}))
    return 0 if summary["shards_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
