"""The one registry of saliency and patch-ranking backends: name -> lazy entry point.

Every map source of the single candidate-box selector (:mod:`mining.selection`) is created here,
whether it is a weight-free saliency map (``sr-bms``), a CNN (``simplenet``) or a patch ranker
(``ltrp``, ``kpp``)::

    from mining.registry import get_backend, backend_from_config
    be = get_backend("sr-bms")                    # predict(image (H, W, 3) uint8) -> (H, W) float32 [0, 1]
    be = backend_from_config(mine_config)         # the mining job's selector, with its options

Design decisions (issue 14):

* **One registry.** Before, :mod:`mining.saliency.base` looked names up in a dict that was filled
  by importing :mod:`mining.ranking` (which itself imports :mod:`mining.saliency.base`: an import
  cycle), and LTRP / KPP were also built a second way (``pipeline.make_backend``,
  ``benchmarks/capture.py``, ``mining.ranking.backend_from_args``), each mapping the mining
  options to constructor arguments on its own. Now every caller goes through :func:`get_backend`
  / :func:`backend_from_config`, and the mapping from the mining job's options (``MineConfig``
  fields) to a backend's keyword arguments is one table, :data:`OPTION_KWARGS`.
* **Lazy entry points.** Built-in backends are ``"module:attr"`` strings in :data:`BUILTIN`.
  Looking a name up imports only that backend's module, so listing the names
  (:func:`available_backends`, used to validate CLI flags on the driver) imports no torch / timm,
  and creating ``sr-bms`` does not import the LTRP model code. This module imports nothing from
  :mod:`mining` at import time, so any backend module may import it without a cycle.
* **Decorators still work.** :func:`register_backend` registers a class (or factory) directly, for
  third-party and test backends; it also sets ``cls.name``. The built-in modules keep their
  decorators, so resolving an entry point and registering agree on the class.

Adding a built-in backend is one line in :data:`BUILTIN` (plus, when it takes options of the
mining job, one line in :data:`OPTION_KWARGS`).
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    from mining.saliency.base import SaliencyBackend

__all__ = ["BUILTIN", "OPTION_KWARGS", "RANKERS", "SELECTORS", "register_backend", "backend_class", "get_backend",
           "available_backends", "backend_name", "backend_kwargs", "backend_from_config"]

# name -> "module:attr"; resolved (imported) on first use only.
BUILTIN: dict[str, str] = {
    "spectral-residual": "mining.saliency.opencv:SpectralResidual",
    "fine-grained": "mining.saliency.opencv:FineGrained",
    "spectral-residual-ms": "mining.saliency.spectral:MultiScaleSpectralResidual",
    "colour-contrast": "mining.saliency.spectral:ColourContrast",
    "boolean-map": "mining.saliency.bms:BooleanMapSaliency",
    "sr-bms": "mining.saliency.ensemble:SpectralBooleanEnsemble",
    "simplenet": "mining.saliency.simplenet:SimpleNetSaliency",
    "ltrp": "mining.ranking.backends:LTRPBackend",
    "kpp": "mining.ranking.backends:KPPBackend",
    "epitome": "mining.epitome.backend:EpitomeSaliency",
    "sr-bms-epitome": "mining.epitome.backend:SpectralBooleanEpitome",
}

# backend name -> {constructor kwarg: option name}; the options are MineConfig fields (or the
# keys of a dict / attributes of any object, see backend_from_config). Unset (None or missing)
# options are not passed, so the backend's own defaults (and env fallbacks) apply.
OPTION_KWARGS: dict[str, dict[str, str]] = {
    "ltrp": {"checkpoint": "ltrp_checkpoint", "random_init": "ranker_random_init", "arch": "arch",
             "device": "device"},
    "kpp": {"mae_checkpoint": "mae_checkpoint", "ratio": "kpp_ratio", "random_init": "ranker_random_init",
            "arch": "arch", "device": "device"},
    "epitome": {"model": "epitome", "device": "device"},
    "sr-bms-epitome": {"model": "epitome", "device": "device"},
}

RANKERS = ("ltrp", "kpp")
SELECTORS = ("saliency", *RANKERS)
"""Values of the mining job's ``--selector``: ``saliency`` uses ``--saliency``; a ranker is its own backend."""

