"""Train an epitome of the fleet's own frames (Malkin, Ortiz & Jojic, ECCV 2020, §3) as a Ray Train job.

    python -m jobs.train_epitome --input <shards: dir|glob|tar/parquet|s3://...> --out <model dir|s3://...> \\
        [--steps 600 --batch 512 --workers 1 --max-frames 256]

Streams frames from the same shard readers as mining into a bounded reservoir per worker,
trains with SGD + location promotion + diversification, checkpoints every --checkpoint-every
steps under <out>/_train/, and writes <out>/epitome-<YYYYmmddTHHMMSSZ>.pt plus <out>/LATEST
(the file the mining job's `epitome` backend loads). Rerunning with the same --out and settings
continues from the newest checkpoint (a larger --steps trains further).

Exit codes: 0 ok, 2 bad settings / input / output (one line on stderr).
Thin CLI: parses arguments and calls :func:`mining.epitome.job.train_epitome`.
"""
from __future__ import annotations

import argparse
import sys

from jobs._common import fail, setup_logging


def build_parser() -> argparse.ArgumentParser:
    from mining.epitome.fit import TrainConfig
    from mining.epitome.job import DEFAULT_CHECKPOINT_EVERY, DEFAULT_MAX_FRAMES
    from mining.epitome.model import EpitomeSpec

    s, t = EpitomeSpec(), TrainConfig()
    p = argparse.ArgumentParser(prog="python -m jobs.train_epitome", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="shards: directory/prefix, glob, .tar/.parquet file(s), comma-separated")
    p.add_argument("--out", required=True, help="model directory (local or s3://bucket/prefix)")
    g = p.add_argument_group("epitome (paper §2)")
    g.add_argument("--size", type=int, default=None, help=f"N: the epitome is N x N (default {s.size}, or --init's)")
    g.add_argument("--patch", type=int, default=None, help=f"K: K x K patches (default {s.patch}, or --init's)")
    g.add_argument("--scale", type=int, default=None,
                   help=f"native pixels per working-resolution pixel (default {s.scale}, or --init's)")
    g.add_argument("--init", default=None, help="start from this model file (e.g. the current LATEST) instead of a data crop")
    g = p.add_argument_group("training (paper §3)")
    g.add_argument("--steps", type=int, default=t.steps, help=f"total optimiser steps, over resumes (default {t.steps})")
    g.add_argument("--batch", type=int, default=t.batch, help=f"patches per step per worker (default {t.batch})")
    g.add_argument("--lr", type=float, default=t.lr, help=f"Adam learning rate (default {t.lr})")
    g.add_argument("--quantile", type=float, default=t.quantile,
                   help=f"diversification: worst-modelled fraction of each batch optimised (default {t.quantile})")
    g.add_argument("--seed", type=int, default=t.seed, help=f"RNG seed (default {t.seed})")
    g = p.add_argument_group("data and runtime")
    g.add_argument("--max-frames", type=int, default=DEFAULT_MAX_FRAMES,
                   help=f"reservoir bound: working-resolution frames held per worker (default {DEFAULT_MAX_FRAMES})")
    g.add_argument("--frames-per-step", type=int, default=1, help="frames streamed in before each step (default 1)")
    g.add_argument("--images-per-shard", type=int, default=64, help="frames per shard for directories of images (default 64)")
    g.add_argument("--workers", type=int, default=1, help="Ray Train workers, data parallel (default 1)")
    g.add_argument("--use-gpu", choices=["auto", "yes", "no"], default="auto", help="auto: GPUs when the cluster has any")
    g.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker (default 1)")
    g.add_argument("--checkpoint-every", type=int, default=DEFAULT_CHECKPOINT_EVERY,
                   help=f"steps between checkpoints (default {DEFAULT_CHECKPOINT_EVERY})")
    g.add_argument("--max-failures", type=int, default=0, help="worker-group restarts from the last checkpoint (default 0)")
    g.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a new local Ray on 127.0.0.1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    from mining.epitome.fit import TrainConfig
    from mining.epitome.job import train_epitome
    from mining.epitome.model import EpitomeSpec
    from mining.errors import SettingsError

    try:
        try:
            shape = {k: getattr(args, k) for k in ("size", "patch", "scale") if getattr(args, k) is not None}
            spec = EpitomeSpec(**shape) if shape or not args.init else None
            cfg = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, quantile=args.quantile, seed=args.seed)
        except ValueError as e:
            raise SettingsError(str(e)) from None
        train_epitome(args.input, args.out, spec, cfg, workers=args.workers, max_frames=args.max_frames,
                      frames_per_step=args.frames_per_step, checkpoint_every=args.checkpoint_every, init=args.init,
                      use_gpu={"yes": True, "no": False}.get(args.use_gpu), cpus_per_worker=args.cpus_per_worker,
                      images_per_dir_shard=args.images_per_shard, max_failures=args.max_failures, address=args.address)
    except Exception as e:  # noqa: BLE001 - user errors become one line + exit 2, others propagate
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
