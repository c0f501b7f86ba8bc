"""The patch store: four Delta Lake tables (delta-rs, ``deltalake``) with exactly-once shard commits.

Layout on a local directory or ``s3://bucket/prefix``::

    <root>/patches/   Delta table, one row per selected patch    (files <date>/<shard_key>-g<gen>-<attempt>.parquet)
    <root>/images/    Delta table, one row per frame
    <root>/errors/    Delta table, one row per failure
    <root>/shards/    Delta table, one row per shard commit: the authoritative table (:data:`SHARDS_SCHEMA`)

Commit protocol of one shard (``key`` = :func:`shard_key`, ``gen`` = 1, +1 each re-mine of a partial or
failed shard):

1. for each of ``patches``, ``images``, ``errors``: write the shard's Parquet file (name
   ``<key>-g<gen>-<attempt>``, unreferenced so far), then commit it in one Delta transaction that
   carries the application transaction ``txn(appId="shard:<key>", version=gen)`` (for gen > 1 the
   same commit removes the shard's earlier-generation files). Before committing, the writer reads
   ``transaction_version("shard:<key>")``: if it is already >= gen the commit is skipped (a retry whose
   earlier attempt got that far). Two concurrent commits of the same app id conflict in delta-rs'
   conflict checker ("Concurrent transaction failed"); the loser refreshes and finds it done.
2. append the shard's row (with its full commit record as JSON) to ``shards`` with the same
   app transaction: this single commit is the commit point.

Readers (:func:`open_patches`, :func:`open_images`, :func:`open_errors`, the index build, the query
metadata, status) first read ``shards`` (latest gen per shard) and then only the data files whose
``<key>-g<gen>`` tag belongs to a committed row: a shard is seen in all three tables or in none. A run
killed between step 1 and 2 leaves data committed in a data table but invisible to these readers; the
rerun's step 1 is a no-op (txn already there) and step 2 makes it visible. A plain Delta reader
(``DeltaTable(root + "/patches")``) sees committed data files, so it can show such a shard before its
``shards`` row lands; join on ``shards`` (the README shows how) for the exact view.

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


def _commit_data_file(root: str, table: str, rel: str | None, size: int, nrows: int, date: str, key: str, gen: int):
    """Commit one shard's data file to ``table`` (append; for gen > 1 also removing the shard's files of
    earlier generations), exactly once per (shard, gen) via the app transaction."""
    from deltalake import CommitProperties, Transaction
    from deltalake.transaction import AddAction, RemoveAction

    uri = table_uri(root, table)
    opts = delta_storage_options(root)
    now = int(time.time() * 1000)

    def do(dt):
        actions = []
        if gen > 1:   # replace the shard's earlier generation (a partial or failed one) in the same commit
            prefix = f"{key}-g"
            for p in dt.get_add_actions(flatten=True).column("path").to_pylist():
                name = p.rsplit("/", 1)[-1]
                if name.startswith(prefix) and _tag_of(p) != _file_tag(key, gen):
                    actions.append(RemoveAction(p, True, now))
        if rel is not None:
            stats = json.dumps({"numRecords": nrows, "minValues": {"date": date}, "maxValues": {"date": date},
                                "nullCount": {}})
            actions.append(AddAction(rel, size, {}, now, True, stats))
        dt.create_write_transaction(actions, "append", delta_schema(table),
                                    commit_properties=CommitProperties(app_transactions=[Transaction(app_id(key), gen)]))

    return _commit_once(uri, opts, key, gen, do)


def write_shard(root: str, out: ShardOutput, *, commit: bool = True, status: str = "committed", gen: int | None = None,
                fingerprint: str | None = None) -> dict:
    """Write and commit a shard's rows to the ``patches``, ``images`` and ``errors`` tables, then (if
    ``commit``) its row in the authoritative ``shards`` table (:func:`commit_record`).

    Each data-table commit carries the app transaction ``(shard:<key>, gen)``: a retry of the same
    (shard, gen) whose data commit already landed skips it (no second copy); readers only see a shard's
    data once its ``shards`` row is committed.

    Args:
        root: dataset root URI. out: the shard's output.
        status: "committed" (read completely), "partial" (a corrupt shard: the frames that were read) or
            "failed" (gave up after retries; errors only).
        gen: the shard's generation (1 the first time; +1 each re-mine of a partial/failed shard);
            default ``out.extra["gen"]`` or 1. fingerprint: the shard's content fingerprint
            (size + ETag/mtime), default ``out.extra["fingerprint"]`` or "".
    Returns:
        the commit record (dict).
    """
    key = shard_key(out.shard)
    gen = int(gen or out.extra.get("gen") or 1)
    fingerprint = fingerprint if fingerprint is not None else str(out.extra.get("fingerprint", ""))
    attempt = uuid.uuid4().hex[:12]
    t0 = time.perf_counter()
    files, nbytes = {}, 0
    for name, table in (("patches", out.patch_table()), ("images", out.image_table()), ("errors", out.error_table())):
        rel, size = (None, 0)
        dt = _load(table_uri(root, name), delta_storage_options(root), create=False)
        if dt is not None and (dt.transaction_version(app_id(key)) or 0) >= gen:
            COMMIT_STATS["noops"] += 1   # an earlier attempt of this (shard, gen) committed it already
            tag = _file_tag(key, gen)
            done = [p for p in dt.get_add_actions(flatten=True).column("path").to_pylist() if _tag_of(p) == tag]
            if done:
                files[name] = f"{name}/{done[0]}"
            continue
        if table.num_rows:
            rel, size = _write_data_file(root, name, table, out.date, key, gen, attempt, out.dim)
            files[name] = f"{name}/{rel}"
        nbytes += size
        _commit_data_file(root, name, rel, size, table.num_rows, out.date, key, gen)
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
        "bytes": nbytes,
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
    if t.num_rows:
        # latest gen per shard; a duplicated (shard, gen) row (cannot happen through commit_record's app
        # transaction, but a hand-made one could) keeps its first row
        idx = pa.array(np.arange(t.num_rows), pa.int64())
        t = t.append_column("_i", idx)
        last = t.group_by("shard_key").aggregate([("gen", "max")]).rename_columns(["shard_key", "gen"])
        t = t.join(last, ["shard_key", "gen"], join_type="inner")
        first = t.group_by(["shard_key", "gen"]).aggregate([("_i", "min")]).rename_columns(["shard_key", "gen", "_i"])
        t = t.join(first, ["shard_key", "gen", "_i"], join_type="inner").sort_by("_i")
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
    t = shard_states(root, columns=("shard_key", "gen", "status", "date"))
    keep = pc.is_in(t.column("status"), pa.array(list(statuses), pa.string()))
    if dates is not None:
        keep = pc.and_(keep, pc.is_in(t.column("date"), pa.array(list(dates), pa.string())))
    t = t.filter(keep)
    tags = {_file_tag(k, g) for k, g in zip(t.column("shard_key").to_pylist(), t.column("gen").to_pylist())}
    dt = _load(table_uri(root, table), delta_storage_options(root), create=False)
    fs, _ = get_fs(root)
    paths = [] if dt is None else [u for u in dt.file_uris() if _tag_of(u) in tags]
    if not paths:
        if schema is None:
            raise FileNotFoundError(f"no committed shards under {root!r} (table {table_uri(root, SHARDS_TABLE)})")
        return pads.dataset(schema.empty_table())
    paths = [get_fs(u)[1] for u in paths]
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
