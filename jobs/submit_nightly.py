"""Submit the nightly mining run as a Ray job, at most once per night.

    python -m jobs.submit_nightly --address http://127.0.0.1:8265 \\
        --input s3://fleet/raw/ --output s3://fleet/mined --index /mnt/fleet/index \\
        [--date YYYY-MM-DD] [--wait] [-- <extra jobs.nightly args, e.g. --clip-model ViT-B-16 --no-reload>]

It submits ``python -m jobs.nightly --input ... --output ... --index ... --date <date> <extra>``
through the Jobs API (:class:`ray.job_submission.JobSubmissionClient`) with

- ``submission_id = "nightly-<date>"``: the Jobs API refuses a second job with the same id, so a
  scheduler that fires twice (cron retry, two CronJob pods, a human re-running it) cannot run
  the same night twice.  The second submit exits with code 3 and says which job already owns
  the night and in which state it is;
- ``runtime_env = {"working_dir": <checkout>, "env_vars": {S3 settings from this environment}}``
  (Ray workers do not see the submitter's environment).

Equivalent plain command (the date must be computed by the caller; in a crontab write ``\\%F``)::

    ray job submit --address http://127.0.0.1:8265 \\
        --submission-id nightly-$(date -u +%F) --working-dir . \\
        --runtime-env-json '{"env_vars": {"AWS_DEFAULT_REGION": "us-west-2"}}' \\
        -- python -m jobs.nightly --input s3://fleet/raw/ --output s3://fleet/mined \\
           --index /mnt/fleet/index --date $(date -u +%F)

Exit codes: 0 submitted (with ``--wait``: the job SUCCEEDED); 1 the job FAILED or was STOPPED
(``--wait``) or waiting timed out; 2 bad arguments or the Jobs API cannot be reached;
3 this night was already submitted (refused).
Thin CLI: the submission logic is :mod:`mining.nightly_submit`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from mining.nightly_submit import EXIT_ALREADY_SUBMITTED, run_submit

__all__ = ["EXIT_ALREADY_SUBMITTED", "build_parser", "main", "split_extra"]  # exit code: for deploy/ checks


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (arguments after a bare ``--`` are not parsed: see :func:`split_extra`)."""
    p = argparse.ArgumentParser(prog="python -m jobs.submit_nightly", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=os.environ.get("RAY_DASHBOARD_ADDRESS") or "http://127.0.0.1:8265",
                   help="Jobs API (dashboard) address, default $RAY_DASHBOARD_ADDRESS or http://127.0.0.1:8265 "
                        "(the end of `ray dashboard cluster.yaml`)")
    p.add_argument("--input", required=True, help="shard prefix (s3://bucket/prefix or a path the cluster sees)")
    p.add_argument("--output", required=True, help="dataset root")
    p.add_argument("--index", default=None, help="index root (jobs.nightly adds the new shards to it)")
    p.add_argument("--date", default=None, help="the night, YYYY-MM-DD (default: today, UTC)")
    wd = p.add_mutually_exclusive_group()
    wd.add_argument("--working-dir", default=".", help="checkout uploaded with the job (default: .)")
    wd.add_argument("--no-working-dir", action="store_true",
                    help="upload nothing: run the fleet-mining release installed on the cluster (cluster.yaml)")
    p.add_argument("--wait", action="store_true", help="wait for the job and exit 0 only when it SUCCEEDED")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds to --wait (default 6 h)")
    return p


def split_extra(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``argv`` at the first bare ``--``: (own arguments, extra jobs.nightly arguments)."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    own, extra = split_extra(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)
    return run_submit(args.address, input=args.input, output=args.output, index=args.index, date=args.date,
                      extra_args=extra, working_dir=None if args.no_working_dir else args.working_dir,
                      wait=args.wait, timeout_s=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
