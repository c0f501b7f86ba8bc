"""Learned / training-free patch ranking as the second selection path (issue 4).

* ``ltrp`` backend: LTRP (Luo et al., CVPR 2024) ranking ViT + DPC-KNN homogeneous patches.
* ``kpp`` backend: Key Patch Proposer (Xu et al. 2024), greedy MAE reconstruction.
* training: :mod:`mining.ranking.train` (Ray Train; CLI ``python -m jobs.train_ltrp``).

Both backends are entries of the one backend registry, :mod:`mining.registry` (which
imports this package only when one of them is created). Importing this package does not
import torch (models load lazily).
"""
from __future__ import annotations

from mining.ranking.backends import (  # noqa: F401
    ENV_KPP_RATIO,
    ENV_LTRP_CHECKPOINT,
    ENV_MAE_ARCH,
    ENV_MAE_CHECKPOINT,
    ENV_RANDOM_INIT,
    ENV_RANKER_ARCH,
    KPPBackend,
    LTRPBackend,
)
from mining.registry import RANKERS, backend_from_config
from mining.saliency.base import SaliencyBackend

SELECTORS = RANKERS


def backend_from_args(selector: str, *, ltrp_checkpoint: str | None = None, mae_checkpoint: str | None = None,
                      kpp_ratio: float = 0.25, random_init: bool = False, arch: str | None = None,
                      device=None) -> SaliencyBackend:
    """Map the mining job's CLI options to a ranking backend (delegates to :func:`mining.registry.backend_from_config`).

    CLI -> kwargs: ``--selector ltrp|kpp`` -> ``selector``; ``--ltrp-checkpoint`` ->
    ``ltrp_checkpoint``; ``--mae-checkpoint`` -> ``mae_checkpoint``; ``--kpp-ratio`` ->
    ``kpp_ratio``; ``--ranker-random-init`` -> ``random_init``. ``arch`` is the ranker
    arch for ``ltrp`` and the MAE arch for ``kpp`` (``"tiny-test"`` for CI; env
    ``MINING_RANKER_ARCH`` / ``MINING_MAE_ARCH`` when None). Unset checkpoints fall back
    to env ``MINING_LTRP_CHECKPOINT`` / ``MINING_MAE_CHECKPOINT``.

    Returns:
        an :class:`LTRPBackend` or :class:`KPPBackend` (``predict(image) -> (H, W) float32 [0, 1]``).
    Raises:
        ValueError: unknown selector, or no weights and ``random_init`` False (the
            message names ``--ltrp-checkpoint`` / ``--mae-checkpoint`` / ``--ranker-random-init``).
    """
    if selector not in SELECTORS:
        raise ValueError(f"unknown ranking selector {selector!r}; expected one of {SELECTORS}")
    return backend_from_config({"selector": selector, "ltrp_checkpoint": ltrp_checkpoint,
                                "mae_checkpoint": mae_checkpoint, "kpp_ratio": kpp_ratio,
                                "ranker_random_init": random_init, "arch": arch, "device": device})


__all__ = ["LTRPBackend", "KPPBackend", "backend_from_args", "SELECTORS", "ENV_KPP_RATIO", "ENV_LTRP_CHECKPOINT",
           "ENV_MAE_ARCH", "ENV_MAE_CHECKPOINT", "ENV_RANDOM_INIT", "ENV_RANKER_ARCH"]
