"""Masked autoencoder (MAE, He et al. 2022) used frozen by LTRP training and by KPP.

Implemented from the paper: an asymmetric encoder-decoder ViT. The encoder sees
only the visible patch tokens (plus a class token); a lightweight decoder gets
the encoded visible tokens scattered back on the full grid, a shared learned
*mask token* at every other position, fixed 2-D sin-cos position embeddings, and
predicts the pixels of every patch (``p*p*3`` values per patch, row-major
``(p, p, 3)`` order).

Parameter names follow the official MAE release (``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``blocks.i``, ``norm``, ``decoder_embed``,
``mask_token``, ``decoder_pos_embed``, ``decoder_blocks.i``, ``decoder_norm``,
``decoder_pred``), so :func:`load_mae` reads the official "visualize"
checkpoints (``{"model": state_dict}``, e.g. ``mae_visualize_vit_base.pth``,
pixel target without per-patch normalisation, LTRP Tab. 1i) from a path.

Pixel space: every image tensor in this package is ``(B, 3, H, W)`` float32,
RGB scaled to [0, 1] and then normalised with the ImageNet mean/std
(:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`), which is what the official
checkpoints were trained on; reconstructions live in that same space.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace
from functools import partial
from typing import Mapping

import numpy as np
import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- utils
def sincos_pos_embed_2d(dim: int, grid: int, with_cls: bool = True) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (Vaswani et al. 2017, extended to 2-D as in MAE).

    Half of the channels encode the column coordinate, the other half the row
    coordinate; each half is ``[sin(pos * w_j), cos(pos * w_j)]`` with
    ``w_j = 10000 ** (-j / (dim / 4))``.

    Args:
        dim: embedding width, divisible by 4.
        grid: tokens per side (14 for 224 px / 16 px patches).
        with_cls: prepend an all-zero row for the class token.
    Returns:
        ``(grid*grid [+1], dim)`` float32 tensor, row-major token order.
    Raises:
        ValueError: ``dim`` not divisible by 4.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim % 4 == 0, got {dim}")
    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def enc(pos: np.ndarray) -> np.ndarray:
        ang = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)

    emb = np.concatenate([enc(cols), enc(rows)], axis=1)
    if with_cls:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return torch.from_numpy(emb).float()


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, L, p*p*C)`` patches in row-major order, each flattened as (p, p, C).

    Raises:
        ValueError: H or W not divisible by ``p``.
    """
    b, c, h, w = imgs.shape
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} not divisible by patch size {p}")
    gh, gw = h // p, w // p
    x = imgs.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, gh * gw, p * p * c)


