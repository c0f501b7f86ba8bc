"""Reading a published index version: :class:`PatchIndex` and :func:`open_index`."""
from __future__ import annotations

import json
import os
import threading
import time

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc

from mining.index import core, publish
from mining.index.sizing import DEFAULT_K_FACTOR

META_FILE = "meta.arrow"
INDEX_FILE = "index.faiss"
TRAINED_FILE = "trained.faiss"
PARAMS_FILE = "params.json"
VECTORS_FILE = "vectors.npy"  # legacy (refine="store"): float16 .npy, IVF labels = patch_ids, numpy re-rank
REFINE_FILE = "refine.faiss"  # refine="fp16": IndexScalarQuantizer(QT_fp16) in row order, IVF labels = rows

META_COLUMNS = ("patch_id", "image_id", "image_uri", "shard", "date", "x0", "y0", "x1", "y1", "level", "novelty")
"""Columns of ``meta.arrow``; ``novelty`` (float32, issue 14) is null where the patches have none, and absent
in versions built before it."""


class PatchIndex:
    """A searchable index version: FAISS index + patch metadata (+ exact vectors for re-rank).

    Attributes:
        version: version name ("" for an unpublished, in-memory index).
        manifest: the version's manifest (kind, factory, n, dim, models, random_init, data_root,
            shards, params, recall_at_publish, build_s, created_at, ...).
        dim: vector dimension. ntotal: number of indexed vectors.
        params: search parameters in use (nprobe / efSearch / k_factor).

    Thread safety: :meth:`search` may be called from several threads (FAISS search is const;
    parameters are set once at open, or under a lock by :meth:`set_params`).
    """

    def __init__(self, index: faiss.Index, meta: pa.Table, manifest: dict, params: dict | None = None,
                 vectors: np.ndarray | None = None, version: str = "", path: str | None = None,
                 refine: faiss.Index | None = None):
        self.index = index
        # ivfpq-refine ("fp16"): the IVF's labels are rows of the patch_id-sorted metadata, and
        # faiss.IndexRefine re-ranks k * k_factor candidates with the float16 refine index in C++
        self._refine = refine
        self._search_index = faiss.IndexRefine(index, refine) if refine is not None else index
        self._meta = meta
        self.manifest = manifest
        self.version = version
        self.path = path
        self.dim = int(index.d)
        self.ntotal = int(index.ntotal)
        self.kind = manifest.get("kind")
        self._sorted_ids = np.asarray(meta.column("patch_id").to_numpy(), dtype=np.int64) if meta.num_rows else np.zeros(0, np.int64)
        self._vectors = vectors
        self._lock = threading.Lock()
        self.params: dict = {}
        self.set_params(params if params is not None else manifest.get("params", {}))

    # ------------------------------------------------------------------ parameters
    def set_params(self, params: dict) -> None:
        """Set search parameters: ``nprobe`` (IVF), ``efSearch`` (HNSW), ``k_factor`` (re-rank depth)."""
        with self._lock:
            self.params = dict(params or {})
            core.set_params(self.index, self.params)
            if self._refine is not None:
                self._search_index.k_factor = float(self.params.get("k_factor", DEFAULT_K_FACTOR))

    def prefault(self, max_bytes: int | None = None) -> dict:
        """Read this index's refine file into the page cache (:func:`prefault_refine`; ``path`` is the
        version / shard directory). Returns its dict; ``"skipped": "no refine"`` for kinds without one."""
        if self._refine is None:
            return {"bytes": 0, "seconds": 0.0, "skipped": "no refine"}
        path = os.path.join(self.path, REFINE_FILE) if self.path else None
        return prefault_refine(self._refine, max_bytes=max_bytes, path=path if path and os.path.isfile(path) else None)

    # ------------------------------------------------------------------ search
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k nearest patches by cosine similarity.

        Args:
            queries: (Q, D) float (a 1-D (D,) array is one query); normalised here.
            k: results per query (> 0). When fewer than k vectors match, the tail is (-inf, -1).
        Returns:
            scores (Q, k) float32 cosine similarities, descending; patch_ids (Q, k) int64 (-1 = none).
            ivfpq-refine scores are exact (re-ranked with the float16 exact vectors); ivfpq/sq8 scores
            are approximate (quantised vectors).
        Raises:
            ValueError: empty queries, wrong dimension (not ``self.dim``), NaN/inf or all-zero
            rows, k <= 0 or not an integer.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        q = core.normalize(queries, dim=self.dim, what="queries")
        if self.ntotal == 0:
            return np.full((len(q), k), core.MISSING_SCORE, np.float32), np.full((len(q), k), -1, np.int64)
        if self._refine is None and self._vectors is not None and self.manifest.get("refine") == "store":
            # legacy versions (vectors.npy, labels = patch_ids): numpy re-rank
            kf = int(self.params.get("k_factor", DEFAULT_K_FACTOR))
            _, cand = self.index.search(q, min(self.ntotal, k * kf))
            return core.rerank(q, cand, self._sorted_ids, self._vectors, k)
        s, i = self._search_index.search(q, k)
        s = s.astype(np.float32, copy=False)
        missing = i < 0
        if self._refine is not None:  # labels are rows of the patch_id-sorted metadata
            i = self._sorted_ids[np.where(missing, 0, i)]
        s[missing] = core.MISSING_SCORE
        return s, np.where(missing, -1, i).astype(np.int64, copy=False)

    # ------------------------------------------------------------------ metadata
    def metadata(self) -> pa.Table:
        """patch_id -> metadata (patch_id, image_id, image_uri, shard, date, x0, y0, x1, y1, level,
        novelty), sorted by patch_id, memory-mapped from ``meta.arrow`` (no embeddings)."""
        return self._meta

    def lookup(self, patch_ids) -> pa.Table:
        """Metadata rows of ``patch_ids`` (in the given order; unknown ids and -1 are dropped)."""
        ids = np.asarray(patch_ids, dtype=np.int64).reshape(-1)
        rows = np.searchsorted(self._sorted_ids, ids)
        rows = np.minimum(rows, max(0, len(self._sorted_ids) - 1))
        ok = (ids >= 0) & (len(self._sorted_ids) > 0)
        if len(self._sorted_ids):
            ok &= self._sorted_ids[rows] == ids
        return self._meta.take(pa.array(rows[ok]))

    def reconstruct_exact(self, patch_ids) -> np.ndarray:
        """Exact (normalised) float32 vectors of ``patch_ids``, shape (len, D).

        From the version's float16 refine file (ivfpq-refine) when present, else read back from
        the Parquet store (``manifest["data_root"]``), else reconstructed from a flat index.
        Raises: KeyError for ids not in this version.
        """
        ids = np.asarray(patch_ids, dtype=np.int64).reshape(-1)
        rows = np.searchsorted(self._sorted_ids, ids)
        rows_c = np.minimum(rows, max(0, len(self._sorted_ids) - 1))
        missing = (len(self._sorted_ids) == 0) | (self._sorted_ids[rows_c] != ids) if len(self._sorted_ids) else np.ones(len(ids), bool)
        if np.any(missing):
            raise KeyError(f"patch ids not in version {self.version}: {ids[missing][:5].tolist()}")
        if self._vectors is not None:
            v = np.asarray(self._vectors[rows_c], dtype=np.float32)
        else:
            v = self._from_store(ids)
        return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    def _from_store(self, ids: np.ndarray) -> np.ndarray:
        from mining.store import embeddings_from_arrow, open_patches

        root = self.manifest.get("data_root")
        if not root:
            raise KeyError("this index has no data_root to read exact vectors from")
        ds = open_patches(root)
        t = ds.to_table(columns=["patch_id", "embedding"], filter=pc.field("patch_id").isin(pa.array(np.unique(ids))))
        got = t.column("patch_id").to_numpy()
        emb = embeddings_from_arrow(t.column("embedding"))
        order = np.argsort(got)
        pos = np.searchsorted(got[order], ids)
        return emb[order][np.minimum(pos, len(got) - 1)]

    def __repr__(self) -> str:
        return f"PatchIndex(version={self.version!r}, kind={self.kind!r}, ntotal={self.ntotal}, dim={self.dim}, params={self.params})"


