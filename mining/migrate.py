"""Migration from the per-shard JSON ledger layout (schema version 1, before issue 15) to the Delta store.

The old layout (written by the store before issue 15)::

    <root>/patches/date=YYYY-MM-DD/shard=<shard_key>/part-0.parquet
    <root>/images/date=.../shard=.../part-0.parquet, <root>/errors/...
    <root>/ledger/<shard_key>.json          one commit record per shard ("committed" | "failed")

:func:`migrate_store` commits every ledger record's parts through :func:`mining.store.write_shard`
(gen 1, same run ids and statuses; exactly once, so an interrupted migration is simply rerun), then
deletes the old part files and moves ``ledger/`` to ``ledger-migrated/``. The small JSON-ledger
reader/writer here is the only ledger code left (the benchmark times it next to the Delta store).
"""
from __future__ import annotations

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq

from mining.fs import get_fs, join

LEDGER_DIR = "ledger"


def read_json_ledger(root: str) -> list[dict]:
    """All JSON ledger records under ``<root>/ledger`` (fresh listing, one concurrent multi-GET), sorted
    by (date, shard). Empty when there is no ledger."""
    fs, path = get_fs(join(root, LEDGER_DIR))
    if not fs.exists(path):
        return []
    paths = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".json"))
    blobs = fs.cat(paths) if paths else {}
    out = [json.loads(blobs[p]) for p in paths]
    out.sort(key=lambda r: (r["date"], r["shard"]))
    return out


def write_json_record(root: str, record: dict) -> None:
    """One JSON ledger record, written as the old code did (one PUT). Used by the benchmark only."""
    from mining.store import _write_bytes_atomic

    _write_bytes_atomic(join(root, LEDGER_DIR, f"{record['shard_key']}.json"),
                        json.dumps(record, indent=1, sort_keys=True).encode())


def _read_part(root: str, rel: str):
    fs, base = get_fs(root)
    return pq.read_table(f"{base}/{rel}", filesystem=fs)


def migrate_store(root: str, *, keep_old: bool = False, log=print) -> dict:
    """Convert ``root`` from the JSON-ledger layout to the Delta store, in place.

    Returns:
        {"shards": records migrated, "committed", "failed", "patches", "images", "errors", "seconds"}.
    Raises:
        FileNotFoundError: ``root`` has no ``ledger/`` (nothing to migrate).
        ValueError: a record's schema version is not 1.
    """
    from mining.store import ERROR_SCHEMA, IMAGE_SCHEMA, ShardOutput, patch_schema, write_shard

    t0 = time.perf_counter()
    recs = read_json_ledger(root)
    fs, base = get_fs(root)
    if not recs and not fs.exists(f"{base}/{LEDGER_DIR}"):
        raise FileNotFoundError(f"{root!r} has no {LEDGER_DIR}/ directory: nothing to migrate")
    n = {"shards": 0, "committed": 0, "failed": 0, "patches": 0, "images": 0, "errors": 0}
    for r in recs:
        if int(r.get("schema_version", 1)) != 1:
            raise ValueError(f"{r['shard_key']}: schema version {r.get('schema_version')}, this migrates version 1")
        files = r.get("files", {})
        out = ShardOutput(shard=r["shard"], date=r["date"], run_id=r["run_id"], model=r["model"],
                          dim=int(r["embedding_dim"]), random_init=bool(r.get("random_init")))
        if "patches" in files:
            t = _read_part(root, files["patches"])
            schema = patch_schema(out.dim)
            for c in schema.names:   # parts written before a nullable column existed (novelty)
                if c not in t.schema.names:
                    t = t.append_column(schema.field(c), pa.nulls(t.num_rows, schema.field(c).type))
            t = t.select(schema.names).cast(schema)
            if t.num_rows:
                out.blocks.append(t)
        if "images" in files:
            out.images = _read_part(root, files["images"]).cast(IMAGE_SCHEMA).to_pylist()
        if "errors" in files:
            out.errors = _read_part(root, files["errors"]).cast(ERROR_SCHEMA).to_pylist()
        keep = {k: v for k, v in r.items() if k not in ("files", "bytes", "num_images", "num_patches", "num_errors",
                                                         "schema_version", "shard", "shard_key", "date", "status",
                                                         "run_id", "model", "embedding_dim", "random_init",
                                                         "committed_at", "write_s")}
        out.extra = {**keep, "migrated_from": "json-ledger", "committed_at_v1": r.get("committed_at")}
        write_shard(root, out, status=r.get("status", "committed"), gen=1)
        n["shards"] += 1
        n[r.get("status", "committed")] = n.get(r.get("status", "committed"), 0) + 1
        n["patches"] += out.num_patches
        n["images"] += len(out.images)
        n["errors"] += len(out.errors)
    from mining.store import publish

    publish(root)
    if not keep_old:
        for table in ("patches", "images", "errors"):
            for d in fs.glob(f"{base}/{table}/date=*"):
                fs.rm(d, recursive=True)
        if fs.exists(f"{base}/{LEDGER_DIR}"):
            fs.mv(f"{base}/{LEDGER_DIR}", f"{base}/{LEDGER_DIR}-migrated", recursive=True)
    n["seconds"] = round(time.perf_counter() - t0, 3)
    log(f"migrated {n['shards']} shards ({n['committed']} committed, {n['failed']} failed): "
        f"{n['patches']} patches, {n['images']} images, {n['errors']} errors in {n['seconds']} s")
    return n

