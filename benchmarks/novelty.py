#!/usr/bin/env python
"""Query-free novelty: does ranking mined patches by epitome novelty surface the rare objects?

    python benchmarks/novelty.py --data ../shared/data/gtsdb                  # table in RESULTS.md
    python benchmarks/novelty.py --data ../shared/data/gtsdb --limit 30 --steps 60   # smoke
    python benchmarks/novelty.py --data DIR --epitome models/epitome/epitome-....pt

Steps: train an epitome on ``--data``'s images (unlabelled, as a night's run would; or load
``--epitome``), select patches in every image with the mining job's default configuration
(:data:`mining.selection.DEFAULT_PRESET` + ``DEFAULT_SALIENCY``), give every selected patch its
``novelty`` (mean epitome NLL inside the box, exactly the mining actor's column), then rank
all patches of all images three ways:

* by ``novelty`` (higher first),
* by the selection score (S_id / S_apv of the map the patch was selected on; higher first),
* at random (the mean over 20 seeded shuffles).

A patch is *relevant* when it captures an annotated object by the thesis' §4.2 criterion
(:func:`mining.metrics.captured`: covers >= 50 % of the object, object fills >= 5 % of it).
Reported: average precision (scikit-learn), precision@50 and precision@200, per ranking;
last line one JSON object (``images``, ``patches``, ``relevant``, ``ap_novelty``,
``ap_score``, ``ap_random``, ``p_at_50_novelty``, ``p_at_50_score``, ``p_at_50_random``,
``p_at_200_*``, ``epitome``).
"""
from __future__ import annotations

import argparse
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


def precision_at(rel_sorted: np.ndarray, k: int) -> float:
    """Fraction of relevant items among the first ``k`` of a ranking ((N,) bool in rank order)."""
    k = min(k, len(rel_sorted))
    return float(rel_sorted[:k].mean()) if k else float("nan")


def rank_metrics(rel: np.ndarray, score: np.ndarray) -> dict:
    """AP, P@50, P@200 of ranking ``score`` (higher first; ties broken by index) for relevance ``rel``."""
    from sklearn.metrics import average_precision_score

    order = np.lexsort((np.arange(len(score)), -score))
    return {"ap": float(average_precision_score(rel, score)) if rel.any() else float("nan"),
            "p50": precision_at(rel[order], 50), "p200": precision_at(rel[order], 200)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--epitome", default=None, help="a trained epitome model file (default: train one on --data)")
    ap.add_argument("--steps", type=int, default=None, help="training steps when no --epitome (default: TrainConfig)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    args = ap.parse_args(argv)
    if not (args.data / "annotations.csv").is_file():
        raise SystemExit(f"error: {args.data} has no annotations.csv (expected a GTSDB-style directory)")
    import torch

    from mining.epitome.backend import EpitomeSaliency
    from mining.epitome.fit import TrainConfig, train_on_images
    from mining.epitome.model import EpitomeSpec
    from mining.registry import get_backend
    from mining.selection import DEFAULT_PRESET, DEFAULT_SALIENCY, get_preset, select_patches_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    items = load_dataset(args.data, args.limit)
    t0 = time.perf_counter()
    if args.epitome:
        ep = EpitomeSaliency(args.epitome, device="cpu")
        source, train_s = args.epitome, 0.0
    else:
        cfg = TrainConfig() if args.steps is None else TrainConfig(steps=args.steps)
        model, info = train_on_images((read_rgb(p) for p, _, _ in items), EpitomeSpec(), cfg, device="cpu")
        ep, source, train_s = EpitomeSaliency(model, device="cpu"), f"trained on --data ({info['frames']} frames)", \
            time.perf_counter() - t0
    print(f"epitome: {source} ({train_s:.1f} s)", flush=True)
    from mining.epitome.resolve import needs_epitome

    needs = needs_epitome(DEFAULT_SALIENCY)
    backend = get_backend(DEFAULT_SALIENCY, model=ep.model, device="cpu") if needs else get_backend(DEFAULT_SALIENCY)
    preset = get_preset(DEFAULT_PRESET)
    rel, nov, score, n_obj = [], [], [], 0
    t1 = time.perf_counter()
    for path, boxes, _cls in items:
        im = read_rgb(path)
        sel = select_patches_batch([im], preset, backend)[0]
        frame = torch.from_numpy(im).permute(2, 0, 1)
        nov.append(ep.box_novelty(frame, sel.boxes))
        score.append(np.asarray(sel.scores, np.float64))
        n_obj += len(boxes)
        if len(boxes):
            rel.append(np.array([bool(captured(boxes, b[None]).any()) for b in sel.boxes], bool))
        else:
            rel.append(np.zeros(len(sel.boxes), bool))
    sel_s = time.perf_counter() - t1
    rel_a, nov_a, score_a = np.concatenate(rel), np.concatenate(nov).astype(np.float64), np.concatenate(score)
    m_nov, m_score = rank_metrics(rel_a, nov_a), rank_metrics(rel_a, score_a)
    rnd = [rank_metrics(rel_a, np.random.default_rng(s).random(len(rel_a))) for s in range(20)]
    m_rnd = {k: float(np.mean([r[k] for r in rnd])) for k in rnd[0]}
    print(f"{len(items)} images, {n_obj} objects, {len(rel_a)} patches, {int(rel_a.sum())} capture an object "
          f"(prevalence {rel_a.mean():.4f}); selection {1000 * sel_s / max(1, len(items)):.0f} ms/image")
    print("| ranking | AP | P@50 | P@200 |\n|---|---|---|---|")
    for name, m in (("novelty (epitome NLL)", m_nov), ("selection score", m_score), ("random (20 shuffles)", m_rnd)):
        print(f"| {name} | {m['ap']:.4f} | {m['p50']:.3f} | {m['p200']:.3f} |")
    out = {"images": len(items), "objects": n_obj, "patches": int(len(rel_a)), "relevant": int(rel_a.sum()),
           "ap_novelty": m_nov["ap"], "ap_score": m_score["ap"], "ap_random": m_rnd["ap"],
           "p_at_50_novelty": m_nov["p50"], "p_at_50_score": m_score["p50"], "p_at_50_random": m_rnd["p50"],
           "p_at_200_novelty": m_nov["p200"], "p_at_200_score": m_score["p200"], "p_at_200_random": m_rnd["p200"],
           "epitome": source, "epitome_train_s": train_s, "preset": DEFAULT_PRESET, "saliency": DEFAULT_SALIENCY}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
