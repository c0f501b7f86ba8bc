"""The Delta Lake tables of the patch store and its exactly-once shard commit (see :mod:`mining.store`
for the layout and the protocol).
"""
from __future__ import annotations

import functools
import io
import json
import operator
import re
import os
import time
import uuid
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from mining.fs import get_fs, join
from mining.store_schema import ERROR_SCHEMA, IMAGE_SCHEMA, SCHEMA_VERSION, TABLES, patch_schema

# --------------------------------------------------------------------------- Delta tables

def delta_storage_options(root: str) -> dict[str, str] | None:
    """delta-rs ``storage_options`` for ``root``: None locally; for ``s3://`` the endpoint, region and
    keys from the same environment as :mod:`mining.fs` (``AWS_ENDPOINT_URL[_S3]``, ``AWS_*``).

    Concurrent writers on S3 rely on delta-rs' default S3 log store, which writes each commit file
    with a conditional PUT (``If-None-Match: *``): no lock service, and no ``AWS_S3_ALLOW_UNSAFE_RENAME``.
    """
    if "://" not in root or root.split("://", 1)[0] in ("file", "local"):
        return None
    opts: dict[str, str] = {}
    ep = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if ep:
        opts["AWS_ENDPOINT_URL"] = ep
        if ep.startswith("http://"):
            opts["AWS_ALLOW_HTTP"] = "true"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        opts["AWS_REGION"] = region
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if os.environ.get(k):
            opts[k] = os.environ[k]
    return opts


def table_uri(root: str, table: str) -> str:
    """URI of one Delta table of the store (``patches``, ``images``, ``errors`` or ``shards``)."""
    if "://" not in root:
        return os.path.join(os.path.abspath(os.path.expanduser(root)), table)
    if root.startswith("file://"):
        return os.path.join(os.path.abspath(root[len("file://"):]), table)
    return join(root, table)


def delta_schema(table: str) -> pa.Schema:
    """Arrow schema of a Delta table of the store. Delta has no float16 and no fixed-size lists, so the
    stored ``embedding`` is ``list<float32>``; :func:`open_patches` casts it back to
    ``fixed_size_list<float16>[dim]``."""
    if table == "patches":
        s = patch_schema(1)
        return pa.schema([pa.field("embedding", pa.list_(pa.float32())) if f.name == "embedding" else f for f in s])
    if table == "images":
        return IMAGE_SCHEMA.remove_metadata()
    if table == "errors":
        return ERROR_SCHEMA.remove_metadata()
    if table == SHARDS_TABLE:
        return SHARDS_SCHEMA
    raise ValueError(f"unknown table {table!r}")


SHARDS_TABLE = "shards"
SHARDS_SCHEMA = pa.schema([
    ("shard", pa.string()), ("shard_key", pa.string()), ("date", pa.string()), ("gen", pa.int64()),
    ("status", pa.string()),   # committed | partial | failed
    ("run_id", pa.string()), ("model", pa.string()), ("embedding_dim", pa.int32()), ("random_init", pa.bool_()),
    ("schema_version", pa.int32()), ("num_images", pa.int64()), ("num_patches", pa.int64()),
    ("num_errors", pa.int64()), ("bytes", pa.int64()), ("fingerprint", pa.string()),
    ("committed_at", pa.string()), ("record", pa.string()),   # the full commit record, JSON
    ("month", pa.string()),    # YYYY-MM of ``date``: the partition column
])
"""The authoritative table: one row per shard commit (see :mod:`mining.store`'s docstring), partitioned
by ``month`` (of the ingest date) and, after :func:`compact_shards_table`, sorted by ``shard`` within it."""

SHARDS_PARTITION = "month"

TXN_RETENTION = "interval 2 days"
"""``delta.setTransactionRetentionDuration`` of the data-side tables: a shard's app transaction guards
against retried / duplicated / concurrent commits while its run lasts; after that the ``shards`` rows
answer "is it committed" (delta-rs drops expired ``txn`` actions when it loads a snapshot, so the
snapshot does not grow with every shard ever committed)."""

SHARDS_TABLE_CONFIG = {
    "delta.setTransactionRetentionDuration": TXN_RETENTION,
    # tombstones of compacted files leave the checkpoints after a day (not the default week)
    "delta.deletedFileRetentionDuration": "interval 1 days",
}
DATA_TABLE_CONFIG = {"delta.setTransactionRetentionDuration": TXN_RETENTION}

