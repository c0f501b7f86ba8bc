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
import json
import os
import sys
import time
from collections import defaultdict
from typing import Any

ACTOR_NAME = "rare-object-query"
ACTOR_NAMESPACE = "mining"


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
        if r.get("status") == "committed":
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
        actor = ray.get_actor(ACTOR_NAME, namespace=ACTOR_NAMESPACE)
    except ValueError:
        return {"running": False,
                "detail": f"not running (no actor {ACTOR_NAME!r} in namespace {ACTOR_NAMESPACE!r}; "
                          "start it with: python -m jobs.serve_query --index <index root> ...)"}
    try:
        h = ray.get(actor.health.remote(), timeout=timeout_s)
        return {"running": True, "healthy": True, "health": h if isinstance(h, dict) else {"value": repr(h)}}
    except Exception as e:
        return {"running": True, "healthy": False, "detail": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}


def _collect_task(data_root, index_root, nights):
    # module-level import inside the task: runs on a cluster node, not on the client
    from jobs.status import collect as _c

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

def _run_as_job(address: str, argv: list[str], timeout_s: float) -> int:
    """Run ``python -m jobs.status <argv>`` on the cluster through the Jobs API and print its output."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    import shlex

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

    if args.address and args.address.startswith(("http://", "https://")):
        rest = list(argv)
        if "--address" in rest:
            i = rest.index("--address")
            del rest[i:i + 2]
        rest = [a for a in rest if not a.startswith("--address=")]
        try:
            return _run_as_job(args.address, rest, args.timeout)
        except (ConnectionError, RuntimeError) as e:
            print(f"error: cannot run the status job at {args.address}: {e}", file=sys.stderr)
            return 2

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    address = args.address or os.environ.get("RAY_ADDRESS") or "auto"
    try:
        ray.init(address=address, namespace=ACTOR_NAMESPACE, logging_level="WARNING",
                 log_to_driver=False, ignore_reinit_error=True)
    except Exception as e:
        print(f"error: cannot connect to Ray at {address}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    try:
        st = gather(args.data, args.index, args.nights, timeout_s=args.timeout)
    except Exception as e:
        print(f"error: status collection failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    finally:
        try:
            ray.shutdown()
        except Exception:
            pass
    print(json.dumps(st, sort_keys=True, default=str) if args.json else format_status(st))
    return 0


if __name__ == "__main__":
    sys.exit(main())
