"""Score-aware (anisotropic) PQ codes for the IVF indexes (issue 18: the ScaNN side by side).

What: the IVF-PQ codes of a vector are chosen to minimise the *score-aware* quantisation loss of
Guo et al. 2020, "Accelerating Large-Scale Inference with Anisotropic Vector Quantization" (ICML,
the method behind ScaNN), section 3, instead of the plain reconstruction error faiss minimises.
For a unit vector x (in the OPQ-rotated space) and its reconstruction x~ = c_list + sum_m C_m[j_m],
with r = x - x~ split into the part parallel to x, r_par = (r.x) x, and the orthogonal rest:

    loss(j_1..j_M) = ||r_perp||^2 + eta * ||r_par||^2 = ||r||^2 + (eta - 1) * (r . x)^2      (Theorem 3.3)

eta = h_par / h_perp > 1 weighs the error along x more: that error shifts the inner product of every
query that scores high against x, i.e. exactly the scores a top-k ranking compares. eta = 1 is
faiss' own encoding (nearest codeword per sub-space).

How (ours): the codebooks are faiss' own, trained as before (OPQ, coarse k-means, PQ k-means); only
the assignment of codes changes, so the index file, the fast-scan search and every reader are
unchanged. The loss couples the sub-spaces through (r.x), so the codes are found by coordinate
descent (the paper's section 4.2 "we iteratively ... optimize each codeword assignment while
holding the others fixed"): start from faiss' nearest-codeword codes, then per sweep and per
sub-space m pick j_m = argmin_j ||r_m(j)||^2 + (eta - 1) (s_rest + r_m(j).x_m)^2, where s_rest is
the parallel error of the other sub-spaces. Every step lowers the loss. Per chunk of n vectors the
tables ||r_m(j)||^2 and r_m(j).x_m are (M, n, K) matmuls: 2 x n x M x K x dsub x 2 FLOPs (n D K x 4:
34 MFLOP per 1,000 vectors at D=512, K=16), then ``sweeps`` x M argmins over (n, K). The work runs in
torch on the CUDA device where one exists (:func:`mining.index.kmeans.torch_device`), on the CPU
otherwise.

Why eta = 4 (``DEFAULT_ETA``): measured on the 1M synthetic 512-d vectors of benchmarks/index.py
with faiss' PQ128x4 codebooks (benchmarks/RESULTS.md, issue 18): recall@16 after the exact re-rank of
512 candidates went 0.850 (eta 1) -> 0.960 (eta 4) -> 0.956 (eta 12). 5-fold cross-validation over the
queries (``benchmarks/anisotropic_eta.py``, 200k vectors, eta in 1/2/4/8/16) chose 4 in every fold:
0.970 +- 0.004 held out, against 0.918 for eta 1; on a second mixture it never saw, 0.920 -> 0.971.  The paper's own rule,
eta = (D - 1) T^2 / (1 - T^2) with threshold T = 0.2, gives 21 at D = 512.

Appending the codes: faiss has no "add these codes" entry for fast-scan lists that is safe to call
(``BlockInvertedLists::add_entries`` overflows, see :mod:`mining.index.blocklists`), so the codes are
grouped by list and packed into the lists by :func:`mining.index.blocklists.append_entries`.
"""
from __future__ import annotations

import faiss
import numpy as np

DEFAULT_ETA = 4.0  # h_par / h_perp; see the module docstring
SWEEPS = 2  # coordinate-descent sweeps over the M sub-spaces (the 2nd changes few codes)
CPU_CHUNK = 16_384  # vectors per chunk on the CPU: M x n x K x 2 float32 tables = 268 MB at M=128, K=16
CUDA_CHUNK = 262_144  # on a GPU: 4.3 GB of tables


def score_aware_ivf(index: faiss.Index):
    """The IVF-PQ inside ``index`` (downcast) when its codes can be chosen here, else None.

    Supported: ``IndexIVFPQFastScan`` (4-bit, ``BlockInvertedLists``) and ``IndexIVFPQ`` with 4 or 8
    bits (``ArrayInvertedLists``), each with or without residual encoding, under an optional chain of
    ``IndexPreTransform`` transforms (OPQ).
    """
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except (RuntimeError, TypeError):
        return None
    if isinstance(ivf, faiss.IndexIVFPQFastScan) and ivf.pq.nbits == 4:
        return ivf
    if isinstance(ivf, faiss.IndexIVFPQ) and ivf.pq.nbits in (4, 8) and ivf.direct_map.no():
        return ivf
    return None


