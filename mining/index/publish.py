"""Versioned index directories and the atomic ``CURRENT`` pointer.

Layout (local directory; sharded versions may also live on ``s3://``, see :mod:`mining.index.layout`)::

    <out_root>/CURRENT                          one line: the serving version
    <out_root>/versions/<version>/index.faiss   the FAISS index (+ merged.ivfdata for on-disk merges)
    <out_root>/versions/<version>/meta.arrow    Arrow IPC file: patch_id -> metadata, sorted by patch_id
    <out_root>/versions/<version>/refine.faiss  ivfpq-refine: exact float16 vectors (IndexScalarQuantizer fp16),
                                                rows in patch_id order = the IVF labels (older versions: vectors.npy)
    <out_root>/versions/<version>/trained.faiss the empty trained index (frozen codebooks for nightly adds)
    <out_root>/versions/<version>/params.json   search parameters (nprobe / efSearch / k_factor)
    <out_root>/versions/<version>/uniqueness.parquet  kNN uniqueness per patch_id (mining.index.uniqueness)
    <out_root>/versions/<version>/manifest.json written last inside the version

Publish protocol (a reader never sees half an index; a crash leaves the previous version serving):

1. everything is written into ``versions/.staging-<version>/`` (ignored by readers);
2. ``manifest.json`` is written last and fsynced;
3. the staging directory is renamed to ``versions/<version>`` (``os.replace``, atomic on POSIX);
4. ``CURRENT`` is replaced atomically (temp file + ``os.replace``) -- the commit point.

A crash before 4 leaves ``CURRENT`` on the old version; leftovers of 1-3 are harmless and
removed by :func:`cleanup_staging`.  Old versions stay readable until :func:`drop_version`.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import uuid

from mining.fs import get_fs, is_local, join

CURRENT = "CURRENT"
VERSIONS = "versions"
STAGING_PREFIX = ".staging-"
MANIFEST = "manifest.json"


def _local(out_root: str) -> str:
    if not is_local(out_root):
        raise ValueError(f"index roots must be local directories, got {out_root!r} (copy the version dir to serve elsewhere)")
    return os.path.abspath(out_root[len("file://"):] if out_root.startswith("file://") else out_root)


def new_version_name() -> str:
    """Sortable, unique version name: ``YYYYmmddTHHMMSSffffffZ-<6 hex>`` (UTC)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ") + "-" + uuid.uuid4().hex[:6]


def check_version_name(version: str) -> str:
    """``version`` if it is a plain name (no '/', not hidden). Raises ValueError."""
    if not version or "/" in version or version.startswith("."):
        raise ValueError(f"bad version name {version!r}")
    return version


def version_dir(out_root: str, version: str) -> str:
    """Directory of a published version (string path; local roots only)."""
    return os.path.join(_local(out_root), VERSIONS, check_version_name(version))


def stage(out_root: str) -> tuple[str, str]:
    """Create a staging directory for a new version. Returns (version, staging_dir)."""
    version = new_version_name()
    d = os.path.join(_local(out_root), VERSIONS, STAGING_PREFIX + version)
    os.makedirs(d)
    return version, d


def write_json_atomic(path: str, obj) -> None:
    """JSON to ``path`` via temp file + fsync + os.replace."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_current(out_root: str, version: str) -> None:
    """Point CURRENT at ``version`` atomically (the commit point of a publish)."""
    root = _local(out_root)
    tmp = os.path.join(root, f".{CURRENT}.tmp-{uuid.uuid4().hex}")
    with open(tmp, "w") as f:
        f.write(version + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, CURRENT))
    _fsync_dir(root)


def publish(out_root: str, version: str, staging_dir: str, manifest: dict) -> str:
    """Finish a staged version: manifest (last file), rename into place, then swap CURRENT.

    Returns: the version directory.  Raises: OSError from the filesystem (CURRENT unchanged then).
    """
    write_json_atomic(os.path.join(staging_dir, MANIFEST), manifest)
    for name in os.listdir(staging_dir):
        p = os.path.join(staging_dir, name)
        if os.path.isfile(p):
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    final = version_dir(out_root, version)
    os.replace(staging_dir, final)
    _fsync_dir(os.path.dirname(final))
    _replace_current(out_root, version)
    return final


def current_version(out_root: str) -> str | None:
    """The version CURRENT points to, or None when nothing was published (local or ``s3://`` root)."""
    if not is_local(out_root):
        fs, path = get_fs(join(out_root, CURRENT))
        try:
            with fs.open(path, "r") as f:
                v = f.read().strip()
        except FileNotFoundError:
            return None
        return v or None
    p = os.path.join(_local(out_root), CURRENT)
    try:
        with open(p) as f:
            v = f.read().strip()
    except FileNotFoundError:
        return None
    return v or None


def list_versions(out_root: str) -> list[str]:
    """Published versions (complete: manifest present), oldest first. Staging dirs are ignored."""
    if not is_local(out_root):
        fs, path = get_fs(join(out_root, VERSIONS))
        if not fs.exists(path):
            return []
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False)]
        return sorted(v for v in names if not v.startswith(".") and fs.exists(f"{path}/{v}/{MANIFEST}"))
    d = os.path.join(_local(out_root), VERSIONS)
    if not os.path.isdir(d):
        return []
    return sorted(v for v in os.listdir(d)
                  if not v.startswith(".") and os.path.isfile(os.path.join(d, v, MANIFEST)))