def open_vectors(path: str, *, populate: bool = True) -> np.ndarray:
    """Memory-map a ``.npy`` file of exact float16 vectors read-only, (N, D).

    ``populate``: map all pages up front (``MAP_POPULATE``): the file stays page cache (shared,
    evictable), but a query no longer takes a page fault per candidate row -- at 1M vectors the
    faults of 512 random rows cost several ms per query here. Falls back to ``np.load(mmap_mode="r")``.
    """
    import mmap

    if not populate or not hasattr(mmap, "MAP_POPULATE"):
        return np.load(path, mmap_mode="r")
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
        if fortran or not shape or shape[0] == 0:
            return np.load(path, mmap_mode="r")
        mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
    arr = np.frombuffer(mm, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
    return arr


def write_refine(path: str, vectors: np.ndarray, order: np.ndarray | None = None, *, chunk: int = 65_536) -> int:
    """Write the exact vectors of an ``ivfpq-refine`` version as a FAISS ``IndexScalarQuantizer``
    (``QT_fp16``, inner product) file, streamed: row ``r`` of the file is ``vectors[order[r]]``.

    The file is what ``faiss.write_index`` writes for such an index: the header of an empty one
    (``serialize_index``) with ``ntotal`` set, then the code vector (a uint64 byte count and the
    float16 rows).  Writing it directly skips faiss' float32 -> float16 encode (the rows already are
    float16) and never holds a second copy of the vectors; :func:`open_refine` reads it back with
    faiss and checks it.
    Args:
        vectors: (N, D) float16 (float32 is cast), L2-normalised, e.g. a memory map.
        order: (N,) int row permutation (the patch_id sort), or None for the given order.
    Returns: bytes written.  Raises: RuntimeError when faiss' serialisation does not have the
    expected layout (a faiss version change).
    """
    n, d = vectors.shape
    with open(path, "wb") as f:
        f.write(refine_header(n, d))
        for s in range(0, n, chunk):
            rows = order[s:s + chunk] if order is not None else slice(s, s + chunk)
            f.write(np.ascontiguousarray(vectors[rows], dtype=np.float16).tobytes())
        return f.tell()


def refine_header(n: int, d: int) -> bytes:
    """The bytes ``faiss.write_index`` puts before the codes of an ``IndexScalarQuantizer(d, QT_fp16, IP)``
    holding ``n`` vectors: append ``n * d`` float16 values (row-major) after it to get a valid refine
    file (what :func:`write_refine` and the streaming merge of :mod:`mining.index.merge` do).
    Raises: RuntimeError when faiss' serialisation does not have the expected layout."""
    empty = faiss.serialize_index(
        faiss.IndexScalarQuantizer(int(d), faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)).tobytes()
    le = "little"
    if (empty[:4] != b"IxSQ" or int.from_bytes(empty[4:8], le) != d or int.from_bytes(empty[8:16], le) != 0
            or int.from_bytes(empty[-8:], le) != 0):
        raise RuntimeError("unexpected faiss IndexScalarQuantizer serialisation layout; cannot stream refine file")
    return empty[:8] + int(n).to_bytes(8, le) + empty[16:-8] + int(n * d * 2).to_bytes(8, le)


def open_refine(path: str) -> tuple[faiss.Index, np.ndarray]:
    """Open a refine file written by :func:`write_refine` without reading it into memory.

    FAISS memory-maps the codes (``IO_FLAG_MMAP_IFC``: page cache, shared and evictable, not
    anonymous memory); a numpy (N, D) float16 view of the same file serves
    ``reconstruct_exact`` and the nightly re-write.  The codes are the last N * 2D bytes of the
    file (``write_index`` of an IndexScalarQuantizer ends with its code vector); the view is
    checked against ``reconstruct`` of the first and last rows.
    Returns: (index, vectors).  Raises: ValueError when the file does not have that layout.
    """
    index = faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC)
    n, d = int(index.ntotal), int(index.d)
    size = os.path.getsize(path)
    if n == 0:
        return index, np.zeros((0, d), np.float16)
    vec = np.memmap(path, dtype=np.float16, mode="r", offset=size - n * d * 2, shape=(n, d))
    for r in {0, n - 1}:
        if not np.array_equal(vec[r].astype(np.float32), index.reconstruct(r)):
            raise ValueError(f"{path}: unexpected refine file layout (row {r} differs from faiss' reconstruct)")
    return index, vec


