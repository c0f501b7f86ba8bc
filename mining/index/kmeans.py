"""Coarse k-means of an IVF index on a torch device (issue 18: "train k-means on a GPU where one exists").

Why: the faiss wheels on PyPI that this project installs (``faiss-cpu``) have no GPU code, so on a GPU
node :func:`mining.index.core.use_gpu` is False and the coarse k-means -- the bulk of training, about
n_train x nlist x D x 2 FLOPs per iteration (102,400 x 2,048 x 512 x 2 = 0.21 TFLOP, x 10 iterations
by default) -- would run on the node's CPUs.  torch with CUDA is installed there anyway (CLIP), so
the assignment step runs as chunked matmuls on the device.

What is ours and what is the library's: the k-means loop (initialisation, centroid update, splitting
of empty clusters) is faiss' own Python k-means (``faiss.contrib.clustering.kmeans``, which accepts
torch tensors); this module supplies only its assignment (``DatasetAssign`` from
``faiss.contrib.torch.clustering``, with the search done by ``torch`` matmul + max instead of
``faiss.knn``) and faiss' ``spherical`` option (centroids re-normalised each iteration, as faiss'
C++ ``Clustering`` does for our inner-product IVFs, :func:`mining.index.core.new_index`).  The
trained centroids are added to the IVF's quantizer; faiss then skips its own coarse training (a
quantizer that is trained and holds nlist vectors "does not need training") and trains PQ on the
residuals on the CPU as before.  OPQ stays on the CPU (../shared/NOTES.md).

Memory on the device: the training sample (n_train x D float32: 0.2 GB for 102,400 x 512) plus one
chunk of scores (``CHUNK`` x nlist float32: 0.5 GB at 65,536 x 2,048).
"""
from __future__ import annotations

import contextlib
import io

import faiss
import numpy as np

CHUNK = 65_536  # training vectors scored against all centroids per matmul


def torch_device() -> str | None:
    """"cuda" when torch sees a CUDA device, else None.  Hosts without NVIDIA device nodes answer None
    without importing torch (a fresh Ray worker would pay ~2 s for the import)."""
    import glob
    import os

    if not (os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/dxg") or glob.glob("/dev/nvidia[0-9]*")):  # dxg: WSL2
        return None
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    return "cuda" if torch.cuda.is_available() else None


def _assigner(x, spherical: bool):
    import torch
    from faiss.contrib.torch.clustering import DatasetAssign

    class DeviceAssign(DatasetAssign):
        """Max-inner-product assignment of ``x`` ((n, D) float32 tensor on the device)."""

        def perform_search(self, centroids):
            n = self.x.shape[0]
            dist = torch.empty(n, dtype=self.x.dtype, device=self.x.device)
            ids = torch.empty(n, dtype=torch.int64, device=self.x.device)
            for s in range(0, n, CHUNK):
                dist[s:s + CHUNK], ids[s:s + CHUNK] = (self.x[s:s + CHUNK] @ centroids.T).max(dim=1)
            return dist[:, None], ids[:, None]

        def assign_to(self, centroids, weights=None):
            assign, dist, sums = super().assign_to(centroids, weights)
            if spherical:  # faiss' kmeans divides the sums by the counts: hand it count x unit mean
                counts = torch.bincount(torch.from_numpy(assign).to(sums.device), minlength=centroids.shape[0])
                sums = torch.nn.functional.normalize(sums, dim=1) * counts.to(sums.dtype)[:, None]
            return assign, dist, sums

    return DeviceAssign(x)


def train_coarse(ivf: faiss.IndexIVF, xt: np.ndarray, *, seed: int = 0, device: str = "cuda") -> dict:
    """Train ``ivf``'s coarse quantizer with k-means on ``device`` and fill it with the centroids.

    Args:
        ivf: an untrained IVF index (inner-product metric; its ``cp``: niter, spherical,
            max_points_per_centroid are honoured, as faiss' C++ clustering does).
        xt: (n, D) float32 training vectors, already through the index's pre-transforms (OPQ).
        seed: initialisation / subsampling seed. device: a torch device ("cuda", "cpu" in tests).
    Returns: {"device", "nlist", "n", "niter", "seconds"}.
    Raises: ValueError: fewer training vectors than lists.
    """
    import time

    import torch
    from faiss.contrib.clustering import kmeans

    t0 = time.perf_counter()
    k, cp = int(ivf.nlist), ivf.cp
    xt = np.ascontiguousarray(xt, dtype=np.float32)
    if len(xt) < k:
        raise ValueError(f"{len(xt)} training vectors for {k} lists")
    cap = k * int(cp.max_points_per_centroid)
    if len(xt) > cap:  # faiss' Clustering subsamples the same way
        xt = xt[np.sort(np.random.default_rng(seed).choice(len(xt), cap, replace=False))]
    x = torch.from_numpy(xt).to(device)
    with contextlib.redirect_stdout(io.StringIO()):  # faiss' Python kmeans prints a line regardless of verbose
        cent = kmeans(k, _assigner(x, bool(cp.spherical)), niter=int(cp.niter), seed=seed, verbose=False)
    cent = np.ascontiguousarray(cent.float().cpu().numpy())
    if cp.spherical:
        faiss.normalize_L2(cent)
    ivf.quantizer.reset()
    ivf.quantizer.add(cent)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"device": device, "nlist": k, "n": int(len(xt)), "niter": int(cp.niter),
            "seconds": round(time.perf_counter() - t0, 3)}


def train_ivf(index: faiss.Index, xtrain: np.ndarray, *, seed: int = 0, device: str = "cuda") -> dict:
    """Train an untrained IVF ``index`` (optionally behind pre-transforms, e.g. OPQ) with its coarse k-means
    on ``device`` (:func:`train_coarse`) and everything else by faiss on the CPU: the pre-transforms
    first (as ``IndexPreTransform.train`` does), then PQ on the residuals of the given centroids.

    Args: xtrain: (n, D) float32, normalised. Returns: :func:`train_coarse`'s info.
    """
    xt = np.ascontiguousarray(xtrain, dtype=np.float32)
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            vt = index.chain.at(i)
            if not vt.is_trained:
                vt.train(xt)
            xt = vt.apply(xt)
    ivf = faiss.extract_index_ivf(index)
    info = train_coarse(ivf, xt, seed=seed, device=device)
    ivf.train(xt)  # the quantizer is full and trained: faiss trains only the PQ on the residuals
    index.is_trained = True
    return info