def unpatchify(x: torch.Tensor, p: int, c: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify` for a square grid: ``(B, L, p*p*C)`` -> ``(B, C, H, W)``."""
    b, n, _ = x.shape
    g = int(round(math.sqrt(n)))
    if g * g != n:
        raise ValueError(f"{n} patches do not form a square grid")
    x = x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, g * p, g * p)


def _block(dim: int, heads: int, mlp_ratio: float) -> nn.Module:
    from timm.models.vision_transformer import Block

    return Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class MAEConfig:
    """Shape of an MAE. Defaults: ViT-B/16 encoder, 8-block 512-d decoder (the released models)."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_pix_loss: bool = False

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2


MAE_ARCHS: dict[str, MAEConfig] = {
    "mae_vit_base_patch16": MAEConfig(),
    "mae_vit_large_patch16": MAEConfig(embed_dim=1024, depth=24, num_heads=16),
    "mae_vit_huge_patch14": MAEConfig(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    # tests / CI only: same geometry as ViT-B/16 at 224 px, tiny widths, random weights
    "tiny-test": MAEConfig(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                           decoder_num_heads=2, mlp_ratio=2.0),
}


def mae_config(arch: str, **overrides) -> MAEConfig:
    """Config of a named MAE arch (:data:`MAE_ARCHS`), with field overrides (e.g. ``img_size=32``).

    Raises:
        KeyError: unknown arch; the message lists the known ones.
    """
    if arch not in MAE_ARCHS:
        raise KeyError(f"unknown MAE arch {arch!r}; known: {sorted(MAE_ARCHS)}")
    return replace(MAE_ARCHS[arch], **overrides)


# --------------------------------------------------------------------------- model
class MaskedAutoencoder(nn.Module):
    """MAE ViT encoder + decoder (He et al. 2022, §3), official parameter names.

    The visible set of each sample is given explicitly as ``ids_keep`` (long
    ``(N, n)``, token indices in ``[0, L)``, row-major), not drawn inside the
    model, so LTRP (§3.2) and KPP (Appendix B) can evaluate many visible sets of
    the same image in one batched forward. Every sample of a batch must have the
    same number ``n`` of visible tokens.
    """

    def __init__(self, cfg: MAEConfig = MAEConfig()):
        super().__init__()
        from timm.layers import PatchEmbed

        self.cfg = cfg
        d, dd = cfg.embed_dim, cfg.decoder_embed_dim
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, d)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, d), requires_grad=False)
        self.blocks = nn.ModuleList([_block(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.decoder_embed = nn.Linear(d, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, dd), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [_block(dd, cfg.decoder_num_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(dd, eps=1e-6)
        self.decoder_pred = nn.Linear(dd, cfg.patch_size ** 2 * cfg.in_chans)
        self._init_weights()

    # -- init ------------------------------------------------------------------
    def _init_weights(self) -> None:
        g = self.cfg.grid
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.cfg.embed_dim, g)[None])
        self.decoder_pos_embed.data.copy_(sincos_pos_embed_2d(self.cfg.decoder_embed_dim, g)[None])
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- geometry --------------------------------------------------------------
    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, L, p*p*3)`` (see :func:`patchify`)."""
        return patchify(imgs, self.cfg.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, p*p*3)`` -> ``(B, 3, H, W)``."""
        return unpatchify(x, self.cfg.patch_size, self.cfg.in_chans)

    def targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """Reconstruction target ``(B, L, p*p*3)``: raw (normalised-image) pixels, or per-patch
        normalised pixels when ``cfg.norm_pix_loss`` (MAE §3 "per-patch normalisation")."""
        t = self.patchify(imgs)
        if self.cfg.norm_pix_loss:
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
        return t

    # -- encoder ---------------------------------------------------------------
    def embed(self, imgs: torch.Tensor) -> torch.Tensor:
        """Patch embeddings plus position embeddings of every token: ``(B, L, D)``."""
        return self.patch_embed(imgs) + self.pos_embed[:, 1:, :]

    def encode(self, tokens: torch.Tensor, ids_keep: torch.Tensor,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        """Encode visible tokens.

        Args:
            tokens: ``(B, L, D)`` output of :meth:`embed`.
            ids_keep: ``(N, n)`` long, visible token indices per sample.
            rows: ``(N,)`` long, which row of ``tokens`` each sample takes its
                tokens from (default: ``arange(N)``, needs ``N == B``). Lets many
                visible sets of one image share one embedding.
        Returns:
            latent ``(N, n + 1, D)``: the class token first, then the visible
            tokens in ``ids_keep`` order, after the final LayerNorm.
        """
        if rows is None:
            rows = torch.arange(ids_keep.shape[0], device=ids_keep.device)
        x = tokens[rows[:, None], ids_keep]  # (N, n, D)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    # -- decoder ---------------------------------------------------------------
    def decode(self, latent: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Reconstruct every patch from encoded visible tokens.

        Args:
            latent: ``(N, n + 1, D)`` from :meth:`encode` (class token first).
            ids_keep: ``(N, n)`` long, grid positions of ``latent[:, 1:]``.
        Returns:
            ``(N, L, p*p*3)`` predicted pixels of all L patches (same space as :meth:`targets`).
        """
        x = self.decoder_embed(latent)
        n_s, _, dd = x.shape
        grid = self.mask_token.to(x.dtype).expand(n_s, self.num_patches, dd).clone()
        grid.scatter_(1, ids_keep[:, :, None].expand(-1, -1, dd), x[:, 1:, :])
        x = torch.cat([x[:, :1, :], grid], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def reconstruct(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """``M_theta(P_v)`` of LTRP Eq. (1): ``(B, 3, H, W)`` + ``(B, n)`` visible ids -> ``(B, L, p*p*3)``."""
        return self.decode(self.encode(self.embed(imgs), ids_keep), ids_keep)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """MAE pre-training forward (He et al. §3): random masking, loss on masked patches only.

        Returns:
            ``(loss scalar, pred (B, L, p*p*3), mask (B, L) float, 1 = masked)``.
        """
        b = imgs.shape[0]
        n_keep = int(self.num_patches * (1 - mask_ratio))
        ids_keep = random_visible(b, self.num_patches, n_keep, imgs.device, generator)
        pred = self.reconstruct(imgs, ids_keep)
        mask = torch.ones(b, self.num_patches, device=imgs.device)
        mask.scatter_(1, ids_keep, 0.0)
        err = ((pred - self.targets(imgs)) ** 2).mean(-1)
        return (err * mask).sum() / mask.sum(), pred, mask


def random_visible(batch: int, num_patches: int, n_keep: int, device=None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniformly random visible sets: ``(batch, n_keep)`` long, distinct indices per row, sorted.

    With ``n_keep = int(L * (1 - 0.9))`` this is LTRP's 90% masking (§3.2).
    """
    noise = torch.rand(batch, num_patches, generator=generator, device="cpu").to(device)
    return torch.sort(torch.argsort(noise, dim=1)[:, :n_keep], dim=1).values


# --------------------------------------------------------------------------- checkpoints
_STRIP_PREFIXES = ("module.", "_orig_mod.")


def _load_obj(path: str):
    """torch.load a checkpoint without arbitrary unpickling (argparse.Namespace allowed for 'args')."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def extract_state_dict(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Model state dict from a loaded checkpoint object.

    Accepts ``{"model": sd}``, ``{"state_dict": sd}`` or a bare ``sd``; strips
    ``module.`` (DDP) prefixes; when ``prefix`` is given (e.g. ``"mim."`` or
    ``"score_net."``) and some keys carry it, keeps only those keys, without it.
    """
    sd = obj
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state"):
            if key in obj and isinstance(obj[key], Mapping):
                sd = obj[key]
                break
    out = {}
    for k, v in sd.items():
        if not torch.is_tensor(v):
            continue
        for p in _STRIP_PREFIXES:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    if prefix and any(k.startswith(prefix) for k in out):
        out = {k[len(prefix):]: v for k, v in out.items() if k.startswith(prefix)}
    return out


_HEADS_BY_DIM = {192: 3, 384: 6, 512: 16, 768: 12, 1024: 16, 1280: 16}


def config_from_state_dict(sd: Mapping[str, torch.Tensor], norm_pix_loss: bool = False) -> MAEConfig:
    """Infer the MAE shape from an official-layout state dict (head counts from the width).

    Raises:
        KeyError: a required key (``patch_embed.proj.weight``, ``pos_embed``, ``decoder_embed.weight``) is missing.
    """
    w = sd["patch_embed.proj.weight"]
    d, c, p, _ = w.shape
    n = sd["pos_embed"].shape[1] - 1
    dd = sd["decoder_embed.weight"].shape[0]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    ddepth = len({k.split(".")[1] for k in sd if k.startswith("decoder_blocks.")})
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * d
    return MAEConfig(img_size=int(round(math.sqrt(n))) * p, patch_size=p, in_chans=c, embed_dim=d, depth=depth,
                     num_heads=_HEADS_BY_DIM.get(d, max(1, d // 64)), decoder_embed_dim=dd, decoder_depth=ddepth,
                     decoder_num_heads=_HEADS_BY_DIM.get(dd, max(1, dd // 64)), mlp_ratio=hidden / d,
                     norm_pix_loss=norm_pix_loss)


def load_mae(checkpoint: str | Mapping, arch: str | None = None, norm_pix_loss: bool = False,
             strict: bool = True) -> MaskedAutoencoder:
    """Build an MAE from an official checkpoint (path or loaded object).

    Args:
        checkpoint: path to e.g. ``mae_visualize_vit_base.pth`` (``{"model": sd}``),
            an LTRP training checkpoint (``mim.*`` keys are used), or an already
            loaded dict.
        arch: optional :data:`MAE_ARCHS` name to cross-check; by default the shape
            is inferred from the tensors.
        norm_pix_loss: set True only for MAEs trained with per-patch-normalised
            targets (LTRP Tab. 1i says to use the pixel-target "visualize" models).
        strict: require an exact key match.
    Returns:
        the model in eval mode with ``requires_grad=False`` everywhere (frozen, LTRP §3.2).
    Raises:
        FileNotFoundError: missing path. KeyError/RuntimeError: keys or shapes do not match.
    """
    obj = _load_obj(checkpoint) if isinstance(checkpoint, str) else checkpoint
    sd = extract_state_dict(obj, prefix="mim.")
    cfg = config_from_state_dict(sd, norm_pix_loss=norm_pix_loss)
    if arch is not None:
        want = mae_config(arch, norm_pix_loss=norm_pix_loss)
        if (want.embed_dim, want.depth, want.decoder_embed_dim, want.decoder_depth) != (
                cfg.embed_dim, cfg.depth, cfg.decoder_embed_dim, cfg.decoder_depth):
            raise RuntimeError(f"checkpoint is {cfg}, not the requested arch {arch!r}")
        cfg = replace(cfg, num_heads=want.num_heads, decoder_num_heads=want.decoder_num_heads)
    model = MaskedAutoencoder(cfg)
    model.load_state_dict(sd, strict=strict)
    return freeze(model)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and ``requires_grad=False`` on every parameter; returns ``model``."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_mae(arch: str = "mae_vit_base_patch16", checkpoint: str | None = None, random_init: bool = False,
              **overrides) -> MaskedAutoencoder:
    """Frozen MAE from a checkpoint path, or random weights only with ``random_init=True``.

    Raises:
        ValueError: neither a checkpoint nor ``random_init`` was given.
    """
    if checkpoint:
        return load_mae(checkpoint, arch=None)
    if not random_init:
        raise ValueError(
            "an MAE checkpoint is required: pass the path of the official MAE 'visualize' checkpoint "
            "(e.g. mae_visualize_vit_base.pth from the facebookresearch/mae release) via "
            "mae_checkpoint=/--mae-checkpoint or env MINING_MAE_CHECKPOINT, or opt into random weights "
            "with random_init=True / --ranker-random-init (throughput tests only)")
    return freeze(MaskedAutoencoder(mae_config(arch, **overrides)))


def official_state_dict(model: MaskedAutoencoder) -> dict:
    """The model's weights in the official MAE checkpoint layout: ``{"model": state_dict}``."""
    return {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