PAGE_BYTES = 4096


def prefault_refine(refine: faiss.Index, max_bytes: int | None = None, path: str | None = None) -> dict:
    """Touch every page of a memory-mapped refine index (one byte per 4 KiB page, in file order) so that
    the first queries after a (re)load do not pay a page-cache miss per re-ranked candidate.

    FAISS maps the refine file lazily (:func:`open_refine`): a candidate row that is not yet in the page
    cache costs a disk read inside the re-rank, and a query re-ranks k * k_factor rows (2,048 at 1M),
    so the first queries after a reload are disk-bound (measured in benchmarks/RESULTS.md, issue 18:
    ``benchmarks/prefault.py``). Reading the file in order lets the kernel's read-ahead fetch it
    sequentially, and populates this mapping's page tables. The pages stay page cache (shared,
    evictable), not anonymous memory, so the resident-bytes budget is unchanged.

    Args:
        refine: the refine index from :func:`open_refine` (an IndexScalarQuantizer whose codes are mapped).
        max_bytes: skip (``"skipped": "too large"``) when the codes are larger (None: no limit).
        path: the refine file; when given it is first read with large sequential reads (16 MiB), which
            fills the page cache at disk speed, where page-by-page faults read ahead only 128 KiB at
            a time (measured: 36 MB/s page by page on this machine's disk).
    Returns: {"bytes": int, "seconds": float, "skipped": None | str}.
    """
    sq = faiss.downcast_index(refine)
    nbytes = int(sq.ntotal) * int(getattr(sq, "code_size", 0))
    if nbytes == 0 or not hasattr(sq, "codes"):
        return {"bytes": 0, "seconds": 0.0, "skipped": "no codes"}
    if max_bytes is not None and nbytes > max_bytes:
        return {"bytes": nbytes, "seconds": 0.0, "skipped": "too large"}
    t0 = time.perf_counter()
    if path:
        buf = bytearray(16 * 1024 * 1024)
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
        del buf
    codes = faiss.rev_swig_ptr(sq.codes.data(), nbytes)  # a view of faiss' own mapping, no copy
    step = 64 * 1024 * 1024
    for a in range(0, nbytes, step):
        int(codes[a:a + step:PAGE_BYTES].sum())  # one byte per page
    return {"bytes": nbytes, "seconds": round(time.perf_counter() - t0, 3), "skipped": None}


