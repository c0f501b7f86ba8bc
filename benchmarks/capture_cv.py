#!/usr/bin/env python
"""K-fold cross-validated capture: every selection design choice is made on folds it is scored off.

    python benchmarks/capture_cv.py --data ../shared/data/gtsdb              # the table in RESULTS.md
    python benchmarks/capture_cv.py --data ../shared/data/gtsdb --limit 40 --steps 60   # smoke

The folds are fixed here: images sorted by name, image ``i`` is in fold ``i % FOLDS``. For
every fold f:

* each epitome configuration is trained on the images of the *other* folds (unlabelled, as a
  night's run would be), never on fold f;
* every candidate configuration (selection preset x saliency maps x ensemble weight x epitome
  size N, patch K and working resolution) selects <= 35 patches on fold f's images and is
  scored with the thesis' capture criterion (:func:`mining.metrics.captured`).

Reported: each candidate's capture per fold (mean and standard deviation across folds), and a
*nested* choice: for each fold, the candidate with the best capture on the other four folds,
scored on the held-out fold. That nested number is the honest estimate of "pick by CV, then
mine new frames". The last line is one JSON object.

Costs are kept bounded by computing every map source once per image crop (all candidates of
an image share a cache that is dropped after the image).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from capture import DEFAULT_DATA, load_dataset, read_rgb  # noqa: E402

from mining.metrics import captured  # noqa: E402
from mining.saliency.base import normalize_map  # noqa: E402
from mining.selection import get_preset, select_patches_batch  # noqa: E402

FOLDS = 5
RARE = {24: "road narrows (24)", 31: "animals (31)"}

# Epitome shapes compared (size N, patch K, working-resolution scale): see mining/epitome/model.py.
EPITOMES = {
    "e32k5s8": dict(size=32, patch=5, scale=8),
    "e32k3s8": dict(size=32, patch=3, scale=8),
    "e64k5s8": dict(size=64, patch=5, scale=8),
}

# name -> (preset, ((map source, weight), ...)[, preset overrides]); sources: weight-free backends or "ep:<EPITOMES key>".
# The default set is what fits in ~30 min on 2 CPU cores; --candidates picks others by name.
CANDIDATES = {
    "pooled/sr-bms": ("hierarchical-pooled", (("sr-bms", 1.0),)),
    "context/sr-bms": ("hierarchical-context", (("sr-bms", 1.0),)),
    "pooled/epitome[e32k5s8]": ("hierarchical-pooled", (("ep:e32k5s8", 1.0),)),
}
for _e in EPITOMES:
    for _w in (0.1, 0.25, 0.5):
        CANDIDATES[f"pooled/sr-bms+{_w:g}*epitome[{_e}]"] = ("hierarchical-pooled", (("sr-bms", 1 - _w), (f"ep:{_e}", _w)))
# weight-free variants of the default preset (one principled change each; see mining/selection/presets.py)
CANDIDATES["pooled+border/sr-bms"] = ("hierarchical-pooled", (("sr-bms", 1.0),), {"cover_border": True})
CANDIDATES["pooled+tiles1.5/sr-bms"] = ("hierarchical-pooled", (("sr-bms", 1.0),), {"level1_tiles": 1.5})
CANDIDATES["pooled+context0.5/sr-bms"] = ("hierarchical-pooled", (("sr-bms", 1.0),), {"context": 0.5})
CANDIDATES["pooled/spectral-residual-ms"] = ("hierarchical-pooled", (("spectral-residual-ms", 1.0),))
WEIGHT_FREE_CANDIDATES = ("pooled/sr-bms", "pooled+border/sr-bms", "pooled+tiles1.5/sr-bms", "pooled+context0.5/sr-bms",
                          "pooled/spectral-residual-ms")
DEFAULT_CANDIDATES = ("pooled/sr-bms", "context/sr-bms", "pooled/epitome[e32k5s8]", "pooled/sr-bms+0.1*epitome[e32k5s8]",
                      "pooled/sr-bms+0.25*epitome[e32k5s8]", "pooled/sr-bms+0.1*epitome[e32k3s8]",
                      "pooled/sr-bms+0.25*epitome[e32k3s8]")


class MapCache:
    """Saliency maps of image crops, per source, keyed by the crop's bytes (one image at a time)."""

    def __init__(self, sources: dict):
        self.sources, self.maps = sources, {}

    def get(self, src: str, im: np.ndarray) -> np.ndarray:
        key = (src, im.shape, hashlib.blake2b(np.ascontiguousarray(im).data, digest_size=16).digest())
        if key not in self.maps:
            self.maps[key] = np.asarray(self.sources[src].predict(im), np.float32)
        return self.maps[key]


