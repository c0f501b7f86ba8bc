"""Shard readers over fsspec (local paths and ``s3://`` through s3fs).

A *shard* is the unit of work and of commit. Three kinds:

- ``tar``: a WebDataset-style tar: ``<key>.jpg|jpeg|png|webp|...`` plus an optional
  ``<key>.json`` sidecar (timestamp, camera, vehicle, ...). Members of one sample are
  adjacent (WebDataset convention); the tar is read as a stream (``tarfile`` mode ``r|*``),
  so memory is bounded by one sample, never the whole shard.
- ``parquet``: a Parquet file with a binary image column and an id column, read in
  small record batches.
- ``dir``: a directory / prefix of image files, split into fixed chunks of sorted file
  names (each chunk is one shard, its id names the first and last file).

Every shard has a stable id, its URI (``ShardRef.uri``); every image has a stable
``image_uri`` (``<shard>#<member>`` for tar/parquet members, the file URI otherwise).
Read problems are yielded as records with an ``error`` (stage, reason) so the
caller writes an errors-table row and keeps going.
"""
from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Iterator

from mining.fs import get_fs, to_uri

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".gif")
SHARD_EXTS = (".tar", ".parquet")
DEFAULT_IMAGES_PER_DIR_SHARD = 64


@dataclass(frozen=True)
class ShardRef:
    """One shard. ``uri`` is its stable id; ``members`` lists the image URIs of a ``dir`` shard."""

    uri: str
    kind: str  # "tar" | "parquet" | "dir"
    members: tuple[str, ...] = ()
    gen: int = 1            # the store generation this attempt commits (see mining.store)
    fingerprint: str = ""   # content fingerprint when planned (size + ETag/mtime, :func:`shard_fingerprint`)


@dataclass
class Record:
    """One frame read from a shard.

    Attributes:
        image_uri: stable URI of the frame. key: its key inside the shard.
        data: encoded bytes (None when ``error`` is set).
        metadata: sidecar dict ({} when absent).
        error: (stage, reason) when the frame could not be read; the frame is then not mined.
        sidecar_error: reason when the sidecar JSON was bad (the frame is still mined).
    """

    image_uri: str
    key: str
    data: bytes | None = None
    metadata: dict = field(default_factory=dict)
    error: tuple[str, str] | None = None
    sidecar_error: str | None = None
    corrupt: bool = False   # the shard itself is broken here (truncated / corrupt tar): it is committed "partial"


def _kind_of(path: str) -> str | None:
    p = path.lower()
    if p.endswith(".tar"):
        return "tar"
    if p.endswith(".parquet"):
        return "parquet"
    return None


def _dir_shards(fs, base: str, files: list[str], images_per_shard: int) -> list[ShardRef]:
    files = sorted(files)
    out = []
    for i in range(0, len(files), images_per_shard):
        chunk = files[i:i + images_per_shard]
        first, last = posixpath.basename(chunk[0]), posixpath.basename(chunk[-1])
        digest = hashlib.blake2b("\n".join(chunk).encode(), digest_size=4).hexdigest()
        uri = f"{to_uri(fs, base)}#{first}..{last}.{digest}"
        out.append(ShardRef(uri=uri, kind="dir", members=tuple(to_uri(fs, f) for f in chunk)))
    return out


def incremental_dir_refs(refs: list[ShardRef], covered: set[str], images_per_shard: int) -> list[ShardRef]:
    """Re-chunk the ``dir`` shards of ``refs`` so that image files already in a committed ``dir`` shard
    (``covered``: their URIs) are left out: adding files to a folder mines only the new ones, in new
    chunks (sorted by name, ``images_per_shard`` each; a chunk's URI names its first and last file and a
    hash of its members). ``tar`` / ``parquet`` refs pass through. Sorted by URI, like :func:`list_shards`.
    """
    out = [r for r in refs if r.kind != "dir"]
    by_base: dict[str, list[str]] = {}
    for r in refs:
        if r.kind == "dir":
            by_base.setdefault(r.uri.split("#", 1)[0], []).extend(r.members)
    for base, members in by_base.items():
        new = sorted(set(members) - covered)
        for i in range(0, len(new), images_per_shard):
            chunk = new[i:i + images_per_shard]
            first, last = posixpath.basename(chunk[0]), posixpath.basename(chunk[-1])
            digest = hashlib.blake2b("\n".join(chunk).encode(), digest_size=4).hexdigest()
            out.append(ShardRef(uri=f"{base}#{first}..{last}.{digest}", kind="dir", members=tuple(chunk)))
    return sorted(out, key=lambda r: r.uri)


