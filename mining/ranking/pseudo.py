"""LTRP pseudo scores: semantic density of each visible patch (§3.2, Eq. 2, Tab. 1c/1g).

For an image with visible set ``P_v`` (90% masking), the frozen MAE gives the
anchor reconstruction ``I^R = M(P_v)``. Removing visible patch ``p_i`` gives
``I^{R_i} = M(P_v \\ p_i)``; its pseudo score is ``y_i = l1(I^R, I^{R_i})``, the
mean absolute difference over all ``L * p*p*3`` predicted pixel values (the
decoder's raw output for every patch, visible ones included).

Removal phase (Tab. 1g): ``"decoder"`` (the paper's choice, 1.3x fewer FLOPs)
encodes ``P_v`` once and drops the encoded token ``i`` before the decoder, i.e.
the decoder sees a mask token at position ``i`` exactly as for any masked patch;
``"encoder"`` re-encodes ``P_v \\ p_i`` from scratch. All ``n`` removals of all
images are evaluated in one batched decoder (or encoder+decoder) forward,
optionally chunked to bound memory.
"""
from __future__ import annotations

import torch

from mining.ranking.mae import MaskedAutoencoder


def _drop_one(x: torch.Tensor) -> torch.Tensor:
    """``(B, n, ...)`` -> ``(B * n, n - 1, ...)``: row ``b * n + i`` is ``x[b]`` without item ``i``."""
    b, n = x.shape[:2]
    keep = ~torch.eye(n, dtype=torch.bool, device=x.device)  # (n, n): row i drops i
    rep = x[:, None].expand(b, n, *x.shape[1:])  # (B, n, n, ...)
    return rep[:, keep].reshape(b * n, n - 1, *x.shape[2:])


@torch.no_grad()
def pseudo_scores(mae: MaskedAutoencoder, imgs: torch.Tensor, ids_keep: torch.Tensor, phase: str = "decoder",
                  chunk: int | None = None) -> torch.Tensor:
    """Pseudo score ``y_i`` of every visible patch (LTRP Eq. 2 with the l1 metric).

    Args:
        mae: frozen MAE (pixel target).
        imgs: ``(B, 3, H, W)`` float32 ImageNet-normalised images.
        ids_keep: ``(B, n)`` long visible token ids, ``n >= 2``.
        phase: ``"decoder"`` (remove before the decoder, Tab. 1g default) or ``"encoder"``.
        chunk: max number of removal variants per forward (None = all in one).
    Returns:
        ``(B, n)`` float32 ``y``, aligned with ``ids_keep``; larger = removing the
        patch changes the reconstruction more = more informative.
    Raises:
        ValueError: unknown phase or ``n < 2``.
    """
    if phase not in ("decoder", "encoder"):
        raise ValueError(f"phase must be 'decoder' or 'encoder', got {phase!r}")
    b, n = ids_keep.shape
    if n < 2:
        raise ValueError("need at least 2 visible patches")
    tokens = mae.embed(imgs)
    latent = mae.encode(tokens, ids_keep)  # (B, n+1, D)
    anchor = mae.decode(latent, ids_keep)  # (B, L, P)
    ids_var = _drop_one(ids_keep)  # (B*n, n-1)
    rows = torch.arange(b, device=imgs.device).repeat_interleave(n)  # image of each variant
    if phase == "decoder":
        lat_var = torch.cat([latent[:, :1].repeat_interleave(n, 0), _drop_one(latent[:, 1:])], dim=1)
    total = b * n
    step = total if not chunk else int(chunk)
    out = []
    for s in range(0, total, step):
        sl = slice(s, min(s + step, total))
        if phase == "decoder":
            rec = mae.decode(lat_var[sl], ids_var[sl])
        else:
            rec = mae.decode(mae.encode(tokens, ids_var[sl], rows=rows[sl]), ids_var[sl])
        out.append((rec - anchor[rows[sl]]).abs().mean(dim=(1, 2)))
    return torch.cat(out).reshape(b, n).float()
