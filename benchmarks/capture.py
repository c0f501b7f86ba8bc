#!/usr/bin/env python
"""Capture benchmark of patch selection (thesis §4.2, Table 4.2) on GTSDB-style data.

    python benchmarks/capture.py --data ../shared/data/gtsdb                 # mining job's default
    python benchmarks/capture.py --data ../shared/data/gtsdb --variant hierarchical-filtered \
        --saliency spectral-residual --limit 50
    python benchmarks/capture.py --data ../shared/data/gtsdb --selector ltrp  # learned ranker
    python benchmarks/capture.py --data ../shared/data/gtsdb --all           # table -> RESULTS.md

``--data`` is a directory with ``images/`` and ``annotations.csv``
(image,x0,y0,x1,y1,class_id[,class_name]; pixels, x1/y1 exclusive). An object counts as
captured when one selected patch covers >= 50 % of it and it fills >= 5 % of that patch
(:func:`mining.metrics.captured`). Prints a table (capture overall, per GTSDB category,
class 24 "road narrows", patches/image, ms/image) and, as its LAST line, one JSON object.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mining.metrics import best_coverage, captured  # noqa: E402
from mining.selection import DEFAULT_PRESET, DEFAULT_SALIENCY, PRESETS, get_preset, select_patches_batch  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "gtsdb"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- capture:begin -->", "<!-- capture:end -->"

# GTSDB-ReadMe.txt, section 3: the category of every class id.
CATEGORIES = {
    "prohibitory": {0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 15, 16},
    "danger": {11, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31},
    "mandatory": {33, 34, 35, 36, 37, 38, 39, 40},
    "other": {6, 12, 13, 14, 17, 32, 41, 42},
}
ROAD_NARROWS = 24


def category_of(class_id: int) -> str:
    for name, ids in CATEGORIES.items():
        if class_id in ids:
            return name
    return "other"


class ConstantSaliency:
    """All-zero maps, for presets whose selection ignores saliency."""

    name = "(none)"
    weight_free = True

    def predict_batch(self, images):
        return [np.zeros(im.shape[:2], np.float32) for im in images]


def load_dataset(data: Path, limit: int | None = None, start: int = 0):
    """List of (image path, (M,4) int boxes, (M,) class ids), images sorted by name."""
    ann = defaultdict(list)
    with open(data / "annotations.csv", newline="") as f:
        for row in csv.DictReader(f):
            ann[row["image"]].append(
                (int(row["x0"]), int(row["y0"]), int(row["x1"]), int(row["y1"]), int(row["class_id"]))
            )
    names = sorted(p.name for p in (data / "images").iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".ppm"})
    names = names[start:]
    if limit is not None:
        names = names[:limit]
    items = []
    for n in names:
        rows = ann.get(n, [])
        boxes = np.array([r[:4] for r in rows], np.int64).reshape(-1, 4)
        cls = np.array([r[4] for r in rows], np.int64)
        items.append((data / "images" / n, boxes, cls))
    return items


def read_rgb(path: Path) -> np.ndarray:
    import cv2

    im = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if im is None:
        raise OSError(f"cannot read image {path}")
    return cv2.cvtColor(im, cv2.COLOR_BGR2RGB)


def make_backend(selector: str, saliency: str | None, checkpoint: str | None = None, random_init: bool = False,
                 epitome=None):
    """The saliency backend for ``--selector`` (saliency maps or a learned ranker's maps).

    The same registry call as the mining job (:func:`mining.registry.backend_from_config`);
    ``checkpoint`` is the LTRP checkpoint for ``ltrp`` and the MAE checkpoint for ``kpp``.
    Raises SystemExit with a hint when the backend cannot be created.
    """
    from mining.registry import backend_from_config

    options = {"selector": selector, "saliency": saliency or DEFAULT_SALIENCY, "ltrp_checkpoint": checkpoint,
               "mae_checkpoint": checkpoint, "ranker_random_init": random_init, "epitome": epitome}
    try:
        return backend_from_config(options)
    except KeyError as e:
        raise SystemExit(f"error: {e.args[0]}") from None
    except (ValueError, FileNotFoundError, TypeError) as e:
        raise SystemExit(f"error: cannot create the {selector!r} backend: {e} "
                         f"(pass --ranker-checkpoint PATH, or --ranker-random-init for a smoke run)") from None


def resolve_epitome_arg(args, items):
    """The epitome for ``--saliency`` when it has an epitome member: ``--epitome``, else one trained on ``items``.

    Returns:
        ``(model path / Epitome / None, description for the JSON line)``; ``(None, None)`` when the
        backend needs no epitome.
    """
    from mining.epitome.resolve import needs_epitome

    if args.selector != "saliency" or not needs_epitome(args.saliency or DEFAULT_SALIENCY):
        return None, None
    if args.epitome:
        return args.epitome, f"given: {args.epitome}"
    from mining.epitome.fit import TrainConfig, train_on_images

    cfg = TrainConfig() if args.epitome_steps is None else TrainConfig(steps=args.epitome_steps)
    t0 = time.perf_counter()
    model, info = train_on_images((read_rgb(p) for p, _, _ in items), cfg=cfg, device=args.device)
    src = f"trained on the --data images ({info['frames']} frames, {info['steps']} steps, {time.perf_counter() - t0:.0f} s)"
    print(f"epitome: {src}", flush=True)
    return model, src


def run(items, config, backend, batch: int = 8, impl: str | None = None, keep_selections: bool = False,
        device: str = "cpu") -> dict:
    """Run selection on all items; return the metrics dict.

    ``impl``: None runs :func:`mining.selection.select_patches_batch` (numpy, the reference);
    ``"torch"`` / ``"numpy"`` run :func:`mining.select_device.select_frames` with that
    implementation on (3, H, W) uint8 tensors on ``device``. ``keep_selections`` adds the
    per-image boxes under ``"_boxes"`` (for parity checks).
    """
    n_obj = 0
    hits = defaultdict(list)
    n_patches = 0
    elapsed = 0.0
    per_object_image = []
    all_boxes: list = []
    for s in range(0, len(items), batch):
        chunk = items[s : s + batch]
        images = [read_rgb(p) for p, _, _ in chunk]
        t0 = time.perf_counter()
        if impl is None:
            sels = select_patches_batch(images, config, backend)
        else:
            import torch

            from mining.select_device import select_frames

            frames = [torch.from_numpy(im).permute(2, 0, 1).to(device) for im in images]
            sels = select_frames(frames, config, backend, impl=impl)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
        elapsed += time.perf_counter() - t0
        if keep_selections:
            all_boxes.extend(np.asarray(sel.boxes).copy() for sel in sels)
        for j, ((p, boxes, cls), sel) in enumerate(zip(chunk, sels)):
            n_patches += len(sel.boxes)
            if len(boxes) == 0:
                continue
            c = captured(boxes, sel.boxes)
            per_object_image += [s + j] * len(c)
            n_obj += len(boxes)
            for ok, cid in zip(c, cls):
                hits["all"].append(ok)
                hits[category_of(int(cid))].append(ok)
                if cid == ROAD_NARROWS:
                    hits["road narrows (24)"].append(ok)
    rate = {k: (float(np.mean(v)) if v else float("nan")) for k, v in hits.items()}
    counts = {k: len(v) for k, v in hits.items()}
    return {
        "images": len(items),
        "objects": n_obj,
        "capture": rate.get("all", float("nan")),
        "capture_by_category": {k: rate.get(k, float("nan")) for k in [*CATEGORIES, "road narrows (24)"]},
        "objects_by_category": {k: counts.get(k, 0) for k in [*CATEGORIES, "road narrows (24)"]},
        "patches_per_image": n_patches / max(len(items), 1),
        "ms_per_image": 1000.0 * elapsed / max(len(items), 1),
        "_hits": np.array(hits["all"], bool),
        "_image_of_object": np.array(per_object_image, np.int64),
        "_boxes": all_boxes,
    }


MISS_TILE = 256         # px, square tile (the crop scaled to fit, letterboxed)
MISS_CAPTION = 34       # px of caption under each tile
MISS_COLS, MISS_ROWS = 8, 6  # 48 tiles per sheet
OBJECT_RGB, PATCH_RGB = (40, 230, 40), (255, 60, 40)


def _miss_tile(image: np.ndarray, obj, patches: np.ndarray, caption: tuple[str, str]) -> np.ndarray:
    """One contact-sheet tile: (MISS_TILE + MISS_CAPTION, MISS_TILE, 3) uint8 RGB.

    The crop is a square of side max(3 x the object's larger side, 160 px) centred on the object
    (shifted to stay inside the image), scaled to MISS_TILE px; the object's box in green, every
    selected patch that intersects the crop in red.
    """
    import cv2

    h, w = image.shape[:2]
    x0, y0, x1, y1 = (int(v) for v in obj)
    side = max(3 * max(x1 - x0, y1 - y0), 160)
    cx0 = int(min(max((x0 + x1) // 2 - side // 2, 0), max(w - side, 0)))
    cy0 = int(min(max((y0 + y1) // 2 - side // 2, 0), max(h - side, 0)))
    cx1, cy1 = min(cx0 + side, w), min(cy0 + side, h)
    scale = MISS_TILE / max(cx1 - cx0, cy1 - cy0)
    crop = cv2.resize(image[cy0:cy1, cx0:cx1], (max(1, round((cx1 - cx0) * scale)), max(1, round((cy1 - cy0) * scale))),
                      interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    tile = np.full((MISS_TILE + MISS_CAPTION, MISS_TILE, 3), 255, np.uint8)
    tile[:crop.shape[0], :crop.shape[1]] = crop
    view = tile[:MISS_TILE]

    def box(b, rgb):
        p0 = (int(round((b[0] - cx0) * scale)), int(round((b[1] - cy0) * scale)))
        p1 = (int(round((b[2] - cx0) * scale)) - 1, int(round((b[3] - cy0) * scale)) - 1)
        cv2.rectangle(view, p0, p1, rgb, 1, cv2.LINE_AA)

    for b in np.asarray(patches).reshape(-1, 4):
        if b[0] < cx1 and b[2] > cx0 and b[1] < cy1 and b[3] > cy0:
            box(b, PATCH_RGB)
    box((x0, y0, x1, y1), OBJECT_RGB)
    for k, line in enumerate(caption):
        cv2.putText(tile, line, (3, MISS_TILE + 14 + 15 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
    return tile


def write_misses(items, res: dict, out_dir: Path) -> int:
    """Contact sheets and a CSV of the annotated objects the selection did NOT capture.

    Args:
        items: the :func:`load_dataset` list that ``res`` was computed on.
        res: :func:`run`'s result with ``keep_selections=True`` (per-image boxes in ``"_boxes"``).
        out_dir: created if needed; receives ``misses_000.jpg``, ``misses_001.jpg``, ... (up to
            48 tiles each, see :func:`_miss_tile`; captions: image, class id, object size in px,
            best cover and fill of :func:`mining.metrics.best_coverage`) and ``misses.csv``
            (image, x0, y0, x1, y1, class_id, best_cover, best_fill, sheet, tile; one row per tile).
    Returns:
        the number of missed objects (= tiles = CSV rows); the capture criterion is
        :func:`mining.metrics.captured`, as in :func:`run`.
    Raises:
        ValueError: ``res`` has no per-image boxes.
    """
    import cv2

    if len(res.get("_boxes", [])) != len(items):
        raise ValueError("write_misses needs run(..., keep_selections=True) on the same items")
    out_dir.mkdir(parents=True, exist_ok=True)
    per_sheet = MISS_COLS * MISS_ROWS
    tiles: list[np.ndarray] = []
    n_sheets = 0

    def flush():
        nonlocal n_sheets
        rows = [tiles[r * MISS_COLS:(r + 1) * MISS_COLS] for r in range((len(tiles) + MISS_COLS - 1) // MISS_COLS)]
        blank = np.full_like(tiles[0], 255)
        sheet = np.vstack([np.hstack(r + [blank] * (MISS_COLS - len(r))) for r in rows])
        path = out_dir / f"misses_{n_sheets:03d}.jpg"
        if not cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90]):
            raise OSError(f"cannot write {path}")
        n_sheets += 1
        tiles.clear()

    n = 0
    with open(out_dir / "misses.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["image", "x0", "y0", "x1", "y1", "class_id", "best_cover", "best_fill", "sheet", "tile"])
        for (path, boxes, cls), sel in zip(items, res["_boxes"]):
            if len(boxes) == 0:
                continue
            missed = ~captured(boxes, sel)
            if not missed.any():
                continue
            cover, fill = best_coverage(boxes, sel)
            image = read_rgb(path)
            for i in np.flatnonzero(missed):
                x0, y0, x1, y1 = (int(v) for v in boxes[i])
                caption = (f"{path.name} cls {int(cls[i])} {x1 - x0}x{y1 - y0}px",
                           f"cover {cover[i]:.2f} fill {fill[i]:.3f}")
                tiles.append(_miss_tile(image, boxes[i], sel, caption))
                wr.writerow([path.name, x0, y0, x1, y1, int(cls[i]), f"{cover[i]:.4f}", f"{fill[i]:.4f}",
                             f"misses_{n_sheets:03d}.jpg", len(tiles) - 1])
                n += 1
                if len(tiles) == per_sheet:
                    flush()
    if tiles:
        flush()
    return n


def split_capture(res: dict, split: int) -> tuple[float, float]:
    """Capture on images [0, split) and [split, end) of the run (validation split)."""
    h, im = res["_hits"], res["_image_of_object"]
    a, b = h[im < split], h[im >= split]
    return (float(a.mean()) if len(a) else float("nan"), float(b.mean()) if len(b) else float("nan"))


def fmt(x: float) -> str:
    return "n/a" if x != x else f"{x:.3f}"


def print_table(res: dict, title: str) -> None:
    print(title)
    print(f"{'group':<22}{'objects':>8}{'capture':>9}")
    print(f"{'all':<22}{res['objects']:>8}{fmt(res['capture']):>9}")
    for k, v in res["capture_by_category"].items():
        print(f"{k:<22}{res['objects_by_category'][k]:>8}{fmt(v):>9}")
    print(f"patches/image {res['patches_per_image']:.1f}   ms/image {res['ms_per_image']:.1f}   images {res['images']}")


def weight_free_backends() -> list[str]:
    from mining.registry import available_backends, backend_class

    names = []
    for n in available_backends():
        try:
            cls = backend_class(n)
        except ImportError:  # e.g. simplenet without torch: not benchmarked
            continue
        if getattr(cls, "weight_free", False) and not getattr(cls, "benchmark_skip", False):
            names.append(n)
    return names


def write_results(section: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    if BEGIN in text and END in text:
        a = text.index(BEGIN)
        b = text.index(END) + len(END)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def run_all(data: Path, limit, start, presets, backends, split: int | None) -> str:
    items = load_dataset(data, limit, start)
    rows = []
    for preset in presets:
        cfg = get_preset(preset)
        # a preset that keeps every candidate (baseline-unfiltered) does not depend on the
        # saliency map: run it once, with a constant map
        saliency_free = all(lv.k <= 0 and lv.apv_threshold < 0 for lv in cfg.levels)
        for bname in (["(none)"] if saliency_free else backends):
            backend = ConstantSaliency() if saliency_free else make_backend("saliency", bname)
            res = run(items, cfg, backend)
            halves = split_capture(res, split) if split else None
            rows.append((preset, bname, res, halves))
            print(f"{preset:<32} {bname:<24} capture {fmt(res['capture'])} "
                  f"patches/img {res['patches_per_image']:.1f} ms/img {res['ms_per_image']:.0f}", flush=True)
            print(json.dumps({"variant": preset, "saliency": bname, **{k: res[k] for k in
                  ('images', 'objects', 'capture', 'patches_per_image', 'ms_per_image')}}), flush=True)
    return render(rows, data, len(items), start, split)


NOTES = """\
Presets: the first four are the thesis' variants with Tables A.1-A.4's parameters, unchanged
(sizes scaled from 3848 px to 1360 px width: 896/448/224 -> 317/158/79 px; min_patch_size 32, so the
thesis' 224-px no-upscaling rule is not applied at this resolution). `hierarchical-adaptive`,
`hierarchical-context` and `hierarchical-pooled` keep Table A.4's sizes, strides, k and overlap (<= 35
patches) and each adds one change: relative level-2 S_apv threshold (> the crop's mean instead of 0.3);
+ 25 % context around each level-1 patch for the recomputed saliency (level-2 centres stay inside it);
+ one shared budget of 30 level-2 patches per image instead of 6 per level-1 patch.
Backends: `spectral-residual`, `fine-grained` = OpenCV; `spectral-residual-ms` = Lab spectral residual at
64/128/256 px; `colour-contrast` = multi-scale Lab centre-surround; `boolean-map` = Boolean Map Saliency
(Zhang & Sclaroff 2013); `sr-bms` = mean of `spectral-residual-ms` and `boolean-map`. All weight-free.
The design choices were made looking at images 0-99 only; 100-299 were not used for them."""


def render(rows, data: Path, n_images: int, start: int, split: int | None = None) -> str:
    cats = [*CATEGORIES, "road narrows (24)"]
    lines = [
        "## Patch selection: capture (thesis §4.2, Table 4.2 form)",
        "",
        f"Data: `{os.path.relpath(data, ROOT)}` images {start:05d}..{start + n_images - 1:05d} "
        f"({n_images} images, {rows[0][2]['objects'] if rows else 0} signs). "
        "An object is captured when one patch covers >= 50 % of it and it fills >= 5 % of that patch. "
        "ms/image = selection incl. saliency, 2 shared CPU cores.",
        "",
    ]
    has_split = any(r[3] for r in rows)
    head = "| model (patches/image) | saliency | all | " + " | ".join(cats) + " | ms/image |"
    if has_split:
        head = head + f" imgs 0-{split - 1} (tuning) | imgs {split}-{n_images - 1} (held out) |"
    lines.append(head)
    lines.append("|" + "---|" * (head.count("|") - 1))
    for preset, bname, res, halves in rows:
        cells = [f"{preset} ({res['patches_per_image']:.1f})", bname, f"**{fmt(res['capture'])}**"]
        cells += [fmt(res["capture_by_category"][c]) for c in cats]
        cells.append(f"{res['ms_per_image']:.0f}")
        if has_split:
            cells += [fmt(halves[0]), fmt(halves[1])] if halves else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Objects per group: " + ", ".join(f"{c} {rows[0][2]['objects_by_category'][c]}" for c in cats) if rows else "")
    lines.append("")
    lines.append(NOTES)
    lines.append("")
    lines.append("Reproduce: `python benchmarks/capture.py --data ../shared/data/gtsdb --all` "
                 "(one configuration: `--variant <preset> --saliency <backend>`; the default pair without flags).")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dir with images/ and annotations.csv")
    ap.add_argument("--variant", default=None, help=f"selection preset (default: the mining job's, {DEFAULT_PRESET}); "
                    f"one of {sorted(PRESETS)}")
    ap.add_argument("--saliency", default=None, help=f"saliency backend for --selector saliency (default {DEFAULT_SALIENCY})")
    ap.add_argument("--selector", default="saliency", choices=["saliency", "ltrp", "kpp"],
                    help="saliency: use --saliency; ltrp/kpp: the learned rankers registered by mining.ranking")
    ap.add_argument("--ranker-checkpoint", default=None, help="checkpoint of the ltrp/kpp ranker")
    ap.add_argument("--ranker-random-init", action="store_true", help="SMOKE RUNS ONLY: random ranker weights")
    ap.add_argument("--limit", type=int, default=None, help="use the first N images")
    ap.add_argument("--start", type=int, default=0, help="skip the first N images (validation splits)")
    ap.add_argument("--batch", type=int, default=8, help="images per select_patches_batch call")
    ap.add_argument("--all", action="store_true", help="every preset x weight-free backend; write RESULTS.md")
    ap.add_argument("--split", type=int, default=100,
                    help="with --all: also report images [0, split) (used while designing the improved "
                         "presets) and [split, end) (held out); 0 = off")
    ap.add_argument("--no-write", action="store_true", help="with --all: do not write RESULTS.md")
    ap.add_argument("--backend-impl", choices=["torch", "numpy"], default=None,
                    help="run the selector through mining.select_device.select_frames with this implementation "
                         "(default: the numpy reference select_patches_batch)")
    ap.add_argument("--device", default="cpu", help="device of the frames with --backend-impl (cpu | cuda)")
    ap.add_argument("--epitome", default=None, metavar="MODEL",
                    help="epitome model file for saliency backends with an epitome member (default: train one on "
                         "the --data images themselves, unlabelled, as a night's run would)")
    ap.add_argument("--epitome-steps", type=int, default=None, help="training steps when no --epitome")
    ap.add_argument("--misses", type=Path, default=None, metavar="DIR",
                    help="write contact sheets (misses_000.jpg, ...; 48 tiles each) and misses.csv of the objects "
                         "that were NOT captured, with the selected patches drawn around them")
    args = ap.parse_args(argv)

    if not (args.data / "annotations.csv").exists() or not (args.data / "images").is_dir():
        print(f"SKIP: no dataset at {args.data} (needs images/ and annotations.csv; ../shared absent?)")
        print(json.dumps({"skipped": True, "reason": f"no dataset at {args.data}"}))
        return 0

    if args.all:
        section = run_all(args.data, args.limit, args.start, list(PRESETS), weight_free_backends(),
                          args.split if args.split and args.start == 0 and (args.limit is None or args.limit > args.split) else None)
        print(section)
        if not args.no_write:
            write_results(section)
            print(f"wrote {RESULTS}")
        print(json.dumps({"all": True, "results": str(RESULTS)}))
        return 0

    variant = args.variant or DEFAULT_PRESET
    try:
        cfg = get_preset(variant)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    items = load_dataset(args.data, args.limit, args.start)
    epitome, epitome_src = resolve_epitome_arg(args, items)
    backend = make_backend(args.selector, args.saliency, args.ranker_checkpoint, args.ranker_random_init, epitome)
    sal_name = getattr(backend, "name", args.saliency)
    res = run(items, cfg, backend, batch=args.batch, impl=args.backend_impl, device=args.device,
              keep_selections=args.misses is not None)
    print_table(res, f"variant {variant}  selector {args.selector}  saliency {sal_name}")
    out = {"variant": variant, "selector": args.selector, "saliency": sal_name,
           "backend_impl": args.backend_impl or "numpy-reference", "device": args.device,
           **{k: res[k] for k in ("images", "objects", "capture", "patches_per_image", "ms_per_image")},
           "capture_by_category": res["capture_by_category"], "epitome": epitome_src}
    if args.misses is not None:
        n_missed = write_misses(items, res, args.misses)
        print(f"misses: {n_missed} objects -> {args.misses}")
        out["misses_dir"] = str(args.misses)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
