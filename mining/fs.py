"""fsspec helpers: one place that turns a URI (local path, ``file://``, ``s3://``) into a filesystem.

S3 settings come from the environment so that Ray workers (which do not see the
driver's environment unless passed through ``runtime_env["env_vars"]``) behave
the same as the driver:

- ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``: endpoint (e.g. a local moto server);
- the usual ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_DEFAULT_REGION``.

Listings are never cached (``use_listings_cache=False``): the nightly job must see
shards that arrived after the first listing (see ../shared/NOTES.md, s3fs).
"""
from __future__ import annotations

import os
import posixpath
from typing import Any

import fsspec


def s3_storage_options() -> dict[str, Any]:
    """storage_options for s3fs built from the environment (endpoint, no listing cache)."""
    opts: dict[str, Any] = {"use_listings_cache": False}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    retries = int(os.environ.get("MINING_S3_RETRIES", "8"))
    opts["config_kwargs"] = {"retries": {"max_attempts": retries, "mode": "standard"}}
    return opts


def get_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and protocol-stripped path for ``uri``.

    Args:
        uri: local path, ``file://...`` or ``s3://bucket/key``.
    Returns:
        (fs, path) where ``path`` is what ``fs`` methods take.
    Raises:
        ValueError: unsupported protocol.
    """
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    if protocol in ("s3", "s3a"):
        fs = fsspec.filesystem("s3", **s3_storage_options())
        path = uri.split("://", 1)[1]
        return fs, path.rstrip("/")
    if protocol in ("file", "local"):
        fs = fsspec.filesystem("file")
        path = uri.split("://", 1)[1] if "://" in uri else uri
        return fs, os.path.abspath(os.path.expanduser(path))
    if protocol == "memory":
        return fsspec.filesystem("memory"), uri.split("://", 1)[1]
    raise ValueError(f"unsupported URI scheme {protocol!r} in {uri!r}; use a local path or s3://bucket/prefix")


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Inverse of :func:`get_fs`: a full URI for ``path`` on ``fs``."""
    protos = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "s3" in protos or "s3a" in protos:
        return "s3://" + path.lstrip("/")
    if "memory" in protos:
        return "memory://" + path
    return path


def join(uri: str, *parts: str) -> str:
    """Join URI path segments with '/', keeping the scheme."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return scheme + "://" + posixpath.join(rest, *parts)
    return os.path.join(uri, *parts)


def is_local(uri: str) -> bool:
    """True for plain paths and file:// URIs."""
    return "://" not in uri or uri.startswith("file://")
