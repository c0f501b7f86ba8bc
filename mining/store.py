"""The patch store: four Delta Lake tables (delta-rs, ``deltalake``) with exactly-once shard commits.

Layout on a local directory or ``s3://bucket/prefix``::

    <root>/patches/   Delta table, one row per selected patch    (files <date>/<shard_key>-g<gen>-<attempt>.parquet)
    <root>/images/    Delta table, one row per frame
    <root>/errors/    Delta table, one row per failure
    <root>/shards/    Delta table, one row per shard commit: the authoritative table (:data:`SHARDS_SCHEMA`)

Commit protocol of one shard (``key`` = :func:`shard_key`; ``gen`` = 1, +1 each re-mine of a partial or
failed shard):

1. the actor writes the shard's three Parquet files into the table directories, named
   ``<date>/<key>-g<gen>-<attempt>.parquet`` (a fresh ``attempt`` id per try, so a retry never
   overwrites a file someone may be reading). Nothing references them yet.
2. it appends the shard's row (its full commit record as JSON, naming the three files) to ``shards``
   in one Delta transaction carrying the application transaction ``txn(appId="shard:<key>",
   version=gen)``. This single commit is the commit point. Before committing, the writer reads
   ``transaction_version("shard:<key>")``: if it is already >= gen, the commit is a no-op (a retried
   or duplicated commit). Two concurrent commits of the same app id conflict in delta-rs' conflict
   checker ("Concurrent transaction failed"); the loser refreshes, finds it done, and is a no-op too.
3. :func:`publish` (the driver, after each run; idempotent, any time) adds the files of committed
   shards to the ``patches`` / ``images`` / ``errors`` Delta logs in batched commits that carry the
   same app transactions (and remove a re-mined shard's earlier-generation files in the same commit),
   so plain Delta readers see them too.

Readers of this module (:func:`open_patches`, :func:`open_images`, :func:`open_errors`, the index build,
query metadata, status) read ``shards`` only (latest gen per shard) and open exactly the files its rows
name: a shard is seen in all three tables or in none, and a run killed between 1 and 2 leaves only
unreferenced files (the rerun writes new ones; ``DeltaTable.vacuum`` removes the old). Plain Delta
readers of ``<root>/patches`` see what was published; join with ``shards`` for the exact committed set
(the README shows it).

Why one authoritative commit, not four: a shard commit touches one Delta log, whose snapshot is small
(the ``shards`` table is compacted after each run); committing each shard to the data tables, whose
snapshots hold one file per shard, cost O(files) per commit in delta-rs (measured in
``benchmarks/ledger.py``: 44 ms/shard at 1k shards, 162 ms at 10k).

Concurrency: delta-rs' S3 log store writes each ``_delta_log/<version>.json`` with a conditional PUT
(``If-None-Match``), so concurrent writers on S3 need no lock service (checked against the moto S3
server in the tests). Commits that lose a race are retried by delta-rs and then here with jittered
backoff (:data:`COMMIT_STATS` counts them). Checkpoints (every 100 versions) and expired-log cleanup are
delta-rs' post-commit hooks on their normal schedule.

"Which shards are committed" at a year's scale (3.65M shards at 10k a night): the cost of a lookup
must not grow with every shard ever committed. Three decisions:

- app transactions carry ``lastUpdated`` and expire after two days (``delta.setTransactionRetentionDuration``):
  they guard one run's retried / duplicated / concurrent commits; delta-rs drops expired ones when it
  loads a snapshot, so the snapshot does not hold one ``txn`` per shard ever committed (that cost
  15-25 ms per ``transaction_version`` at 100k before). After expiry the rows answer.
- ``shards`` is partitioned by ``month`` (of the ingest date) and :func:`compact_shards_table` rewrites
  the run's month as one file sorted by ``shard`` URI (row groups of 4,096; one overwrite commit of the
  partition, which delta-rs' conflict checker fails if a shard was committed into that month meanwhile;
  then a checkpoint). Rewriting costs a month's rows, not the table's.
- the planner's lookup (:func:`shard_states` with ``shards=`` / ``prefixes=``) opens only the files whose
  Delta ``shard`` statistics, and reads only the row groups whose Parquet statistics, can hold a wanted
  URI. Fleet uploads name a night's shards under a common prefix (date, vehicle), so a night's lookup
  reads one month's few row groups: measured 1.8x from 1k to 100k shards (``benchmarks/ledger.py``).
  With random shard names it reads at most one month per wanted range -- bounded, but not flat.

Readers that need every shard (index build, status, :func:`open_patches`) are O(shards) by nature. The
data tables keep one file per shard (their file names carry (shard, gen), which our readers select on),
so their snapshots -- loaded by :func:`publish` once a run -- still grow with every shard ever committed.

``patch_id`` is a stable 63-bit hash of (image_id, box, level): a rerun over the
same input with the same selection gives the same ids (see :func:`make_patch_id`).
"""
from __future__ import annotations

