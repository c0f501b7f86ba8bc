"""Status readers: the ledger's last nights, the index, the query actor's health (``jobs.status`` prints them).

Everything here is importable inside a Ray task (nothing imports ``jobs``). See
``python -m jobs.status --help`` for the command.
"""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

from mining.query_actor import ACTOR_NAME, NAMESPACE


# --------------------------------------------------------------------------- pure readers

def ledger_nights(data_root: str, nights: int = 7) -> list[dict]:
    """Per ingest date, newest first, the last ``nights`` dates of the ledger under ``data_root``.

    Returns:
        [{"date", "shards" (committed), "failed" (shards given up), "frames", "patches",
          "errors", "last_commit"}], empty when nothing is committed yet.
    Raises:
        OSError / botocore errors from the filesystem; ValueError: unsupported URI scheme.
    """
    from mining.store import read_ledger

    per: dict[str, dict] = defaultdict(lambda: {"shards": 0, "failed": 0, "frames": 0, "patches": 0,
                                                "errors": 0, "last_commit": ""})
    for r in read_ledger(data_root, statuses=None):
        d = per[r.get("date", "?")]
        if r.get("status") in ("committed", "partial"):   # partial: a corrupt shard's frames that were read
            d["shards"] += 1
            d["frames"] += int(r.get("num_images", 0))
            d["patches"] += int(r.get("num_patches", 0))
        elif r.get("status") == "failed":
            d["failed"] += 1
        d["errors"] += int(r.get("num_errors", 0))
        d["last_commit"] = max(d["last_commit"], str(r.get("committed_at", "")))
    out = [{"date": date, **v} for date, v in per.items()]
    out.sort(key=lambda x: x["date"], reverse=True)
    return out[: max(int(nights), 0)]


def _du(uri: str) -> int | None:
    from mining.fs import get_fs

    try:
        fs, path = get_fs(uri)
        return int(fs.du(path, total=True)) if fs.exists(path) else None
    except Exception:  # size is informative only
        return None


def index_summary(index_root: str) -> dict:
    """Current version and size of the index under ``index_root``, from its manifest only
    (the FAISS index itself is not loaded: this is cheap even for a large index).

    Returns:
        {"root", "version", "vectors", "kind", "dim", "bytes" (of the current version's
        directory), "versions" (published versions kept), "built_at"}; ``version`` is None,
        with an "error" entry, when nothing is published there yet.
    Raises:
        ValueError: ``index_root`` is not a local path (index roots are local directories,
        shared between nodes through a common mount; see docs/cluster.md).
    """
    from mining.index import current_version, list_versions
    from mining.index.publish import read_manifest, version_dir

    out: dict[str, Any] = {"root": index_root, "version": None}
    version = current_version(index_root)
    if version is None:
        out["error"] = f"no index published under {index_root} (no CURRENT file)"
        return out
    try:
        manifest = read_manifest(index_root, version)
    except FileNotFoundError as e:
        out["error"] = f"CURRENT names {version!r} but it has no manifest: {e}"
        return out
    out.update(version=version, vectors=manifest.get("n"), kind=manifest.get("kind"), dim=manifest.get("dim"),
               built_at=manifest.get("created_at"), random_init=bool(manifest.get("random_init")),
               versions=len(list_versions(index_root)), bytes=_du(version_dir(index_root, version)))
    return out


def collect(data_root: str | None, index_root: str | None, nights: int = 7) -> dict:
    """The data part of the status (ledger + index), as plain JSON-able dicts.

    Errors reading one part are reported in that part (``{"error": ...}``), not raised.
    """
    out: dict[str, Any] = {"collected_on": os.uname().nodename}
    if data_root:
        try:
            out["nights"] = ledger_nights(data_root, nights)
            out["data_root"] = data_root
        except Exception as e:
            out["nights_error"] = f"{type(e).__name__}: {e}"
    if index_root:
        try:
            out["index"] = index_summary(index_root)
        except Exception as e:
            out["index"] = {"root": index_root, "version": None, "error": f"{type(e).__name__}: {e}"}
    return out


# --------------------------------------------------------------------------- through Ray

def actor_health(timeout_s: float = 30.0) -> dict:
    """``health()`` of the named query actor, via the connected Ray (driver or client).

    Returns:
        {"running": False, "detail": "not running ..."} when there is no such actor;
        {"running": True, "healthy": True, "health": {...}} when it answered;
        {"running": True, "healthy": False, "detail": error} when it exists but did not answer
        within ``timeout_s`` seconds (restarting, overloaded, crashed).
    """
    import ray

    try:
        actor = ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
    except ValueError:
        return {"running": False,
                "detail": f"not running (no actor {ACTOR_NAME!r} in namespace {NAMESPACE!r}; "
                          "start it with: python -m jobs.serve_query --index <index root> ...)"}
    try:
        h = ray.get(actor.health.remote(), timeout=timeout_s)
        return {"running": True, "healthy": True, "health": h if isinstance(h, dict) else {"value": repr(h)}}
    except Exception as e:
        return {"running": True, "healthy": False, "detail": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}


def _collect_task(data_root, index_root, nights):
    # module-level import inside the task: runs on a cluster node, not on the client
    from mining.status import collect as _c

    return _c(data_root, index_root, nights)