class MixBackend:
    """Weighted mean of cached source maps, min-max normalised (the :class:`Ensemble` rule)."""

    weight_free = True

    def __init__(self, cache: MapCache, mix):
        self.cache, self.mix, self.name = cache, mix, "+".join(s for s, _ in mix)

    def predict_batch(self, images):
        out = []
        for im in images:
            acc = np.zeros(im.shape[:2], np.float32)
            for src, w in self.mix:
                acc += w * self.cache.get(src, im)
            out.append(normalize_map(acc))
        return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--steps", type=int, default=600, help="epitome training steps per fold (TrainConfig's default)")
    ap.add_argument("--candidates", default=None,
                    help="comma-separated candidate names, or 'weight-free' (default: DEFAULT_CANDIDATES)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--out", type=Path, default=None, help="write per-object hits (npz) here")
    args = ap.parse_args(argv)
    if not (args.data / "annotations.csv").is_file():
        raise SystemExit(f"error: {args.data} has no annotations.csv (expected a GTSDB-style directory)")
    import torch

    from mining.epitome.backend import EpitomeSaliency
    from mining.epitome.fit import TrainConfig, train_on_images
    from mining.epitome.model import EpitomeSpec
    from mining.saliency.base import get_backend

    torch.set_num_threads(args.threads)
    items = load_dataset(args.data, args.limit)
    names = (args.candidates.split(",") if args.candidates not in (None, "weight-free") else
             WEIGHT_FREE_CANDIDATES if args.candidates == "weight-free" else DEFAULT_CANDIDATES)
    unknown = [k for k in names if k not in CANDIDATES]
    if unknown:
        raise SystemExit(f"error: unknown candidates {unknown}; known: {sorted(CANDIDATES)}")
    cands = {k: CANDIDATES[k] for k in names}
    eps = sorted({s[3:] for c in cands.values() for s, _ in c[1] if s.startswith("ep:")})
    wf = sorted({s for c in cands.values() for s, _ in c[1] if not s.startswith("ep:")})
    fold_of = np.arange(len(items)) % FOLDS
    hits = {c: [] for c in cands}          # per object, in item order
    obj_fold, obj_cls = [], []
    train_s = {e: [] for e in eps}
    map_s = {s: 0.0 for s in wf + [f"ep:{e}" for e in eps]}
    t_all = time.perf_counter()
    for f in range(FOLDS):
        train_imgs = None
        sources = {s: get_backend(s) for s in wf}
        for e in eps:
            if train_imgs is None:
                train_imgs = [read_rgb(items[i][0]) for i in np.flatnonzero(fold_of != f)]
            t0 = time.perf_counter()
            model, info = train_on_images(train_imgs, EpitomeSpec(**EPITOMES[e]),
                                          TrainConfig(steps=args.steps, seed=f), device="cpu")
            train_s[e].append(time.perf_counter() - t0)
            sources[f"ep:{e}"] = EpitomeSaliency(model, device="cpu")
            print(f"fold {f}: epitome {e} trained on {info['frames']} frames in {train_s[e][-1]:.1f} s "
                  f"(nll {info['final_nll']:.1f}, resets {info['resets']})", flush=True)
        del train_imgs
        timed = {k: _Timed(v, k, map_s) for k, v in sources.items()}
        for i in np.flatnonzero(fold_of == f):
            path, boxes, cls = items[i]
            im = read_rgb(path)
            cache = MapCache(timed)
            for c, (preset, mix, *over) in cands.items():
                sel = select_patches_batch([im], get_preset(preset, **(over[0] if over else {})), MixBackend(cache, mix))[0]
                assert len(sel.boxes) <= 35
                hits[c].extend(captured(boxes, sel.boxes).tolist() if len(boxes) else [])
            obj_fold.extend([f] * len(boxes))
            obj_cls.extend(int(x) for x in cls)
        done = {c: float(np.mean(np.array(hits[c])[np.array(obj_fold) == f])) for c in cands}
        best = max(done, key=done.get)
        print(f"fold {f} done ({time.perf_counter() - t_all:.0f} s): best {best} {done[best]:.3f}", flush=True)
    obj_fold, obj_cls = np.array(obj_fold), np.array(obj_cls)
    table = {}
    for c in cands:
        h = np.array(hits[c], bool)
        per_fold = [float(h[obj_fold == f].mean()) for f in range(FOLDS)]
        table[c] = {"mean": float(np.mean(per_fold)), "std": float(np.std(per_fold, ddof=1)), "per_fold": per_fold,
                    "pooled": float(h.mean()),
                    **{RARE[k]: (float(h[obj_cls == k].mean()) if (obj_cls == k).any() else None) for k in RARE}}
    nested = []
    for f in range(FOLDS):
        inner = {c: float(np.mean([table[c]["per_fold"][g] for g in range(FOLDS) if g != f])) for c in cands}
        pick = max(inner, key=inner.get)
        nested.append({"fold": f, "picked": pick, "held_out": table[pick]["per_fold"][f]})
    ranked = sorted(table, key=lambda c: -table[c]["mean"])
    print("\n| configuration | capture mean | std across folds | per fold | road narrows (24) | animals (31) |")
    print("|---|---|---|---|---|---|")
    for c in ranked:
        t = table[c]
        rare = " | ".join("-" if t[RARE[k]] is None else f"{t[RARE[k]]:.2f}" for k in RARE)
        print(f"| {c} | {t['mean']:.4f} | {t['std']:.4f} | {' '.join(f'{x:.3f}' for x in t['per_fold'])} | {rare} |")
    nest = [n["held_out"] for n in nested]
    print(f"\nnested choice per fold: {[n['picked'] for n in nested]}")
    print(f"nested held-out capture: {np.mean(nest):.4f} +- {np.std(nest, ddof=1):.4f}")
    n_img = len(items)
    print("map seconds per image: " + ", ".join(f"{k} {v / n_img:.3f}" for k, v in map_s.items()))
    print("epitome training seconds (median over folds): " + ", ".join(f"{e} {np.median(v):.1f}" for e, v in train_s.items()))
    if args.out:
        np.savez(args.out, fold=obj_fold, cls=obj_cls, **{c: np.array(hits[c], bool) for c in cands})
    out = {"images": n_img, "objects": int(len(obj_fold)), "folds": FOLDS, "best": ranked[0],
           "best_mean": table[ranked[0]]["mean"], "best_std": table[ranked[0]]["std"],
           "nested_mean": float(np.mean(nest)), "nested_std": float(np.std(nest, ddof=1)),
           "nested_picks": [n["picked"] for n in nested], "table": table,
           "map_s_per_image": {k: v / n_img for k, v in map_s.items()},
           "epitome_train_s": {e: float(np.median(v)) for e, v in train_s.items()}, "steps": args.steps}
    print(json.dumps(out))
    return out


class _Timed:
    """Adds a source's predict time to ``acc[name]`` (seconds)."""

    def __init__(self, b, name, acc):
        self.b, self.name, self.acc = b, name, acc

    def predict(self, im):
        t0 = time.perf_counter()
        m = self.b.predict(im)
        self.acc[self.name] += time.perf_counter() - t0
        return m


if __name__ == "__main__":
    main()
