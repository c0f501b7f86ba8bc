"""Large-scale epitome training (Malkin, Ortiz & Jojic, ECCV 2020, §3).

Three ingredients, each in :meth:`EpitomeTrainer.step`:

* **Stochastic gradient descent** on the negative log-likelihood of a batch of K x K
  patches, ``-log sum_{s in M} p(x|s) p(s)``. We use Adam (a stochastic gradient method with
  per-parameter step sizes): the three parameter groups (means in [0, 1], log variances,
  prior logits) have very different scales, and plain SGD needs a learning rate per group.
* **Location promotion** (posterior regularisation): counters ``R[s]`` are incremented by
  the posterior ``p(s|x)`` of every sample. Windows whose counter has reached ``c`` (in
  samples' worth of posterior mass, ``c < 1``) are *blocked*: the likelihood of the next
  batches is computed over the allowed windows ``M = {s : R[s] < c}`` only, which forces
  samples onto the under-used parts of the epitome, so no "real estate" dies off from
  vanishing posteriors. When more than ``(1 - delta) N^2`` windows are blocked, all counters
  are reset to 0. (The paper writes the mask as ``R < c / N^2`` on normalised counters and
  the reset as ``|M| > (1 - delta) N^2``; read literally the reset would fire only when
  almost nothing is blocked, i.e. right after a reset. We read M's complement in the reset
  test, which is what makes the mechanism cycle.)
* **Diversification**: the loss is the mean NLL of the worst-modelled quantile ``p`` (0.25
  in the paper) of each batch under the model being trained (*self-diversification*), a
  max-min criterion that keeps rare appearance in the epitome instead of blurring it away.

Patches are sampled uniformly from frames at the working resolution
(:meth:`mining.epitome.model.Epitome.to_working`); the epitome's means are initialised from
a random working-resolution crop of the data, so training starts from natural image
statistics rather than grey.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from mining.epitome.model import Epitome, EpitomeSpec


@dataclass
class TrainConfig:
    """Training hyper-parameters (paper §3 and its SI).

    Attributes:
        steps: optimiser steps.
        batch: patches per step.
        lr: Adam learning rate.
        promote_c: location promotion: a window is blocked once its counter reaches ``c``
            samples' worth of posterior mass (c < 1).
        promote_delta: counters reset when more than (1 - delta) N^2 windows are blocked.
        quantile: diversification: the worst-modelled fraction of each batch that is optimised
            (1.0 = plain maximum likelihood).
        seed: RNG seed for patch sampling and initialisation.
    """

    steps: int = 600
    batch: int = 512
    lr: float = 0.02
    promote_c: float = 0.5
    promote_delta: float = 0.05
    quantile: float = 0.25
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.quantile <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {self.quantile}")
        if not 0 < self.promote_c:
            raise ValueError(f"promote_c must be > 0, got {self.promote_c}")
        if not 0 <= self.promote_delta < 1:
            raise ValueError(f"promote_delta must be in [0, 1), got {self.promote_delta}")
        if self.steps < 0 or self.batch < 1:
            raise ValueError("steps must be >= 0 and batch >= 1")


class LocationPromotion:
    """The counters and mask of §3's location promotion.

    Args:
        size: N (the counters are N x N).
        c: blocking threshold in posterior mass.
        delta: reset when more than (1 - delta) N^2 windows are blocked.
    Attributes:
        counts: (N, N) float64 counters R.
        resets: number of resets so far.
    """

    def __init__(self, size: int, c: float, delta: float, device=None):
        self.counts = torch.zeros(size, size, dtype=torch.float64, device=device)
        self.c, self.delta, self.resets = float(c), float(delta), 0

    def allowed(self) -> torch.Tensor:
        """(N, N) bool mask M of windows that may explain samples now."""
        return self.counts < self.c

    def update(self, posterior: torch.Tensor) -> bool:
        """Add a batch's posteriors (B, N, N) to the counters; reset them if too many are blocked.

        Returns:
            True when this update reset the counters.
        """
        self.counts += posterior.detach().sum(0).to(self.counts.dtype)
        blocked = int((~self.allowed()).sum())
        if blocked > (1.0 - self.delta) * self.counts.numel():
            self.counts.zero_()
            self.resets += 1
            return True
        return False

    def state_dict(self) -> dict:
        return {"counts": self.counts.cpu().clone(), "resets": self.resets}

    def load_state_dict(self, d: dict) -> None:
        self.counts.copy_(d["counts"].to(self.counts.device))
        self.resets = int(d["resets"])


def sample_patches(frames: Sequence[torch.Tensor], k: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """Uniformly sample ``n`` K x K patches from working-resolution frames.

    Args:
        frames: (C, H_i, W_i) float tensors in [0, 1] (H_i, W_i >= K), one device.
        k: patch side K.
        n: number of patches.
        gen: CPU generator (reproducible sampling).
    Returns:
        (n, C, K, K) float patches on the frames' device.
    Raises:
        ValueError: no frame is at least K x K.
    """
    ok = [f for f in frames if f.shape[-1] >= k and f.shape[-2] >= k]
    if not ok:
        raise ValueError(f"no frame is at least {k} x {k} pixels at the working resolution")
    which = torch.randint(len(ok), (n,), generator=gen)
    out = []
    for i in range(len(ok)):
        m = int((which == i).sum())
        if not m:
            continue
        f = ok[i]
        h, w = f.shape[-2:]
        ys = torch.randint(h - k + 1, (m,), generator=gen)
        xs = torch.randint(w - k + 1, (m,), generator=gen)
        win = f.unfold(1, k, 1).unfold(2, k, 1)  # (C, h-k+1, w-k+1, K, K) view
        out.append(win[:, ys.to(f.device), xs.to(f.device)].permute(1, 0, 2, 3))
    return torch.cat(out)


class EpitomeTrainer:
    """SGD + location promotion + diversification for one :class:`Epitome` (paper §3).

    Args:
        model: the epitome to train (its device is used).
        cfg: :class:`TrainConfig`.
    """

    def __init__(self, model: Epitome, cfg: TrainConfig):
        self.model, self.cfg = model, cfg
        dev = model.mu.device
        self.opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        self.promotion = LocationPromotion(model.spec.size, cfg.promote_c, cfg.promote_delta, device=dev)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step_no = 0
        self.history: list[float] = []

    @torch.no_grad()
    def init_from(self, frames: Sequence[torch.Tensor]) -> None:
        """Initialise the means from a random N x N working-resolution crop (tiled when frames are smaller)
        and the variances from the data variance."""
        n = self.model.spec.size
        f = frames[int(torch.randint(len(frames), (1,), generator=self.gen))]
        reps = (1, -(-n // f.shape[-2]) , -(-n // f.shape[-1]))
        f = f.repeat(*reps)
        y = int(torch.randint(f.shape[-2] - n + 1, (1,), generator=self.gen))
        x = int(torch.randint(f.shape[-1] - n + 1, (1,), generator=self.gen))
        self.model.mu.copy_(f[:, y:y + n, x:x + n])
        var = torch.stack([g.reshape(g.shape[0], -1).var(1) for g in frames]).mean(0)
        self.model.log_var.copy_(var.clamp(min=self.model.spec.min_var).log()[:, None, None].expand_as(self.model.log_var))

    def step(self, patches: torch.Tensor) -> float:
        """One optimiser step on a batch of patches.

        Args:
            patches: (B, C, K, K) float in [0, 1] on the model's device.
        Returns:
            mean NLL (nats per patch) of the whole batch under the allowed windows, before the step.
        """
        lj = self.model.log_joint(patches)  # (B, N, N)
        allowed = self.promotion.allowed()
        if not bool(allowed.any()):  # cannot happen after a reset, but never divide by nothing
            allowed = torch.ones_like(allowed)
        lj = lj.masked_fill(~allowed[None], float("-inf"))
        ll = torch.logsumexp(lj.flatten(1), 1)  # (B,) log sum_{s in M} p(x|s) p(s)
        q = max(1, int(math.ceil(self.cfg.quantile * ll.shape[0])))
        worst = torch.topk(ll, q, largest=False).values if q < ll.shape[0] else ll
        loss = -worst.mean() / self.model.spec.dim
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.sync_grads()
        self.opt.step()
        self.model.clamp_()
        with torch.no_grad():
            post = torch.softmax(lj.detach().flatten(1), 1).reshape(lj.shape)
            self.promotion.update(self.sync_posterior(post))
        self.step_no += 1
        nll = float(-ll.detach().mean())
        self.history.append(nll)
        return nll

    def sync_grads(self) -> None:
        """Hook between ``backward`` and the optimiser step; data-parallel trainers average the
        gradients across workers here (:mod:`mining.epitome.job`). No-op on one worker."""

    def sync_posterior(self, posterior: torch.Tensor) -> torch.Tensor:
        """Hook before the promotion counters are updated: returns the (B', N, N) posteriors to add.
        Data-parallel trainers return the sum over every worker's batch, so all workers block the
        same windows. Identity on one worker."""
        return posterior

    def fit(self, frames: Sequence[torch.Tensor], steps: int | None = None, log_every: int = 0) -> dict:
        """Train on working-resolution frames held in memory (see :func:`train_on_images`).

        Returns:
            ``{"steps", "seconds", "final_nll", "resets"}``.
        """
        t0 = time.perf_counter()
        n = self.cfg.steps if steps is None else steps
        for _ in range(n):
            nll = self.step(sample_patches(frames, self.model.spec.patch, self.cfg.batch, self.gen))
            if log_every and self.step_no % log_every == 0:
                print(f"epitome step {self.step_no}: nll {nll:.2f} nats/patch, resets {self.promotion.resets}",
                      flush=True)
        return {"steps": self.step_no, "seconds": time.perf_counter() - t0,
                "final_nll": float(sum(self.history[-20:]) / max(1, len(self.history[-20:]))),
                "resets": self.promotion.resets}

    def state_dict(self) -> dict:
        """Checkpoint content: model, optimiser, counters, RNG and step (resume bit for bit)."""
        return {"model": self.model.to_file_dict(), "opt": self.opt.state_dict(),
                "promotion": self.promotion.state_dict(), "gen": self.gen.get_state(), "step": self.step_no,
                "history": list(self.history)}

    def load_state_dict(self, d: dict) -> None:
        self.model.load_state_dict(d["model"]["state_dict"])
        self.opt.load_state_dict(d["opt"])
        self.promotion.load_state_dict(d["promotion"])
        self.gen.set_state(d["gen"])
        self.step_no = int(d["step"])
        self.history = list(d.get("history", []))


def train_on_images(images: Iterable, spec: EpitomeSpec | None = None, cfg: TrainConfig | None = None,
                    device=None, log_every: int = 0) -> tuple[Epitome, dict]:
    """Train an epitome on in-memory images (the fallback for a root with no epitome, and benchmarks).

    Args:
        images: (H, W, 3) uint8 RGB numpy arrays or (3, H, W) uint8 tensors, native pixels.
        spec: epitome shape (default :class:`EpitomeSpec`).
        cfg: training settings (default :class:`TrainConfig`).
        device: torch device (default: cuda when available).
    Returns:
        ``(model in eval mode, info)`` with info ``{"frames", "steps", "seconds", "final_nll", "resets"}``.
    Raises:
        ValueError: no usable image.
    """
    import numpy as np

    spec, cfg = spec or EpitomeSpec(), cfg or TrainConfig()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = Epitome(spec).to(dev)
    frames = []
    with torch.no_grad():
        for im in images:
            t = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1) if isinstance(im, np.ndarray) else im
            frames.append(model.to_working(t.to(dev)))
    if not frames:
        raise ValueError("no images to train the epitome on")
    tr = EpitomeTrainer(model, cfg)
    tr.init_from(frames)
    info = tr.fit(frames, log_every=log_every)
    info["frames"] = len(frames)
    return model.eval(), info

