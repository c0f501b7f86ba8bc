"""Saliency backends (one per file) behind :class:`mining.saliency.base.SaliencyBackend`."""
from mining.saliency.base import SaliencyBackend, available_backends, get_backend, register_backend  # noqa: F401
from mining.saliency import opencv  # noqa: F401  (registers spectral-residual, fine-grained)
from mining.saliency import spectral  # noqa: F401  (registers spectral-residual-ms, colour-contrast)
from mining.saliency import bms  # noqa: F401  (registers boolean-map)
from mining.saliency import ensemble  # noqa: F401  (registers sr-bms)

try:  # SimpleNet needs torch/timm; keep the weight-free path importable without them
    from mining.saliency import simplenet  # noqa: F401
except ImportError:  # pragma: no cover
    pass