def read_meta(path: str) -> pa.Table:
    """Memory-map an Arrow IPC file (``meta.arrow``) as a Table."""
    source = pa.memory_map(path, "r")
    return pa.ipc.open_file(source).read_all()


def write_meta(path: str, table: pa.Table) -> None:
    """Write the metadata table as an Arrow IPC file (uncompressed, so it can be memory-mapped)."""
    with pa.OSFile(path, "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table, max_chunksize=1 << 20)


def read_index_file(vdir: str, manifest: dict) -> faiss.Index:
    """Read ``index.faiss`` of a version dir; on-disk merged indexes with IO_FLAG_ONDISK_SAME_DIR
    (IO_FLAG_MMAP segfaulted on search here, ../shared/NOTES.md)."""
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR if manifest.get("ondisk") else 0
    return faiss.read_index(os.path.join(vdir, INDEX_FILE), flags)


def open_index(out_root: str, version: str | None = None) -> PatchIndex:
    """Open a published version (the one ``CURRENT`` points to by default).

    Args:
        out_root: local index root. version: a name from :func:`list_versions`, or None.
    Returns: a :class:`PatchIndex` (search parameters from params.json applied).
    Raises:
        FileNotFoundError: nothing published / no such version.
    """
    if version is None:
        version = publish.current_version(out_root)
        if version is None:
            raise FileNotFoundError(f"no index published under {out_root!r} (no CURRENT file); run jobs.build_index")
    vdir = publish.version_dir(out_root, version)
    mpath = os.path.join(vdir, publish.MANIFEST)
    if not os.path.isfile(mpath):
        raise FileNotFoundError(f"no published version {version!r} under {out_root!r}")
    with open(mpath) as f:
        manifest = json.load(f)
    with open(os.path.join(vdir, PARAMS_FILE)) as f:
        params = json.load(f)
    index = read_index_file(vdir, manifest)
    meta = read_meta(os.path.join(vdir, META_FILE))
    refine, vectors = None, None
    rpath, vpath = os.path.join(vdir, REFINE_FILE), os.path.join(vdir, VECTORS_FILE)
    if os.path.exists(rpath):
        refine, vectors = open_refine(rpath)
    elif os.path.exists(vpath):
        vectors = open_vectors(vpath)
    return PatchIndex(index, meta, manifest, params, vectors, version=version, path=vdir, refine=refine)