_REGISTERED: dict[str, Callable[..., "SaliencyBackend"]] = {}


def register_backend(name: str):
    """Class decorator: register a backend class (or factory) under ``name``; sets ``cls.name``.

    A registered name takes precedence over a :data:`BUILTIN` entry of the same name.
    """

    def deco(cls):
        _REGISTERED[name] = cls
        cls.name = name
        return cls

    return deco


def available_backends() -> list[str]:
    """Sorted names of all backends (built-in entry points and registered ones); imports no backend."""
    return sorted(set(BUILTIN) | set(_REGISTERED))


def backend_class(name: str) -> Callable[..., "SaliencyBackend"]:
    """The class (or factory) registered as ``name``, importing only its module.

    Raises:
        KeyError: unknown name; the message lists the known names.
        ImportError: the backend's module (or a dependency such as torch) cannot be imported.
    """
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in BUILTIN:
        raise KeyError(f"unknown saliency backend {name!r}; known: {available_backends()}")
    module, attr = BUILTIN[name].split(":")
    return getattr(importlib.import_module(module), attr)


def get_backend(name: str, **kwargs) -> "SaliencyBackend":
    """Create the backend ``name`` with ``kwargs`` (its constructor's keyword arguments).

    Returns:
        a :class:`mining.saliency.base.SaliencyBackend`: ``predict(image (H, W, 3) uint8 RGB)``
        -> (H, W) float32 map in [0, 1].
    Raises:
        KeyError: unknown name; the message lists the known names.
        ValueError / TypeError: the backend rejects ``kwargs`` (e.g. a ranker without weights
            and without ``random_init``).
    """
    return backend_class(name)(**kwargs)


def _option(options: Any, key: str):
    if isinstance(options, Mapping):
        return options.get(key)
    return getattr(options, key, None)


def backend_name(selector: str, saliency: str | None = None) -> str:
    """The backend a ``--selector`` / ``--saliency`` pair names.

    Args:
        selector: one of :data:`SELECTORS`.
        saliency: backend for ``selector == "saliency"`` (None: ``mining.selection.DEFAULT_SALIENCY``).
    Raises:
        ValueError: unknown selector.
    """
    if selector == "saliency":
        if saliency is None:
            from mining.selection import DEFAULT_SALIENCY

            saliency = DEFAULT_SALIENCY
        return saliency
    if selector in RANKERS:
        return selector
    raise ValueError(f"unknown selector {selector!r}; use one of {', '.join(SELECTORS)}")


def backend_kwargs(name: str, options: Any) -> dict:
    """Constructor kwargs of backend ``name`` from the mining options (:data:`OPTION_KWARGS`).

    Args:
        name: backend name.
        options: a ``MineConfig``, a dict, or any object with the option attributes; missing or
            None options are left out.
    Returns:
        dict of keyword arguments (empty for backends without options).
    """
    out = {}
    for kwarg, opt in OPTION_KWARGS.get(name, {}).items():
        v = _option(options, opt)
        if v is not None:
            out[kwarg] = v
    return out


def backend_from_config(options: Any) -> "SaliencyBackend":
    """The backend of the mining job's selection options: one call for every selector.

    Args:
        options: a ``MineConfig`` (or dict / object) with ``selector``, ``saliency`` and the
            options in :data:`OPTION_KWARGS` (``ltrp_checkpoint``, ``mae_checkpoint``,
            ``kpp_ratio``, ``ranker_random_init``, ``device``, optional ``arch``).
    Returns:
        the created backend.
    Raises:
        ValueError: unknown selector, or a ranker without weights and without random init.
        KeyError: unknown saliency backend.
    """
    name = backend_name(_option(options, "selector") or "saliency", _option(options, "saliency"))
    return get_backend(name, **backend_kwargs(name, options))
