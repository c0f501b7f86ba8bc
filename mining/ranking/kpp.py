"""Key Patch Proposer (Xu, Tian & Zhao 2024, §2 Eq. 1-2, Appendix B Algorithm 1).

Training-free: greedy subset selection with a frozen MAE. Start from the
central patch; at each step add the patch ``p`` that minimises the
reconstruction error ``L(P* U {p})`` = mean squared error between the
ground-truth masked patches ``P \\ (P* U {p})`` and the MAE's predictions of
them; stop at ``n_keep = round(r * |P|)`` patches.

Batched: every candidate of a step is one row of a single MAE forward (the
image's patch embeddings are computed once and gathered per candidate), so a
step costs one forward of ``|P| - i`` short encoder sequences and full-grid
decoder sequences, instead of ``|P| - i`` forwards. Several images are stacked
in the same forward, up to ``max_batch`` rows (whole images only).
"""
from __future__ import annotations

import torch

from mining.ranking.mae import MaskedAutoencoder


def center_index(grid: int) -> int:
    """Token id of the central patch of a ``grid x grid`` token grid (row ``grid // 2``, col ``grid // 2``)."""
    return (grid // 2) * grid + grid // 2


def n_keep_for(ratio: float, num_patches: int) -> int:
    """``round(ratio * |P|)`` clamped to ``[1, |P|]``.

    Raises:
        ValueError: ratio outside ``(0, 1]``.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"KPP ratio must be in (0, 1], got {ratio}")
    return int(min(num_patches, max(1, round(ratio * num_patches))))


def masked_mse(pred: torch.Tensor, target: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE over the masked (not visible) patches; 0 when nothing is masked.

    Args:
        pred, target: ``(N, L, P)`` float.
        ids_keep: ``(N, n)`` long visible ids.
    Returns:
        ``(N,)`` float.
    """
    err = ((pred - target) ** 2).mean(-1)
    masked = torch.ones_like(err)
    masked.scatter_(1, ids_keep, 0.0)
    return (err * masked).sum(1) / masked.sum(1).clamp(min=1.0)


@torch.no_grad()
def kpp_loss(mae: MaskedAutoencoder, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
    """``L(P_s)`` of KPP Eq. (1) for each sample: ``(B, 3, H, W)`` + ``(B, n)`` visible ids -> ``(B,)``."""
    return masked_mse(mae.reconstruct(imgs, ids_keep), mae.targets(imgs), ids_keep)


@torch.no_grad()
def kpp_select(mae: MaskedAutoencoder, imgs: torch.Tensor, n_keep: int, start: int | None = None,
               max_batch: int | None = None, return_losses: bool = False):
    """Greedy KPP selection (Appendix B, Algorithm 1).

    Args:
        mae: frozen MAE.
        imgs: ``(B, 3, H, W)`` float32, ImageNet-normalised, ``H = W = mae.cfg.img_size``.
        n_keep: patches to select, ``1 <= n_keep <= L``.
        start: first patch (default: the central patch, :func:`center_index`).
        max_batch: cap on rows per forward; images are grouped so that all
            candidates of one image stay in one forward (default: all images at once).
        return_losses: also return the loss after each step.
    Returns:
        ``(B, n_keep)`` long token ids in selection order (``[:, 0]`` is ``start``);
        with ``return_losses``, also ``(B, n_keep - 1)`` float minimal losses per step.
    Raises:
        ValueError: ``n_keep`` out of range.
    """
    b = imgs.shape[0]
    n = mae.num_patches
    if not 1 <= n_keep <= n:
        raise ValueError(f"n_keep must be in [1, {n}], got {n_keep}")
    if start is None:
        start = center_index(mae.cfg.grid)
    dev = imgs.device
    tokens = mae.embed(imgs)  # (B, L, D), computed once
    target = mae.targets(imgs)  # (B, L, P)
    chosen = torch.full((b, 1), int(start), dtype=torch.long, device=dev)
    avail = torch.ones(b, n, dtype=torch.bool, device=dev)
    avail[:, start] = False
    step_losses = []
    for step in range(1, n_keep):
        c = n - step  # candidates per image
        cand = avail.nonzero()[:, 1].reshape(b, c)  # (B, C), ascending ids
        per_fwd = b if not max_batch else max(1, max_batch // c)
        best_l, best_j = [], []
        for s in range(0, b, per_fwd):
            g = min(per_fwd, b - s)
            ids = torch.cat([chosen[s:s + g, None, :].expand(g, c, step), cand[s:s + g, :, None]], dim=2)
            ids = ids.reshape(g * c, step + 1)
            rows = torch.arange(s, s + g, device=dev).repeat_interleave(c)
            pred = mae.decode(mae.encode(tokens, ids, rows=rows), ids)  # ONE forward for all candidates
            loss = masked_mse(pred, target[rows], ids).reshape(g, c)
            lmin, j = loss.min(dim=1)
            best_l.append(lmin)
            best_j.append(j)
        j = torch.cat(best_j)
        pick = torch.gather(cand, 1, j[:, None])
        chosen = torch.cat([chosen, pick], dim=1)
        avail.scatter_(1, pick, False)
        step_losses.append(torch.cat(best_l))
    if return_losses:
        losses = torch.stack(step_losses, 1) if step_losses else torch.zeros(b, 0, device=dev)
        return chosen, losses
    return chosen


def kpp_flops(cfg, n_keep: int) -> float:
    """Analytic multiply-add count x2 (FLOPs) of :func:`kpp_select` for one image.

    Counts the matmuls of every candidate row of every step (encoder on
    ``i + 1`` visible tokens + class token, decoder on ``L + 1`` tokens, the
    prediction head), ignoring norms/softmax/GELU.
    """
    from mining.ranking.flops import vit_block_flops

    n = cfg.num_patches
    p3 = cfg.patch_size ** 2 * cfg.in_chans
    total = 2.0 * n * p3 * cfg.embed_dim  # patch embedding, once
    for step in range(1, n_keep):
        c = n - step
        enc = cfg.depth * vit_block_flops(step + 2, cfg.embed_dim, cfg.mlp_ratio)
        dec = (2.0 * (step + 2) * cfg.embed_dim * cfg.decoder_embed_dim
               + cfg.decoder_depth * vit_block_flops(n + 1, cfg.decoder_embed_dim, cfg.mlp_ratio)
               + 2.0 * (n + 1) * cfg.decoder_embed_dim * p3)
        total += c * (enc + dec)
    return total
