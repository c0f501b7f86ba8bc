"""Reading the committed mining store for the index builds: which shards, their vectors, a uniform
sample, and groups of shards for the build tasks.

Design decisions:
- Only the ledger's committed shards with a patches part are indexed (``committed_records``): a part
  written by a worker that died before its commit is invisible here, as it is to every other reader of
  the store (:mod:`mining.store`).
- Vectors are stored as float16 and re-normalised on read (``shard_vectors``): the index searches by
  inner product, and float16 rounding moves the norms by up to about 1e-3.
- The training sample is uniform over patches, not over shards (``sample_vectors``): nights differ in
  size and a per-shard sample would over-weight the small ones in the codebooks.
- Groups of shards are contiguous in ledger order (``group_records``), so a build task reads whole
  shards and a night's shards stay together.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from mining.fs import join
from mining.store import embeddings_from_arrow, read_ledger, read_part_columns


def committed_records(data_root: str) -> list[dict]:
    """The ledger records of the committed shards that hold patches (ledger order); dicts as in
    :func:`mining.store.read_ledger`."""
    return [r for r in read_ledger(data_root) if r.get("num_patches", 0) > 0 and "patches" in r.get("files", {})]


def check_unique_patch_ids(data_root: str, records: list[dict]) -> None:
    """Refuse to index a store whose committed shards hold the same ``patch_id`` twice (the same frames
    mined under two shard keys): the index would return duplicates. Says which shards.

    Raises:
        ValueError: one line with the number of duplicated ids and the shards that hold them.
    """
    import numpy as np

    ids, owners = [], []
    for r in records:
        t = read_shard(data_root, r, ["patch_id"])
        ids.append(t.column("patch_id").to_numpy())
        owners.append(np.full(t.num_rows, len(owners), np.int64))
    if not ids:
        return
    x = np.concatenate(ids)
    o = np.concatenate(owners)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    dup = np.flatnonzero(xs[1:] == xs[:-1])
    if len(dup):
        shards = sorted({records[int(o[order][j])]["shard"] for d in dup for j in (d, d + 1)})
        raise ValueError(f"refusing to build the index: {len(dup)} patch_id(s) occur more than once in the store "
                         f"(the same frames committed under several shards): {', '.join(shards[:6])}"
                         + (f" and {len(shards) - 6} more" if len(shards) > 6 else ""))


def read_shard(data_root: str, rec: dict, columns) -> pa.Table:
    """``columns`` of a shard's patches part; optional columns an older part lacks (``novelty``) are null."""
    return read_part_columns(join(data_root, rec["files"]["patches"]), list(columns))


def shard_vectors(table: pa.Table) -> np.ndarray:
    """embedding column -> (n, D) float32, re-normalised (stored as float16)."""
    x = embeddings_from_arrow(table.column("embedding"))
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(n, 1e-12), dtype=np.float32)


def sample_vectors(data_root: str, records: list[dict], n: int, seed: int = 0) -> np.ndarray:
    """``n`` vectors drawn uniformly at random without replacement from all patches of ``records``.

    Global row numbers are sampled over the concatenation of all shards (so every patch has the
    same probability, whatever its shard), then each shard is read once.
    Returns (min(n, N), D) float32 normalised vectors, in random order.
    """
    counts = np.array([r["num_patches"] for r in records], dtype=np.int64)
    total = int(counts.sum())
    n = min(n, total)
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(total, size=n, replace=False))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    out = []
    for i, rec in enumerate(records):
        lo, hi = np.searchsorted(picks, [offsets[i], offsets[i + 1]])
        if hi > lo:
            t = read_shard(data_root, rec, ["embedding"])
            out.append(shard_vectors(t.take(pa.array(picks[lo:hi] - offsets[i]))))
    x = np.concatenate(out) if out else np.zeros((0, records[0]["embedding_dim"]), np.float32)
    return x[rng.permutation(len(x))]


def group_records(records: list[dict], n_parts: int) -> list[list[dict]]:
    """Split records (in ledger order) into <= n_parts contiguous groups of about equal patch counts."""
    n_parts = max(1, min(n_parts, len(records)))
    total = sum(r["num_patches"] for r in records)
    groups, cur, acc = [], [], 0
    for j, r in enumerate(records):
        cur.append(r)
        acc += r["num_patches"]
        left = len(records) - j - 1  # records after this one
        need = n_parts - len(groups) - 1  # groups still to open after this one
        if need > 0 and (acc >= total * (len(groups) + 1) / n_parts or left == need):
            groups.append(cur)
            cur = []
    if cur:
        groups.append(cur)
    return groups