def read_manifest(out_root: str, version: str) -> dict:
    """manifest.json of a version (local or ``s3://`` root). Raises FileNotFoundError when the version does not exist."""
    if not is_local(out_root):
        fs, path = get_fs(join(out_root, VERSIONS, check_version_name(version), MANIFEST))
        with fs.open(path, "r") as f:
            return json.load(f)
    with open(os.path.join(version_dir(out_root, version), MANIFEST)) as f:
        return json.load(f)


def publish_small_version(out_root: str, version: str, manifest: dict, files: dict[str, object]) -> str:
    """Publish a version made of small JSON files only (a sharded version: manifest + params; the shards
    are already written), on a local or ``s3://`` root.

    Local: :func:`stage` semantics (staging dir, manifest last, rename, CURRENT).  S3: each file is one
    PUT, ``manifest.json`` after the others, then the ``CURRENT`` object -- the commit point; a crash
    before it leaves CURRENT on the previous version.
    Args: files: {name: JSON-able object} written before the manifest.
    Returns: the version's URI.
    """
    if is_local(out_root):
        d = os.path.join(_local(out_root), VERSIONS, STAGING_PREFIX + version)
        os.makedirs(d, exist_ok=True)  # a sharded version's uniqueness parts may already be staged there
        for name, obj in files.items():
            write_json_atomic(os.path.join(d, name), obj)
        return publish(out_root, version, d, manifest)
    vuri = join(out_root, VERSIONS, version)
    for name, obj in list(files.items()) + [(MANIFEST, manifest)]:
        fs, path = get_fs(join(vuri, name))
        with fs.open(path, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True, default=str)
    fs, path = get_fs(join(out_root, CURRENT))
    with fs.open(path, "w") as f:
        f.write(version + "\n")
    return vuri


def drop_version(out_root: str, version: str) -> None:
    """Delete a published version. Readers that already opened it keep working on POSIX
    (open files / memory maps survive unlink).

    Raises:
        ValueError: ``version`` is the one CURRENT points to (publish another one first).
        FileNotFoundError: no such version.
    """
    if version == current_version(out_root):
        raise ValueError(f"{version} is the current version of {out_root}; publish another before dropping it")
    if not is_local(out_root):
        fs, path = get_fs(join(out_root, VERSIONS, version))
        if not fs.exists(f"{path}/{MANIFEST}"):
            raise FileNotFoundError(f"no version {version!r} under {out_root}")
        fs.rm(f"{path}/{MANIFEST}")  # gone for readers first
        fs.rm(path, recursive=True)
        return
    d = version_dir(out_root, version)
    if not os.path.isdir(d):
        raise FileNotFoundError(f"no version {version!r} under {out_root}")
    trash = os.path.join(os.path.dirname(d), f".drop-{version}-{uuid.uuid4().hex[:6]}")
    os.replace(d, trash)  # disappears from list_versions atomically
    shutil.rmtree(trash, ignore_errors=True)


def cleanup_staging(out_root: str, *, min_age_s: float = 6 * 3600) -> list[str]:
    """Remove leftovers of crashed publishes (``.staging-*``, ``.drop-*``) older than ``min_age_s``
    seconds (a younger one may belong to a build still running). Returns what was removed."""
    import time

    d = os.path.join(_local(out_root), VERSIONS)
    removed = []
    if os.path.isdir(d):
        for name in os.listdir(d):
            p = os.path.join(d, name)
            if name.startswith((STAGING_PREFIX, ".drop-")) and time.time() - os.path.getmtime(p) >= min_age_s:
                shutil.rmtree(os.path.join(d, name), ignore_errors=True)
                removed.append(name)
    return removed
