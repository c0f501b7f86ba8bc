"""Unit tests of the LTRP / KPP ranking path with tiny random configs (issue 4). CPU, a few seconds."""
from __future__ import annotations

import argparse
import math
import sys

import numpy as np
import pytest
import torch

from mining.ranking.dpc_knn import dpc_knn, n_homogeneous, select_tokens
from mining.ranking.kpp import center_index, kpp_loss, kpp_select
from mining.ranking.losses import list_mle
from mining.ranking.ltrp import PatchRanker, load_ranker, ranker_checkpoint, ranker_config
from mining.ranking.mae import (MaskedAutoencoder, freeze, load_mae, mae_config, official_state_dict, patchify,
                                random_visible, unpatchify)
from mining.ranking.pseudo import pseudo_scores

torch.set_num_threads(1)


def tiny_mae(img_size: int, seed: int = 0) -> MaskedAutoencoder:
    torch.manual_seed(seed)
    return freeze(MaskedAutoencoder(mae_config("tiny-test", img_size=img_size)))


def rand_imgs(b: int, size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g)


# --------------------------------------------------------------------------- MAE basics
def test_patchify_roundtrip():
    x = rand_imgs(2, 32)
    p = patchify(x, 16)
    assert p.shape == (2, 4, 16 * 16 * 3)
    assert torch.equal(unpatchify(p, 16), x)
    # patch 1 is the top-right 16x16 block, flattened (p, p, C)
    assert torch.equal(p[0, 1], x[0, :, :16, 16:].permute(1, 2, 0).reshape(-1))