def list_shards(spec: str, *, images_per_dir_shard: int = DEFAULT_IMAGES_PER_DIR_SHARD) -> list[ShardRef]:
    """Resolve an input spec to shards, sorted by URI, with a fresh (uncached) listing.

    Args:
        spec: a tar/parquet file, a directory or prefix (tar/parquet files in it are shards,
            and its loose image files are chunked into ``dir`` shards; a folder holding both
            is mined completely), a glob
            (``/data/*.tar``, ``s3://bucket/night/*.tar``), or several of these joined by commas.
        images_per_dir_shard: frames per ``dir`` shard.
    Returns:
        list of ShardRef (no duplicates).
    Raises:
        FileNotFoundError: nothing matches ``spec``.
        ValueError: unsupported URI scheme.
    """
    refs: dict[str, ShardRef] = {}
    for part in [s.strip() for s in spec.split(",") if s.strip()]:
        fs, path = get_fs(part)
        if hasattr(fs, "invalidate_cache"):
            fs.invalidate_cache()
        if any(c in path for c in "*?["):
            matches = sorted(fs.glob(path))
            shard_files = [m for m in matches if _kind_of(m)]
            image_files = [m for m in matches if m.lower().endswith(IMAGE_EXTS)]
            for m in shard_files:
                refs[to_uri(fs, m)] = ShardRef(to_uri(fs, m), _kind_of(m))
            if image_files:
                base = posixpath.dirname(path.split("*", 1)[0].rstrip("/")) or path
                for r in _dir_shards(fs, base, image_files, images_per_dir_shard):
                    refs[r.uri] = r
            if not matches:
                raise FileNotFoundError(f"no files match {part!r}")
            continue
        if not fs.exists(path):
            raise FileNotFoundError(f"input {part!r} does not exist")
        if fs.isfile(path):
            kind = _kind_of(path)
            if kind:
                refs[to_uri(fs, path)] = ShardRef(to_uri(fs, path), kind)
            elif path.lower().endswith(IMAGE_EXTS):
                for r in _dir_shards(fs, posixpath.dirname(path), [path], 1):
                    refs[r.uri] = r
            else:
                raise ValueError(f"{part!r} is neither a shard (.tar, .parquet) nor an image file")
            continue
        entries = [e for e in fs.find(path, maxdepth=None) if not posixpath.basename(e).startswith((".", "_"))]
        shard_files = sorted(e for e in entries if _kind_of(e))
        image_files = [e for e in entries if e.lower().endswith(IMAGE_EXTS)]
        if not shard_files and not image_files:
            raise FileNotFoundError(f"no shards (.tar, .parquet) or images ({', '.join(IMAGE_EXTS)}) under {part!r}")
        for m in shard_files:
            refs[to_uri(fs, m)] = ShardRef(to_uri(fs, m), _kind_of(m))
        # loose images next to tar/parquet shards are mined too (chunked into dir shards)
        for r in _dir_shards(fs, path, image_files, images_per_dir_shard) if image_files else ():
            refs[r.uri] = r
    return [refs[k] for k in sorted(refs)]


# --------------------------------------------------------------------------- readers

def _wds_key(name: str) -> tuple[str, str]:
    """WebDataset split: 'dir/000123.front.jpg' -> ('dir/000123', 'front.jpg')."""
    d, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(d, stem) if d else stem), ext.lower()


def _finish_sample(shard: str, key: str, parts: dict[str, bytes], bad: dict[str, str],
                   corrupt: bool = False) -> Iterator[Record]:
    imgs = [e for e in parts if ("." + e.rsplit(".", 1)[-1]) in IMAGE_EXTS]
    meta, side_err = {}, None
    if "json" in parts:
        try:
            meta = json.loads(parts["json"].decode("utf-8"))
            if not isinstance(meta, dict):
                meta, side_err = {}, f"sidecar {key}.json is not a JSON object"
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            side_err = f"bad sidecar JSON {key}.json: {e}"
    if "json" in bad:
        side_err = bad["json"]
    if not imgs:
        if bad:
            yield Record(image_uri=f"{shard}#{key}", key=key, error=("read", "; ".join(bad.values())), corrupt=corrupt)
        return
    for ext in sorted(imgs):
        name = f"{key}.{ext}"
        if ext in bad:
            yield Record(image_uri=f"{shard}#{name}", key=name, error=("read", bad[ext]), metadata=meta, corrupt=corrupt)
            continue
        yield Record(image_uri=f"{shard}#{name}", key=name, data=parts[ext], metadata=meta, sidecar_error=side_err)


