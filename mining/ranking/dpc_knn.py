"""DPC-KNN clustering (Du, Ding & Jia 2016) and LTRP's patch selection (§3.4, Tab. 1e).

Density peaks clustering with a k-nearest-neighbour density:

* local density ``rho_i = exp(-(1/K) * sum_{j in kNN(i)} d_ij^2)``;
* ``delta_i`` = distance to the nearest point of higher density (for the
  densest point, the largest distance to any point); that point is ``i``'s parent;
* cluster centres = the ``c`` points with the largest ``gamma_i = rho_i * delta_i``
  (the densest point is always a centre);
* every other point joins its parent's cluster, in decreasing density order
  (the original DPC assignment).

Distances are Euclidean over ``sqrt(C)`` (scale-free ``rho``). Density ties are
broken by token index, so the result is deterministic.

LTRP selection (§3.4): keep ``k`` tokens = the ``k - h`` best-ranked ones plus
``h`` homogeneous ones: cluster all tokens into ``k`` groups on their raw pixels,
walk the groups from the largest down, and from each take the not-yet-selected
member closest to the group centre, until ``h`` were taken.
"""
from __future__ import annotations

import math

import numpy as np
import torch


@torch.no_grad()
def dpc_knn(x: torch.Tensor, n_clusters: int, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the points of each batch row with DPC-KNN.

    Args:
        x: ``(B, N, C)`` float features (e.g. patch pixels).
        n_clusters: number of clusters ``1 <= c <= N``.
        k: neighbours for the density (clamped to ``N - 1``).
    Returns:
        ``labels (B, N)`` long in ``[0, c)`` and ``centers (B, c)`` long token ids;
        ``labels[b, centers[b, j]] == j``.
    Raises:
        ValueError: ``n_clusters`` outside ``[1, N]``.
    """
    b, n, c = x.shape
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be in [1, {n}], got {n_clusters}")
    x = x.float()
    dist = torch.cdist(x, x) / math.sqrt(c)  # (B, N, N)
    kk = max(1, min(k, n - 1))
    if n > 1:
        knn = torch.topk(dist, kk + 1, dim=-1, largest=False).values[..., 1:]  # drop self
        rho = torch.exp(-(knn ** 2).mean(-1))
    else:
        rho = torch.ones(b, n, device=x.device)
    # density rank: 0 = densest; ties -> lower index first
    order = torch.sort(-rho, dim=1, stable=True).indices  # (B, N)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=x.device).expand(b, n))
    higher = rank[:, None, :] < rank[:, :, None]  # [b, i, j]: j denser than i
    big = dist.amax(dim=(1, 2), keepdim=True) + 1.0
    d_masked = torch.where(higher, dist, big.expand_as(dist))
    delta, parent = d_masked.min(dim=-1)
    top = order[:, 0]
    bi = torch.arange(b, device=x.device)
    delta[bi, top] = dist[bi, top].max(dim=-1).values
    parent[bi, top] = top
    gamma = rho * delta
    gamma[bi, top] = float("inf")
    centers = torch.topk(gamma, n_clusters, dim=1).indices  # (B, c)
    labels = torch.full((b, n), -1, dtype=torch.long, device=x.device)
    labels.scatter_(1, centers, torch.arange(n_clusters, device=x.device).expand(b, n_clusters))
    for r in range(n):  # decreasing density: parents are labelled before children
        idx = order[:, r]
        cur = labels[bi, idx]
        labels[bi, idx] = torch.where(cur >= 0, cur, labels[bi, parent[bi, idx]])
    return labels, centers


def n_homogeneous(k: int, ratio: float = 0.2) -> int:
    """``h = round(ratio * k)``, clamped to ``[0, k - 1]`` for ``k >= 1`` (Tab. 1e: ratio 0.2)."""
    if k <= 1:
        return 0
    return int(min(k - 1, max(0, round(ratio * k))))


@torch.no_grad()
def select_tokens(scores: torch.Tensor, feats: torch.Tensor, k: int, homogeneous_ratio: float = 0.2,
                  dpc_k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """LTRP patch selection (§3.4): ``k - h`` top-scored tokens + ``h`` homogeneous tokens.

    Args:
        scores: ``(B, L)`` float ranking scores (higher = more informative).
        feats: ``(B, L, C)`` float per-token features for clustering (raw patch pixels).
        k: tokens to keep per image, ``1 <= k <= L``.
        homogeneous_ratio: ``h / k`` (0 disables clustering).
        dpc_k: neighbours of the DPC-KNN density.
    Returns:
        ``top (B, L) bool`` (the ``k - h`` best-ranked tokens) and
        ``homog (B, L) bool`` (the ``h`` cluster representatives); disjoint, ``k`` in total.
    Raises:
        ValueError: ``k`` out of range.
    """
    b, n = scores.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    h = n_homogeneous(k, homogeneous_ratio)
    top_idx = torch.topk(scores, k - h, dim=1).indices
    top = torch.zeros(b, n, dtype=torch.bool, device=scores.device)
    top.scatter_(1, top_idx, True)
    if h == 0:
        return top, torch.zeros_like(top)
    labels, centers = dpc_knn(feats, k, dpc_k)
    f = feats.float()
    lab_np, top_np = labels.cpu().numpy(), top.cpu().numpy()
    dist_to_center = torch.linalg.vector_norm(f - torch.gather(
        f, 1, torch.gather(centers, 1, labels)[:, :, None].expand_as(f)), dim=-1).cpu().numpy()  # (B, L)
    homog = np.zeros((b, n), dtype=bool)
    for i in range(b):
        sizes = np.bincount(lab_np[i], minlength=k)
        taken = 0
        for cl in np.argsort(-sizes, kind="stable"):
            members = np.flatnonzero((lab_np[i] == cl) & ~top_np[i])
            if members.size == 0:
                continue
            j = members[np.argmin(dist_to_center[i, members])]
            homog[i, j] = True
            taken += 1
            if taken == h:
                break
    return top, torch.from_numpy(homog).to(scores.device)
