"""Ranking-path micro-benchmark: ms/image and FLOPs/image of LTRP, KPP and the saliency hierarchy.

    nice -n 10 python benchmarks/ranking.py --out benchmarks/ranking_results.json

RANDOM WEIGHTS: no pretrained weights are available here, so this reports
throughput and compute only -- nothing about selection quality.

Measured (wall clock, this machine, torch threads = ``--threads``):

* LTRP ranker forward (ViT-S/16 and ViT-T/16) at batch 1 and batch 64 (224x224 views);
* the full ``ltrp`` backend (resize + forward + DPC-KNN + render) at batch 1 and 64 on GTSDB frames;
* KPP with the ViT-B MAE at ``--kpp-ratio`` (default 0.25 -> 49 of 196 patches, 48 greedy steps):
  ``--kpp-steps`` greedy steps are timed at batch 1 and the total is extrapolated by
  FLOPs (a full run is ~1e14 FLOPs per view, about an hour on this CPU);
* the saliency hierarchy's saliency cost: OpenCV spectral residual on the full frame + 5
  level-1 windows (``hierarchical-filtered``: k = 5 at level 1), each resized to 256x256;
* the whole ``select_patches_batch`` per frame for ``spectral-residual`` and ``ltrp`` (ViT-S).

FLOPs: analytic (2 x MACs of matmuls/convs, :mod:`mining.ranking.flops`), cross-checked
with ``torch.utils.flop_counter.FlopCounterMode`` where the model can run on the meta device.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "gtsdb" / "images"
VIEWS_PER_FRAME = 6  # hierarchy: the whole frame (level 1) + 5 level-1 windows (level 2 saliency)


def _time(fn, repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls (after one warm-up call)."""
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _count_flops(fn) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        fn()
    return float(fc.get_total_flops())


def load_frames(data: Path, n: int) -> list[np.ndarray]:
    import cv2

    paths = sorted(glob.glob(str(data / "*.jpg")))[:n]
    if not paths:
        raise SystemExit(f"no images in {data}")
    frames = [cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB) for p in paths]
    while len(frames) < n:
        frames += frames[: n - len(frames)]
    return frames


def bench_ranker(arch: str, batches: list[int], repeats: int) -> dict:
    import torch

    from mining.ranking.flops import ranker_flops
    from mining.ranking.ltrp import PatchRanker, ranker_config

    torch.manual_seed(0)
    model = PatchRanker(ranker_config(arch)).eval()
    out = {"arch": arch, "flops_analytic": ranker_flops(model.cfg)}
    with torch.device("meta"):
        meta = PatchRanker(ranker_config(arch)).eval()
    out["flops_counted"] = _count_flops(lambda: meta(torch.empty(1, 3, 224, 224, device="meta")))
    for b in batches:
        x = torch.randn(b, 3, 224, 224)
        with torch.inference_mode():
            s = _time(lambda: model(x), repeats if b == 1 else 1)
        out[f"ms_per_image_b{b}"] = 1000.0 * s / b
    return out


def bench_ltrp_backend(frames: list[np.ndarray], batches: list[int], repeats: int) -> dict:
    from mining.ranking import LTRPBackend

    be = LTRPBackend(random_init=True, device="cpu")
    out = {"keep": be.keep}
    for b in batches:
        imgs = frames[:b]
        s = _time(lambda: be.predict_batch(imgs), repeats if b == 1 else 1)
        out[f"ms_per_view_b{b}"] = 1000.0 * s / b
    return out


