"""Read the frames of query hits for export: plain image files and shard members, local or s3://.

An ``image_uri`` is either an image file (``/data/a.jpg``, ``s3://bucket/a.jpg``) or a member of a
WebDataset tar / Parquet shard, ``<shard uri>#<member>`` (see :mod:`mining.shards`). Members are read
through the same shard readers the mining job used (``iter_tar``: one streaming pass per tar shard;
Parquet: a row filter on the id column, pushed down by pyarrow), so the export sees exactly the bytes
that were mined. Frames are decoded with :func:`mining.decode.decode_image` (EXIF orientation, 16-bit,
CMYK, pixel limit): the same upright frame the mined boxes refer to.
"""
from __future__ import annotations

import collections
import io
from typing import Callable, Iterable

import numpy as np

SHARD_SUFFIXES = (".tar", ".parquet")


def split_member(uri: str) -> tuple[str, str] | None:
    """``"<shard>.tar#key.jpg"`` -> (shard uri, member); None for a plain file URI."""
    if "#" not in uri:
        return None
    shard, member = uri.rsplit("#", 1)
    if shard.lower().endswith(SHARD_SUFFIXES) and member:
        return shard, member
    return None


def read_uri_bytes(uri: str) -> bytes:
    """Bytes of a local path or s3:// object (no shard members: see :class:`FrameReader`)."""
    from mining.fs import get_fs

    fs, path = get_fs(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def _parquet_members(shard: str, members: set[str], id_column: str = "id", image_column: str = "image") -> dict:
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from mining.fs import get_fs

    fs, path = get_fs(shard)
    ds = pads.dataset(path, format="parquet", filesystem=fs)
    names = ds.schema.names
    for c in (id_column, image_column):
        if c not in names:
            raise ValueError(f"parquet shard {shard!r} has no column {c!r} (columns: {names})")
    t = ds.to_table(columns=[id_column, image_column],
                    filter=pc.field(id_column).cast("string").isin(sorted(members)))
    return {f"{shard}#{i}": (bytes(b) if b is not None else None)
            for i, b in zip(t.column(id_column).cast("string").to_pylist(), t.column(image_column).to_pylist())}


class FrameReader:
    """Encoded bytes and decoded upright RGB frames by ``image_uri``.

    Args:
        loader: optional ``uri -> bytes`` for plain files (default: fsspec, local or s3://).
        cache_frames: decoded frames kept (LRU); each is (H, W, 3) uint8.
    Use :meth:`prefetch` with all URIs of an export first: it reads each shard once for all of
    its members. Errors: :meth:`bytes` / :meth:`rgb` raise ``KeyError`` (member not in its shard),
    ``OSError`` / ``FileNotFoundError`` (unreadable file) or ``mining.decode.DecodeError``.
    """

    def __init__(self, loader: Callable[[str], bytes] | None = None, cache_frames: int = 8):
        self.loader = loader or read_uri_bytes
        self._bytes: dict[str, bytes | None] = {}
        self._errors: dict[str, str] = {}
        self._frames: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self.cache_frames = cache_frames

    def prefetch(self, uris: Iterable[str]) -> None:
        """Read the member URIs among ``uris`` with one pass per shard (plain files are read lazily)."""
        from mining.shards import iter_tar

        by_shard: dict[str, set[str]] = collections.defaultdict(set)
        for u in uris:
            sm = split_member(u)
            if sm and u not in self._bytes:
                by_shard[sm[0]].add(sm[1])
        for shard, members in by_shard.items():
            wanted = {f"{shard}#{m}" for m in members}
            try:
                if shard.lower().endswith(".tar"):
                    for rec in iter_tar(shard):
                        if rec.image_uri in wanted:
                            if rec.error:
                                self._errors[rec.image_uri] = rec.error[1]
                            else:
                                self._bytes[rec.image_uri] = rec.data
                else:
                    self._bytes.update(_parquet_members(shard, members))
            except Exception as e:  # the whole shard is unreadable: every member says why
                for u in wanted:
                    self._errors[u] = f"shard {shard!r} unreadable: {type(e).__name__}: {e}"
            for u in wanted:
                if u not in self._bytes and u not in self._errors:
                    self._errors[u] = f"member not found in shard {shard!r}"

    def bytes(self, uri: str) -> bytes:
        """Encoded bytes of a frame."""
        if split_member(uri):
            if uri not in self._bytes and uri not in self._errors:
                self.prefetch([uri])
            if uri in self._errors:
                raise KeyError(self._errors[uri])
            data = self._bytes[uri]
            if data is None:
                raise KeyError(f"null image bytes for {uri!r}")
            return data
        return self.loader(uri)

    def rgb(self, uri: str) -> np.ndarray:
        """(H, W, 3) uint8 upright RGB frame (decoded like the mining job did)."""
        from mining.decode import decode_image

        hit = self._frames.get(uri)
        if hit is not None:
            self._frames.move_to_end(uri)
            return hit
        arr = decode_image(self.bytes(uri))
        self._frames[uri] = arr
        while len(self._frames) > self.cache_frames:
            self._frames.popitem(last=False)
        return arr

    def pil(self, uri: str):
        """The upright frame as a PIL RGB image."""
        from PIL import Image

        return Image.fromarray(self.rgb(uri), "RGB")

    def export_file(self, uri: str) -> tuple[bytes, str]:
        """Bytes to write as a standalone frame file and its extension (".jpg" / ".png").

        The original bytes when they already show the upright 8-bit frame that the boxes refer
        to (JPEG or PNG without an EXIF rotation); otherwise the decoded upright frame re-encoded
        (JPEG, quality 95), so every labeling tool sees the pixels the boxes were mined on.
        """
        from PIL import Image

        data = self.bytes(uri)
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt, mode = im.format, im.mode
                orient = im.getexif().get(0x0112, 1)
        except Exception:
            fmt, mode, orient = None, None, 1
        if orient in (None, 1) and (fmt == "JPEG" and mode in ("RGB", "L") or
                                    fmt == "PNG" and mode in ("RGB", "RGBA", "L", "P")):
            return data, ".jpg" if fmt == "JPEG" else ".png"
        buf = io.BytesIO()
        Image.fromarray(self.rgb(uri), "RGB").save(buf, format="JPEG", quality=95)
        return buf.getvalue(), ".jpg"