SHARDS_ROW_GROUP = 4096
"""Rows per Parquet row group of the compacted ``shards`` files: a lookup decodes only the row groups
whose ``shard`` range holds a wanted URI."""

COMMIT_STATS = {"commits": 0, "noops": 0, "retries": 0}
"""Counters of this process: Delta commits made, commits found already done (no-ops), retried attempts."""

_TABLE_CACHE: dict[str, object] = {}
_MAX_COMMIT_TRIES = 30


def app_id(key: str) -> str:
    """The Delta application-transaction id of a shard (``txn.appId``); its version is the shard's ``gen``."""
    return f"shard:{key}"


def _load(uri: str, opts, *, create: bool):
    """A cached, refreshed :class:`deltalake.DeltaTable` of ``uri``; created when missing and ``create``.
    Returns None when the table does not exist and ``create`` is false."""
    from deltalake import DeltaTable

    dt = _TABLE_CACHE.get(uri)
    if dt is not None:
        dt.update_incremental()
        return dt
    from deltalake.exceptions import TableNotFoundError

    # (not DeltaTable.is_deltatable: its listing request hangs against the moto S3 server)
    try:
        dt = DeltaTable(uri, storage_options=opts)
    except TableNotFoundError:
        if not create:
            return None
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        shards = name == SHARDS_TABLE
        try:
            DeltaTable.create(uri, schema=delta_schema(name), mode="ignore", storage_options=opts,
                              partition_by=[SHARDS_PARTITION] if shards else None,
                              configuration=SHARDS_TABLE_CONFIG if shards else DATA_TABLE_CONFIG)
        except Exception:  # a concurrent writer created it first; the load below says if not
            pass
        dt = DeltaTable(uri, storage_options=opts)
    _TABLE_CACHE[uri] = dt
    return dt


def _txn(key: str, gen: int):
    """The app transaction of a shard commit, stamped with the commit time (``lastUpdated``, ms) so that
    it expires after :data:`TXN_RETENTION` (without a timestamp delta-rs keeps it for ever)."""
    from deltalake import Transaction

    return Transaction(app_id(key), int(gen), int(time.time() * 1000))


def _has_month(dt) -> bool:
    """Whether a ``shards`` table has the ``month`` partition column (tables made before it had none)."""
    return SHARDS_PARTITION in dt.metadata().partition_columns


def _lost_race(uri: str, sleep_s: float) -> None:
    """After a Delta commit lost a race (``CommitFailedError``): count the retry, drop the cached table so
    the next try reloads the winner's snapshot, and back off ``sleep_s`` seconds."""
    COMMIT_STATS["retries"] += 1
    _TABLE_CACHE.pop(uri, None)
    time.sleep(sleep_s)


def _commit_once(uri: str, opts, key: str, gen: int, do_commit) -> bool:
    """Run ``do_commit(dt)`` unless the table already holds app transaction ``(app_id(key), >= gen)``.

    A conflicting concurrent commit (delta-rs exhausted its own retries, or a concurrent commit of the
    same app id: "Concurrent transaction failed") is retried here with jittered backoff after a refresh.
    Returns True when this call committed, False when the commit was already there (a no-op).
    """
    import random

    from deltalake.exceptions import CommitFailedError

    for attempt in range(_MAX_COMMIT_TRIES):
        dt = _load(uri, opts, create=True)
        if (dt.transaction_version(app_id(key)) or 0) >= gen:
            COMMIT_STATS["noops"] += 1
            return False
        try:
            do_commit(dt)
            COMMIT_STATS["commits"] += 1
            return True
        except CommitFailedError:
            _lost_race(uri, min(2.0, 0.02 * 2 ** min(attempt, 6)) * random.random())
    raise RuntimeError(f"gave up committing shard {key} gen {gen} to {uri} after {_MAX_COMMIT_TRIES} tries")


def _file_tag(key: str, gen: int) -> str:
    return f"{key}-g{int(gen)}"


def _tag_of(path: str) -> str:
    """``<shard_key>-g<gen>`` of a data file named ``<shard_key>-g<gen>-<attempt>.parquet``."""
    return path.rsplit("/", 1)[-1].rsplit("-", 1)[0]


