"""Submitting the nightly mining run through the Ray Jobs API, at most once per night.

The CLI is ``python -m jobs.submit_nightly`` (see its ``--help`` for the plain ``ray job submit``
equivalent). The job runs ``python -m jobs.nightly --input ... --output ... --index ... --date <date>``
with ``submission_id = "nightly-<date>"``: the Jobs API refuses a second job with the same id, so a
scheduler that fires twice cannot run the same night twice.

Exit codes of :func:`run_submit`: 0 submitted (with ``wait``: the job SUCCEEDED); 1 the job FAILED or
was STOPPED (``wait``) or waiting timed out; 2 bad arguments or the Jobs API cannot be reached;
3 this night was already submitted (refused).
"""
from __future__ import annotations

import datetime as _dt
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

#: Environment variables passed through to the job (when set here).  Credentials are only
#: passed when present: on AWS leave them unset and give the nodes an instance profile
#: (env_vars are stored with the job and shown in the dashboard).
S3_ENV_VARS = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
    "MINING_S3_RETRIES", "HF_HUB_OFFLINE",
)

#: Not uploaded with the working directory (Ray also honours .gitignore).
WORKING_DIR_EXCLUDES = [".git", "**/__pycache__", "*.egg-info", ".pytest_cache", "out", "runs"]

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_ALREADY_SUBMITTED = 0, 1, 2, 3

_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class AlreadySubmittedError(RuntimeError):
    """The night's submission id is already taken on this cluster (the night was submitted).

    Attributes:
        submission_id: the refused id; status: the existing job's status ("RUNNING", ...)
        or None when the Jobs API only said "already exists".
    """

    def __init__(self, submission_id: str, status: str | None = None, detail: str = ""):
        self.submission_id = submission_id
        self.status = status
        state = f" (status {status})" if status else ""
        super().__init__(f"night already submitted: job {submission_id!r} exists on this cluster{state}; "
                         f"refusing to run the same night twice. {detail}".rstrip())


def today_utc() -> str:
    """Today's date in UTC as YYYY-MM-DD (the default night)."""
    return _dt.datetime.now(_dt.timezone.utc).date().isoformat()


def check_date(date: str) -> str:
    """Return ``date`` if it is a real calendar date written YYYY-MM-DD.

    Raises:
        ValueError: not in that form or not a valid date.
    """
    if not isinstance(date, str) or not _DATE_RE.match(date):
        raise ValueError(f"--date must be YYYY-MM-DD, got {date!r}")
    try:
        _dt.date.fromisoformat(date)
    except ValueError as e:
        raise ValueError(f"--date {date!r} is not a calendar date: {e}") from None
    return date


def nightly_submission_id(date: str) -> str:
    """The Jobs API submission id of the night ``date`` (YYYY-MM-DD): ``nightly-<date>``.

    Raises:
        ValueError: ``date`` is not YYYY-MM-DD.
    """
    return f"nightly-{check_date(date)}"


def nightly_entrypoint(input: str, output: str, index: str | None, date: str,
                       extra_args: Sequence[str] = ()) -> str:
    """The shell command the job runs: ``python -m jobs.nightly ...`` (arguments shell-quoted).

    Raises:
        ValueError: ``date`` is not YYYY-MM-DD, or ``extra_args`` sets --input/--output/--index/--date
        (those come from the named arguments so that the id and the run always agree).
    """
    check_date(date)
    for a in extra_args:
        if a.split("=", 1)[0] in ("--input", "--output", "--index", "--date"):
            raise ValueError(f"{a.split('=', 1)[0]} is set by submit_nightly itself; do not repeat it after --")
    argv = ["python", "-m", "jobs.nightly", "--input", input, "--output", output]
    if index:
        argv += ["--index", index]
    argv += ["--date", date, *extra_args]
    return shlex.join(argv)


def s3_env_vars(environ: Mapping[str, str] | None = None, names: Iterable[str] = S3_ENV_VARS) -> dict[str, str]:
    """The S3 endpoint / region / credential variables that are set in ``environ`` (default:
    ``os.environ``), to pass to the job in ``runtime_env["env_vars"]``."""
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in names if environ.get(k)}


def build_runtime_env(working_dir: str | None, env_vars: Mapping[str, str]) -> dict[str, Any]:
    """``runtime_env`` for the job: the working directory (uploaded by the client) and env vars.

    Args:
        working_dir: a checkout of this repository, or None to use the package installed on the
            cluster (cluster.yaml installs a pinned release).
    Raises:
        FileNotFoundError: ``working_dir`` does not contain ``jobs/nightly.py``.
    """
    env: dict[str, Any] = {"env_vars": dict(env_vars)}
    if working_dir is not None:
        wd = Path(working_dir).expanduser().resolve()
        if not (wd / "jobs" / "nightly.py").is_file():
            raise FileNotFoundError(
                f"--working-dir {str(wd)!r} is not a checkout of this repository (no jobs/nightly.py); "
                "run from the repository root or pass --no-working-dir to use the package installed on the cluster")
        env["working_dir"] = str(wd)
        env["excludes"] = list(WORKING_DIR_EXCLUDES)
    return env


