"""Argument groups shared by the job entry points (model and selection options)."""
from __future__ import annotations

import argparse
import logging
import os


def add_clip_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("CLIP model")
    g.add_argument("--clip-model", default="ViT-B-16", help="open_clip model name (default ViT-B-16, the thesis' model; "
                   "tiny-test-random is a toy config for tests)")
    g.add_argument("--clip-pretrained", default="openai",
                   help="open_clip pretrained tag (e.g. openai) or a local checkpoint path (default openai)")
    g.add_argument("--clip-random-init", action="store_true",
                   help="SMOKE RUNS ONLY: random CLIP weights; recorded in the outputs, later steps warn")


def add_selection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("patch selection")
    g.add_argument("--selector", default="saliency", choices=["saliency", "ltrp", "kpp"],
                   help="saliency hierarchy (thesis §3.1), LTRP learned ranking, or KPP (training-free)")
    g.add_argument("--preset", default=None, help="selection preset (default: the best measured one, see README)")
    g.add_argument("--saliency", default=None, help="saliency backend for --selector saliency")
    g.add_argument("--ltrp-checkpoint", default=None, help="LTRP ranking-model checkpoint (irsLu/ltrp layout)")
    g.add_argument("--mae-checkpoint", default=None, help="MAE checkpoint for KPP (official MAE layout)")
    g.add_argument("--kpp-ratio", type=float, default=0.25, help="KPP: fraction of tokens kept")
    g.add_argument("--ranker-random-init", action="store_true", help="SMOKE RUNS ONLY: random LTRP/MAE weights")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a new local Ray)")
    g.add_argument("--actors", type=int, default=None, help="mining actors (default: one per GPU, else CPUs / --cpus-per-actor)")
    g.add_argument("--gpu", dest="use_gpu", action="store_true", default=None,
                   help="ask for num_gpus=1 actors even if no GPU is up yet (autoscaling from zero; use with --actors)")
    g.add_argument("--no-gpu", dest="use_gpu", action="store_false", help="CPU actors even where GPUs exist")
    g.add_argument("--cpus-per-actor", type=int, default=None, help="CPUs per actor without GPUs (default: all CPUs / actors)")
    g.add_argument("--batch-size", type=int, default=None, help="patches per CLIP forward (default: from free GPU memory; 64 on CPU)")
    g.add_argument("--device", default=None, help="torch device in the actors (default: cuda when visible, else cpu)")
    g.add_argument("--decode-threads", type=int, default=None,
                   help="decode (+ selection on CPU) threads per actor (default: the actor's CPUs)")
    g.add_argument("--max-attempts", type=int, default=3, help="tries per shard before it is recorded as failed")
    g.add_argument("--images-per-shard", type=int, default=64, help="frames per shard for directories of images")


def mine_config(args: argparse.Namespace, date: str | None = None):
    from mining.pipeline import MineConfig

    return MineConfig(
        preset=args.preset, saliency=args.saliency, selector=args.selector,
        ltrp_checkpoint=args.ltrp_checkpoint, mae_checkpoint=args.mae_checkpoint, kpp_ratio=args.kpp_ratio,
        ranker_random_init=args.ranker_random_init, clip_model=args.clip_model,
        clip_pretrained=None if args.clip_random_init else args.clip_pretrained,
        clip_random_init=args.clip_random_init, batch_size=args.batch_size, device=args.device,
        decode_threads=args.decode_threads, date=date or getattr(args, "date", None),
    )


def runtime_kwargs(args: argparse.Namespace) -> dict:
    """The runtime options as keyword arguments of ``mining.pipeline.run_mining``."""
    return dict(address=args.address, num_actors=args.actors, cpus_per_actor=args.cpus_per_actor,
                max_attempts=args.max_attempts, use_gpu=args.use_gpu, images_per_dir_shard=args.images_per_shard)


def setup_logging() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