def _write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` at ``uri`` so a reader sees no object or the whole one (local: temp file +
    ``os.replace``; S3: a single PUT)."""
    fs, path = get_fs(uri)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)


def _write_data_file(root: str, table: str, data: pa.Table, date: str, key: str, gen: int, attempt: str,
                     dim: int) -> tuple[str, int]:
    """Write one shard's Parquet file inside a Delta table's directory; returns (path relative to the
    table, bytes). Not yet visible: nothing references it until the Delta commit."""
    if table == "patches":
        data = data.set_column(data.schema.get_field_index("embedding"), "embedding",
                               data.column("embedding").cast(pa.list_(pa.float32())))
    data = data.cast(delta_schema(table))
    rel = f"{date}/{_file_tag(key, gen)}-{attempt}.parquet"
    buf = io.BytesIO()
    pq.write_table(data, buf, compression="zstd")
    blob = buf.getvalue()
    _write_bytes_atomic(join(table_uri(root, table), rel), blob)
    return rel, len(blob)


def commit_record(root: str, record: dict) -> bool:
    """Commit a shard: append its row to the ``shards`` table with app transaction
    ``(shard:<key>, gen)``, the commit point of the shard. Returns False when that (shard, gen) was
    already committed (a retried, duplicated or concurrent commit is a no-op)."""
    from deltalake import CommitProperties, write_deltalake

    rec = dict(record)
    row = {name: rec.get(name) for name in SHARDS_SCHEMA.names if name != "record"}
    row.update(gen=int(rec.get("gen", 1)), schema_version=int(rec.get("schema_version", SCHEMA_VERSION)),
               fingerprint=str(rec.get("fingerprint", "")), bytes=int(rec.get("bytes", 0)),
               record=json.dumps(rec, sort_keys=True, default=str), month=str(rec.get("date", ""))[:7])
    table = pa.Table.from_pylist([row], schema=SHARDS_SCHEMA)
    uri = table_uri(root, SHARDS_TABLE)
    opts = delta_storage_options(root)

    def do(dt):
        t = table if _has_month(dt) else table.drop_columns([SHARDS_PARTITION])
        write_deltalake(dt, t, mode="append", commit_properties=CommitProperties(
            app_transactions=[_txn(row["shard_key"], row["gen"])]))

    return _commit_once(uri, opts, row["shard_key"], row["gen"], do)


def publish(root: str, *, tables: Sequence[str] = TABLES, batch: int = 5000, months: Sequence[str] | None = None) -> dict:
    """Add the data files of committed shards that the data tables do not list yet to the ``patches``,
    ``images`` and ``errors`` Delta logs, so that any Delta reader sees them (idempotent; run by the
    driver after each mining run, and by anyone at any time).

    Per table and per batch of shards: one Delta commit with an add action per file, a remove action
    for each earlier-generation file of the same shards, and the app transactions
    ``(shard:<key>, gen)`` of those shards. Two concurrent publishes of the same shards conflict on
    those app ids in delta-rs' conflict checker; the loser recomputes what is missing (nothing).

    Args:
        months: only shards of these ``YYYY-MM`` ingest months (the driver passes its run's month, so
            a run reads one month of ``shards``; None = all, for a repair).
    Returns:
        {table: files added}.
    """
    from deltalake import CommitProperties
    from deltalake.exceptions import CommitFailedError
    from deltalake.transaction import AddAction, RemoveAction

    st = shard_states(root, columns=("shard_key", "gen", "record"), months=months)
    if not st.num_rows:
        return {}
    recs = [json.loads(r) for r in st.column("record").to_pylist()]
    opts = delta_storage_options(root)
    out = {}
    for table in tables:
        uri = table_uri(root, table)
        added = 0
        for tries in range(_MAX_COMMIT_TRIES):
            dt = _load(uri, opts, create=True)
            listed = dt.get_add_actions(flatten=True).column("path").to_pylist()
            have = {_tag_of(p) for p in listed}
            todo = [r for r in recs if _file_tag(r["shard_key"], r["gen"]) not in have]
            if not todo:
                break
            by_key: dict[str, list[str]] = {}
            for p in listed:
                by_key.setdefault(_tag_of(p).rsplit("-g", 1)[0], []).append(p)
            now = int(time.time() * 1000)
            try:
                for i in range(0, len(todo), batch):
                    part = todo[i:i + batch]
                    actions = []
                    for r in part:
                        for p in by_key.get(r["shard_key"], ()):   # the shard's earlier generation
                            actions.append(RemoveAction(p, True, now))
                        rel = r.get("files", {}).get(table)
                        if rel:
                            rel = rel.split("/", 1)[1]
                            stats = json.dumps({"numRecords": int(r.get("rows", {}).get(table, 0)),
                                                "minValues": {"date": r["date"]}, "maxValues": {"date": r["date"]},
                                                "nullCount": {}})
                            actions.append(AddAction(rel, int(r.get("file_bytes", {}).get(table, 0)), {}, now, True, stats))
                    txns = [_txn(r["shard_key"], r["gen"]) for r in part]
                    dt.create_write_transaction(actions, "append", delta_schema(table),
                                                commit_properties=CommitProperties(app_transactions=txns))
                    added += sum(1 for r in part if r.get("files", {}).get(table))
                    COMMIT_STATS["commits"] += 1
                break
            except CommitFailedError:
                _lost_race(uri, 0.05 * (tries + 1))
        out[table] = added
    return out


def shard_states(root: str, *, columns: Sequence[str] = ("shard", "shard_key", "gen", "status", "fingerprint"),
                 shards: Sequence[str] | None = None, prefixes: Sequence[str] | None = None,
                 months: Sequence[str] | None = None) -> pa.Table:
    """The latest generation of shards in the ``shards`` table (one row per shard), ``columns`` only.

    Args:
        columns: the columns to return (names of :data:`SHARDS_SCHEMA`).
        shards: only these shard URIs (the planner's "which of tonight's shards are committed?").
        prefixes: only shards whose URI starts with one of these (an image folder's ``<dir>#`` chunks).
            With neither, every shard: O(shards) by nature (index build, status, readers).
        months: only shards whose ingest date is in these ``YYYY-MM`` months (partition pruning).
    Returns:
        a table with ``columns``, one row per shard found (shards never committed are absent).

    A lookup (``shards`` / ``prefixes``) reads the table snapshot -- whose size is bounded: files are
    compacted per month, and expired app transactions leave it -- then only the files whose ``shard``
    min/max statistics (Delta add-action stats, truncated strings compared as prefixes) can hold a
    wanted URI, and in them only the Parquet row groups whose statistics can (the rows of a compacted
    month are sorted by ``shard``). Fleet shard URIs of a night share a prefix (date / vehicle), so a
    night's lookup touches one month's few row groups, whatever the table's size.
    """
    cols = list(dict.fromkeys(["shard_key", "gen", *columns]))
    dt = _load(table_uri(root, SHARDS_TABLE), delta_storage_options(root), create=False)
    if dt is None:
        return SHARDS_SCHEMA.empty_table().select([c for c in columns])
    ds = dt.to_pyarrow_dataset()
    flt = None
    if months is not None and _has_month(dt):
        flt = pc.field(SHARDS_PARTITION).isin([_check_month(m) for m in months])
    if shards is not None or prefixes is not None:
        want = sorted({str(u) for u in shards or ()})
        pre = sorted({str(p) for p in prefixes or ()})
        keep = _files_that_may_hold(dt, want, pre)
        frags = [f for f in ds.get_fragments() if f.path.rsplit("/", 1)[-1] in keep]
        ds = pads.FileSystemDataset(frags, ds.schema, ds.format, ds.filesystem)
        f = pc.field("shard")
        # the range conjuncts let Parquet row-group statistics skip row groups (``isin`` alone does not)
        exprs = ([(f >= want[0]) & (f <= want[-1]) & f.isin(want)] if want else []) + [
            (f >= p) & (f <= p + "\U0010ffff") & pc.starts_with(f, p) for p in pre]
        sel = functools.reduce(operator.or_, exprs) if exprs else pc.scalar(False)
        flt = sel if flt is None else flt & sel
    t = ds.to_table(columns=cols, filter=flt)
    if t.num_rows > 1:
        # latest gen per shard: sort by (shard_key, gen desc, commit order) and keep each key's first row (a
        # duplicated (shard, gen) row cannot come through commit_record's app transaction; it would keep one)
        t = t.append_column("_i", pa.array(np.arange(t.num_rows), pa.int64()))
        t = t.sort_by([("shard_key", "ascending"), ("gen", "descending"), ("_i", "ascending")])
        k = t.column("shard_key").combine_chunks()
        first = np.ones(t.num_rows, bool)
        first[1:] = np.asarray(pc.not_equal(k.slice(1), k.slice(0, t.num_rows - 1)))
        t = t.filter(pa.array(first)).sort_by("_i")
    return t.select(list(columns))


def _check_month(m: str) -> str:
    if not (isinstance(m, str) and re.fullmatch(r"\d{4}-\d{2}", m)):
        raise ValueError(f"bad month {m!r}: expected YYYY-MM")
    return m


def _files_that_may_hold(dt, want: list[str], prefixes: list[str]) -> set[str]:
    """Base names of the ``shards`` files whose ``shard`` statistics do not rule out every URI of ``want``
    (sorted) and every prefix of ``prefixes``. Delta truncates string statistics, so a file's min/max
    are compared as prefixes of the true values (never rules out a file that holds a wanted URI)."""
    import bisect

    adds = pa.table(dt.get_add_actions(flatten=True))
    names = [p.rsplit("/", 1)[-1] for p in adds.column("path").to_pylist()]
    if "min.shard" not in adds.column_names or "max.shard" not in adds.column_names:
        return set(names)
    keep = set()
    for name, mn, mx in zip(names, adds.column("min.shard").to_pylist(), adds.column("max.shard").to_pylist()):
        if mn is None or mx is None:
            keep.add(name)
            continue
        i = bisect.bisect_left(want, mn)    # the first wanted URI >= min; true max >= mx, and starts with mx
        if i < len(want) and want[i][:len(mx)] <= mx:
            keep.add(name)
        elif any(p[:len(mx)] <= mx and mn[:len(p)] <= p for p in prefixes):
            keep.add(name)
    return keep


def compact_shards_table(root: str, *, months: Sequence[str] | None = None, min_files: int = 2) -> dict | None:
    """Rewrite months of the ``shards`` table as one file each, rows sorted by ``shard`` in row groups of
    :data:`SHARDS_ROW_GROUP` (so a lookup reads a few row groups, see :func:`shard_states`). Run by the
    driver after a mining run for the months it committed to.

    Args:
        months: the ``YYYY-MM`` partitions to rewrite; None = every month with >= ``min_files`` files.
    Returns:
        {"months": [...], "files_removed": n, "rows": n}, or None when nothing was rewritten.

    The rewrite is one Delta transaction per month (``write_deltalake(mode="overwrite",
    predicate="month = '<m>'")``), which reads that partition: a shard committed concurrently into the
    same month makes it fail delta-rs' conflict check rather than vanish, and it is retried on the new
    snapshot. The cost is bounded by a month's rows, not by the table. A checkpoint is written after.
    """
    from deltalake import WriterProperties, write_deltalake
    from deltalake.exceptions import CommitFailedError

    uri, opts = table_uri(root, SHARDS_TABLE), delta_storage_options(root)
    dt = _load(uri, opts, create=False)
    if dt is None:
        return None
    if not _has_month(dt):              # a table made before the month partition: compact it as it is
        m = dt.optimize.compact() if len(dt.file_uris()) >= 64 else None
        return None if m is None else {"months": [], "files_removed": m.get("numFilesRemoved", 0), "rows": None}
    adds = pa.table(dt.get_add_actions(flatten=True))
    per_month: dict[str, int] = {}
    for m in adds.column(f"partition.{SHARDS_PARTITION}").to_pylist():
        per_month[m] = per_month.get(m, 0) + 1
    asked = [_check_month(m) for m in months] if months is not None else list(per_month)
    todo = sorted(m for m in asked if per_month.get(m, 0) >= (min_files if months is None else 2))
    removed = rows = 0
    props = WriterProperties(max_row_group_size=SHARDS_ROW_GROUP, compression="ZSTD", statistics_truncate_length=1024)
    for m in todo:
        for attempt in range(_MAX_COMMIT_TRIES):
            dt = _load(uri, opts, create=False)
            t = dt.to_pyarrow_dataset().to_table(filter=pc.field(SHARDS_PARTITION) == m)
            if not t.num_rows:
                break
            t = t.sort_by([("shard", "ascending"), ("gen", "ascending")]).select(SHARDS_SCHEMA.names).cast(SHARDS_SCHEMA)
            try:
                write_deltalake(dt, t, mode="overwrite", predicate=f"{SHARDS_PARTITION} = '{m}'",
                                writer_properties=props)
                removed += per_month[m]
                rows += t.num_rows
                COMMIT_STATS["commits"] += 1
                break
            except CommitFailedError:
                _lost_race(uri, 0.05 * (attempt + 1))
    if todo:
        # a checkpoint now: the next process loads one small Parquet snapshot (live files, unexpired
        # txns), not the log tail since delta-rs' last periodic checkpoint
        _load(uri, opts, create=False).create_checkpoint()
    return {"months": todo, "files_removed": removed, "rows": rows} if todo else None