def iter_tar(shard: str) -> Iterator[Record]:
    """Stream a WebDataset tar shard sample by sample (bounded memory)."""
    fs, path = get_fs(shard)
    key, parts, bad, corrupt = None, {}, {}, False
    try:
        with fs.open(path, "rb", block_size=8 * 2**20) as f, tarfile.open(fileobj=f, mode="r|*") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                k, ext = _wds_key(m.name)
                if key is not None and k != key:
                    yield from _finish_sample(shard, key, parts, bad, corrupt)
                    parts, bad, corrupt = {}, {}, False
                key = k
                try:
                    fh = tf.extractfile(m)
                    data = fh.read() if fh is not None else b""
                    if len(data) != m.size:
                        bad[ext] = f"tar member {m.name} truncated ({len(data)} of {m.size} bytes)"
                        corrupt = True
                    parts[ext] = data
                except (tarfile.TarError, EOFError) as e:
                    bad[ext] = f"corrupt tar member {m.name}: {type(e).__name__}: {e}"
                    parts[ext] = b""
                    corrupt = True
    except (tarfile.TarError, EOFError) as e:
        # the tar itself is broken (truncated, garbage): what was read is kept, the shard is "partial".
        # An OSError (S3 5xx after retries, a timeout, a reset connection) is transient: it propagates and
        # fails this attempt, which the driver retries.
        if key is not None:
            yield from _finish_sample(shard, key, parts, bad, corrupt)
            key = None
        yield Record(image_uri=f"{shard}#<tar>", key="<tar>", error=("read", f"corrupt tar stream: {type(e).__name__}: {e}"),
                     corrupt=True)
    if key is not None:
        yield from _finish_sample(shard, key, parts, bad, corrupt)


def iter_parquet(shard: str, *, image_column: str = "image", id_column: str = "id", batch_size: int = 8) -> Iterator[Record]:
    """Stream a Parquet shard in record batches of ``batch_size`` rows (bounded memory).

    Other columns become the frame's metadata. Raises ValueError when the columns are missing.
    """
    import pyarrow.parquet as pq

    fs, path = get_fs(shard)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        for c in (image_column, id_column):
            if c not in names:
                raise ValueError(f"parquet shard {shard!r} has no column {c!r} (columns: {names})")
        for batch in pf.iter_batches(batch_size=batch_size):
            for row in batch.to_pylist():
                rid = str(row.pop(id_column))
                data = row.pop(image_column)
                meta = {k: v for k, v in row.items() if isinstance(v, (str, int, float, bool)) or v is None}
                if data is None:
                    yield Record(image_uri=f"{shard}#{rid}", key=rid, error=("read", "null image bytes"))
                else:
                    yield Record(image_uri=f"{shard}#{rid}", key=rid, data=bytes(data), metadata=meta)


def iter_dir(ref: ShardRef) -> Iterator[Record]:
    """Read the image files of a ``dir`` shard one by one (sidecar ``<stem>.json`` if present)."""
    for uri in ref.members:
        fs, path = get_fs(uri)
        name = posixpath.basename(path)
        try:
            data = fs.cat_file(path)
        except (OSError, FileNotFoundError) as e:
            yield Record(image_uri=uri, key=name, error=("read", f"{type(e).__name__}: {e}"))
            continue
        meta, side_err = {}, None
        side = path.rsplit(".", 1)[0] + ".json"
        try:
            if fs.exists(side):
                meta = json.loads(fs.cat_file(side))
        except (OSError, ValueError) as e:
            side_err = f"bad sidecar JSON {posixpath.basename(side)}: {e}"
        yield Record(image_uri=uri, key=name, data=data, metadata=meta, sidecar_error=side_err)


def shard_fingerprint(ref: ShardRef) -> str:
    """Content fingerprint of a shard: ``<size>:<ETag or mtime>`` of its file (for a ``dir`` shard, a
    hash over its members'). Changes when the object is replaced (e.g. a truncated tar by the full one).

    Raises:
        OSError / FileNotFoundError from the filesystem.
    """
    def one(uri: str) -> str:
        fs, path = get_fs(uri)
        info = fs.info(path)
        tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
        return f"{info.get('size', 0)}:{str(tag).strip(chr(34))}"

    if ref.kind == "dir":
        return hashlib.blake2b("\n".join(one(u) for u in ref.members).encode(), digest_size=8).hexdigest()
    return one(ref.uri)


def iter_shard(ref: ShardRef, **kw) -> Iterator[Record]:
    """Records of one shard, streamed. Keyword args go to the Parquet reader."""
    if ref.kind == "tar":
        return iter_tar(ref.uri)
    if ref.kind == "parquet":
        return iter_parquet(ref.uri, **kw)
    if ref.kind == "dir":
        return iter_dir(ref)
    raise ValueError(f"unknown shard kind {ref.kind!r}")


def write_tar_shard(path_or_uri: str, samples: list[tuple[str, dict[str, bytes]]]) -> str:
    """Write a WebDataset tar: ``samples`` = [(key, {"jpg": bytes, "json": bytes, ...}), ...].

    A helper for tests, benchmarks and users packing fleet frames. Returns the URI.
    """
    fs, path = get_fs(path_or_uri)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for key, parts in samples:
            for ext, data in parts.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(buf.getvalue())
    return to_uri(fs, path)


def matches(uri: str, patterns: list[str]) -> bool:
    """True when ``uri`` matches one of the shell-style ``patterns``."""
    return any(fnmatch.fnmatch(uri, p) for p in patterns)
