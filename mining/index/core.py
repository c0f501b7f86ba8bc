"""Array-level index operations: train, add, merge, exact ground truth, re-rank, quantisation error.

Everything here works on numpy arrays and FAISS objects only (no store, no Ray), so the
benchmark and the store-level build share the same code.  Vectors are float32, L2-normalised,
shape (n, d); ids are int64 patch ids; similarities are inner products (= cosine).
The search-parameter tuner and the recall measures live in :mod:`mining.index.tuning` (re-exported
here: ``core.tune``, ``core.recall_at_k``, ...).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import faiss
import numpy as np

from mining.index.blocklists import merge_block_lists  # noqa: F401  (re-exported: core.merge_block_lists)
from mining.index.sizing import IVF_KINDS, IndexPlan
from mining.index.tuning import (  # noqa: F401  (re-exported for the callers of core.tune, core.recall_at_k, ...)
    K_FACTORS,
    per_query_recall,
    recall_at_k,
    recall_lower_bound,
    tune,
)

log = logging.getLogger(__name__)

MISSING_SCORE = -np.inf  # score returned with patch_id -1 ("no result")
# OPQ dominates training time on few cores (measured here, 2 shared cores under load: OPQ64_256 with
# 10 alternations on 16k x 512 vectors took 165 s), so its budget is cut from faiss' defaults
# (niter 50, first PQ 40 k-means iterations, 65 536 training points):
OPQ_NITER = 10  # rotation <-> PQ alternations
OPQ_NITER_PQ_0 = 10  # k-means iterations of the first PQ
OPQ_MAX_TRAIN = 16_384  # points the rotation is estimated on (a random subset of the training sample)


def configure_opq(vt) -> None:
    """Apply the OPQ training budget above to a ``faiss.OPQMatrix``."""
    vt.verbose = False
    vt.niter = OPQ_NITER
    vt.niter_pq_0 = OPQ_NITER_PQ_0
    vt.max_train_points = OPQ_MAX_TRAIN


# --------------------------------------------------------------------------- vectors

def normalize(x: np.ndarray, *, dim: int | None = None, what: str = "queries") -> np.ndarray:
    """Validate and L2-normalise a (n, d) batch; returns a new C-contiguous float32 array.

    A 1-D array of length ``dim`` is taken as one vector.
    Raises:
        ValueError: empty input, not 1-D/2-D, wrong dimension, non-finite values or a zero vector.
    """
    x = np.asarray(x)
    if x.ndim == 1 and (dim is None or x.shape[0] == dim) and x.size:
        x = x.reshape(1, -1)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a (n, d) array, got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{what} is empty (shape {x.shape}); pass at least one vector")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{what} have dimension {x.shape[1]} but the index has dimension {dim}")
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or inf")
    norms = np.linalg.norm(x, axis=1)
    if (norms == 0).any():
        raise ValueError(f"{what} contain {int((norms == 0).sum())} all-zero vector(s); cannot normalise")
    x /= norms[:, None]
    return x


# --------------------------------------------------------------------------- build

def use_gpu() -> bool:
    """True when this faiss build sees a GPU (``faiss.get_num_gpus() > 0``); decided at run time."""
    try:
        return faiss.get_num_gpus() > 0
    except AttributeError:  # faiss-cpu builds without the symbol
        return False


def kmeans_device() -> str:
    """Where :func:`train_index` runs an IVF's coarse k-means here: "faiss-gpu" (faiss sees a GPU),
    "torch-cuda" (faiss does not, torch does: :mod:`mining.index.kmeans`) or "cpu"."""
    from mining.index.kmeans import torch_device

    return "faiss-gpu" if use_gpu() else "torch-cuda" if torch_device() else "cpu"


def new_index(plan: IndexPlan) -> faiss.Index:
    """An empty, untrained FAISS index for ``plan`` (inner-product metric)."""
    index = faiss.index_factory(plan.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind in IVF_KINDS:
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.spherical = True  # centroids on the unit sphere: inner-product k-means
        ivf = faiss.downcast_index(ivf)
        if isinstance(ivf, faiss.IndexIVFPQ):
            # polysemous training (PQ codes ordered for Hamming filtering, which we never use) took
            # 7 s of a 7 s training of IVF32,PQ16x5 on 1500 vectors here: off.
            ivf.do_polysemous_training = False
    return index


def _seed(index: faiss.Index, seed: int) -> None:
    """Make k-means / PQ / OPQ training deterministic for ``seed``."""
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(vt, faiss.OPQMatrix):
                configure_opq(vt)
        index = faiss.downcast_index(index.index)
    if isinstance(index, faiss.IndexIVF):
        index.cp.seed = seed
        if isinstance(index, (faiss.IndexIVFPQ, faiss.IndexIVFPQFastScan)):
            index.pq.cp.seed = seed + 1


def train_index(plan: IndexPlan, xtrain: np.ndarray, *, seed: int = 0, gpu: bool | None = None,
                kmeans_device: str | None = None) -> faiss.Index:
    """Train an empty index for ``plan`` on ``xtrain`` ((n_train, d) float32, normalised).

    On a machine where faiss sees GPUs (``gpu=None`` -> :func:`use_gpu`) the IVF/PQ part is
    trained on GPU 0 via ``index_cpu_to_gpu`` (PQ codes with ``useFloat16=True``; OPQ stays on
    the CPU, see ../shared/NOTES.md) and copied back with ``index_gpu_to_cpu``; if that fails,
    and for 4-bit fast-scan plans (no GPU version in faiss), the coarse k-means assignment alone
    runs on the GPUs (``clustering_index``).  Where faiss has no GPU (the PyPI ``faiss-cpu`` wheel)
    but torch sees CUDA, the coarse k-means runs on it (:mod:`mining.index.kmeans`;
    ``kmeans_device`` forces a torch device, "cpu" in tests).  Flat and HNSW need no
    training and are returned empty.
    Returns: a trained, empty CPU index.  Raises: ValueError on a dimension mismatch.
    """
    index = new_index(plan)
    if xtrain.shape[1] != plan.dim:
        raise ValueError(f"training vectors have dim {xtrain.shape[1]}, plan has {plan.dim}")
    if index.is_trained:
        return index
    _seed(index, seed)
    xtrain = np.ascontiguousarray(xtrain, dtype=np.float32)
    gpu = use_gpu() if gpu is None else gpu
    if kmeans_device is None and not gpu and plan.kind in IVF_KINDS:
        from mining.index.kmeans import torch_device

        kmeans_device = torch_device()
    if kmeans_device and plan.kind in IVF_KINDS:
        from mining.index.kmeans import train_ivf

        log.info("coarse k-means on %s: %s", kmeans_device, train_ivf(index, xtrain, seed=seed, device=kmeans_device))
        return index
    if gpu and plan.kind in IVF_KINDS and getattr(plan, "fast_scan", False):
        # faiss has no GPU fast-scan index: the coarse k-means (the bulk of training) runs on the GPUs
        ivf = faiss.extract_index_ivf(index)
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
    elif gpu and plan.kind in IVF_KINDS:
        try:
            res = faiss.StandardGpuResources()
            co = faiss.GpuClonerOptions()
            co.useFloat16 = True  # PQ64 lookup tables need float16 in GPU shared memory
            gindex = faiss.index_cpu_to_gpu(res, 0, index, co)
            gindex.train(xtrain)
            return faiss.index_gpu_to_cpu(gindex)
        except Exception as e:  # pragma: no cover - needs a GPU
            log.warning("GPU training of %s failed (%s); training k-means on GPU only", plan.factory, e)
            index = new_index(plan)
            _seed(index, seed)
            ivf = faiss.extract_index_ivf(index)
            ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d))
    index.train(xtrain)
    if plan.kind in IVF_KINDS:
        faiss.extract_index_ivf(index).clustering_index = None
    return index


HNSW_QUANTIZER_MIN_NLIST = 32_768  # from this many lists on, coarse assignment uses an HNSW graph over the centroids
HNSW_QUANTIZER_M = 32
HNSW_QUANTIZER_EF = 128  # efSearch of the coarse quantizer (assignment and nprobe probes)


def use_hnsw_quantizer(index: faiss.Index, *, m: int = HNSW_QUANTIZER_M, ef: int = HNSW_QUANTIZER_EF) -> None:
    """Replace the flat coarse quantizer of a trained IVF index by an HNSW graph over the same centroids.

    Assignment against a flat quantizer costs nlist * D multiply-adds per vector (89 % of the add time
    at 100M projected in issue 18); HNSW makes it ~log(nlist).  FAISS wiki "Indexing 1G vectors" uses
    ``IVF{65536..}_HNSW32`` for this.  The centroids are unchanged, so codes stay compatible with parts
    encoded by the flat quantizer (up to HNSW misses: a vector may land in its 2nd-nearest cell).
    Raises: TypeError for a non-IVF index.
    """
    ivf = faiss.extract_index_ivf(index)
    old = ivf.quantizer
    hq = faiss.IndexHNSWFlat(ivf.d, m, ivf.metric_type)
    hq.hnsw.efSearch = ef
    hq.add(old.reconstruct_n(0, ivf.nlist))
    ivf.quantizer = hq
    ivf.own_fields = True
    hq.this.disown()  # the IVF index owns (and serialises) the graph now


def default_eta(index: faiss.Index) -> float:
    """The score-aware encoding weight :func:`add_vectors` uses for ``index`` by default:
    ``anisotropic.DEFAULT_ETA`` for a 4-bit fast-scan IVF-PQ (the ivfpq-refine kind, whose candidates are
    re-ranked exactly, so only their ranking matters), 1.0 (faiss' own encoding) for everything else."""
    from mining.index import anisotropic

    ivf = anisotropic.score_aware_ivf(index)
    return anisotropic.DEFAULT_ETA if isinstance(ivf, faiss.IndexIVFPQFastScan) else 1.0


def add_vectors(index: faiss.Index, x: np.ndarray, ids: np.ndarray, *, chunk: int = 65_536,
                eta: float | None = None) -> None:
    """``add_with_ids`` in chunks (x: (n, d) float32 normalised; ids: (n,) int64 patch ids).

    ``eta`` > 1 chooses the IVF-PQ codes by the score-aware loss (:mod:`mining.index.anisotropic`,
    Guo et al. 2020) instead of faiss' nearest-codeword encoding; None -> :func:`default_eta`.
    Raises TypeError when eta > 1 is asked of an index that has no IVF-PQ codes.
    """
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    eta = default_eta(index) if eta is None else float(eta)
    if eta != 1.0:
        from mining.index import anisotropic

        anisotropic.add_with_ids(index, x, ids, eta=eta, chunk=chunk)
        return
    for s in range(0, len(ids), chunk):
        index.add_with_ids(np.ascontiguousarray(x[s:s + chunk], dtype=np.float32), ids[s:s + chunk])


def merge_indexes(dst: faiss.Index, *srcs: faiss.Index) -> None:
    """Move all vectors of each of ``srcs`` into ``dst`` (same trained state), in order. The sources are emptied.

    IVF kinds use ``faiss.merge_into`` (inverted lists appended, ids kept), except fast-scan IVF
    (``BlockInvertedLists``), which goes through :func:`merge_block_lists`; IndexIDMap over
    Flat/SQ8 uses ``merge_from``. HNSW graphs cannot be merged: raises TypeError.
    """
    if isinstance(faiss.downcast_index(dst), faiss.IndexIDMap):
        inner = faiss.downcast_index(faiss.downcast_index(dst).index)
        if isinstance(inner, faiss.IndexHNSW):
            raise TypeError("HNSW graphs cannot be merged; add the vectors to one graph instead")
        for src in srcs:
            dst.merge_from(src, 0)
        return
    if isinstance(faiss.downcast_InvertedLists(faiss.extract_index_ivf(dst).invlists), faiss.BlockInvertedLists):
        merge_block_lists(dst, list(srcs))
        return
    for src in srcs:
        faiss.merge_into(dst, src, False)


def relabel_ivf(index: faiss.Index, mapping: Callable[[np.ndarray], np.ndarray]) -> int:
    """Rewrite, in place, the ids stored in the inverted lists of an IVF index.

    ``mapping``: (m,) int64 -> (m,) int64, applied list by list (e.g. patch_id -> row of the sorted
    version, see :mod:`mining.index.build`).  Works for in-memory lists (``ArrayInvertedLists``,
    and the ``BlockInvertedLists`` of fast-scan indexes): the ids are written through
    ``InvertedLists.get_ids``; not for on-disk lists.
    Returns: the number of ids rewritten.  Raises: TypeError for a non-IVF index.
    """
    ivf = faiss.extract_index_ivf(index)
    inv = ivf.invlists
    if isinstance(faiss.downcast_InvertedLists(inv), faiss.OnDiskInvertedLists):
        raise TypeError("relabel_ivf: on-disk inverted lists are read-only here")
    total = 0
    for lno in range(ivf.nlist):
        m = inv.list_size(lno)
        if m == 0:
            continue
        ptr = inv.get_ids(lno)
        view = faiss.rev_swig_ptr(ptr, m)
        view[:] = mapping(np.array(view, dtype=np.int64))
        inv.release_ids(lno, ptr)
        total += m
    return total


def serialize(index: faiss.Index) -> np.ndarray:
    """Index -> uint8 array (for Ray object store / bytes)."""
    return faiss.serialize_index(index)


def deserialize(buf: np.ndarray) -> faiss.Index:
    """uint8 array -> index."""
    return faiss.deserialize_index(np.asarray(buf, dtype=np.uint8))


# --------------------------------------------------------------------------- exact search

def exact_topk(queries: np.ndarray, x: np.ndarray, ids: np.ndarray, k: int, *, chunk: int = 131_072):
    """Exact top-k inner products of queries (Q, d) against x (n, d) with ids (n,).

    Returns (scores (Q, k) float32, ids (Q, k) int64), padded with (-inf, -1) when n < k.
    Streams x in chunks so memory is O(Q * chunk).
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(q), k), MISSING_SCORE, np.float32)
    best_i = np.full((len(q), k), -1, np.int64)
    for s in range(0, len(x), chunk):
        xs = np.asarray(x[s:s + chunk], dtype=np.float32)
        sc = q @ xs.T
        best_s, best_i = merge_topk(best_s, best_i, sc, np.broadcast_to(np.asarray(ids[s:s + chunk], np.int64), sc.shape), k)
    return best_s, best_i


def merge_topk(s1, i1, s2, i2, k: int):
    """Merge two (Q, *) candidate sets into the top-k by score (descending)."""
    s = np.concatenate([s1, s2], axis=1)
    i = np.concatenate([i1, i2], axis=1)
    if s.shape[1] > k:
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        s = np.take_along_axis(s, part, 1)
        i = np.take_along_axis(i, part, 1)
    order = np.argsort(-s, axis=1, kind="stable")
    return np.take_along_axis(s, order, 1).astype(np.float32), np.take_along_axis(i, order, 1)


# --------------------------------------------------------------------------- re-rank

def rerank(queries: np.ndarray, cand_ids: np.ndarray, sorted_ids: np.ndarray, vectors: np.ndarray, k: int):
    """Exact re-rank of candidates: the "refine" step of ``ivfpq-refine``.

    Args:
        queries: (Q, d) float32 normalised. cand_ids: (Q, C) int64 candidate patch ids (-1 = none).
        sorted_ids: (N,) int64 ascending patch ids; vectors: (N, d) float16/float32 exact
            vectors aligned with ``sorted_ids`` (a memory map: only the touched rows are read).
    Returns:
        (scores (Q, k) float32, ids (Q, k) int64), missing = (-inf, -1).
    """
    Q, C = cand_ids.shape
    rows = np.searchsorted(sorted_ids, cand_ids)
    rows = np.minimum(rows, len(sorted_ids) - 1)
    valid = (cand_ids >= 0) & (sorted_ids[rows] == cand_ids)
    sc = np.full((Q, C), MISSING_SCORE, np.float32)
    for qi in range(Q):  # per query: one gather of C rows, one gemv (cheaper than a (Q, C, d) block)
        ok = np.nonzero(valid[qi])[0]
        if len(ok) == 0:
            continue
        g = np.asarray(vectors[rows[qi, ok]], dtype=np.float32)
        dots = g @ queries[qi]
        norms = np.sqrt(np.einsum("ij,ij->i", g, g))  # float16 storage: re-normalise
        sc[qi, ok] = dots / np.maximum(norms, 1e-12)
    ids = np.where(valid, cand_ids, -1)
    kk = min(k, C)
    part = np.argpartition(-sc, kk - 1, axis=1)[:, :kk]
    s = np.take_along_axis(sc, part, 1)
    i = np.take_along_axis(ids, part, 1)
    o = np.argsort(-s, axis=1, kind="stable")
    s, i = np.take_along_axis(s, o, 1), np.take_along_axis(i, o, 1)
    if kk < k:
        s = np.pad(s, ((0, 0), (0, k - kk)), constant_values=MISSING_SCORE)
        i = np.pad(i, ((0, 0), (0, k - kk)), constant_values=-1)
    i[~np.isfinite(s)] = -1
    return s, i


# --------------------------------------------------------------------------- parameters

def set_params(index: faiss.Index, params: dict) -> None:
    """Apply search parameters ({"nprobe": int} / {"efSearch": int}; "k_factor" is ours) to ``index``.

    Uses ``faiss.ParameterSpace`` which reaches through IndexPreTransform/IDMap wrappers.
    """
    ps = faiss.ParameterSpace()
    for name in ("nprobe", "efSearch"):
        if name in params:
            ps.set_index_parameter(index, name, float(params[name]))


def ivf_input(index: faiss.Index, x: np.ndarray):
    """What the PQ of an IVF index encodes for ``x``: the vectors through its pre-transforms (OPQ), their
    coarse cells, the cells' centroids and the residuals (the rotated vectors when not ``by_residual``).

    Args: index: a trained IVF index, optionally behind ``IndexPreTransform`` s. x: (n, D_in) float32.
    Returns: (xt (n, D) float32, lists (n,) int64, centroids (n, D) float32, residual (n, D) float32,
        the ``VectorTransform`` s applied, in order).
    Raises: ValueError when the coarse quantizer returns no cell (an untrained index).
    """
    xt, vts = np.ascontiguousarray(x, dtype=np.float32), []
    outer = faiss.downcast_index(index)
    while isinstance(outer, faiss.IndexPreTransform):
        for i in range(outer.chain.size()):
            vts.append(faiss.downcast_VectorTransform(outer.chain.at(i)))
            xt = vts[-1].apply(xt)
        outer = faiss.downcast_index(outer.index)
    xt = np.ascontiguousarray(xt, dtype=np.float32)
    ivf = faiss.extract_index_ivf(index)
    _, cell = ivf.quantizer.search(xt, 1)
    lists = cell[:, 0]
    if (lists < 0).any():
        raise ValueError("the coarse quantizer returned no list for some vectors (untrained index?)")
    cent = ivf.quantizer.reconstruct_batch(lists)
    resid = np.ascontiguousarray(xt - cent) if ivf.by_residual else xt
    return xt, lists, cent, resid, vts


def quantization_error(index: faiss.Index, x: np.ndarray) -> float:
    """Mean squared reconstruction error ||x - decode(encode(x))||^2 of normalised x (n, d).

    Uses the standalone codec (``sa_encode``/``sa_decode``) of the trained index, so the OPQ
    rotation + dimension reduction, IVF residual and PQ are all included. Flat and HNSW store
    exact vectors: 0.0. Unitless (vectors have norm 1, so 0 = exact, ~1 = no information).
    """
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexIDMap):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, (faiss.IndexFlat, faiss.IndexHNSW)) or len(x) == 0:
        return 0.0
    x = np.ascontiguousarray(x, dtype=np.float32)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index)) if isinstance(
        inner, (faiss.IndexPreTransform, faiss.IndexIVF)) else None
    if isinstance(ivf, faiss.IndexIVFPQFastScan):
        # sa_decode of IVF fast-scan indexes crashes in faiss 1.15: decode by hand
        # (pre-transforms, coarse cell, residual PQ), then undo the (orthonormal) OPQ rotation
        _, _, cent, resid, vts = ivf_input(index, x)
        rec = ivf.pq.decode(ivf.pq.compute_codes(resid))
        rec = rec + cent if ivf.by_residual else rec
        for vt in reversed(vts):
            rec = vt.reverse_transform(rec)
        return float(((x - rec) ** 2).sum(1).mean())
    codes = inner.sa_encode(x)
    rec = inner.sa_decode(codes)
    return float(((x - rec) ** 2).sum(1).mean())


class Timer:
    """``with Timer() as t: ...; t.s`` -> elapsed seconds."""

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *a):
        self.s = time.perf_counter() - self.t0