def gather(data_root: str | None, index_root: str | None, nights: int = 7, timeout_s: float = 120.0) -> dict:
    """Status of the connected cluster: ledger + index read by a Ray task, plus the actor's health.

    Requires ``ray.init`` (driver, job or ``ray://`` client) to have been called.
    Raises:
        ray.exceptions.GetTimeoutError: the collecting task did not finish in ``timeout_s`` s.
    """
    import ray

    task = ray.remote(num_cpus=0, max_retries=1)(_collect_task)
    out = ray.get(task.remote(data_root, index_root, nights), timeout=timeout_s) if (data_root or index_root) else {}
    out["query_actor"] = actor_health()
    out["ray_version"] = ray.__version__
    return out


# --------------------------------------------------------------------------- formatting

def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "?"


def format_status(st: dict) -> str:
    """Human-readable text of :func:`gather`'s result."""
    lines: list[str] = []
    if "nights" in st or "nights_error" in st:
        lines.append(f"ledger {st.get('data_root', '')}")
        if "nights_error" in st:
            lines.append(f"  cannot read: {st['nights_error']}")
        elif not st["nights"]:
            lines.append("  no committed shards yet")
        else:
            lines.append(f"  {'date':<10}  {'shards':>6}  {'failed':>6}  {'frames':>8}  {'patches':>9}  {'errors':>6}  last commit")
            for n in st["nights"]:
                lines.append(f"  {n['date']:<10}  {n['shards']:>6}  {n['failed']:>6}  {n['frames']:>8}  "
                             f"{n['patches']:>9}  {n['errors']:>6}  {n['last_commit']}")
    if "index" in st:
        ix = st["index"]
        lines.append(f"index {ix.get('root', '')}")
        if not ix.get("version"):
            lines.append(f"  no index: {ix.get('error', 'unknown')}")
        else:
            lines.append(f"  version {ix['version']}: {ix.get('vectors')} vectors, kind {ix.get('kind')}, "
                         f"dim {ix.get('dim')}, {_fmt_bytes(ix.get('bytes'))} on disk, built {ix.get('built_at')}, "
                         f"{ix.get('versions')} version(s) kept")
            if ix.get("random_init"):
                lines.append("  WARNING: built from RANDOMLY INITIALISED CLIP embeddings (smoke run): not semantic")
    qa = st.get("query_actor", {})
    if not qa.get("running"):
        lines.append(f"query actor: {qa.get('detail', 'not running')}")
    elif not qa.get("healthy"):
        lines.append(f"query actor: NOT HEALTHY: {qa.get('detail')}")
    else:
        h = qa.get("health", {})
        lines.append("query actor: healthy " + ", ".join(f"{k}={v}" for k, v in h.items() if not isinstance(v, (dict, list))))
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def run_status_job(address: str, argv: list[str], timeout_s: float) -> int:
    """Run ``python -m jobs.status <argv>`` on the cluster through the Jobs API (``address``: its
    ``http://`` address) and print its output.

    Returns:
        the exit code: 0 the job succeeded, 2 it failed or is still running after ``timeout_s`` seconds.
    Raises:
        ConnectionError, RuntimeError: the Jobs API cannot be reached or refused the job.
    """
    import shlex
    import sys
    import time

    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    sid = client.submit_job(entrypoint=shlex.join(["python", "-m", "jobs.status", *argv]),
                            metadata={"kind": "status"})
    deadline = time.monotonic() + timeout_s
    while True:
        st = client.get_job_status(sid)
        st = str(getattr(st, "value", st))
        if st in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        if time.monotonic() > deadline:
            print(f"error: status job {sid} still {st} after {timeout_s:.0f} s", file=sys.stderr)
            return 2
        time.sleep(1.0)
    logs = client.get_job_logs(sid).splitlines()
    # drop the job supervisor's preamble ("Runtime env is setting up.", "Running entrypoint ...")
    start = next((i + 1 for i, ln in enumerate(logs) if ln.startswith("Running entrypoint for job")), 0)
    print("\n".join(logs[start:]))
    return 0 if st == "SUCCEEDED" else 2


def print_status(address: str | None, data_root: str | None, index_root: str | None, nights: int = 7, *,
                 timeout_s: float = 120.0, as_json: bool = False) -> int:
    """Connect (``address``, else ``$RAY_ADDRESS``, else ``auto``), :func:`gather` the status in the
    cluster and print it (:func:`format_status`, or one JSON object with ``as_json``).

    Returns:
        the exit code: 0 printed, 2 cannot connect or the collection failed (one line on stderr).
    """
    import json
    import sys

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from mining.connect import connect

    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        connect(address, namespace=NAMESPACE, log_to_driver=False)
    except Exception as e:
        print(f"error: cannot connect to Ray at {address}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    try:
        st = gather(data_root, index_root, nights, timeout_s=timeout_s)
    except Exception as e:
        print(f"error: status collection failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    finally:
        try:
            import ray

            ray.shutdown()
        except Exception:
            pass
    print(json.dumps(st, sort_keys=True, default=str) if as_json else format_status(st))
    return 0
