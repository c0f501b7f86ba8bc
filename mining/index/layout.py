"""Sharded index versions (issue 18): on-storage layout, opening, fetching from ``s3://``.

Layout (``<root>`` is a local directory or an ``s3://bucket/prefix``)::

    <root>/CURRENT                                  one line: the serving version (the commit point)
    <root>/versions/<version>/manifest.json         "layout": "sharded", "shards": [{"id", "n", "date_min",
                                                    "date_max", "bytes"}, ...], "trained": <trained id>, ...
    <root>/versions/<version>/params.json           {} (each shard searches with its own params.json)
    <root>/shards/<shard_id>/index.faiss            IVF lists of the shard, labels = rows of its meta.arrow
    <root>/shards/<shard_id>/refine.faiss           float16 exact vectors in patch_id order (IndexScalarQuantizer fp16)
    <root>/shards/<shard_id>/meta.arrow             patch_id-sorted metadata of the shard
    <root>/shards/<shard_id>/params.json            the shard's tuned nprobe / k_factor
    <root>/shards/<shard_id>/tune_truth.npz         exact top-16 of the trained id's tuning queries in this shard
    <root>/shards/<shard_id>/manifest.json          written last: n, dates, store shards it holds, params, bytes
    <root>/trained/<trained_id>/trained.faiss       the shared trained codebooks (OPQ, coarse centroids, PQ)
    <root>/trained/<trained_id>/tune_queries.npy    held-out tuning queries (float32, normalised)
    <root>/trained/<trained_id>/manifest.json       plan, n_trained, quant_error, seed

A shard directory is a complete single index in the per-version format of :mod:`mining.index.search`
(``open_shard`` returns a :class:`~mining.index.search.PatchIndex`) and is **immutable** once its
``manifest.json`` exists: a nightly add writes a new shard, a compaction writes a merged shard, and
old shard directories are only deleted by :func:`gc_shards` once no version lists them.  Legacy
single-index versions (``versions/<v>/index.faiss`` ...) keep working: :func:`open_index` returns a
``PatchIndex`` for them and a :class:`ShardedIndex` for ``"layout": "sharded"``.

Commit protocol (as :mod:`mining.index.publish`): shard files, then the shard's ``manifest.json``; then
the version's ``params.json`` and ``manifest.json``; then ``CURRENT`` -- the commit point.  On a local
root a shard is written into ``shards/.staging-<id>/`` and renamed; on S3 each object PUT is atomic and
a shard or version without its ``manifest.json`` does not exist for readers.

Design decisions:

* **Why shards by date range (not by patch_id hash)**: a night's data is one new shard, so the nightly
  add writes only new files and never rewrites (or re-uploads, or re-fetches on serving hosts) an old
  shard; with hash shards every night would touch every shard.  Date shards are unequal in size, so
  small old shards are merged on a schedule (:func:`mining.index.stream.compaction_plan`).  Queries
  are not routed by date (every query asks every shard), so balance does not matter for correctness;
  a date filter can skip shards whose ``[date_min, date_max]`` misses it.  All shards of a version
  share one set of trained codebooks: the same vector gets the same coarse cell and PQ code in any
  shard, so the union of the shards' candidates contains the single index's candidates at the same
  ``nprobe``/``k_factor`` (sharded recall >= single recall at equal parameters; tested).
* **Fetch to local disk, then memory-map** (``fetch_version``): FAISS memory-maps only local files;
  shards are immutable, so a cached file with the right size is the right file (skipped).
* Version dirs on S3 are listed with ``use_listings_cache=False`` (:mod:`mining.fs`).
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import threading
import uuid

import numpy as np
import pyarrow as pa

from mining.fs import get_fs, is_local, join
from mining.index import core, publish
from mining.index.search import (INDEX_FILE, META_FILE, PARAMS_FILE, REFINE_FILE, PatchIndex, open_refine, read_index_file,
                                 read_meta)

SHARDS = "shards"
TRAINED = "trained"
LAYOUT_SHARDED = "sharded"
SHARD_FILES = (INDEX_FILE, REFINE_FILE, META_FILE, PARAMS_FILE, "tune_truth.npz", publish.MANIFEST)
TRAINED_FILE = "trained.faiss"
TUNE_QUERIES = "tune_queries.npy"
SHARD_TRUTH = "tune_truth.npz"
CACHE_ENV = "MINING_INDEX_CACHE"
DEFAULT_CACHE = "/tmp/mining-index-cache"


# --------------------------------------------------------------------------- names and small files

def new_shard_id(date_min: str, date_max: str) -> str:
    """``<date_min>_<date_max>-<8 hex>``: sorts by date, unique per write (a rebuild never reuses an id)."""
    return f"{date_min}_{date_max}-{uuid.uuid4().hex[:8]}"


def shard_uri(root: str, shard_id: str) -> str:
    """URI of a shard directory. Raises ValueError for a malformed id."""
    if not shard_id or "/" in shard_id or shard_id.startswith("."):
        raise ValueError(f"bad shard id {shard_id!r}")
    return join(root, SHARDS, shard_id)


def trained_uri(root: str, trained_id: str) -> str:
    """URI of a trained-codebooks directory."""
    if not trained_id or "/" in trained_id or trained_id.startswith("."):
        raise ValueError(f"bad trained id {trained_id!r}")
    return join(root, TRAINED, trained_id)


def read_json(uri: str) -> dict:
    """JSON object at ``uri`` (local or s3). Raises FileNotFoundError."""
    fs, path = get_fs(uri)
    with fs.open(path, "r") as f:
        return json.load(f)


def write_json(uri: str, obj) -> None:
    """JSON to ``uri``: local -> temp file + fsync + rename; s3 -> one PUT (atomic per object)."""
    if is_local(uri):
        os.makedirs(os.path.dirname(_local_path(uri)), exist_ok=True)
        publish.write_json_atomic(_local_path(uri), obj)
        return
    fs, path = get_fs(uri)
    with fs.open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)


def _local_path(uri: str) -> str:
    return os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)


def upload_dir(local_dir: str, dest_uri: str, *, last: str = publish.MANIFEST) -> int:
    """Copy the files of ``local_dir`` to ``dest_uri`` (s3 or local), the file ``last`` after all others.

    Returns: bytes copied.  Raises: OSError / botocore errors from the store (the destination then
    has no ``last`` file, i.e. does not exist for readers).
    """
    names = sorted(n for n in os.listdir(local_dir) if os.path.isfile(os.path.join(local_dir, n)))
    names = [n for n in names if n != last] + ([last] if last in names else [])
    fs, base = get_fs(dest_uri)
    total = 0
    for n in names:
        src = os.path.join(local_dir, n)
        fs.put_file(src, posixpath.join(base, n) if not is_local(dest_uri) else os.path.join(base, n))
        total += os.path.getsize(src)
    return total


def download_dir(src_uri: str, local_dir: str, names=None) -> dict:
    """Copy the files of ``src_uri`` (``names``, default all) into ``local_dir``, skipping files already
    there with the same size (index files are immutable).  Returns {"downloaded": n, "skipped": n, "bytes": b}."""
    fs, base = get_fs(src_uri)
    os.makedirs(local_dir, exist_ok=True)
    if names is None:
        entries = {posixpath.basename(e["name"]): int(e.get("size") or 0) for e in fs.ls(base, detail=True)
                   if e.get("type") == "file"}
    else:
        entries = {n: int(fs.info(posixpath.join(base, n))["size"]) for n in names if fs.exists(posixpath.join(base, n))}
    stats = {"downloaded": 0, "skipped": 0, "bytes": 0}
    for n, size in entries.items():
        dst = os.path.join(local_dir, n)
        if os.path.isfile(dst) and os.path.getsize(dst) == size:
            stats["skipped"] += 1
            continue
        tmp = f"{dst}.part-{uuid.uuid4().hex[:6]}"
        fs.get_file(posixpath.join(base, n), tmp)
        os.replace(tmp, dst)
        stats["downloaded"] += 1
        stats["bytes"] += size
    return stats


def default_cache_dir(root: str) -> str:
    """Local cache of a remote root: ``$MINING_INDEX_CACHE`` (default /tmp/mining-index-cache)/<sha1(root)[:12]>."""
    return os.path.join(os.environ.get(CACHE_ENV, DEFAULT_CACHE), hashlib.sha1(root.encode()).hexdigest()[:12])


# --------------------------------------------------------------------------- versions

def read_version_manifest(root: str, version: str | None = None) -> tuple[str, dict]:
    """(version, manifest) of ``version`` or of CURRENT. Raises FileNotFoundError when nothing is published."""
    if version is None:
        version = publish.current_version(root)
        if version is None:
            raise FileNotFoundError(f"no index published under {root!r} (no CURRENT file); run jobs.build_index")
    try:
        return version, publish.read_manifest(root, version)
    except FileNotFoundError:
        raise FileNotFoundError(f"no published version {version!r} under {root!r}") from None


def shard_manifests(root: str, manifest: dict) -> list[dict]:
    """The ``manifest.json`` of every shard a sharded version lists (small JSON reads)."""
    return [read_json(join(shard_uri(root, s["id"]), publish.MANIFEST)) for s in manifest["shards"]]


def fetch_version(root: str, version: str | None = None, cache_dir: str | None = None) -> str:
    """A local directory holding ``version`` (default: CURRENT) of ``root``, ready to open.

    Local roots: returns ``<root>/versions/<version>`` as is (nothing copied).  ``s3://`` roots: downloads
    the version's manifest and params, and for a sharded version every listed shard directory and the
    trained codebooks, into ``cache_dir`` (default :func:`default_cache_dir`), mirroring the root layout
    (``<cache_dir>/versions/<v>``, ``<cache_dir>/shards/<id>``, ``<cache_dir>/trained/<tid>``); files
    already there with the same size are skipped (shards are immutable), so a reload fetches only new
    shards.  The version's manifest is written into the cache last.
    Returns: the local version directory.  Raises: FileNotFoundError (no such version).
    """
    version, manifest = read_version_manifest(root, version)
    if is_local(root):
        return publish.version_dir(root, version)
    cache_dir = cache_dir or default_cache_dir(root)
    if manifest.get("layout") == LAYOUT_SHARDED:
        for s in manifest["shards"]:
            download_dir(shard_uri(root, s["id"]), os.path.join(cache_dir, SHARDS, s["id"]))
        if manifest.get("trained"):
            download_dir(trained_uri(root, manifest["trained"]), os.path.join(cache_dir, TRAINED, manifest["trained"]))
    return fetch_version_files(root, version, manifest, cache_dir)


def fetch_version_files(root: str, version: str, manifest: dict, cache_dir: str | None = None) -> str:
    """The version directory alone (manifest, params, a sharded version's ``uniqueness/`` parts; no
    shards): ``<root>/versions/<version>`` for a local root, else downloaded into ``cache_dir`` with the
    manifest last.  Returns the local directory."""
    if is_local(root):
        return publish.version_dir(root, version)
    vdir = os.path.join(cache_dir or default_cache_dir(root), publish.VERSIONS, version)
    vuri = join(root, publish.VERSIONS, version)
    if (manifest.get("uniqueness") or {}).get("parts"):
        part_dir = manifest["uniqueness"]["parts"]
        download_dir(join(vuri, part_dir), os.path.join(vdir, part_dir))
    download_dir(vuri, vdir)
    return vdir


# --------------------------------------------------------------------------- opening

def _open_shard_dir(d: str, version: str = "") -> PatchIndex:
    """A shard directory -> PatchIndex (labels = rows, refine file memory-mapped)."""
    with open(os.path.join(d, publish.MANIFEST)) as f:
        manifest = json.load(f)
    with open(os.path.join(d, PARAMS_FILE)) as f:
        params = json.load(f)
    index = read_index_file(d, manifest)
    meta = read_meta(os.path.join(d, META_FILE))
    refine, vectors = open_refine(os.path.join(d, REFINE_FILE))
    return PatchIndex(index, meta, manifest, params, vectors, version=version or manifest.get("id", ""), path=d,
                      refine=refine)


def open_shard(root: str, shard_id: str, *, cache_dir: str | None = None) -> PatchIndex:
    """One index shard as a :class:`PatchIndex` (``search``/``lookup``/``reconstruct_exact`` over the shard only).

    Args:
        root: index root (local or ``s3://``; s3 shards are first downloaded into ``cache_dir``,
            default :func:`default_cache_dir`, skipping files already there with the same size).
    Raises: FileNotFoundError when the shard does not exist (or has no manifest: not finished).
    """
    if is_local(root):
        d = _local_path(shard_uri(root, shard_id))
    else:
        d = os.path.join(cache_dir or default_cache_dir(root), SHARDS, shard_id)
        fs, path = get_fs(shard_uri(root, shard_id))
        if not fs.exists(posixpath.join(path, publish.MANIFEST)):
            raise FileNotFoundError(f"no index shard {shard_id!r} under {root!r}")
        download_dir(shard_uri(root, shard_id), d)
    if not os.path.isfile(os.path.join(d, publish.MANIFEST)):
        raise FileNotFoundError(f"no index shard {shard_id!r} under {root!r}")
    return _open_shard_dir(d)


def shard_meta(root: str, shard_id: str, cache_dir: str | None = None) -> pa.Table:
    """The memory-mapped ``meta.arrow`` of one shard (from s3: only that file and the manifest are
    fetched into the cache, default :func:`default_cache_dir`). Raises FileNotFoundError."""
    if is_local(root):
        d = _local_path(shard_uri(root, shard_id))
    else:
        d = os.path.join(cache_dir or default_cache_dir(root), SHARDS, shard_id)
        download_dir(shard_uri(root, shard_id), d, names=[META_FILE, publish.MANIFEST])
    path = os.path.join(d, META_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no index shard {shard_id!r} under {root!r}")
    return read_meta(path)


def open_index(root: str, version: str | None = None, *, cache_dir: str | None = None):
    """Open a published version (default: the one ``CURRENT`` points to).

    Args:
        root: index root, a local directory or ``s3://...`` (fetched with :func:`fetch_version`).
    Returns: a :class:`PatchIndex` for legacy single-index versions, a :class:`ShardedIndex` for
        ``"layout": "sharded"`` ones (same search / metadata / lookup / reconstruct_exact interface).
    Raises: FileNotFoundError: nothing published / no such version.
    """
    from mining.index import search

    version, manifest = read_version_manifest(root, version)
    if manifest.get("layout") != LAYOUT_SHARDED:
        if is_local(root):
            return search.open_index(root, version)
        vdir = fetch_version(root, version, cache_dir)
        return search.open_index(os.path.dirname(os.path.dirname(vdir)), version)
    if is_local(root):
        base = _local_path(root)
    else:
        vdir = fetch_version(root, version, cache_dir)
        base = os.path.dirname(os.path.dirname(vdir))
    shards = [_open_shard_dir(os.path.join(base, SHARDS, s["id"]), version) for s in manifest["shards"]]
    return ShardedIndex(shards, manifest, version=version, path=os.path.join(base, publish.VERSIONS, version))


class ShardedIndex:
    """A sharded version: per-shard :class:`PatchIndex` searches merged into one top-k by score.

    Same interface as :class:`PatchIndex` (``search``, ``metadata``, ``lookup``, ``reconstruct_exact``,
    ``set_params``, ``version``, ``manifest``, ``dim``, ``ntotal``, ``kind``, ``path``).  Each shard returns
    its own top-k with exact (float16 re-ranked) cosines, so merging by score gives the version's top-k
    of the union of the shards' candidates (FAISS ``IndexShards`` does the same merge in C++).
    Thread safety: as PatchIndex (searches are independent; ``set_params`` is per shard, under locks).
    """

    def __init__(self, shards: list[PatchIndex], manifest: dict, *, version: str = "", path: str | None = None,
                 threads: int = 0):
        if not shards:
            raise ValueError("a sharded index needs at least one shard")
        dims = {s.dim for s in shards}
        if len(dims) != 1:
            raise ValueError(f"shards disagree on the dimension: {sorted(dims)}")
        self.shards = shards
        self.manifest = manifest
        self.version = version
        self.path = path
        self.dim = dims.pop()
        self.ntotal = sum(s.ntotal for s in shards)
        self.kind = manifest.get("kind")
        self.params: dict = {}
        self._threads = threads
        self._meta = None
        self._lock = threading.Lock()

    def set_params(self, params: dict) -> None:
        """Apply ``params`` (nprobe / k_factor) to every shard; ``{}`` keeps each shard's own tuned params."""
        self.params = dict(params or {})
        for s in self.shards:
            s.set_params(self.params or s.manifest.get("params", {}))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k nearest patches over all shards: scores (Q, k) float32 cosine, descending; patch_ids (Q, k)
        int64 (-1 = none).  Queries (Q, D) float (normalised here).  Raises ValueError as PatchIndex.search."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        q = core.normalize(queries, dim=self.dim, what="queries")
        if self._threads > 1 and len(self.shards) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(self._threads, len(self.shards))) as ex:
                res = list(ex.map(lambda s: s.search(q, int(k)), self.shards))
        else:
            res = [s.search(q, int(k)) for s in self.shards]
        return merge_shard_results(res, int(k))

    def metadata(self) -> pa.Table:
        """All shards' metadata, sorted by patch_id (built once, then cached)."""
        with self._lock:
            if self._meta is None:
                t = pa.concat_tables([s.metadata() for s in self.shards], promote_options="default")
                self._meta = t.sort_by("patch_id")
            return self._meta

    def lookup(self, patch_ids) -> pa.Table:
        """Metadata rows of ``patch_ids`` in the given order (unknown ids and -1 dropped)."""
        ids = np.asarray(patch_ids, dtype=np.int64).reshape(-1)
        parts = [s.lookup(ids) for s in self.shards]
        t = pa.concat_tables(parts, promote_options="default")
        if t.num_rows == 0:
            return t
        got = t.column("patch_id").to_numpy()
        pos = {int(p): i for i, p in enumerate(got)}
        order = [pos[int(i)] for i in ids if int(i) in pos]
        return t.take(pa.array(order, pa.int64()))

    def reconstruct_exact(self, patch_ids) -> np.ndarray:
        """Exact normalised float32 vectors (len, D) from the shards' refine files. Raises KeyError for unknown ids."""
        ids = np.asarray(patch_ids, dtype=np.int64).reshape(-1)
        out = np.zeros((len(ids), self.dim), np.float32)
        found = np.zeros(len(ids), bool)
        for s in self.shards:
            si = s._sorted_ids
            if not len(si):
                continue
            r = np.minimum(np.searchsorted(si, ids), len(si) - 1)
            hit = (si[r] == ids) & ~found
            if hit.any():
                out[hit] = s.reconstruct_exact(ids[hit])
                found |= hit
        if not found.all():
            raise KeyError(f"patch ids not in version {self.version}: {ids[~found][:5].tolist()}")
        return out

    def __repr__(self) -> str:
        return f"ShardedIndex(version={self.version!r}, shards={len(self.shards)}, ntotal={self.ntotal}, dim={self.dim})"