import datetime as _dt
import json
import time
import uuid
import warnings
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from mining.fs import get_fs
from mining.store_delta import *  # noqa: F401,F403  (re-exported: the store's public API is mining.store)
from mining.store_delta import (COMMIT_STATS, SHARDS_SCHEMA, SHARDS_TABLE, _TABLE_CACHE, _commit_once,  # noqa: F401
                                _load, _write_bytes_atomic, _write_data_file, app_id, commit_record, compact_shards_table,
                                delta_schema, delta_storage_options, publish, shard_states, table_uri)
from mining.store_schema import *  # noqa: F401,F403
from mining.store_schema import (ERROR_SCHEMA, IMAGE_SCHEMA, OPTIONAL_PATCH_COLUMNS, RANDOM_INIT_WARNING,  # noqa: F401
                                 SCHEMA_VERSION, TABLES, PatchColumns, ShardOutput, embeddings_from_arrow,
                                 embeddings_to_arrow, image_row, make_image_id, make_patch_id, make_patch_ids,
                                 patch_block_table, patch_columns, patch_schema, read_part_columns, shard_key)


# --------------------------------------------------------------------------- shard write

def write_shard(root: str, out: ShardOutput, *, commit: bool = True, status: str = "committed", gen: int | None = None,
                fingerprint: str | None = None) -> dict:
    """Write a shard's data files into the ``patches``, ``images`` and ``errors`` table directories, then
    (if ``commit``) commit its row to the authoritative ``shards`` table (:func:`commit_record`).

    The data files are named ``<key>-g<gen>-<attempt>.parquet`` (a fresh attempt id each time: a retry
    never overwrites a file a reader may hold); until the ``shards`` commit nothing references them.
    They are added to the data tables' Delta logs later, in batches, by :func:`publish`.

    Args:
        root: dataset root URI. out: the shard's output.
        status: "committed" (read completely), "partial" (a corrupt shard: the frames that were read) or
            "failed" (gave up after retries; errors only).
        gen: the shard's generation (1 the first time; +1 each re-mine of a partial/failed shard);
            default ``out.extra["gen"]`` or 1. fingerprint: the shard's content fingerprint
            (size + ETag/mtime), default ``out.extra["fingerprint"]`` or "".
    Returns:
        the commit record (dict), with ``files`` ({table: path under root}), ``file_bytes`` and ``rows``.
    """
    key = shard_key(out.shard)
    gen = int(gen or out.extra.get("gen") or 1)
    fingerprint = fingerprint if fingerprint is not None else str(out.extra.get("fingerprint", ""))
    attempt = uuid.uuid4().hex[:12]
    t0 = time.perf_counter()
    files, sizes, rows = {}, {}, {}
    for name, table in (("patches", out.patch_table()), ("images", out.image_table()), ("errors", out.error_table())):
        if table.num_rows:
            rel, size = _write_data_file(root, name, table, out.date, key, gen, attempt, out.dim)
            files[name], sizes[name], rows[name] = f"{name}/{rel}", size, table.num_rows
    record = {
        "schema_version": SCHEMA_VERSION,
        "shard": out.shard,
        "shard_key": key,
        "date": out.date,
        "gen": gen,
        "status": status,
        "run_id": out.run_id,
        "model": out.model,
        "embedding_dim": out.dim,
        "random_init": bool(out.random_init),
        "fingerprint": fingerprint,
        "files": files,
        "file_bytes": sizes,
        "rows": rows,
        "bytes": sum(sizes.values()),
        "num_images": sum(1 for r in out.images if r["status"] != "error"),
        "num_patches": out.num_patches,
        "num_errors": len(out.errors),
        "committed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "write_s": round(time.perf_counter() - t0, 4),
        **{k: v for k, v in out.extra.items() if k not in ("gen", "fingerprint")},
    }
    if commit:
        commit_record(root, record)
    return record


# --------------------------------------------------------------------------- readers

def read_ledger(root: str, *, statuses: Iterable[str] | None = ("committed", "partial")) -> list[dict]:
    """The commit records (latest generation per shard) under ``root``, sorted by (date, shard).

    Args:
        statuses: keep only records with these statuses; None keeps all ("committed", "partial", "failed").
    """
    t = shard_states(root, columns=("record", "status"))
    if statuses is not None:
        t = t.filter(pc.is_in(t.column("status"), pa.array(list(statuses), pa.string())))
    out = [json.loads(s) for s in t.column("record").to_pylist()]
    out.sort(key=lambda r: (r["date"], r["shard"]))
    return out


def committed_shards(root: str) -> set[str]:
    """URIs of the shards committed (completely or ``partial``) under ``root``."""
    t = shard_states(root, columns=("shard", "status"))
    return set(t.filter(pc.is_in(t.column("status"), pa.array(["committed", "partial"]))).column("shard").to_pylist())


