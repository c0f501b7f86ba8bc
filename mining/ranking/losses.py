"""ListMLE ranking loss (Xia et al. 2008), LTRP Eq. (3)."""
from __future__ import annotations

import torch


def list_mle(scores: torch.Tensor, targets: torch.Tensor, top_k: int | None = None,
             reduction: str = "mean") -> torch.Tensor:
    """ListMLE: negative log Plackett-Luce likelihood of the target order, LTRP Eq. (3).

    ``L = -log prod_{i=1}^{n} exp(s_pi(i)) / sum_{k=i}^{n} exp(s_pi(k))`` where
    ``pi`` sorts the items by ``targets`` descending (ties keep input order).

    Args:
        scores: ``(B, n)`` or ``(n,)`` float, predicted scores ``s``.
        targets: same shape, pseudo scores ``y`` (only their order matters).
        top_k: if given, only the first ``top_k`` factors of the product (top-k
            ListMLE); ``None`` = the full Eq. (3).
        reduction: ``"mean"`` over the batch, ``"sum"``, or ``"none"`` (``(B,)``).
    Returns:
        scalar (or ``(B,)``) loss in nats, >= 0.
    Raises:
        ValueError: shape mismatch or unknown reduction.
    """
    if scores.shape != targets.shape:
        raise ValueError(f"scores {tuple(scores.shape)} vs targets {tuple(targets.shape)}")
    if scores.dim() == 1:
        scores, targets = scores[None], targets[None]
    order = torch.sort(targets, dim=1, descending=True, stable=True).indices
    s = torch.gather(scores, 1, order)
    # log sum_{k >= i} exp(s_k): reverse cumulative logsumexp
    tail_lse = torch.flip(torch.logcumsumexp(torch.flip(s, [1]), dim=1), [1])
    terms = tail_lse - s
    if top_k is not None:
        terms = terms[:, :top_k]
    per = terms.sum(dim=1)
    if reduction == "mean":
        return per.mean()
    if reduction == "sum":
        return per.sum()
    if reduction == "none":
        return per
    raise ValueError(f"unknown reduction {reduction!r}")
