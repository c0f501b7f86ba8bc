"""Mining throughput of one actor, the device path's host cost, parity and an H200 projection (issue 13).

    python benchmarks/throughput.py --data ../shared/data/gtsdb --limit 8                 # CPU, tiny model
    python benchmarks/throughput.py --data ../shared/data/gtsdb --device cuda --model ViT-B-16 --repeat 4
    python benchmarks/throughput.py --data ../shared/data/gtsdb --limit 6 --impls numpy,torch --cores 1,2 \\
        --models tiny-test-random,ViT-B-16                                                # CPU side by side

Each configuration (selection implementation x actor cores x CLIP model) runs the REAL mining
job (a fresh local Ray with that many CPUs, one actor, Parquet + ledger into a temporary
root) on the same frames, one after the other in this process, and reports frames/s and
patches/s of the mining wall time (actor start-up excluded), the per-stage split and the
host seconds per frame (stages that stay on the host on the device path: read + write).

Then, on the annotated frames (``DIR/annotations.csv``, first ``--parity-limit`` images):
``parity_boxes_equal_frac`` = share of frames where ``select_frames(impl="torch")`` on
``--device`` picks exactly the boxes of the numpy reference, and ``capture_delta`` = capture
of the torch path minus the reference's (thesis §4.2 criterion).

Last, FLOPs / unfused bytes / kernel launches per frame of saliency + selection + crops
(the torch path on CPU under ``benchmarks/device_cost.OpCounter``) next to the CLIP image
tower on the frame's patches (``torch.utils.flop_counter``), and the *projected* patches/s of
one H200 from them (``device_cost.project_h200``; a projection, labelled as such).

Random weights (default, no pretrained weights here): the real architecture, real FLOPs and
timing; embeddings are not semantic. The last line is one JSON object.

Each configuration starts a private local Ray: set ``RAY_AUTH_MODE`` as for any local Ray (README,
"Token authentication"); ``benchmarks/gpu_check.sh`` sets it to ``disabled``. Left unset, Ray 2.60
turns token auth on and writes ``~/.ray/auth_token``, which every later ``ray start`` on the machine
then picks up.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

IMAGE_EXT = (".jpg", ".jpeg", ".png")


def frame_dir(data: Path, limit: int | None, repeat: int) -> tuple[str, int]:
    """A temporary directory of symlinks to the first ``limit`` images of ``data`` (or
    ``data/images``), ``repeat`` times over under distinct names. Returns (dir, frames)."""
    src = data / "images" if (data / "images").is_dir() else data
    imgs = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_EXT)[:limit]
    if not imgs:
        raise SystemExit(f"error: no images in {src}")
    out = tempfile.mkdtemp(prefix="tp-in-")
    for r in range(max(1, repeat)):
        for p in imgs:
            os.symlink(p.resolve(), Path(out) / f"r{r:02d}_{p.name}")
    return out, len(imgs) * max(1, repeat)


class GpuSampler:
    """Samples ``nvidia-smi`` GPU utilisation (%) every 0.5 s in a thread (CUDA runs only)."""

    def __init__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout.split()
                if out:
                    self.samples.append(float(out[0]))
            except Exception:  # noqa: BLE001 - no nvidia-smi: no samples
                return
            self._stop.wait(0.5)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(timeout=5)

    def summary(self) -> dict:
        s = self.samples
        return {"gpu_util_median": statistics.median(s) if s else None, "gpu_util_mean": sum(s) / len(s) if s else None,
                "gpu_util_samples": len(s)}


def mine_once(input_dir: str, *, model: str, device: str, impl: str, cores: int, frame_batch: int | None,
              batch_size: int | None, images_per_shard: int) -> dict:
    """One mining run on a fresh local Ray with ``cores`` CPUs: returns the job summary + rates."""
    import ray

    from mining.pipeline import MineConfig, run_mining
    from mining.shards import list_shards

    out = tempfile.mkdtemp(prefix="tp-out-")
    ray.init(num_cpus=cores, num_gpus=1 if device == "cuda" else 0, include_dashboard=False, log_to_driver=False)
    try:
        cfg = MineConfig(clip_model=model, clip_pretrained=None, clip_random_init=True, batch_size=batch_size,
                         device=device, select_impl=impl, frame_batch=frame_batch)
        shards = list_shards(input_dir, images_per_dir_shard=images_per_shard)
        sampler = GpuSampler() if device == "cuda" else None
        if sampler:
            with sampler:
                s = run_mining(input_dir, out, cfg, num_actors=1, cpus_per_actor=cores, progress=False, shards=shards,
                               use_gpu=device == "cuda")
        else:
            s = run_mining(input_dir, out, cfg, num_actors=1, cpus_per_actor=cores, progress=False, shards=shards,
                           use_gpu=False)
    finally:
        ray.shutdown()
        shutil.rmtree(out, ignore_errors=True)
    wall = s["mining_wall_s"]
    frames = s["images"]
    row = {"impl": impl, "cores": cores, "model": model, "device": device, "frames": frames, "patches": s["patches"],
           "wall_s": round(wall, 3), "frames_per_s": round(frames / wall, 3), "patches_per_s": round(s["patches"] / wall, 2),
           "host_ms_per_frame": round(1e3 * s.get("host_s", 0.0) / max(frames, 1), 3),
           "select_ms_per_frame": round(1e3 * s["stage_s"].get("select", 0.0) / max(frames, 1), 2),
           "stage_ms_per_frame": {k: round(1e3 * v / max(frames, 1), 2) for k, v in s["stage_s"].items()},
           "forward_s": round(s.get("forward_s", 0.0), 3), "errors": s["errors"]}
    if sampler:
        row.update(sampler.summary())
    return row


def parity(data: Path, n: int | None, device: str) -> dict:
    """Torch path vs numpy reference on the annotated frames: same boxes, capture delta."""
    from capture import load_dataset, run

    from mining.saliency.base import get_backend
    from mining.selection import DEFAULT_PRESET, DEFAULT_SALIENCY, get_preset

    if not (data / "annotations.csv").exists():
        return {"parity_boxes_equal_frac": None, "capture_delta": None, "parity_frames": 0}
    items = load_dataset(data, n)
    cfg, backend = get_preset(DEFAULT_PRESET), get_backend(DEFAULT_SALIENCY)
    ref = run(items, cfg, backend, batch=8, keep_selections=True)
    dev = run(items, cfg, backend, batch=8, impl="torch", keep_selections=True, device=device)
    same = [a.shape == b.shape and bool((a == b).all()) for a, b in zip(ref["_boxes"], dev["_boxes"])]
    return {"parity_frames": len(items), "parity_boxes_equal_frac": round(sum(same) / max(len(same), 1), 4),
            "capture_reference": round(ref["capture"], 4), "capture_device_path": round(dev["capture"], 4),
            "capture_delta": round(dev["capture"] - ref["capture"], 4),
            "select_ms_per_frame_reference": round(ref["ms_per_image"], 1),
            "select_ms_per_frame_device_path": round(dev["ms_per_image"], 1), "parity_device": device}


def costs(data: Path, n: int, model: str, frame_batch: int) -> dict:
    """FLOPs / bytes / launches per frame of the device path's non-model work, and the projection."""
    import numpy as np
    import torch

    from capture import load_dataset, read_rgb
    from device_cost import OpCounter, project_h200, vit_flops_per_patch

    from mining.batcher import crop_boxes
    from mining.saliency.base import get_backend
    from mining.select_device import select_frames
    from mining.selection import DEFAULT_PRESET, DEFAULT_SALIENCY, get_preset

    src = data if (data / "annotations.csv").exists() else None
    paths = [p for p, _, _ in load_dataset(src, n)] if src else \
        sorted(p for p in ((data / "images") if (data / "images").is_dir() else data).iterdir()
               if p.suffix.lower() in IMAGE_EXT)[:n]
    frames = [torch.from_numpy(read_rgb(p)).permute(2, 0, 1).contiguous() for p in paths]
    cfg, backend = get_preset(DEFAULT_PRESET), get_backend(DEFAULT_SALIENCY)
    select_frames(frames[:1], cfg, backend, impl="torch")  # warm the Lab tables outside the count
    with OpCounter() as c_sel:
        sels = select_frames(frames, cfg, backend, impl="torch")
    patches = sum(len(s.boxes) for s in sels)
    with OpCounter() as c_crop:
        crop_boxes(frames, [np.asarray(s.boxes) for s in sels], 224)
    h, w = frames[0].shape[-2:]
    # nvJPEG: Huffman + IDCT + colour conversion, ~ 20 ops per output byte; reads the JPEG, writes RGB
    jpeg_bytes = statistics.mean(p.stat().st_size for p in paths)
    dec = {"flops": 20.0 * 3 * h * w, "bytes": jpeg_bytes + 3.0 * h * w}
    nf = len(frames)
    per = {"flops": (c_sel.flops + c_crop.flops) / nf + dec["flops"], "bytes": (c_sel.bytes + c_crop.bytes) / nf + dec["bytes"],
           "launches_per_batch": (c_sel.launches + c_crop.launches) * 1.0}  # one batch of nf frames
    vit = vit_flops_per_patch(model)
    ppf = patches / nf
    proj = project_h200(per, vit, ppf, nf)
    return {"cost_frames": nf, "patches_per_frame": round(ppf, 2),
            "select_gflop_per_frame": round(c_sel.flops / nf / 1e9, 3), "select_gb_per_frame": round(c_sel.bytes / nf / 1e9, 3),
            "crop_gflop_per_frame": round(c_crop.flops / nf / 1e9, 3), "crop_gb_per_frame": round(c_crop.bytes / nf / 1e9, 3),
            "decode_gflop_per_frame": round(dec["flops"] / 1e9, 3), "decode_gb_per_frame": round(dec["bytes"] / 1e9, 4),
            "launches_per_batch": per["launches_per_batch"], "vit_gflop_per_patch": round(vit / 1e9, 2),
            "vit_gflop_per_frame": round(vit * ppf / 1e9, 1),
            "top_ops_gflop": {k: round(v / 1e9, 2) for k, v in c_sel.by_op.most_common(6)},
            "projected_h200_frames_per_s": round(proj["frames_per_s"], 1),
            "projected_h200_patches_per_s": round(proj["patches_per_s"], 0),
            "projection_ms_per_frame": {k: round(1e3 * proj[k], 3) for k in ("select_s_per_frame", "launch_s_per_frame", "vit_s_per_frame")},
            "projection_assumptions": proj["assumptions"], "projection_frame_batch": frame_batch}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="dir of images, or a GTSDB-style dir (images/ + annotations.csv)")
    p.add_argument("--limit", type=int, default=None, help="first N images")
    p.add_argument("--repeat", type=int, default=1, help="mine the images this many times over (distinct names)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--model", default="tiny-test-random", help="CLIP model of the main run (random init)")
    p.add_argument("--models", default=None, help="comma list: side-by-side models (default: --model)")
    p.add_argument("--impls", default=None, help="comma list of select impls side by side (default: the device's default)")
    p.add_argument("--cores", default=None, help="comma list of actor CPU counts side by side (default: all CPUs)")
    p.add_argument("--frame-batch", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="patches per CLIP forward")
    p.add_argument("--images-per-shard", type=int, default=64)
    p.add_argument("--parity-limit", type=int, default=None, help="annotated frames for parity (default: 300 on cuda, 12 on cpu)")
    p.add_argument("--cost-frames", type=int, default=16, help="frames counted for FLOPs / bytes (one device batch)")
    p.add_argument("--skip", default="", help="comma list of parts to skip: mine, parity, costs")
    args = p.parse_args(argv)

    import torch

    from mining.select_device import default_impl

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    skip = {s for s in args.skip.split(",") if s}
    models = (args.models or args.model).split(",")
    impls = (args.impls or default_impl(device)).split(",")
    cores = [int(c) for c in (args.cores or str(os.cpu_count() or 1)).split(",")]
    result: dict = {"device": device, "random_init": True}
    rows = []
    if "mine" not in skip:
        inp, nframes = frame_dir(args.data, args.limit, args.repeat)
        try:
            for model in models:
                for impl in impls:
                    for c in cores:
                        row = mine_once(inp, model=model, device=device, impl=impl, cores=c, frame_batch=args.frame_batch,
                                        batch_size=args.batch_size, images_per_shard=args.images_per_shard)
                        rows.append(row)
                        print(f"{model:>18} {impl:>5} {c:>2} cores: {row['frames']} frames, {row['frames_per_s']:.3f} frames/s, "
                              f"{row['patches_per_s']:.1f} patches/s, host {row['host_ms_per_frame']:.2f} ms/frame, "
                              f"select {row['select_ms_per_frame']:.1f} ms/frame; stages ms/frame {row['stage_ms_per_frame']}",
                              flush=True)
        finally:
            shutil.rmtree(inp, ignore_errors=True)
        main_row = next((r for r in rows if r["model"] == args.model and r["impl"] == default_impl(device)
                         and r["cores"] == max(cores)), rows[-1])
        result.update({k: main_row[k] for k in ("frames", "frames_per_s", "patches_per_s", "select_ms_per_frame", "model")})
        # host work left in the loop on the device path: from the torch-path run if there is one
        dev_row = next((r for r in rows if r["impl"] == "torch" and r["model"] == args.model), main_row)
        result["host_ms_per_frame"] = dev_row["host_ms_per_frame"]
        result["host_ms_per_frame_from"] = f"{dev_row['impl']} path, {dev_row['cores']} cores, {device}"
        result["stage_ms_per_frame"] = main_row["stage_ms_per_frame"]
        for k in ("gpu_util_median", "gpu_util_mean"):
            if k in main_row:
                result[k] = main_row[k]
        result["side_by_side"] = rows
    if "parity" not in skip:
        n = args.parity_limit or (300 if device == "cuda" else 12)
        t0 = time.perf_counter()
        par = parity(args.data, n, device)
        print(f"parity on {par.get('parity_frames')} annotated frames ({time.perf_counter() - t0:.0f} s): "
              f"same boxes {par.get('parity_boxes_equal_frac')}, capture {par.get('capture_reference')} -> "
              f"{par.get('capture_device_path')} (delta {par.get('capture_delta')})", flush=True)
        result.update(par)
    if "costs" not in skip:
        c = costs(args.data, args.cost_frames, "ViT-B-16", args.cost_frames)
        print(f"per frame: select {c['select_gflop_per_frame']} GFLOP / {c['select_gb_per_frame']} GB unfused, crops "
              f"{c['crop_gflop_per_frame']} GFLOP, decode ~{c['decode_gflop_per_frame']} GFLOP; ViT-B-16 on "
              f"{c['patches_per_frame']} patches {c['vit_gflop_per_frame']} GFLOP; launches/batch {c['launches_per_batch']:.0f}")
        print(f"PROJECTION (not measured): one H200 ~ {c['projected_h200_patches_per_s']:.0f} patches/s "
              f"({c['projected_h200_frames_per_s']} frames/s); ms/frame {c['projection_ms_per_frame']}", flush=True)
        result.update(c)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
