"""Ids, Arrow schemas, row builders and the in-memory shard output of the patch store (:mod:`mining.store`).

Nothing here touches storage: :mod:`mining.store_delta` holds the Delta Lake tables and the commit
protocol, :mod:`mining.store` the shard write and the readers (and re-exports this module's names).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mining.fs import get_fs

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
