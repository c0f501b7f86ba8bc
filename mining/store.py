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
delta-rs' post-commit hooks on their normal schedule; :func:`compact_shards_table` compacts ``shards``
after a run so the committed-shard lookup reads a few files.

``patch_id`` is a stable 63-bit hash of (image_id, box, level): a rerun over the
same input with the same selection gives the same ids (see :func:`make_patch_id`).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import re
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from mining.fs import get_fs, join

SCHEMA_VERSION = 1

TABLES = ("patches", "images", "errors")

RANDOM_INIT_WARNING = (
    "the patch embeddings in {root} were made with RANDOMLY INITIALISED CLIP weights "
    "(--clip-random-init): search results are not semantic"
)


# --------------------------------------------------------------------------- ids

def make_image_id(image_uri: str) -> str:
    """Stable image id: 16 hex chars of blake2b(image_uri). Same URI -> same id."""
    return hashlib.blake2b(image_uri.encode("utf-8"), digest_size=8).hexdigest()


def make_patch_id(image_id: str, box: Sequence[int], level: int) -> int:
    """Stable int64 patch id from image id + box (x0, y0, x1, y1 pixels) + hierarchy level.

    The top bit is cleared so ids are non-negative (FAISS uses -1 for "no result").
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    key = f"{image_id}|{x0},{y0},{x1},{y1}|{int(level)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


def make_patch_ids(image_ids: Sequence[str], boxes: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """:func:`make_patch_id` over columns: ``image_ids`` (N,) str, ``boxes`` (N, 4) int pixels,
    ``levels`` (N,) int -> (N,) int64, element i equal to ``make_patch_id(image_ids[i], boxes[i], levels[i])``."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    out = np.empty(len(boxes), dtype=np.int64)
    b2b = hashlib.blake2b
    for i, (iid, (x0, y0, x1, y1), lvl) in enumerate(zip(image_ids, boxes.tolist(), np.asarray(levels).tolist())):
        key = f"{iid}|{x0},{y0},{x1},{y1}|{int(lvl)}".encode()
        out[i] = int.from_bytes(b2b(key, digest_size=8).digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF
    return out


def shard_key(shard_uri: str) -> str:
    """Filesystem-safe, stable key of a shard: its base name + 10 hex of blake2b(uri)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", shard_uri.rstrip("/").rsplit("/", 1)[-1])[:60] or "shard"
    return f"{base}-{hashlib.blake2b(shard_uri.encode(), digest_size=5).hexdigest()}"


# --------------------------------------------------------------------------- schemas

def patch_schema(dim: int) -> pa.Schema:
    """Schema of the patches table.

    Columns: patch_id int64 (stable), image_id string, image_uri string, shard string (shard URI),
    date string (YYYY-MM-DD ingest date), x0, y0, x1, y1 int32 (original-image pixels, x1/y1
    exclusive), level int8 (hierarchy level, 1 = coarsest), score float32 (selection score,
    thesis Eq. 3.2), novelty float32 nullable (mean epitome NLL inside the box, nats per K x K
    working-resolution patch, from the same map the selection used; null when the run's
    saliency backend has no epitome member -- issue 14), embedding fixed_size_list<float16>[dim]
    (L2-normalised CLIP embedding), model string, run_id string.

    ``novelty`` was added without a schema-version bump: it is nullable, and parts written
    before it (no such column) read as null through :func:`open_patches` (the dataset schema
    fills missing columns) and through :func:`read_part_columns`.
    """
    return pa.schema(
        [
            ("patch_id", pa.int64()),
            ("image_id", pa.string()),
            ("image_uri", pa.string()),
            ("shard", pa.string()),
            ("date", pa.string()),
            ("x0", pa.int32()),
            ("y0", pa.int32()),
            ("x1", pa.int32()),
            ("y1", pa.int32()),
            ("level", pa.int8()),
            ("score", pa.float32()),
            ("novelty", pa.float32()),
            ("embedding", pa.list_(pa.float16(), dim)),
            ("model", pa.string()),
            ("run_id", pa.string()),
        ],
        metadata={b"schema_version": str(SCHEMA_VERSION).encode()},
    )


OPTIONAL_PATCH_COLUMNS = {"novelty": pa.float32()}
"""Nullable patches-table columns that older parts may lack (name -> type); read as null there."""


def read_part_columns(uri: str, columns: Sequence[str]) -> pa.Table:
    """Read ``columns`` of one Parquet part; columns of :data:`OPTIONAL_PATCH_COLUMNS` that the
    part lacks (written before they existed) come back as nulls of their type.

    Args:
        uri: the part (local path or any fsspec URI). columns: names, in the wanted order.
    Returns:
        a table with exactly ``columns``.
    Raises:
        KeyError: a requested column that is neither in the part nor optional.
    """
    fs, path = get_fs(uri)
    pf = pq.ParquetFile(path, filesystem=fs)
    have = set(pf.schema_arrow.names)
    missing = [c for c in columns if c not in have]
    bad = [c for c in missing if c not in OPTIONAL_PATCH_COLUMNS]
    if bad:
        raise KeyError(f"{uri} has no column(s) {bad}")
    t = pf.read(columns=[c for c in columns if c in have])
    for c in missing:
        t = t.append_column(pa.field(c, OPTIONAL_PATCH_COLUMNS[c]), pa.nulls(t.num_rows, OPTIONAL_PATCH_COLUMNS[c]))
    return t.select(list(columns))


IMAGE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image_uri", pa.string()),
        ("shard", pa.string()),
        ("date", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("num_patches", pa.int32()),
        ("status", pa.string()),  # "ok" | "skipped" | "error"
        ("reason", pa.string()),  # why skipped / failed, else ""
        ("metadata", pa.string()),  # JSON sidecar (timestamp, camera, vehicle, ...) or "{}"
        ("run_id", pa.string()),
    ],
    metadata={b"schema_version": str(SCHEMA_VERSION).encode()},
)

ERROR_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("shard", pa.string()),
        ("date", pa.string()),
        ("stage", pa.string()),  # read | decode | sidecar | select | embed | write | shard
        ("reason", pa.string()),
        ("run_id", pa.string()),
    ],
    metadata={b"schema_version": str(SCHEMA_VERSION).encode()},
)


def embeddings_to_arrow(emb: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) float array -> fixed_size_list<float16>[D] Arrow array."""
    emb = np.ascontiguousarray(emb, dtype=np.float16)
    n, d = emb.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=pa.float16()), d)


