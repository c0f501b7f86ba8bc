"""Epitome model (issue 14): Eq. 5 against a direct computation, location promotion, file round trip."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mining.epitome.backend import EpitomeSaliency, box_means, find_epitome_member
from mining.epitome.fit import EpitomeTrainer, LocationPromotion, TrainConfig, sample_patches, train_on_images
from mining.epitome.model import Epitome, EpitomeSpec, load_epitome, save_epitome


def _random_epitome(n=5, k=3, seed=0) -> Epitome:
    g = torch.Generator().manual_seed(seed)
    m = Epitome(EpitomeSpec(size=n, patch=k, scale=1, min_var=1e-3)).double()
    with torch.no_grad():
        m.mu.copy_(torch.rand(m.mu.shape, generator=g, dtype=torch.float64))
        m.log_var.copy_(torch.empty(m.log_var.shape, dtype=torch.float64).uniform_(-4, -1, generator=g))
        m.prior_logits.copy_(torch.randn(m.prior_logits.shape, generator=g, dtype=torch.float64))
    return m


def _direct_log_joint(m: Epitome, x: torch.Tensor) -> torch.Tensor:
    """Eqs. 3-4 literally: loop over windows, gather with modulo indices, sum Gaussian log densities."""
    n, k = m.spec.size, m.spec.patch
    mu, var = m.mu.detach(), m.var().detach()
    logp = torch.log_softmax(m.prior_logits.detach().reshape(-1), 0).reshape(n, n)
    out = torch.empty(x.shape[0], n, n, dtype=torch.float64)
    for s1 in range(n):
        for s2 in range(n):
            rows = [(s1 + i) % n for i in range(k)]
            cols = [(s2 + j) % n for j in range(k)]
            mw = mu[:, rows][:, :, cols]
            vw = var[:, rows][:, :, cols]
            ll = -0.5 * ((x - mw) ** 2 / vw + torch.log(2 * math.pi * vw)).flatten(1).sum(1)
            out[:, s1, s2] = ll + logp[s1, s2]
    return out


def test_eq5_convolution_equals_direct_computation():
    m = _random_epitome()
    x = torch.rand(7, 3, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = m.log_joint(x)
    want = _direct_log_joint(m, x)
    assert got.shape == (7, 5, 5)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-9)
    # the matrix-product path of the dense map computes the same normaliser
    nll = m.patch_nll(x.reshape(7, -1))
    torch.testing.assert_close(nll, -torch.logsumexp(want.flatten(1), 1), rtol=1e-10, atol=1e-9)


def test_nll_map_is_the_patch_nll_around_each_pixel():
    m = _random_epitome(n=6, k=3)
    img = (torch.rand(3, 9, 11, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
    mp = m.nll_map(img)
    assert mp.shape == (9, 11)
    x = img.double() / 255.0
    # an interior pixel (4, 5): its 3 x 3 neighbourhood
    patch = x[:, 3:6, 4:7].reshape(1, -1)
    assert float(mp[4, 5]) == pytest.approx(float(m.patch_nll(patch)[0]), rel=1e-5)


def test_wrong_patch_shape_raises():
    m = _random_epitome()
    with pytest.raises(ValueError, match="patches must be"):
        m.log_joint(torch.rand(2, 3, 4, 4, dtype=torch.float64))


def test_location_promotion_counts_blocks_and_resets():
    lp = LocationPromotion(size=2, c=0.5, delta=0.3)
    post = torch.zeros(1, 2, 2, dtype=torch.float64)
    post[0, 0, 0] = 0.6
    post[0, 1, 1] = 0.4
    assert not lp.update(post)
    assert lp.counts[0, 0] == pytest.approx(0.6)
    allowed = lp.allowed()
    assert not allowed[0, 0] and allowed[1, 1] and allowed[0, 1]  # the over-used window is blocked
    # 3 of 4 blocked > (1 - 0.3) * 4 = 2.8: every counter resets
    post2 = torch.zeros(1, 2, 2, dtype=torch.float64)
    post2[0, 0, 1] = 0.5
    post2[0, 1, 1] = 0.5
    assert lp.update(post2)
    assert lp.resets == 1 and float(lp.counts.sum()) == 0.0 and bool(lp.allowed().all())


def test_trainer_maps_samples_only_to_allowed_windows():
    g = torch.Generator().manual_seed(3)
    frames = [torch.rand(3, 24, 24, generator=g)]
    m = Epitome(EpitomeSpec(size=8, patch=3, scale=1))
    tr = EpitomeTrainer(m, TrainConfig(batch=32, promote_c=0.5, promote_delta=0.0, quantile=1.0))
    tr.init_from(frames)
    tr.promotion.counts.fill_(1.0)  # every window blocked ...
    tr.promotion.counts[2, 3] = 0.0  # ... but one
    before = tr.promotion.counts.clone()
    tr.step(sample_patches(frames, 3, 32, tr.gen))
    delta = tr.promotion.counts - before
    # all 32 samples' posterior mass went to the one allowed window, none to the blocked ones
    assert float(delta[2, 3]) == pytest.approx(32.0)
    delta[2, 3] = 0
    assert float(delta.abs().sum()) == 0.0
    # plain SGD on a tiny epitome: the allowed window is used, and the counters reset once
    # more than (1 - delta) N^2 windows are blocked
    tr2 = EpitomeTrainer(Epitome(EpitomeSpec(size=4, patch=3, scale=1)), TrainConfig(batch=64, promote_c=0.5,
                                                                                      promote_delta=0.2))
    tr2.init_from(frames)
    for _ in range(20):
        tr2.step(sample_patches(frames, 3, 64, tr2.gen))
    assert tr2.promotion.resets >= 1


def test_training_lowers_nll_and_diversification_uses_the_worst_quantile():
    torch.manual_seed(0)
    imgs = [np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8) // 4 * 2 + 60 for i in range(3)]
    model, info = train_on_images(imgs, EpitomeSpec(size=8, patch=3, scale=2), TrainConfig(steps=40, batch=64), device="cpu")
    assert info["steps"] == 40 and info["frames"] == 3
    assert not model.training
    with pytest.raises(ValueError, match="quantile"):
        TrainConfig(quantile=0.0)


def test_save_load_round_trip(tmp_path):
    m = _random_epitome().float()
    save_epitome(m, tmp_path / "e.pt", meta={"frames": 3})
    m2, meta = load_epitome(tmp_path / "e.pt")
    assert meta == {"frames": 3} and m2.spec == m.spec
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        torch.testing.assert_close(a, b)
    torch.save({"format": "something-else"}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a mining-epitome"):
        load_epitome(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError):
        load_epitome(tmp_path / "missing.pt")


def test_backend_map_range_and_novelty_boxes(tmp_path):
    m = _random_epitome(n=6, k=3).float()
    m.spec = EpitomeSpec(size=6, patch=3, scale=2)
    save_epitome(m, tmp_path / "e.pt")
    b = EpitomeSaliency(str(tmp_path / "e.pt"), device="cpu")
    img = np.full((20, 30, 3), 128, np.uint8)
    img[4:10, 6:14] = (250, 10, 10)  # a saturated red block in grey
    sal = b.predict(img)
    assert sal.shape == (20, 30) and sal.dtype == np.float32 and 0 <= sal.min() and sal.max() <= 1
    t = torch.from_numpy(img).permute(2, 0, 1)
    nov = b.box_novelty(t, np.array([[6, 4, 14, 10], [20, 12, 28, 18]]))
    raw = b.nll_maps([t])[0].double().numpy()
    assert nov.shape == (2,)
    assert nov[0] == pytest.approx(raw[2:5, 3:7].mean(), rel=1e-5)
    assert find_epitome_member(b) is b and find_epitome_member(object()) is None
    # integral-image means equal direct means
    r = np.arange(12, dtype=np.float64).reshape(3, 4)
    assert box_means(r, np.array([[0, 0, 8, 6]]), 2, (6, 8))[0] == pytest.approx(r.mean())


def test_backend_without_model_names_the_options(monkeypatch):
    monkeypatch.delenv("MINING_EPITOME", raising=False)
    with pytest.raises(ValueError, match="--epitome"):
        EpitomeSaliency()
