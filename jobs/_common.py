"""Argument groups shared by the job entry points; defaults come from :class:`mining.pipeline.MineConfig`
and :func:`mining.driver.run_mining`, so the CLI and the library never disagree."""
from __future__ import annotations

import argparse
import inspect
import logging
import sys


def _defaults() -> tuple:
    from mining.driver import run_mining
    from mining.pipeline import MineConfig

    params = inspect.signature(run_mining).parameters
    return MineConfig(), {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def add_clip_args(p: argparse.ArgumentParser) -> None:
    d, _ = _defaults()
    g = p.add_argument_group("CLIP model")
    g.add_argument("--clip-model", default=d.clip_model, help=f"open_clip model name (default {d.clip_model}, the thesis' "
                   "model; tiny-test-random is a toy config for tests)")
    g.add_argument("--clip-pretrained", default=d.clip_pretrained,
                   help=f"open_clip pretrained tag (e.g. openai) or a local checkpoint path (default {d.clip_pretrained})")
    g.add_argument("--clip-random-init", action="store_true",
                   help="SMOKE RUNS ONLY: random CLIP weights; recorded in the outputs, later steps warn")


def add_selection_args(p: argparse.ArgumentParser) -> None:
    d, _ = _defaults()
    g = p.add_argument_group("patch selection")
    g.add_argument("--selector", default=d.selector, choices=["saliency", "ltrp", "kpp"],
                   help="saliency hierarchy (thesis §3.1), LTRP learned ranking, or KPP (training-free)")
    g.add_argument("--preset", default=d.preset, help="selection preset (default: the best measured one, see README)")
    g.add_argument("--saliency", default=d.saliency, help="saliency backend for --selector saliency")
    g.add_argument("--ltrp-checkpoint", default=d.ltrp_checkpoint, help="LTRP ranking-model checkpoint (irsLu/ltrp layout)")
    g.add_argument("--mae-checkpoint", default=d.mae_checkpoint, help="MAE checkpoint for KPP (official MAE layout)")
    g.add_argument("--kpp-ratio", type=float, default=d.kpp_ratio, help=f"KPP: fraction of tokens kept (default {d.kpp_ratio})")
    g.add_argument("--ranker-random-init", action="store_true", help="SMOKE RUNS ONLY: random LTRP/MAE weights")


def add_epitome_args(p: argparse.ArgumentParser) -> None:
    d, _ = _defaults()
    g = p.add_argument_group("epitome (for --saliency epitome and ensembles with it)")
    g.add_argument("--epitome", default=d.epitome,
                   help="epitome model file (default: <output>/models/epitome/LATEST, else one trained on the "
                        "run's first frames; see python -m jobs.train_epitome)")
    g.add_argument("--no-epitome-bootstrap", dest="epitome_bootstrap", action="store_false", default=d.epitome_bootstrap,
                   help="a root without an epitome falls back to sr-bms instead of training one on the run's first frames")
    g.add_argument("--epitome-bootstrap-frames", type=int, default=d.epitome_bootstrap_frames,
                   help=f"frames the bootstrap epitome is trained on (default {d.epitome_bootstrap_frames})")
    g.add_argument("--epitome-bootstrap-steps", type=int, default=d.epitome_bootstrap_steps,
                   help=f"optimiser steps of the bootstrap epitome (default {d.epitome_bootstrap_steps})")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    d, r = _defaults()
    g = p.add_argument_group("runtime")
    g.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a new local Ray on 127.0.0.1)")
    g.add_argument("--actors", type=int, default=r["num_actors"],
                   help="mining actors (default: one per free GPU, else free CPUs / --cpus-per-actor)")
    g.add_argument("--gpu", dest="use_gpu", action="store_true", default=r["use_gpu"],
                   help="ask for num_gpus=1 actors even if no GPU is up yet (autoscaling from zero; use with --actors)")
    g.add_argument("--no-gpu", dest="use_gpu", action="store_false", help="CPU actors even where GPUs exist")
    g.add_argument("--cpus-per-actor", type=int, default=r["cpus_per_actor"],
                   help="CPUs per actor without GPUs (default: the free CPUs / actors)")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="patches per CLIP forward, >= 1 (default: from free GPU memory; 64 on CPU)")
    g.add_argument("--device", default=d.device, help="torch device in the actors (default: cuda when visible, else cpu)")
    g.add_argument("--decode-threads", type=int, default=d.decode_threads,
                   help="decode (+ selection on CPU) threads per actor (default: the actor's CPUs)")
    g.add_argument("--select-impl", default=d.select_impl, choices=["torch", "numpy"],
                   help="patch selection implementation (default: torch on GPU actors, numpy on CPU actors)")
    g.add_argument("--frame-batch", type=int, default=d.frame_batch,
                   help="frames per decode/select/crop batch, >= 1 (default: 32 on GPU, 4 on CPU)")
    g.add_argument("--max-attempts", type=int, default=r["max_attempts"],
                   help=f"tries per shard before it is recorded as failed (default {r['max_attempts']})")
    g.add_argument("--images-per-shard", type=int, default=r["images_per_dir_shard"],
                   help=f"frames per shard for directories of images (default {r['images_per_dir_shard']})")
    g.add_argument("--startup-timeout", type=float, default=r["startup_timeout"],
                   help="seconds to wait for the first mining actor (free resources, model load) before giving up "
                        f"with exit code 2 (default {r['startup_timeout']:.0f})")