def _job_status(client, submission_id: str) -> str | None:
    """Status of an existing job as a string, or None when there is no such job."""
    try:
        info = client.get_job_info(submission_id)
    except RuntimeError:
        return None
    return str(getattr(info.status, "value", info.status))


def submit_nightly(client, *, input: str, output: str, index: str | None, date: str | None = None,
                   extra_args: Sequence[str] = (), working_dir: str | None = ".",
                   env_vars: Mapping[str, str] | None = None, metadata: Mapping[str, str] | None = None) -> str:
    """Submit ``jobs.nightly`` for the night ``date`` through the Jobs API, at most once.

    Args:
        client: a ``ray.job_submission.JobSubmissionClient`` (or an object with its
            ``submit_job`` / ``get_job_info`` methods).
        input / output / index: shard prefix, dataset root and index root (URIs).
        date: YYYY-MM-DD, default today in UTC.  Passed to jobs.nightly as ``--date`` too.
        extra_args: more jobs.nightly arguments (model / selection options, ``--no-reload``).
        working_dir: checkout to upload, or None for the package installed on the cluster.
        env_vars: variables for the job, default :func:`s3_env_vars` of this environment.
    Returns:
        the submission id, ``nightly-<date>``.
    Raises:
        AlreadySubmittedError: a job with that id exists (any state); nothing was submitted.
        ValueError: bad date / extra args.  FileNotFoundError: bad working_dir.
        RuntimeError: the Jobs API refused or failed for another reason.
        ConnectionError: the Jobs API cannot be reached.
    """
    date = check_date(date or today_utc())
    sid = nightly_submission_id(date)
    entrypoint = nightly_entrypoint(input, output, index, date, extra_args)
    runtime_env = build_runtime_env(working_dir, s3_env_vars() if env_vars is None else env_vars)
    # Pre-check for a clear message; the server-side refusal below still closes the race
    # between two schedulers that both pass this check.
    status = _job_status(client, sid)
    if status is not None:
        raise AlreadySubmittedError(sid, status)
    md = {"kind": "nightly", "date": date, **(metadata or {})}
    try:
        return client.submit_job(entrypoint=entrypoint, submission_id=sid, runtime_env=runtime_env, metadata=md)
    except RuntimeError as e:
        if "already exists" in str(e) or _job_status(client, sid) is not None:
            raise AlreadySubmittedError(sid, _job_status(client, sid), detail=str(e).splitlines()[0][:300]) from e
        raise


TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def wait_for_job(client, submission_id: str, timeout_s: float = 6 * 3600, poll_s: float = 5.0) -> str:
    """Poll until the job reaches a terminal state.

    Returns:
        "SUCCEEDED", "FAILED" or "STOPPED".
    Raises:
        TimeoutError: still not finished after ``timeout_s`` seconds (the job keeps running).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        st = client.get_job_status(submission_id)
        status = str(getattr(st, "value", st))
        if status in TERMINAL:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {submission_id} still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def run_submit(address: str, *, input: str, output: str, index: str | None, date: str | None,
               extra_args: Sequence[str] = (), working_dir: str | None = ".", wait: bool = False,
               timeout_s: float = 6 * 3600) -> int:
    """Submit the night (``jobs.submit_nightly``): print what was submitted and how to follow it;
    with ``wait``, wait for the job and print the end of its logs and its final status.

    Errors are printed as one line on stderr (``error: ...``).

    Args:
        address: Jobs API (dashboard) address, e.g. ``http://127.0.0.1:8265``.
        date: YYYY-MM-DD, default today in UTC.
        working_dir: checkout to upload, or None for the package installed on the cluster.
        timeout_s: seconds to wait with ``wait``.
    Returns:
        the exit code: ``EXIT_OK``, ``EXIT_JOB_FAILED``, ``EXIT_USAGE`` or ``EXIT_ALREADY_SUBMITTED``.
    """
    try:
        date = check_date(date or today_utc())
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(address)
        sid = submit_nightly(client, input=input, output=output, index=index, date=date,
                             extra_args=extra_args, working_dir=working_dir)
    except AlreadySubmittedError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ALREADY_SUBMITTED
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ConnectionError, RuntimeError) as e:
        print(f"error: cannot submit to the Jobs API at {address}: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"submitted {sid}: {nightly_entrypoint(input, output, index, date, extra_args)}")
    print(f"  follow it: ray job logs --address {address} --follow {sid}")
    if not wait:
        return EXIT_OK
    try:
        status = wait_for_job(client, sid, timeout_s=timeout_s)
    except TimeoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_JOB_FAILED
    logs = client.get_job_logs(sid)
    print(logs[-20000:])
    print(f"{sid}: {status}")
    return EXIT_OK if status == "SUCCEEDED" else EXIT_JOB_FAILED