def embeddings_from_arrow(col: pa.ChunkedArray | pa.Array, dtype=np.float32) -> np.ndarray:
    """fixed_size_list<float16>[D] column -> (N, D) numpy array of ``dtype``."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    flat = col.flatten().to_numpy(zero_copy_only=False)
    if pa.types.is_fixed_size_list(col.type):
        d = col.type.list_size
    else:  # list<float32> as stored in the Delta table
        d = (len(flat) // len(col)) if len(col) else 0
    return flat.reshape(len(col), d).astype(dtype, copy=False)


# --------------------------------------------------------------------------- row builders

@dataclass
class PatchColumns:
    """The patches of several frames as columns (what :func:`patch_columns` builds).

    Attributes:
        image_ids / image_uris: one per frame (F,).
        frame: (N,) int32, the frame (index into ``image_ids``) of each patch.
        boxes: (N, 4) int32 x0, y0, x1, y1 original-image pixels, x1/y1 exclusive.
        levels: (N,) int8 hierarchy level. scores: (N,) float32 selection score.
        patch_ids: (N,) int64 stable ids (:func:`make_patch_id`).
        novelty: (N,) float32 epitome novelty (NaN = null), or None (all null).
    """

    image_ids: list[str]
    image_uris: list[str]
    frame: np.ndarray
    boxes: np.ndarray
    levels: np.ndarray
    scores: np.ndarray
    patch_ids: np.ndarray
    novelty: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.patch_ids)


def patch_columns(image_uris: Sequence[str], frame: np.ndarray, boxes: np.ndarray, levels: np.ndarray,
                  scores: np.ndarray, novelty: np.ndarray | None = None) -> PatchColumns:
    """Column arrays of N patches of F frames, with their stable ids.

    Args:
        image_uris: F frame URIs. frame: (N,) int index into ``image_uris`` of each patch.
        boxes: (N, 4) int x0, y0, x1, y1 pixels. levels: (N,) int. scores: (N,) float.
        novelty: (N,) float epitome novelty in nats (NaN = null), or None (all null).
    Returns:
        a :class:`PatchColumns`; ``patch_ids[i] == make_patch_id(make_image_id(image_uris[frame[i]]), boxes[i], levels[i])``.
    Raises:
        ValueError: arrays of different lengths, or a frame index outside ``image_uris``.
    """
    frame = np.asarray(frame, np.int32).reshape(-1)
    b = np.asarray(boxes, np.int32).reshape(-1, 4)
    lv = np.asarray(levels, np.int8).reshape(-1)
    sc = np.asarray(scores, np.float32).reshape(-1)
    nov = None if novelty is None else np.asarray(novelty, np.float32).reshape(-1)
    if not (len(frame) == len(b) == len(lv) == len(sc)) or (nov is not None and len(nov) != len(frame)):
        raise ValueError(f"column lengths differ: frame {len(frame)}, boxes {len(b)}, levels {len(lv)}, scores {len(sc)}"
                         + ("" if nov is None else f", novelty {len(nov)}"))
    if len(frame) and (frame.min() < 0 or frame.max() >= len(image_uris)):
        raise ValueError(f"frame index outside the {len(image_uris)} image URIs")
    image_ids = [make_image_id(u) for u in image_uris]
    ids = make_patch_ids([image_ids[i] for i in frame.tolist()], b, lv)
    return PatchColumns(image_ids, list(image_uris), frame, b, lv, sc, ids, nov)


def patch_block_table(cols: PatchColumns, embeddings: np.ndarray, *, shard: str, date: str, model: str, run_id: str,
                      dim: int) -> pa.Table:
    """Arrow patches table (:func:`patch_schema`) of one column block, rows in block order.

    Args:
        embeddings: (N, dim) float (stored as float16), row i for patch i of ``cols``.
    Raises:
        ValueError: ``embeddings`` is not (N, dim).
    """
    n = len(cols)
    emb = np.asarray(embeddings)
    if emb.shape != (n, dim):
        raise ValueError(f"{n} patches of dim {dim} but embeddings of shape {emb.shape}")
    schema = patch_schema(dim)
    frame = pa.array(cols.frame, pa.int32())
    const = lambda v: pa.repeat(pa.scalar(v, pa.string()), n)  # noqa: E731
    arrays = {
        "patch_id": pa.array(cols.patch_ids, pa.int64()),
        "image_id": pa.array(cols.image_ids, pa.string()).take(frame),
        "image_uri": pa.array(cols.image_uris, pa.string()).take(frame),
        "shard": const(shard), "date": const(date),
        "x0": pa.array(cols.boxes[:, 0], pa.int32()), "y0": pa.array(cols.boxes[:, 1], pa.int32()),
        "x1": pa.array(cols.boxes[:, 2], pa.int32()), "y1": pa.array(cols.boxes[:, 3], pa.int32()),
        "level": pa.array(cols.levels, pa.int8()), "score": pa.array(cols.scores, pa.float32()),
        "novelty": (pa.nulls(n, pa.float32()) if cols.novelty is None
                    else pa.array(cols.novelty, pa.float32(), mask=np.isnan(cols.novelty))),
        "embedding": embeddings_to_arrow(emb.reshape(n, dim)),
        "model": const(model), "run_id": const(run_id),
    }
    return pa.Table.from_arrays([arrays[f.name] for f in schema], schema=schema)


def image_row(image_uri: str, *, shard: str, date: str, run_id: str, width: int = 0, height: int = 0,
              num_patches: int = 0, status: str = "ok", reason: str = "", metadata: dict | None = None) -> dict:
    """One row of the images table (:data:`IMAGE_SCHEMA`); width/height in pixels of the upright frame
    (0 when it was never decoded), ``status`` "ok" | "skipped" | "error"."""
    return dict(image_id=make_image_id(image_uri), image_uri=image_uri, shard=shard, date=date, width=int(width),
                height=int(height), num_patches=int(num_patches), status=status, reason=reason or "",
                metadata=json.dumps(metadata or {}, sort_keys=True, default=str), run_id=run_id)


# --------------------------------------------------------------------------- shard output

@dataclass
class ShardOutput:
    """Everything one shard produced, before commit.

    Patches arrive in two forms, both written to the same table: ``patches`` (a list of row
    dicts, ``embeddings`` the aligned (n_i, dim) blocks; for small producers and tests) and
    column blocks added with :meth:`add_patch_block` (the mining actor: no dict per patch).

    Attributes:
        shard: shard URI; date: ingest date YYYY-MM-DD; run_id: the mining run.
        patches / images / errors: lists of row dicts.
        blocks: Arrow tables of the column blocks (:func:`patch_block_table`).
    """

    shard: str
    date: str
    run_id: str
    model: str
    dim: int
    random_init: bool = False
    patches: list[dict] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)  # (n_i, dim) blocks, aligned with patches
    images: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    blocks: list[pa.Table] = field(default_factory=list)
    status: str = "committed"   # "partial" when the shard itself turned out corrupt while reading

    def add_error(self, uri: str, stage: str, reason: str) -> None:
        self.errors.append(dict(uri=uri, shard=self.shard, date=self.date, stage=stage, reason=reason, run_id=self.run_id))

    def add_patch_block(self, cols: PatchColumns, embeddings: np.ndarray) -> None:
        """Add the patches of ``cols`` with their (N, dim) embeddings (built into Arrow now)."""
        self.blocks.append(patch_block_table(cols, embeddings, shard=self.shard, date=self.date, model=self.model,
                                             run_id=self.run_id, dim=self.dim))

    @property
    def num_patches(self) -> int:
        return len(self.patches) + sum(t.num_rows for t in self.blocks)

    def patch_table(self) -> pa.Table:
        """All patches, sorted by (image_uri, level, patch_id): a rerun gives an identical table."""
        schema = patch_schema(self.dim)
        if not self.patches:
            if not self.blocks:
                return schema.empty_table()
            t = pa.concat_tables(self.blocks) if len(self.blocks) > 1 else self.blocks[0]
            return t.sort_by([("image_uri", "ascending"), ("level", "ascending"), ("patch_id", "ascending")])
        cols = {name: [r.get(name) if name in OPTIONAL_PATCH_COLUMNS else r[name] for r in self.patches]
                for name in schema.names if name != "embedding"}
        emb = np.concatenate(self.embeddings, axis=0) if self.embeddings else np.zeros((0, self.dim), np.float16)
        if emb.shape[0] != len(self.patches):
            raise ValueError(f"{len(self.patches)} patch rows but {emb.shape[0]} embeddings")
        arrays = []
        for f in schema:
            if f.name == "embedding":
                arrays.append(embeddings_to_arrow(emb))
            else:
                arrays.append(pa.array(cols[f.name], type=f.type))
        t = pa.Table.from_arrays(arrays, schema=schema)
        if self.blocks:
            t = pa.concat_tables([t, *self.blocks])
        # deterministic row order: rerun => identical table
        return t.sort_by([("image_uri", "ascending"), ("level", "ascending"), ("patch_id", "ascending")])

    def image_table(self) -> pa.Table:
        rows = sorted(self.images, key=lambda r: r["image_uri"])
        return pa.Table.from_pylist(rows, schema=IMAGE_SCHEMA)

    def error_table(self) -> pa.Table:
        rows = sorted(self.errors, key=lambda r: (r["uri"], r["stage"]))
        return pa.Table.from_pylist(rows, schema=ERROR_SCHEMA)


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
])
"""The authoritative table: one row per shard commit (see the module docstring)."""

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
        try:
            DeltaTable.create(uri, schema=delta_schema(name), mode="ignore", storage_options=opts)
        except Exception:  # a concurrent writer created it first; the load below says if not
            pass
        dt = DeltaTable(uri, storage_options=opts)
    _TABLE_CACHE[uri] = dt
    return dt


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
            COMMIT_STATS["retries"] += 1
            _TABLE_CACHE.pop(uri, None)
            time.sleep(min(2.0, 0.02 * 2 ** min(attempt, 6)) * random.random())
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


def commit_record(root: str, record: dict) -> bool:
    """Commit a shard: append its row to the ``shards`` table with app transaction
    ``(shard:<key>, gen)``, the commit point of the shard. Returns False when that (shard, gen) was
    already committed (a retried, duplicated or concurrent commit is a no-op)."""
    from deltalake import CommitProperties, Transaction, write_deltalake

    rec = dict(record)
    row = {name: rec.get(name) for name in SHARDS_SCHEMA.names if name != "record"}
    row.update(gen=int(rec.get("gen", 1)), schema_version=int(rec.get("schema_version", SCHEMA_VERSION)),
               fingerprint=str(rec.get("fingerprint", "")), bytes=int(rec.get("bytes", 0)),
               record=json.dumps(rec, sort_keys=True, default=str))
    table = pa.Table.from_pylist([row], schema=SHARDS_SCHEMA)
    uri = table_uri(root, SHARDS_TABLE)
    opts = delta_storage_options(root)

    def do(dt):
        write_deltalake(dt, table, mode="append",
                        commit_properties=CommitProperties(app_transactions=[Transaction(app_id(row["shard_key"]), row["gen"])]))

    return _commit_once(uri, opts, row["shard_key"], row["gen"], do)


def publish(root: str, *, tables: Sequence[str] = TABLES, batch: int = 5000) -> dict:
    """Add the data files of committed shards that the data tables do not list yet to the ``patches``,
    ``images`` and ``errors`` Delta logs, so that any Delta reader sees them (idempotent; run by the
    driver after each mining run, and by anyone at any time).

    Per table and per batch of shards: one Delta commit with an add action per file, a remove action
    for each earlier-generation file of the same shards, and the app transactions
    ``(shard:<key>, gen)`` of those shards. Two concurrent publishes of the same shards conflict on
    those app ids in delta-rs' conflict checker; the loser recomputes what is missing (nothing).
    Returns:
        {table: files added}.
    """
    from deltalake import CommitProperties, Transaction
    from deltalake.exceptions import CommitFailedError
    from deltalake.transaction import AddAction, RemoveAction

    st = shard_states(root, columns=("shard_key", "gen", "record"))
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
                    txns = [Transaction(app_id(r["shard_key"]), int(r["gen"])) for r in part]
                    dt.create_write_transaction(actions, "append", delta_schema(table),
                                                commit_properties=CommitProperties(app_transactions=txns))
                    added += sum(1 for r in part if r.get("files", {}).get(table))
                    COMMIT_STATS["commits"] += 1
                break
            except CommitFailedError:
                COMMIT_STATS["retries"] += 1
                _TABLE_CACHE.pop(uri, None)
                time.sleep(0.05 * (tries + 1))
        out[table] = added
    return out


# --------------------------------------------------------------------------- readers

def shard_states(root: str, *, columns: Sequence[str] = ("shard", "shard_key", "gen", "status", "fingerprint")) -> pa.Table:
    """The latest generation of every shard in the ``shards`` table (one row per shard), ``columns`` only.

    Reads the table's current snapshot (checkpoint + log tail), the given columns only: the cost grows
    with the number of *shards*, not with the rows ever written to the data tables.
    """
    cols = list(dict.fromkeys(["shard_key", "gen", *columns]))
    dt = _load(table_uri(root, SHARDS_TABLE), delta_storage_options(root), create=False)
    if dt is None:
        return SHARDS_SCHEMA.empty_table().select([c for c in columns])
    t = dt.to_pyarrow_dataset().to_table(columns=cols)
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
    return pads.dataset(paths, format="parquet", filesystem=fs, schema=schema)


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


def compact_shards_table(root: str, *, min_files: int = 64) -> dict | None:
    """Compact the small per-commit files of the ``shards`` table (``optimize.compact``) when it has at
    least ``min_files`` files, so "which shards are committed" reads a few files, not one per shard.
    Returns delta-rs' metrics, or None when nothing was done. Data tables are not compacted: their
    file names carry the (shard, gen) that readers select on."""
    dt = _load(table_uri(root, SHARDS_TABLE), delta_storage_options(root), create=False)
    if dt is None or len(dt.file_uris()) < min_files:
        return None
    m = dt.optimize.compact()
    return m