def _dataset(root: str, table: str, statuses: Sequence[str], schema: pa.Schema | None,
             dates: Sequence[str] | None = None) -> pads.Dataset:
    """The ``table`` files named by the latest commit of each shard with one of ``statuses`` (the
    ``shards`` table is the authority; the data tables' own logs may lag until :func:`publish`)."""
    t = shard_states(root, columns=("status", "date", "record"))
    keep = pc.is_in(t.column("status"), pa.array(list(statuses), pa.string()))
    if dates is not None:
        keep = pc.and_(keep, pc.is_in(t.column("date"), pa.array(list(dates), pa.string())))
    t = t.filter(keep)
    fs, base = get_fs(root)
    paths = []
    for r in t.column("record").to_pylist():
        rel = json.loads(r).get("files", {}).get(table)
        if rel:
            paths.append(f"{base}/{rel}")
    if not paths:
        if schema is None:
            raise FileNotFoundError(f"no committed shards under {root!r} (table {table_uri(root, SHARDS_TABLE)})")
        return pads.dataset(schema.empty_table())
    paths = _drop_missing(fs, paths, table, root)
    if not paths:
        return pads.dataset((schema or pa.schema([])).empty_table())
    return pads.dataset(paths, format="parquet", filesystem=fs, schema=schema)


def missing_files(fs, paths: Sequence[str]) -> list[str]:
    """The entries of ``paths`` (files named by committed shards) that are not there, found with one
    listing per parent directory (one per table and ingest date), not one request per file."""
    by_dir: dict[str, set[str]] = {}
    for p in paths:
        d, _, name = p.rpartition("/")
        by_dir.setdefault(d, set()).add(name)
    gone = set()
    for d, names in by_dir.items():
        try:
            fs.invalidate_cache(d)
            have = {e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(d, detail=False)}
        except FileNotFoundError:
            have = set()
        gone.update(f"{d}/{n}" for n in names - have)
    return [p for p in paths if p in gone]


def _drop_missing(fs, paths: list[str], table: str, root: str) -> list[str]:
    """``paths`` without the files that are gone, with one warning naming how many and the first: one lost
    part file (a bad lifecycle rule, a manual delete) must not make the whole dataset unreadable."""
    gone = missing_files(fs, paths)
    if not gone:
        return paths
    warnings.warn(f"{len(gone)} committed {table} file(s) under {root} are missing and were left out "
                  f"(first: {gone[0]}); remine those shards or restore the files", UserWarning, stacklevel=3)
    drop = set(gone)
    return [p for p in paths if p not in drop]


def open_patches(root: str, *, dates: Sequence[str] | None = None) -> pads.Dataset:
    """The committed patches of ``root`` as a pyarrow Dataset (see :func:`patch_schema`; ``embedding``
    cast back to ``fixed_size_list<float16>[dim]``).

    Args:
        dates: keep only these ingest dates (YYYY-MM-DD).
    Raises:
        FileNotFoundError: nothing committed.
        ValueError: committed shards disagree on the embedding dimension or schema version.
    """
    t = shard_states(root, columns=("status", "date", "embedding_dim", "schema_version"))
    t = t.filter(pc.is_in(t.column("status"), pa.array(["committed", "partial"])))
    if dates is not None:
        t = t.filter(pc.is_in(t.column("date"), pa.array(list(dates), pa.string())))
    dims = set(t.column("embedding_dim").to_pylist())
    if len(dims) > 1:
        raise ValueError(f"committed shards under {root!r} mix embedding dims {sorted(dims)}")
    versions = set(t.column("schema_version").to_pylist())
    if versions - {SCHEMA_VERSION}:
        raise ValueError(f"{root!r} has schema versions {sorted(versions)}, this code reads {SCHEMA_VERSION}")
    schema = patch_schema(dims.pop()) if dims else None
    return _dataset(root, "patches", ("committed", "partial"), schema, dates)


def open_images(root: str) -> pads.Dataset:
    """The committed images table (one row per frame) as a pyarrow Dataset."""
    return _dataset(root, "images", ("committed", "partial"), IMAGE_SCHEMA)


def open_errors(root: str) -> pads.Dataset:
    """The errors table of committed, partial *and* failed shards as a pyarrow Dataset."""
    return _dataset(root, "errors", ("committed", "partial", "failed"), ERROR_SCHEMA)


def dataset_info(root: str, *, warn: bool = True) -> dict:
    """Summary of the committed dataset: models, embedding dim, random_init, counts.

    Emits a UserWarning (and sets ``random_init``) when any shard was embedded with
    randomly initialised CLIP weights.
    """
    t = shard_states(root, columns=("status", "num_patches", "num_images", "num_errors", "model", "embedding_dim",
                                    "random_init", "date"))
    t = t.filter(pc.is_in(t.column("status"), pa.array(["committed", "partial"])))
    col = lambda c: t.column(c).to_pylist()  # noqa: E731
    info = {
        "shards": t.num_rows,
        "patches": int(sum(col("num_patches"))),
        "images": int(sum(col("num_images"))),
        "errors": int(sum(col("num_errors"))),
        "models": sorted(set(col("model"))),
        "embedding_dim": (col("embedding_dim")[0] if t.num_rows else None),
        "random_init": any(col("random_init")),
        "dates": sorted(set(col("date"))),
    }
    if warn and info["random_init"]:
        warnings.warn(RANDOM_INIT_WARNING.format(root=root), UserWarning, stacklevel=2)
    return info
