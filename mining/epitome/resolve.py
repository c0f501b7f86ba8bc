"""Which epitome a mining run uses (issue 14 item 5: a fresh root has no epitome yet).

:func:`resolve_epitome` decides, in this order:

1. ``given``: the path of ``--epitome`` (checked up front by :mod:`mining.validate`);
2. ``root``: the version ``<root>/models/epitome/LATEST`` names (written by
   ``python -m jobs.train_epitome --out <root>/models/epitome`` or ``jobs.nightly --refresh-epitome``);
3. ``bootstrap``: a fresh root: an epitome trained on the first ``bootstrap_frames`` frames of
   this run (:func:`mining.epitome.fit.train_on_images`, ``bootstrap_steps`` steps; default
   64 frames and 200 steps, about 5 s on one CPU core at the default size), published into
   ``<root>/models/epitome/`` like the job does, so later runs find it as ``root``;
4. ``fallback``: bootstrap disabled or impossible (no decodable frame): the run uses the best
   weight-free backend, :data:`FALLBACK_SALIENCY`.

:func:`needs_epitome` says whether a saliency backend name needs a model at all (the backend
``epitome``, or an ensemble with an ``epitome`` member); the mining driver resolves only then.
"""
from __future__ import annotations

from typing import Callable, Iterable

MODEL_SUBDIR = ("models", "epitome")
FALLBACK_SALIENCY = "sr-bms"
BOOTSTRAP_FRAMES = 64
BOOTSTRAP_STEPS = 200


def model_dir(root: str) -> str:
    """``<root>/models/epitome`` (local or s3://)."""
    from mining.fs import join

    return join(root, *MODEL_SUBDIR)


def needs_epitome(saliency_name: str | None) -> bool:
    """True when the backend ``saliency_name`` is ``epitome`` or an ensemble with such a member.

    Looks at the registered class only (its ``members`` spec, recursively); nothing is built
    and no model is loaded. Unknown names are False (the settings check reports them).
    """
    if not saliency_name:
        return False
    if saliency_name == "epitome":
        return True
    try:
        from mining.registry import backend_class

        cls = backend_class(saliency_name)
    except (KeyError, ImportError):
        return False
    return any(needs_epitome(name) for name, *_ in getattr(cls, "members", ()) or ())


def resolve_epitome(cfg_epitome: str | None, root: str, frames_for_bootstrap: Callable[[int], Iterable] | None,
                    log: Callable[[str], None] = print, *, bootstrap_frames: int = BOOTSTRAP_FRAMES,
                    bootstrap_steps: int = BOOTSTRAP_STEPS, device=None) -> tuple[str | None, str]:
    """The epitome model file for a mining run, and how it was found; prints one line saying which.

    Args:
        cfg_epitome: ``--epitome`` (a model file path / URI), or None.
        root: the run's dataset root (local or s3://).
        frames_for_bootstrap: ``f(n)`` -> up to ``n`` frames of this run, (H, W, 3) uint8 RGB numpy
            arrays (an iterator is fine: frames are converted to the working resolution one at a
            time); None disables bootstrapping.
        log: where the one line goes.
        bootstrap_frames, bootstrap_steps: the bootstrap's frames and optimiser steps.
        device: torch device of the bootstrap training (default: cuda when available).
    Returns:
        ``(path or None, how)``, how in ``given``, ``root``, ``bootstrap``, ``fallback``
        (path None only for ``fallback``).
    """
    from mining.epitome.job import latest_model, publish_model

    if cfg_epitome:
        log(f"epitome: {cfg_epitome} (--epitome)")
        return cfg_epitome, "given"
    mdir = model_dir(root)
    found = latest_model(mdir)
    if found:
        log(f"epitome: {found} (the latest in {mdir})")
        return found, "root"
    if frames_for_bootstrap is None:
        log(f"epitome: none in {mdir} and --no-epitome-bootstrap; falling back to {FALLBACK_SALIENCY}")
        return None, "fallback"
    from mining.epitome.fit import TrainConfig, train_on_images

    try:
        model, info = train_on_images(frames_for_bootstrap(bootstrap_frames), cfg=TrainConfig(steps=bootstrap_steps),
                                      device=device)
    except ValueError as e:  # no frame at all, or none at least K x K at the working resolution
        log(f"epitome: none in {mdir} and no frames to train one on ({e}); falling back to {FALLBACK_SALIENCY}")
        return None, "fallback"
    meta = {"steps": info["steps"], "frames_seen": info["frames"], "train_s": round(info["seconds"], 3),
            "final_nll": info["final_nll"], "how": "bootstrap: the first frames of a mining run"}
    path = publish_model(model, mdir, meta)
    log(f"epitome: trained on the first {info['frames']} frames of this run ({info['steps']} steps, "
        f"{info['seconds']:.1f} s) -> {path}")
    return path, "bootstrap"