def test_decode_ignores_order_of_visible_ids():
    mae = tiny_mae(64)
    x = rand_imgs(1, 64)
    ids = torch.tensor([[0, 5, 9, 14]])
    perm = torch.tensor([[9, 0, 14, 5]])
    torch.testing.assert_close(mae.reconstruct(x, ids), mae.reconstruct(x, perm), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- pseudo scores (§3.2)
@pytest.mark.parametrize("phase", ["decoder", "encoder"])
def test_pseudo_scores_equal_direct_loop(phase):
    mae = tiny_mae(64)
    x = rand_imgs(2, 64)
    ids = random_visible(2, mae.num_patches, 5, generator=torch.Generator().manual_seed(3))
    y = pseudo_scores(mae, x, ids, phase=phase)
    y_chunked = pseudo_scores(mae, x, ids, phase=phase, chunk=3)
    assert y.shape == (2, 5)
    with torch.no_grad():
        for b in range(2):
            xb, idb = x[b:b + 1], ids[b:b + 1]
            tokens = mae.embed(xb)
            latent = mae.encode(tokens, idb)
            anchor = mae.decode(latent, idb)
            for i in range(5):
                keep = [j for j in range(5) if j != i]
                ids_i = idb[:, keep]
                if phase == "decoder":  # encoded once with patch i, token i dropped before the decoder
                    rec = mae.decode(latent[:, [0] + [j + 1 for j in keep]], ids_i)
                else:  # re-encode without patch i
                    rec = mae.reconstruct(xb, ids_i)
                direct = (rec - anchor).abs().mean().item()
                assert y[b, i].item() == pytest.approx(direct, rel=1e-4, abs=1e-6)
                assert y_chunked[b, i].item() == pytest.approx(direct, rel=1e-4, abs=1e-6)
    assert y.std() > 0  # a non-degenerate check


# --------------------------------------------------------------------------- ListMLE (Eq. 3)
def test_list_mle_hand_computed():
    s = torch.tensor([1.0, 2.0, 0.5])
    y = torch.tensor([3.0, 1.0, 2.0])
    # y-descending order: item0, item2, item1 -> s_pi = [1.0, 0.5, 2.0]
    # L = [log(e^1 + e^.5 + e^2) - 1] + [log(e^.5 + e^2) - .5] + [log(e^2) - 2]
    #   = (2.464372 - 1) + (2.201410 - 0.5) + 0 = 3.165782
    assert list_mle(s, y).item() == pytest.approx(3.165782, abs=1e-5)
    # 4 items, already in the right order with equal scores: sum_i log(n - i + 1) = log 4!
    assert list_mle(torch.zeros(4), torch.tensor([4.0, 3.0, 2.0, 1.0])).item() == pytest.approx(math.log(24), abs=1e-6)
    # top-k truncation keeps only the first factors
    assert list_mle(s, y, top_k=1).item() == pytest.approx(math.log(math.e + math.exp(0.5) + math.exp(2)) - 1,
                                                          abs=1e-6)
    # batched mean
    batch = list_mle(torch.stack([s, torch.zeros(3)]), torch.stack([y, y]))
    assert batch.item() == pytest.approx((3.165782 + math.log(6)) / 2, abs=1e-5)


# --------------------------------------------------------------------------- training
def test_training_steps_lower_loss_on_fixed_batch():
    from mining.ranking.train import ltrp_step

    mae = tiny_mae(64)
    torch.manual_seed(0)
    ranker = PatchRanker(ranker_config("tiny-test", img_size=64)).train()
    x = rand_imgs(4, 64, seed=5)
    ids = random_visible(4, 16, 6, generator=torch.Generator().manual_seed(7))
    opt = torch.optim.Adam([p for p in ranker.parameters() if p.requires_grad], lr=3e-3)
    first = ltrp_step(ranker, mae, None, x, ids_keep=ids)
    for _ in range(25):
        ltrp_step(ranker, mae, opt, x, ids_keep=ids)
    last = ltrp_step(ranker, mae, None, x, ids_keep=ids)
    assert last < 0.7 * first, (first, last)


def test_ranker_sparse_scores_follow_ids_order():
    torch.manual_seed(0)
    r = PatchRanker(ranker_config("tiny-test", img_size=64)).eval()
    x = rand_imgs(2, 64)
    ids = torch.tensor([[1, 4, 7], [0, 2, 15]])
    s = r(x, ids)
    assert s.shape == (2, 3)
    perm = torch.tensor([2, 0, 1])
    torch.testing.assert_close(r(x, ids[:, perm]), s[:, perm], atol=1e-5, rtol=1e-5)
    assert r(x).shape == (2, 16)


# --------------------------------------------------------------------------- KPP (Appendix B)
def test_kpp_greedy_equals_brute_force_on_2x2_tokens():
    mae = tiny_mae(32, seed=4)  # 2x2 token grid
    x = rand_imgs(2, 32, seed=9)
    order, losses = kpp_select(mae, x, n_keep=3, return_losses=True)
    assert order.shape == (2, 3)
    start = center_index(2)
    for b in range(2):
        xb = x[b:b + 1]
        chosen = [start]
        for step in range(1, 3):
            cands = [p for p in range(4) if p not in chosen]
            ls = [kpp_loss(mae, xb, torch.tensor([chosen + [p]])).item() for p in cands]  # one forward each
            assert len(set(np.round(ls, 7))) == len(ls)  # no ties: the argmin is meaningful
            best = cands[int(np.argmin(ls))]
            assert order[b, step].item() == best
            assert losses[b, step - 1].item() == pytest.approx(min(ls), rel=1e-4, abs=1e-7)
            chosen.append(best)
        assert order[b].tolist() == chosen
        # one greedy step = exhaustive search over all 2-subsets containing the start patch
        subsets = [(start, p) for p in range(4) if p != start]
        brute = min(subsets, key=lambda sset: kpp_loss(mae, xb, torch.tensor([list(sset)])).item())
        assert order[b, 1].item() == brute[1]
    # grouping images into several forwards gives the same answer
    assert torch.equal(kpp_select(mae, x, n_keep=3, max_batch=3), order)


# --------------------------------------------------------------------------- DPC-KNN (§3.4)
def test_dpc_knn_separates_blobs_and_selection_sizes():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(10, 4, generator=g) * 0.05
    b = torch.randn(6, 4, generator=g) * 0.05 + 5.0
    x = torch.cat([a, b])[None]
    labels, centers = dpc_knn(x, 2, k=3)
    assert len(set(labels[0, :10].tolist())) == 1 and len(set(labels[0, 10:].tolist())) == 1
    assert labels[0, 0] != labels[0, 10]
    assert labels[0, centers[0, 0]] == 0 and labels[0, centers[0, 1]] == 1
    scores = torch.randn(3, 16, generator=g)
    feats = torch.randn(3, 16, 12, generator=g)
    top, homog = select_tokens(scores, feats, k=5, homogeneous_ratio=0.2)
    assert n_homogeneous(5, 0.2) == 1
    assert (top.sum(1) == 4).all() and (homog.sum(1) == 1).all() and not (top & homog).any()
    assert torch.equal(top[0], torch.zeros(16, dtype=torch.bool).index_fill(0, torch.topk(scores[0], 4).indices, True))


# --------------------------------------------------------------------------- official key layouts
# Names taken from the official releases (facebookresearch/mae models_mae.py; irsLu/ltrp score_net,
# a timm ViT with an L-way head on the class token), written out here independently of our code.
def _official_vit_keys(prefix: str, depth: int) -> set[str]:
    blk = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
           "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    return {f"{prefix}.{i}.{k}" for i in range(depth) for k in blk}


def test_mae_official_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(11)
    mae = MaskedAutoencoder(mae_config("tiny-test", img_size=64, depth=2))
    ckpt = official_state_dict(mae)
    expected = ({"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                 "norm.bias", "decoder_embed.weight", "decoder_embed.bias", "mask_token", "decoder_pos_embed",
                 "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
                | _official_vit_keys("blocks", 2) | _official_vit_keys("decoder_blocks", 1))
    assert set(ckpt["model"]) == expected
    assert ckpt["model"]["decoder_pred.weight"].shape == (16 * 16 * 3, 32)
    path = tmp_path / "mae_visualize_tiny.pth"
    torch.save(ckpt, path)
    loaded = load_mae(str(path))
    assert loaded.cfg.depth == 2 and loaded.cfg.img_size == 64
    for k, v in mae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert not any(p.requires_grad for p in loaded.parameters())


def test_ltrp_official_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(12)
    ranker = PatchRanker(ranker_config("tiny-test", depth=2))
    mim = MaskedAutoencoder(mae_config("tiny-test"))
    sd = ranker.official_state_dict()
    expected = ({"score_net." + k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight",
                                            "patch_embed.proj.bias", "norm.weight", "norm.bias", "head.weight",
                                            "head.bias")}
                | {"score_net." + k for k in _official_vit_keys("blocks", 2)})
    assert set(sd) == expected
    assert sd["score_net.head.weight"].shape == (196, 32)
    # the official main_ltrp.py checkpoint: DDP-free model state with mim.* + score_net.*, optimizer, args
    official = {"model": {**{f"mim.{k}": v for k, v in mim.state_dict().items()}, **sd},
                "optimizer": {"state": {}, "param_groups": []}, "epoch": 399,
                "scaler": {"scale": 65536.0}, "args": argparse.Namespace(model="ltrp_base_and_vs", mask_ratio=0.9)}
    path = tmp_path / "ltrp_official.pth"
    torch.save(official, path)
    loaded = load_ranker(str(path))
    for k, v in ranker.vit.state_dict().items():
        assert torch.equal(loaded.vit.state_dict()[k], v), k
    # the MAE inside an LTRP checkpoint loads too (mim.* prefix)
    mae2 = load_mae(str(path))
    for k, v in mim.state_dict().items():
        assert torch.equal(mae2.state_dict()[k], v), k
    # our own training checkpoint (same layout) and a DDP-prefixed bare state dict
    torch.save(ranker_checkpoint(ranker, epoch=0, step=1), tmp_path / "ours.pth")
    assert torch.equal(load_ranker(str(tmp_path / "ours.pth")).vit.head.weight, ranker.vit.head.weight)
    bare = {"module." + k[len("score_net."):]: v for k, v in sd.items()}
    assert torch.equal(load_ranker(bare).vit.pos_embed, ranker.vit.pos_embed)
    bad = dict(sd)
    bad["score_net.head.weight"] = torch.zeros(256, 32)
    bad["score_net.head.bias"] = torch.zeros(256)
    with pytest.raises(ValueError, match="256 scores"):
        load_ranker({"model": bad})


# --------------------------------------------------------------------------- backends
def _road_image():
    from tests.conftest import gtsdb_images
    import cv2

    path = gtsdb_images(1)[0]
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def test_import_is_light_and_registers():
    import subprocess

    # mining.saliency may import torch for its own backends; mining.ranking itself must add no model code
    code = ("import sys, mining.saliency; had_torch = 'torch' in sys.modules; import mining.ranking; "
            "from mining.saliency.base import available_backends; "
            "assert had_torch or 'torch' not in sys.modules, 'torch imported by mining.ranking'; "
            "heavy = [m for m in ('timm', 'mining.ranking.mae', 'mining.ranking.ltrp', 'mining.ranking.kpp') "
            "if m in sys.modules]; assert not heavy, heavy; "
            "assert {'ltrp', 'kpp'} <= set(available_backends()), available_backends()")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ltrp_backend_map_and_batch():
    from mining.ranking import backend_from_args
    from mining.saliency.base import get_backend

    with pytest.raises(ValueError, match="--ltrp-checkpoint"):
        backend_from_args("ltrp", device="cpu")
    with pytest.raises(ValueError, match="unknown ranking selector"):
        backend_from_args("saliency")
    be = get_backend("ltrp", random_init=True, arch="tiny-test", device="cpu")
    assert be.weight_free is False and be.name == "ltrp"
    img = _road_image()
    m = be.predict(img)
    assert m.shape == img.shape[:2] and m.dtype == np.float32
    assert 0.0 <= m.min() and m.max() <= 1.0 and m.max() >= 0.99
    tok = be.token_values([img])[0]
    assert (tok > 0).sum() == be.keep == 49  # 25% of 196, incl. h = 10 homogeneous tokens
    small = np.ascontiguousarray(img[100:300, 200:500])
    maps = be.predict_batch([img, small])
    np.testing.assert_allclose(maps[0], m, atol=1e-5)
    assert maps[1].shape == small.shape[:2]
    with pytest.raises(ValueError):
        be.predict(img.astype(np.float32))


def test_kpp_backend_small_ratio():
    from mining.ranking import backend_from_args

    with pytest.raises(ValueError, match="--mae-checkpoint"):
        backend_from_args("kpp", device="cpu")
    be = backend_from_args("kpp", random_init=True, arch="tiny-test", kpp_ratio=0.02, device="cpu")
    assert be.keep == 4
    img = _road_image()
    tok = be.token_values([img])[0]
    assert (tok > 0).sum() == 4 and tok.reshape(-1)[center_index(14)] == 1.0  # starts at the central patch
    m = be.predict(img)
    assert m.shape == img.shape[:2] and m.dtype == np.float32 and m.max() == 1.0