def encode(residual, direction, codebooks, *, eta: float = DEFAULT_ETA, sweeps: int = SWEEPS, device=None):
    """Score-aware PQ codes (Guo et al. 2020, eq. in Theorem 3.3; coordinate descent of section 4.2).

    Args:
        residual: (n, D) float32, what the PQ encodes (x - c_list for residual IVF-PQ, else x).
        direction: (n, D) float32, the unit vectors x whose parallel error is weighted (rotated space).
        codebooks: (M, K, D/M) float32, faiss' ``pq.centroids`` reshaped.
        eta: h_par / h_perp >= 1; 1 gives the nearest-codeword codes (faiss' encoding).
        sweeps: coordinate-descent sweeps after the nearest-codeword start (ignored when eta == 1).
        device: torch device string ("cuda", "cpu"); None -> CUDA where torch sees one, else CPU.
    Returns: (n, M) uint8 code indices in [0, K).
    Raises: ValueError on mismatched shapes or eta < 1.
    """
    import torch

    from mining.index.kmeans import torch_device

    residual = np.ascontiguousarray(residual, np.float32)
    direction = np.ascontiguousarray(direction, np.float32)
    cb = np.ascontiguousarray(codebooks, np.float32)
    m_sub, k_sub, dsub = cb.shape
    n, d = residual.shape
    if direction.shape != residual.shape or d != m_sub * dsub:
        raise ValueError(f"shapes do not match: residual {residual.shape}, direction {direction.shape}, "
                         f"codebooks {cb.shape}")
    if not eta >= 1.0:
        raise ValueError(f"eta must be >= 1 (got {eta})")
    device = device or torch_device() or "cpu"
    chunk = CUDA_CHUNK if str(device).startswith("cuda") else CPU_CHUNK
    out = np.empty((n, m_sub), np.uint8)
    w = float(eta) - 1.0
    with torch.no_grad():
        C = torch.from_numpy(cb).to(device)  # (M, K, dsub)
        c_sq = (C * C).sum(-1)  # (M, K)
        for s in range(0, n, chunk):
            r = torch.from_numpy(residual[s:s + chunk]).to(device)
            u = torch.from_numpy(direction[s:s + chunk]).to(device)
            nn_ = r.shape[0]
            r = r.view(nn_, m_sub, dsub).transpose(0, 1)  # (M, n, dsub)
            u = u.view(nn_, m_sub, dsub).transpose(0, 1)
            # ||r_m - C_mj||^2 without the constant ||r_m||^2: (M, n, K)
            dist = torch.baddbmm(c_sq[:, None, :], r, C.transpose(1, 2), alpha=-2.0)
            codes = dist.argmin(-1)  # (M, n) nearest codeword: faiss' codes
            if w > 0 and sweeps > 0:
                # parallel error of sub-space m for codeword j: (r_m - C_mj) . u_m, (M, n, K)
                par = (r * u).sum(-1, keepdim=True) - torch.bmm(u, C.transpose(1, 2))
                sel = par.gather(2, codes[..., None]).squeeze(-1)  # (M, n)
                tot = sel.sum(0)  # (n,) r . x
                for _ in range(sweeps):
                    for m in range(m_sub):
                        rest = tot - sel[m]
                        loss = dist[m] + w * (rest[:, None] + par[m]) ** 2
                        cm = loss.argmin(1)
                        codes[m] = cm
                        sel[m] = par[m].gather(1, cm[:, None]).squeeze(1)
                        tot = rest + sel[m]
            out[s:s + nn_] = codes.transpose(0, 1).to("cpu", torch.uint8).numpy()
    return out


def pack_codes(codes: np.ndarray, nbits: int) -> np.ndarray:
    """(n, M) uint8 code indices -> (n, code_size) uint8 in faiss' ``ProductQuantizer`` layout.

    nbits 8: one byte per sub-space. nbits 4: two per byte, the even sub-space in the low nibble
    (faiss' ``PQEncoderGeneric`` writes bits least-significant first).  Raises ValueError otherwise.
    """
    codes = np.ascontiguousarray(codes, np.uint8)
    if nbits == 8:
        return codes
    if nbits == 4:
        if codes.shape[1] % 2:
            codes = np.concatenate([codes, np.zeros((len(codes), 1), np.uint8)], axis=1)
        return np.ascontiguousarray(codes[:, 0::2] | (codes[:, 1::2] << 4))
    raise ValueError(f"pack_codes: {nbits}-bit codes are not supported (4 or 8)")


def add_with_ids(index: faiss.Index, x: np.ndarray, ids: np.ndarray, *, eta: float = DEFAULT_ETA,
                 sweeps: int = SWEEPS, device=None, chunk: int = 65_536) -> int:
    """``index.add_with_ids(x, ids)`` with score-aware codes (see module docstring).

    Args:
        index: a trained index for which :func:`score_aware_ivf` is not None.
        x: (n, D_in) float32, L2-normalised. ids: (n,) int64 labels stored in the lists.
        eta, sweeps, device: as :func:`encode`. chunk: vectors rotated, assigned and encoded at a time
            (memory: chunk x D x 4 B x 3, 0.4 GB at 65,536 x 512, plus :func:`encode`'s tables).
        The codes of all n vectors (code_size B each) are appended to the lists in one pass.
    Returns: n. Raises: TypeError for an unsupported index; ValueError for shape mismatches.
    """
    from mining.index.blocklists import append_entries
    from mining.index.core import ivf_input

    ivf = score_aware_ivf(index)
    if ivf is None:
        raise TypeError(f"score-aware codes need an IVF-PQ index, got {type(faiss.downcast_index(index)).__name__}")
    x = np.ascontiguousarray(x, np.float32)
    ids = np.ascontiguousarray(ids, np.int64)
    if len(x) != len(ids):
        raise ValueError(f"{len(x)} vectors but {len(ids)} ids")
    if len(x) == 0:
        return 0
    pq = ivf.pq
    cb = faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)
    lists = np.empty(len(x), np.int64)
    packed = np.empty((len(x), int(ivf.code_size)), np.uint8)
    for s in range(0, len(x), chunk):  # bounded memory: chunk x D float32 rotated vectors and residuals
        xt, lno, _, residual, _ = ivf_input(index, x[s:s + chunk])
        codes = encode(residual, xt, cb, eta=eta, sweeps=sweeps, device=device)
        lists[s:s + len(xt)] = lno
        packed[s:s + len(xt)] = pack_codes(codes, pq.nbits)
    append_entries(ivf, lists, ids, packed)  # once: a fast-scan list is rebuilt once per call
    index.ntotal = ivf.ntotal
    return len(x)