def bench_kpp(ratio: float, steps: int) -> dict:
    import torch

    from mining.ranking.kpp import kpp_flops, kpp_select, n_keep_for
    from mining.ranking.mae import MaskedAutoencoder, freeze, mae_config

    torch.manual_seed(0)
    cfg = mae_config("mae_vit_base_patch16")
    mae = freeze(MaskedAutoencoder(cfg))
    n_keep = n_keep_for(ratio, cfg.num_patches)
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        kpp_select(mae, x, 2)  # warm-up (1 step)
        t = time.perf_counter()
        kpp_select(mae, x, steps + 1)
        measured = time.perf_counter() - t
    f_measured = kpp_flops(cfg, steps + 1)
    f_total = kpp_flops(cfg, n_keep)
    # cross-check the analytic count of one step with FlopCounterMode on the meta device
    with torch.device("meta"):
        meta = freeze(MaskedAutoencoder(cfg))
    c = cfg.num_patches - 1
    ids = torch.zeros(c, 2, dtype=torch.long, device="meta")
    tokens = torch.empty(1, cfg.num_patches, cfg.embed_dim, device="meta")
    rows = torch.zeros(c, dtype=torch.long, device="meta")
    counted_step1 = _count_flops(lambda: meta.decode(meta.encode(tokens, ids, rows=rows), ids))
    analytic_step1 = kpp_flops(cfg, 2) - 2.0 * cfg.num_patches * 768 * cfg.embed_dim
    return {"mae": "mae_vit_base_patch16", "ratio": ratio, "n_keep": n_keep, "steps_timed": steps,
            "s_timed": measured, "flops_per_view": f_total, "flops_step1_analytic": analytic_step1,
            "flops_step1_counted": counted_step1,
            "ms_per_view_b1_extrapolated": 1000.0 * measured * f_total / f_measured}


def bench_saliency(frames: list[np.ndarray], repeats: int) -> dict:
    from mining.ranking.flops import spectral_residual_flops
    from mining.saliency.base import get_backend

    be = get_backend("spectral-residual")
    h, w = frames[0].shape[:2]
    win = int(round(896 * w / 3848))  # level-1 patch side at this width (Table A.4, scaled)
    crops = [np.ascontiguousarray(frames[0][:win, i * (w - win) // 4: i * (w - win) // 4 + win]) for i in range(5)]
    views = [frames[0]] + crops
    s = _time(lambda: [be.predict(v) for v in views], repeats)
    flops = spectral_residual_flops(256, 64, (h, w)) + 5 * spectral_residual_flops(256, 64, (win, win))
    return {"level1_window_px": win, "ms_per_frame": 1000.0 * s, "flops_per_frame": flops}


def bench_selection(frames: list[np.ndarray], n: int) -> dict:
    from mining.ranking import LTRPBackend
    from mining.saliency.base import get_backend
    from mining.selection import DEFAULT_PRESET, get_preset, select_patches_batch

    cfg = get_preset(DEFAULT_PRESET)
    out = {"preset": DEFAULT_PRESET, "frames": n}
    for name, be in (("spectral-residual", get_backend("spectral-residual")),
                     ("ltrp-vit_s16-random", LTRPBackend(random_init=True, device="cpu"))):
        select_patches_batch(frames[:1], cfg, be)
        t = time.perf_counter()
        sel = select_patches_batch(frames[:n], cfg, be)
        out[f"{name}_ms_per_frame"] = 1000.0 * (time.perf_counter() - t) / n
        out[f"{name}_patches_per_frame"] = float(np.mean([len(s) for s in sel]))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kpp-ratio", type=float, default=0.25)
    ap.add_argument("--kpp-steps", type=int, default=1, help="greedy steps timed (then extrapolated)")
    ap.add_argument("--selection-frames", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip", nargs="*", default=[], choices=["ranker", "backend", "kpp", "saliency", "selection"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    frames = load_frames(args.data, max(args.batches + [args.selection_frames]))
    res = {"note": "RANDOM WEIGHTS: throughput/compute only", "torch_threads": torch.get_num_threads(),
           "cpu": os.cpu_count(), "views_per_frame": VIEWS_PER_FRAME}
    steps = [("ranker", lambda: {a: bench_ranker(a, args.batches, args.repeats)
                                 for a in ("vit_small_patch16_224", "vit_tiny_patch16_224")}),
             ("backend", lambda: bench_ltrp_backend(frames, args.batches, args.repeats)),
             ("saliency", lambda: bench_saliency(frames, args.repeats)),
             ("selection", lambda: bench_selection(frames, args.selection_frames)),
             ("kpp", lambda: bench_kpp(args.kpp_ratio, args.kpp_steps))]
    for name, fn in steps:
        if name in args.skip:
            continue
        t = time.perf_counter()
        res[name] = fn()
        print(f"[{name}] {time.perf_counter() - t:.1f}s {json.dumps(res[name])}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
