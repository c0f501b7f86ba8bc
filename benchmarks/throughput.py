"""Mining throughput and efficiency (issue 5).

    python benchmarks/throughput.py --data <dir | s3 prefix> [--actors N] [--model ViT-B-16] [--limit N]

Runs the real mining job (Ray actors, selection, CLIP, Parquet + ledger) over the data
into a fresh temporary output, then, in the same run and on the same device type with
the same number of threads per actor, times the CLIP image forward alone on the same
number of patches with the same batch size. Prints:

- images/s and patches/s of the whole job (wall time of mining, actor start-up excluded,
  start-up reported separately);
- model-forward time alone on the same patches;
- efficiency = model-forward time / (mining wall time x actors), and each stage's share
  of actor time (read, decode, select, embed, write);
- a last line of JSON with images_per_s, patches_per_s, efficiency.

Without pretrained weights here, ``--random-init`` (default when no --pretrained is
given) builds the real architecture with random weights: the FLOPs and the timing are
those of the real model; the embeddings are not semantic.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def forward_alone(model: str, pretrained: str | None, random_init: bool, n_patches: int, batch_size: int,
                  threads: int, device: str | None, repeats: int = 3) -> float:
    """Seconds the CLIP image forward alone takes on ``n_patches`` patches (median of repeats)."""
    import torch

    from mining.embed import ClipEmbedder, ClipSpec

    torch.set_num_threads(threads)
    e = ClipEmbedder(ClipSpec(model, pretrained, random_init), device=device)
    bs = batch_size or e.default_batch_size()
    px = torch.randint(0, 256, (min(n_patches, bs), 3, e.image_size, e.image_size), dtype=torch.uint8)
    e.embed_pixels(px[: min(4, len(px))], batch_size=bs)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        left = n_patches
        while left > 0:
            m = min(left, bs)
            e.embed_pixels(px[:m], batch_size=bs)
            left -= m
        if e.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="images dir / shards / s3 prefix (e.g. ../shared/data/gtsdb/images)")
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--pretrained", default=None, help="open_clip tag or checkpoint path (default: random init)")
    p.add_argument("--limit", type=int, default=None, help="use the first N images of a directory")
    p.add_argument("--images-per-shard", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--preset", default=None)
    p.add_argument("--saliency", default=None)
    p.add_argument("--address", default=None, help="Ray address (default: a new local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a new local Ray (default: all)")
    p.add_argument("--device", default=None)
    p.add_argument("--output", default=None, help="output root (default: a temp dir, removed afterwards)")
    args = p.parse_args(argv)

    import ray

    from mining.pipeline import MineConfig, run_mining
    from mining.shards import list_shards

    data = args.data
    tmp_in = None
    if args.limit and "://" not in data and Path(data).is_dir():
        tmp_in = tempfile.mkdtemp(prefix="tp-in-")
        imgs = sorted(x for x in Path(data).iterdir() if x.suffix.lower() in (".jpg", ".jpeg", ".png"))[: args.limit]
        for x in imgs:
            os.symlink(x.resolve(), Path(tmp_in) / x.name)
        data = tmp_in
    random_init = args.pretrained is None
    out = args.output or tempfile.mkdtemp(prefix="tp-out-")
    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpa = max(1, cpus // args.actors) if not gpus else 1
    cfg = MineConfig(preset=args.preset, saliency=args.saliency, clip_model=args.model, clip_pretrained=args.pretrained,
                     clip_random_init=random_init, batch_size=args.batch_size, device=args.device)
    shards = list_shards(data, images_per_dir_shard=args.images_per_shard)
    s = run_mining(data, out, cfg, num_actors=args.actors, cpus_per_actor=cpa, progress=True, shards=shards)
    ray.shutdown()
    threads = cpa if not gpus else (os.cpu_count() or 1)
    bs = s["actors"][0]["batch_size"]
    device = s["actors"][0]["device"]
    fwd = forward_alone(args.model, args.pretrained, random_init, s["patches"], bs, threads, device)
    wall = s["mining_wall_s"]
    n = s["num_actors"]
    eff = fwd / (wall * n) if wall > 0 else 0.0
    actor_total = sum(s["stage_s"].values())
    print()
    print(f"model {args.model} ({'RANDOM weights: timing only' if random_init else args.pretrained}), device {device}, "
          f"{n} actor(s) x {threads} threads, batch {bs}")
    print(f"images {s['images']}, patches {s['patches']} ({s['patches'] / max(1, s['images']):.1f}/image), errors {s['errors']}")
    print(f"actor start-up {s['startup_s']:.1f} s (model load, excluded below)")
    print(f"mining wall {wall:.1f} s: {s['images'] / wall:.2f} images/s, {s['patches'] / wall:.1f} patches/s")
    print(f"model forward alone on the same {s['patches']} patches, same device and threads: {fwd:.1f} s "
          f"({s['patches'] / fwd:.1f} patches/s)")
    fin = s.get("forward_s", 0.0)
    eff_in = fin / (wall * n) if wall > 0 else 0.0
    print(f"efficiency = forward alone / (wall x actors) = {eff:.3f}")
    print(f"model forward inside the run (timed in the actors, same moment, same load): {fin:.1f} s -> "
          f"in-run efficiency = {eff_in:.3f} (the share of actor wall time spent in the model)")
    print("stage share of actor time: " + ", ".join(f"{k} {v / max(actor_total, 1e-9):.3f}" for k, v in s["stage_s"].items()))
    print("stage efficiency (forward time / stage time, both summed over actors): " + ", ".join(
        f"{k} {fwd / v:.2f}" if v > 0 else f"{k} inf" for k, v in s["stage_s"].items()))
    if tmp_in:
        shutil.rmtree(tmp_in, ignore_errors=True)
    if not args.output:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"images_per_s": round(s["images"] / wall, 4), "patches_per_s": round(s["patches"] / wall, 3),
                      "efficiency": round(eff, 4), "efficiency_in_run": round(eff_in, 4), "forward_s": round(fwd, 3),
                      "forward_in_run_s": round(fin, 3), "wall_s": wall, "actors": n,
                      "model": args.model, "random_init": random_init, "device": device, "images": s["images"],
                      "patches": s["patches"], "stage_s": s["stage_s"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
