"""Analytic FLOP counts (2 x multiply-adds of the matmuls/convs) for the ranking paths.

Norms, softmax, GELU and element-wise ops are ignored (a few % for ViTs).
:mod:`benchmarks.ranking` cross-checks these against ``torch.utils.flop_counter``.
"""
from __future__ import annotations


def vit_block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """One pre-norm transformer block on ``tokens`` tokens of width ``dim``:
    qkv + proj (4 D^2 per token), MLP (2 r D^2 per token), QK^T and AV (2 T^2 D)."""
    t, d = float(tokens), float(dim)
    return 2.0 * t * d * d * (4.0 + 2.0 * mlp_ratio) + 4.0 * t * t * d


def ranker_flops(cfg, tokens: int | None = None) -> float:
    """FLOPs of one :class:`~mining.ranking.ltrp.PatchRanker` forward on ``tokens`` patch tokens
    (default: all ``L``, the inference case): patch embedding, blocks, L-way head."""
    n = cfg.num_patches if tokens is None else tokens
    p3 = cfg.patch_size ** 2 * 3
    return (2.0 * cfg.num_patches * p3 * cfg.embed_dim
            + cfg.depth * vit_block_flops(n + 1, cfg.embed_dim, cfg.mlp_ratio)
            + 2.0 * cfg.embed_dim * cfg.num_patches)


def spectral_residual_flops(work_size: int = 256, sr_size: int = 64, in_hw: tuple[int, int] | None = None) -> float:
    """Rough FLOPs of OpenCV ``StaticSaliencySpectralResidual`` on a ``work_size`` square.

    OpenCV resizes its input to ``sr_size`` (64) squared internally: grey
    conversion, forward + inverse 2-D FFT (``5 N log2 N`` each), log-amplitude,
    3x3 mean filter, exp/phase recombination (~30 ops/px), a Gaussian blur
    (~11x11 separable), and the resizes (input -> work_size -> sr_size -> back
    to the input size, ~8 ops per output pixel). ``in_hw``: the original window
    size, for the final resize back.
    """
    import math

    n = sr_size * sr_size
    w2 = work_size * work_size
    fft = 2 * 5.0 * n * math.log2(n)
    per_px = 30.0 * n + 2 * 11 * 2 * n
    resize = 8.0 * w2 * 3 + 8.0 * n + 8.0 * w2
    if in_hw is not None:
        resize += 8.0 * in_hw[0] * in_hw[1] * 3
    return 3.0 * w2 + fft + per_px + resize
