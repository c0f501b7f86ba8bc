"""The store's writer before issue 15 (JSON ledger + hive-partitioned Parquet parts), frozen for the
migration test: it builds a root "written by the previous code". Ids, schemas and ``ShardOutput`` did
not change and are imported from :mod:`mining.store`.

Layout::

    <root>/patches/date=YYYY-MM-DD/shard=<shard_key>/part-0.parquet   (images/, errors/ the same)
    <root>/ledger/<shard_key>.json                                    the commit record of a shard
"""
from __future__ import annotations

import datetime as _dt
import io
import json
import time
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from mining.fs import get_fs, join
from mining.store import (SCHEMA_VERSION, ShardOutput, _write_bytes_atomic, make_image_id, make_patch_id,  # noqa: F401
                          patch_schema, shard_key)

LEDGER_DIR = "ledger"


def part_path(root: str, table: str, date: str, key: str) -> str:
    """Deterministic Parquet path of one shard's part of ``table``."""
    return join(root, table, f"date={date}", f"shard={key}", "part-0.parquet")


def ledger_path(root: str, key: str) -> str:
    return join(root, LEDGER_DIR, f"{key}.json")


def _write_parquet(uri: str, table: pa.Table) -> int:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue()
    _write_bytes_atomic(uri, data)
    return len(data)


def write_shard(root: str, out: ShardOutput, *, commit: bool = True, status: str = "committed") -> dict:
    """Write a shard's patches/images/errors parts, then (if ``commit``) its ledger record.

    Idempotent: parts go to deterministic paths and overwrite an earlier partial attempt,
    so a retried shard never leaves a duplicate.

    Args:
        root: dataset root URI. out: the shard's output.
        status: "committed" (mined) or "failed" (gave up after retries; errors only).
    Returns:
        the ledger record (dict).
    Raises:
        OSError / botocore errors from the filesystem after its own retries.
    """
    key = shard_key(out.shard)
    t0 = time.perf_counter()
    files, nbytes = {}, 0
    for name, table in (("patches", out.patch_table()), ("images", out.image_table()), ("errors", out.error_table())):
        uri = part_path(root, name, out.date, key)
        nbytes += _write_parquet(uri, table)
        files[name] = f"{name}/date={out.date}/shard={key}/part-0.parquet"
    record = {
        "schema_version": SCHEMA_VERSION,
        "shard": out.shard,
        "shard_key": key,
        "date": out.date,
        "status": status,
        "run_id": out.run_id,
        "model": out.model,
        "embedding_dim": out.dim,
        "random_init": bool(out.random_init),
        "files": files,
        "bytes": nbytes,
        "num_images": sum(1 for r in out.images if r["status"] != "error"),
        "num_patches": out.num_patches,
        "num_errors": len(out.errors),
        "committed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "write_s": round(time.perf_counter() - t0, 4),
        **out.extra,
    }
    if commit:
        commit_record(root, record)
    return record


def commit_record(root: str, record: dict) -> None:
    """Atomically publish a shard's ledger record (the commit point)."""
    _write_bytes_atomic(ledger_path(root, record["shard_key"]), json.dumps(record, indent=1, sort_keys=True).encode())


# --------------------------------------------------------------------------- readers

def read_ledger(root: str, *, statuses: Iterable[str] | None = ("committed",)) -> list[dict]:
    """All ledger records under ``root`` (fresh listing, no cache), sorted by (date, shard).

    Args:
        statuses: keep only records with these statuses; None keeps all.
    """
    fs, path = get_fs(join(root, LEDGER_DIR))
    if not fs.exists(path):
        return []
    out = []
    paths = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".json"))
    # one concurrent multi-GET on s3fs (a sequential HEAD+GET per record costs ~45 ms each on S3)
    blobs = fs.cat(paths) if paths else {}
    for p in paths:
        rec = json.loads(blobs[p])
        if statuses is None or rec.get("status") in statuses:
            out.append(rec)
    out.sort(key=lambda r: (r["date"], r["shard"]))
    return out


def _dataset(root: str, table: str, records: list[dict], schema: pa.Schema | None) -> pads.Dataset:
    fs, base = get_fs(root)
    paths = [f"{base}/{r['files'][table]}" for r in records if table in r.get("files", {})]
    if not paths:
        if schema is None:
            raise FileNotFoundError(f"no committed shards under {root!r} (ledger at {join(root, LEDGER_DIR)})")
        return pads.dataset(schema.empty_table())
    return pads.dataset(paths, format="parquet", filesystem=fs, schema=schema)


def open_patches(root: str, *, dates: Sequence[str] | None = None) -> pads.Dataset:
    """The committed patches of ``root`` as a pyarrow Dataset (see :func:`patch_schema`).

    Args:
        dates: keep only these ingest dates (YYYY-MM-DD).
    Raises:
        FileNotFoundError: nothing committed.
        ValueError: committed shards disagree on the embedding dimension or schema version.
    """
    recs = [r for r in read_ledger(root) if dates is None or r["date"] in set(dates)]
    dims = {r["embedding_dim"] for r in recs}
    if len(dims) > 1:
        raise ValueError(f"committed shards under {root!r} mix embedding dims {sorted(dims)}")
    versions = {r.get("schema_version") for r in recs}
    if versions - {SCHEMA_VERSION}:
        raise ValueError(f"{root!r} has schema versions {sorted(versions)}, this code reads {SCHEMA_VERSION}")
    schema = patch_schema(dims.pop()) if dims else None
    return _dataset(root, "patches", recs, schema)


