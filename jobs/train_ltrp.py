"""Train the LTRP ranking model (Luo et al., CVPR 2024, §3.2-3.3) as a Ray Train job.

    python -m jobs.train_ltrp --data ../shared/data/gtsdb/images \\
        --mae-checkpoint mae_visualize_vit_base.pth --storage-path /abs/runs --name ltrp-vits \\
        --epochs 400 --batch-size 256 --num-workers 8

Per step, for a batch of images on each worker:

1. draw a random visible set per image at 90% masking (``--mask-ratio``), ``n = int(0.1 L)``;
2. frozen MAE (ViT-B, pixel target, Tab. 1a/1i; official "visualize" checkpoint):
   pseudo score of every visible patch = l1 distance between the reconstructions
   with and without it, removal before the decoder (Eq. 2, Tab. 1g), all removals
   in one batched forward;
3. ranking model (ViT-S/16, ``--ranker-arch``) sees the visible tokens only
   (sparse design, Tab. 1h) and is trained with ListMLE (Eq. 3, Tab. 1f).

Checkpoints (every ``--checkpoint-every`` epochs and at the end) are Ray Train
checkpoint directories holding ``ltrp.pth`` -- official ``irsLu/ltrp`` layout
(``{"model": {"score_net.*"}}``) plus optimizer/scheduler/epoch/step -- and
``losses.jsonl`` (the loss history). ``--resume auto`` continues from the newest
checkpoint under ``<storage-path>/<name>``; ``--resume PATH`` from a given one.
Loss logging: one JSON line per ``--log-every`` steps on stdout, the
``losses.jsonl`` of each checkpoint, and (local storage) ``<storage-path>/<name>/loss_log.jsonl``.

``--tiny-random-init``: CI / smoke-test configuration ONLY -- a random tiny MAE and
ranker (arch ``tiny-test``); the pseudo labels of a random MAE are meaningless.

Thin CLI: parses arguments and calls :func:`mining.ranking.train.train_ltrp`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from mining.ranking.train import CKPT_FILE, LOSS_FILE, RANKER_ARCHS, TrainConfig, find_latest_checkpoint, train_ltrp

__all__ = ["CKPT_FILE", "LOSS_FILE", "find_latest_checkpoint", "main", "parse_args"]  # CKPT_FILE..: re-exported


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m jobs.train_ltrp", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, nargs="+",
                   help="image directories, globs or files (local or s3://); every image is a training sample")
    p.add_argument("--mae-checkpoint", default=d.mae_checkpoint,
                   help="official MAE visualize checkpoint (pixel target), e.g. mae_visualize_vit_base.pth")
    p.add_argument("--mae-arch", default=d.mae_arch, help="MAE arch for --tiny-random-init/--random-mae")
    p.add_argument("--ranker-arch", default=d.ranker_arch, choices=list(RANKER_ARCHS))
    p.add_argument("--ranker-init", default=d.ranker_init, help="start the ranker from this LTRP checkpoint (fine-tuning)")
    p.add_argument("--tiny-random-init", action="store_true",
                   help="CI/SMOKE ONLY: random tiny MAE + tiny ranker (arch tiny-test); labels are meaningless")
    p.add_argument("--mask-ratio", type=float, default=d.mask_ratio, help="LTRP §3.2 / Tab. 1b")
    p.add_argument("--removal-phase", choices=["decoder", "encoder"], default=d.removal_phase, help="Tab. 1g")
    p.add_argument("--list-mle-k", type=int, default=d.list_mle_k, help="top-k ListMLE (default: full Eq. 3)")
    p.add_argument("--img-size", type=int, default=d.img_size)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--max-steps-per-epoch", type=int, default=d.max_steps_per_epoch, help="cap steps per epoch (smoke runs)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per worker")
    p.add_argument("--blr", type=float, default=d.blr, help="base lr; lr = blr * global_batch / 256")
    p.add_argument("--lr", type=float, default=d.lr, help="absolute lr (overrides --blr)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--pseudo-chunk", type=int, default=d.pseudo_chunk, help="max removal variants per MAE forward")
    p.add_argument("--loader-workers", type=int, default=d.loader_workers, help="DataLoader processes per Ray worker")
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (one per GPU)")
    p.add_argument("--use-gpu", choices=["auto", "yes", "no"], default="auto",
                   help="auto: GPUs when the Ray cluster has any")
    p.add_argument("--cpus-per-worker", type=float, default=d.cpus_per_worker)
    p.add_argument("--storage-path", default=os.path.abspath("runs/ltrp"), help="absolute path or s3:// URI")
    p.add_argument("--name", default="ltrp", help="run name (subdirectory of --storage-path)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="epochs between checkpoints")
    p.add_argument("--keep-checkpoints", type=int, default=3)
    p.add_argument("--resume", default="none", help="'auto', 'none', or a checkpoint directory / ltrp.pth path")
    p.add_argument("--max-failures", type=int, default=0, help="worker-group restarts (resume from last checkpoint)")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between loss log lines")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--address", default=None, help="Ray address (default: start a local Ray)")
    args = p.parse_args(argv)
    if args.tiny_random_init:
        args.mae_arch, args.ranker_arch = "tiny-test", "tiny-test"
    elif not args.mae_checkpoint:
        p.error("--mae-checkpoint is required (official MAE visualize checkpoint); "
                "--tiny-random-init runs a random tiny smoke configuration instead")
    if not 0.0 < args.mask_ratio < 1.0:
        p.error("--mask-ratio must be in (0, 1)")
    if "://" not in args.storage_path:
        args.storage_path = os.path.abspath(args.storage_path)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the job; returns ``{"checkpoint": path, "metrics": {...}}`` of the final result."""
    args = parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    return train_ltrp(args.data, cfg, storage_path=args.storage_path, name=args.name, resume=args.resume,
                      num_workers=args.num_workers, use_gpu={"yes": True, "no": False}.get(args.use_gpu),
                      keep_checkpoints=args.keep_checkpoints, max_failures=args.max_failures, address=args.address)


if __name__ == "__main__":
    main()
