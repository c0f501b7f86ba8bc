"""Saliency backends (one per file) behind :class:`mining.saliency.base.SaliencyBackend`.

Importing this package imports no backend module: :mod:`mining.registry` names them and imports
a backend's module when that backend is first created (so ``sr-bms`` never imports torch).
"""
from mining.saliency.base import SaliencyBackend, available_backends, get_backend, register_backend  # noqa: F401
