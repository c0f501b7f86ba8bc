"""LTRP ranking model (Luo et al., CVPR 2024, §3.3, Tab. 1d/1h).

A timm Vision Transformer (ViT-S/16 by default, ViT-T/16 optional) whose head
maps the final class-token embedding to ``L`` scores, one per patch position of
the ``g x g`` grid (``L = 196`` for a 224x224 view with 16 px patches). This is
the layout of the official release (``score_net`` of ``irsLu/ltrp``:
``head.weight`` is ``(L, D)``), so official checkpoints load unchanged.

Sparse design (§3.3, Tab. 1h): during training only the visible patch tokens
(10% of the grid at 90% masking) are fed through the transformer, and the
scores of exactly those positions are read out. At inference all tokens are fed.

Checkpoint layout (:func:`load_ranker`, :func:`ranker_checkpoint`):
``{"model": {"score_net.<timm ViT key>": tensor, ...}, ...}`` as written by the
official ``main_ltrp.py`` (which also stores the frozen MAE under ``mim.*``; we
ignore those). Bare state dicts and ``module.`` prefixes are accepted too.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Mapping

import torch
from torch import nn

from mining.ranking.mae import _load_obj, extract_state_dict, sincos_pos_embed_2d


@dataclass(frozen=True)
class RankerConfig:
    """Shape of a ranking ViT. Defaults: ViT-S/16 at 224 px (the paper's choice, Tab. 1d)."""

    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2


RANKER_ARCHS: dict[str, RankerConfig] = {
    "vit_small_patch16_224": RankerConfig(),
    "vit_tiny_patch16_224": RankerConfig(embed_dim=192, num_heads=3),
    # tests / CI only: 224 px geometry, tiny width, random weights
    "tiny-test": RankerConfig(embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0),
}


def ranker_config(arch: str, **overrides) -> RankerConfig:
    """Config of a named ranker arch (:data:`RANKER_ARCHS`) with field overrides.

    Raises:
        KeyError: unknown arch; the message lists the known ones.
    """
    if arch not in RANKER_ARCHS:
        raise KeyError(f"unknown ranker arch {arch!r}; known: {sorted(RANKER_ARCHS)}")
    return replace(RANKER_ARCHS[arch], **overrides)


class PatchRanker(nn.Module):
    """Learned patch scorer ``s = f(I, P_v)`` of LTRP §3.3.

    Wraps a timm ``VisionTransformer`` as ``self.vit`` (official key names under
    it). The 2-D sin-cos position embedding is fixed, as in the release.
    """

    def __init__(self, cfg: RankerConfig = RankerConfig()):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.cfg = cfg
        self.vit = VisionTransformer(img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=cfg.num_patches,
                                     global_pool="token", embed_dim=cfg.embed_dim, depth=cfg.depth,
                                     num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True)
        with torch.no_grad():
            self.vit.pos_embed.copy_(sincos_pos_embed_2d(cfg.embed_dim, cfg.grid)[None])
        self.vit.pos_embed.requires_grad_(False)

    @property
    def num_patches(self) -> int:
        return self.cfg.num_patches

    def forward(self, imgs: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Patch scores (higher = more informative).

        Args:
            imgs: ``(B, 3, H, W)`` float, ImageNet-normalised, ``H = W = cfg.img_size``.
            ids_keep: optional ``(B, n)`` long visible token ids (sparse design):
                only these tokens enter the transformer.
        Returns:
            ``(B, n)`` float scores of the ``ids_keep`` positions (same order), or
            ``(B, L)`` scores of every position when ``ids_keep`` is None.
        """
        v = self.vit
        x = v.patch_embed(imgs) + v.pos_embed[:, 1:, :]
        if ids_keep is not None:
            x = torch.gather(x, 1, ids_keep[:, :, None].expand(-1, -1, x.shape[-1]))
        cls = (v.cls_token + v.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = v.norm_pre(v.pos_drop(torch.cat([cls, x], dim=1)))
        for blk in v.blocks:
            x = blk(x)
        scores = v.head(v.norm(x)[:, 0])  # (B, L)
        if ids_keep is not None:
            scores = torch.gather(scores, 1, ids_keep)
        return scores

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under the official ``score_net.`` names (timm ViT keys)."""
        return {f"score_net.{k}": t.detach().cpu() for k, t in self.vit.state_dict().items()}


_HEADS_BY_DIM = {192: 3, 384: 6, 768: 12}


def config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> RankerConfig:
    """Infer the ranker shape from a (prefix-free) official score_net state dict.

    Raises:
        ValueError: the head does not output one score per patch of the grid
            (e.g. a head width of 256 for a 14x14 grid).
    """
    w = sd["patch_embed.proj.weight"]
    d, _, p, _ = w.shape
    n = sd["pos_embed"].shape[1] - 1
    g = int(round(n ** 0.5))
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    head_out = sd["head.weight"].shape[0]
    if head_out != n or g * g != n:
        raise ValueError(f"ranker head outputs {head_out} scores but the grid has {n} patches; "
                         "this checkpoint is not a one-score-per-patch LTRP ranking model")
    return RankerConfig(img_size=g * p, patch_size=p, embed_dim=d, depth=depth,
                        num_heads=_HEADS_BY_DIM.get(d, max(1, d // 64)), mlp_ratio=hidden / d)


def load_ranker(checkpoint: str | Mapping, arch: str | None = None, strict: bool = True) -> PatchRanker:
    """Build a :class:`PatchRanker` from an LTRP checkpoint (path or loaded object).

    Args:
        checkpoint: official ``irsLu/ltrp`` checkpoint (``{"model": {"score_net.*", "mim.*"}, ...}``),
            a ``ltrp.pth`` written by ``jobs.train_ltrp`` (same layout), or a bare state dict.
        arch: optional :data:`RANKER_ARCHS` name; its head count overrides the inferred one.
        strict: require an exact key match.
    Returns:
        the model in eval mode.
    Raises:
        ValueError: no ``score_net`` weights in the file / wrong head width.
        RuntimeError: key or shape mismatch (``load_state_dict``).
    """
    obj = _load_obj(checkpoint) if isinstance(checkpoint, str) else checkpoint
    sd = extract_state_dict(obj, prefix="score_net.")
    if "patch_embed.proj.weight" not in sd or "head.weight" not in sd:
        raise ValueError("no LTRP ranking-model weights (score_net.*) found in the checkpoint")
    cfg = config_from_state_dict(sd)
    if arch is not None:
        cfg = replace(cfg, num_heads=ranker_config(arch).num_heads)
    model = PatchRanker(cfg)
    model.vit.load_state_dict(sd, strict=strict)
    return model.eval()


def build_ranker(arch: str = "vit_small_patch16_224", checkpoint: str | None = None,
                 random_init: bool = False, **overrides) -> PatchRanker:
    """Ranker from a checkpoint path, or random weights only with ``random_init=True``.

    Raises:
        ValueError: neither given (the message says how to provide weights).
    """
    if checkpoint:
        return load_ranker(checkpoint)
    if not random_init:
        raise ValueError(
            "the LTRP selector needs trained ranking-model weights: pass checkpoint=/--ltrp-checkpoint PATH "
            "(an official irsLu/ltrp checkpoint or a ltrp.pth written by `python -m jobs.train_ltrp`), "
            "or env MINING_LTRP_CHECKPOINT; or opt into random weights with random_init=True / "
            "--ranker-random-init (throughput tests only: the ranking is meaningless)")
    return PatchRanker(ranker_config(arch, **overrides)).eval()


def ranker_checkpoint(model: PatchRanker, **extra) -> dict:
    """Serialisable checkpoint in the official layout plus our own metadata.

    ``{"model": {"score_net.*": ...}, "ranker_config": {...}, **extra}``
    (``extra``: e.g. ``optimizer``, ``epoch``, ``step``, ``args``).
    """
    return {"model": model.official_state_dict(), "ranker_config": asdict(model.cfg), **extra}


__all__ = ["PatchRanker", "RankerConfig", "RANKER_ARCHS", "build_ranker", "load_ranker", "ranker_checkpoint",
           "ranker_config"]