def merge_shard_results(results: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (scores (Q, k_i), ids (Q, k_i)) into the top-k by score: (Q, k) float32, (Q, k) int64.

    Missing entries (-inf, -1) sort last; ties keep shard order (stable).  Used by :class:`ShardedIndex`
    and by the query router over shard actors."""
    s = np.concatenate([r[0] for r in results], axis=1).astype(np.float32, copy=False)
    i = np.concatenate([r[1] for r in results], axis=1).astype(np.int64, copy=False)
    empty_s = np.zeros((len(s), 0), np.float32)
    s, i = core.merge_topk(s, i, empty_s, empty_s.astype(np.int64), k)
    if s.shape[1] < k:
        s = np.pad(s, ((0, 0), (0, k - s.shape[1])), constant_values=core.MISSING_SCORE)
        i = np.pad(i, ((0, 0), (0, k - i.shape[1])), constant_values=-1)
    i[~np.isfinite(s)] = -1
    return s, i


def gc_shards(root: str, *, keep_versions: int | None = None) -> list[str]:
    """Delete shard directories that no published version lists (after :func:`~mining.index.publish.drop_version`).
    Returns the removed shard ids.  Never touches a shard a published version lists."""
    listed = set()
    for v in publish.list_versions(root):
        m = publish.read_manifest(root, v)
        listed |= {s["id"] for s in m.get("shards", []) if isinstance(s, dict)}
    fs, base = get_fs(join(root, SHARDS))
    if not fs.exists(base):
        return []
    removed = []
    for e in fs.ls(base, detail=False):
        sid = posixpath.basename(e.rstrip("/"))
        if sid.startswith(".") or sid in listed:
            continue
        fs.rm(e, recursive=True)
        removed.append(sid)
    return removed
