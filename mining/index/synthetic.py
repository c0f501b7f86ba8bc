"""A clustered synthetic generator of unit vectors for index tests and benchmarks.

Isotropic Gaussian noise on the sphere has no neighbourhood structure: every point is about
equally far from every other, which makes PQ look hopeless (and graph indexes slow); a few
tight, spherical clusters make everything look perfect.  Patch embeddings (CLIP) are in
between: a strong shared direction (all images of roads), many object/scene clusters of very
different sizes (rare objects!), each spread along a few dominant directions.  The model:

    x = normalise( c_j + B_j (s * z) + eps * e ),   j ~ Zipf(a) over n_clusters clusters

* ``c_j = normalise(w * m + g_j)``: cluster centres share a common direction ``m``
  (weight ``w = common``), ``g_j ~ N(0, I/d)``, so random pairs have cosine ~0.3-0.5 like CLIP;
* ``B_j``: a random orthonormal (d, rank) basis per cluster (anisotropy: each cluster lies near
  its own ``rank``-dim subspace), ``s_i = spread * i^(-decay)`` power-law axis scales,
  ``z ~ N(0, I_rank)``;
* ``eps * e``: small isotropic noise (``e ~ N(0, I/d)``);
* cluster weights ``p_j ∝ j^(-zipf)``: a few big clusters, a long tail of rare ones.

Deterministic: the mixture is fixed by ``seed``; :meth:`ClusteredMixture.sample` draws points
with its own seed (database and queries from the same mixture, different seeds).
"""
from __future__ import annotations

import numpy as np


class ClusteredMixture:
    """Mixture of anisotropic clusters on the unit sphere (see module docstring).

    Args:
        dim: vector dimension (512 for CLIP ViT-B/16).
        n_clusters: number of clusters. rank: dims of each cluster's subspace.
        spread: scale of the first axis; decay: power-law exponent of axis scales.
        common: weight of the shared direction; noise: isotropic noise norm; zipf: exponent
            of the cluster-size distribution. seed: fixes the mixture.
    """

    def __init__(self, dim: int = 512, *, n_clusters: int = 1000, rank: int = 32, spread: float = 0.9,
                 decay: float = 0.6, common: float = 0.8, noise: float = 0.25, zipf: float = 1.0, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.dim, self.n_clusters, self.rank, self.noise = dim, n_clusters, rank, noise
        m = rng.standard_normal(dim)
        m /= np.linalg.norm(m)
        g = rng.standard_normal((n_clusters, dim)) / np.sqrt(dim)
        c = common * m + g
        self.centers = (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)
        self.scales = (spread * np.arange(1, rank + 1) ** (-decay) / np.sqrt(rank)).astype(np.float32)
        bases = np.empty((n_clusters, dim, rank), np.float32)
        for j in range(n_clusters):
            q, _ = np.linalg.qr(rng.standard_normal((dim, rank)))
            bases[j] = q
        self.bases = bases
        w = np.arange(1, n_clusters + 1, dtype=np.float64) ** (-zipf)
        self.weights = w / w.sum()

    def sample(self, n: int, *, seed: int = 1, chunk: int = 65_536, return_labels: bool = False):
        """n unit vectors, (n, dim) float32 (and (n,) int cluster labels if ``return_labels``)."""
        rng = np.random.default_rng(seed)
        out = np.empty((n, self.dim), np.float32)
        labels = rng.choice(self.n_clusters, size=n, p=self.weights)
        for s in range(0, n, chunk):
            lab = labels[s:s + chunk]
            blk = self.centers[lab] + rng.standard_normal((len(lab), self.dim)).astype(np.float32) * (self.noise / np.sqrt(self.dim))
            z = rng.standard_normal((len(lab), self.rank)).astype(np.float32) * self.scales
            for j in np.unique(lab):
                sel = np.nonzero(lab == j)[0]
                blk[sel] += z[sel] @ self.bases[j].T
            blk /= np.linalg.norm(blk, axis=1, keepdims=True)
            out[s:s + len(lab)] = blk
        return (out, labels) if return_labels else out