def mine_config(args: argparse.Namespace, date: str | None = None):
    """The :class:`mining.pipeline.MineConfig` of the parsed arguments."""
    from mining.pipeline import MineConfig

    return MineConfig(
        preset=args.preset, saliency=args.saliency, selector=args.selector,
        ltrp_checkpoint=args.ltrp_checkpoint, mae_checkpoint=args.mae_checkpoint, kpp_ratio=args.kpp_ratio,
        ranker_random_init=args.ranker_random_init, clip_model=args.clip_model,
        epitome=args.epitome, epitome_bootstrap=args.epitome_bootstrap,
        epitome_bootstrap_frames=args.epitome_bootstrap_frames, epitome_bootstrap_steps=args.epitome_bootstrap_steps,
        clip_pretrained=None if args.clip_random_init else args.clip_pretrained,
        clip_random_init=args.clip_random_init, batch_size=args.batch_size, device=args.device,
        decode_threads=args.decode_threads, select_impl=args.select_impl, frame_batch=args.frame_batch,
        date=date or getattr(args, "date", None),
    )


def runtime_kwargs(args: argparse.Namespace) -> dict:
    """The runtime options as keyword arguments of :func:`mining.driver.run_mining`."""
    return dict(address=args.address, num_actors=args.actors, cpus_per_actor=args.cpus_per_actor,
                max_attempts=args.max_attempts, use_gpu=args.use_gpu, images_per_dir_shard=args.images_per_shard,
                startup_timeout=args.startup_timeout)


def setup_logging() -> None:
    """WARNING-level logging in one line per record (RAY_AUTH_MODE is left as the user set it)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def fail(exc: BaseException) -> int:
    """Print a user-facing error as one line on stderr; returns exit code 2. Re-raises anything else."""
    from mining.errors import user_error

    ue = user_error(exc)
    if ue is None and not isinstance(exc, (FileNotFoundError, ValueError)):
        raise exc
    msg = str(ue if ue is not None else exc).strip().splitlines()
    print(f"error: {msg[0] if msg else type(exc).__name__}", file=sys.stderr, flush=True)
    return 2


def exit_process(code) -> None:
    """Flush stdout / stderr / logging, then leave with ``code`` (``main()``'s return: int, or None = 0),
    skipping the interpreter's finalisation (``os._exit``).

    Why: a finished ``jobs.feedback`` run, its output printed and its files closed, was once killed by
    SIGABRT at interpreter exit ("terminate called without an active exception": a native thread pool
    -- torch / faiss OpenMP / pyarrow -- torn down under a running thread), so a successful command exited
    -6 (tests/test_feedback.py, one of about five full runs). Used by the local, non-Ray CLIs
    (``jobs.feedback``, ``jobs.query``); their outputs are written and closed before ``main`` returns.
    """
    import os

    rc = 0 if code is None else code if isinstance(code, int) else 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(rc)
