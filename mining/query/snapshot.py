"""One loaded index version and the metadata arrays every query reads: :class:`IndexSnapshot`.

Design decisions:

- **Immutable, swapped whole.** A snapshot is built completely (index opened, metadata mapped,
  lookup arrays made) before :meth:`mining.query.QueryEngine.reload` swaps it in with one reference
  assignment. A query pins the snapshot it started with, so queries in flight finish on the old
  version and no query ever sees two versions.
- **Patch ids -> (image id, box, date)** through the Arrow patch metadata (``meta.arrow``,
  memory-mapped; only fixed-width columns and dictionary codes are held in RAM): ``patch_ids``
  sorted for ``searchsorted`` lookups, boxes as one (N, 4) int32 array, image ids and dates as
  dictionary codes. String columns stay in the memory-mapped table and are only taken for the
  final hits, from the few record batches that hold them.
- **Filter masks** are computed on these codes: a date range becomes a mask over the (small)
  date dictionary, excluded image ids a set of image codes, a ``where`` SQL condition a mask over
  the image dictionary (computed once per expression by DuckDB, :mod:`mining.where`, and cached on
  the snapshot).
- Other modules cache per-version data on the snapshot's ``__dict__`` (``mining.novel``'s rarity
  arrays); it dies with the snapshot at the next reload.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mining.query.validation import QueryError

RANDOM_INIT_QUERY_WARNING = (
    "index {where} was built from embeddings made with RANDOMLY INITIALISED CLIP weights "
    "(--clip-random-init): query results are not semantic"
)


def _manifest_random_init(manifest: Mapping[str, Any]) -> bool:
    """True when the manifest says the index embeddings came from randomly initialised CLIP weights."""
    if manifest.get("random_init"):
        return True
    models = manifest.get("models") or [manifest.get("model") or ""]
    if isinstance(models, str):
        models = [models]
    return any(str(m).endswith("/random-init") for m in models)


class IndexSnapshot:
    """One immutable index version plus the lookup arrays queries need.

    Holds the ``PatchIndex`` and, from its Arrow metadata (memory-mapped ``meta.arrow``):
    ``patch_ids`` (N,) int64 sorted, ``boxes`` (N, 4) int32, ``image_codes`` (N,) int32
    (dictionary codes of image_id), ``date_codes`` (N,) int32 and the dictionaries.
    String columns stay in the memory-mapped table and are only ``take``-n for the final hits.

    Args:
        index: an opened ``PatchIndex``-like object (``dim``, ``ntotal``, ``metadata()``,
            ``search``, ``reconstruct_exact``; optional ``version`` and ``manifest``).
        root: the index root it was opened from (None for an index object given directly).
    """

    def __init__(self, index: Any, root: str | None = None):
        t0 = time.perf_counter()
        self.index = index
        self.root = root
        self.version = str(getattr(index, "version", "") or "")
        self.manifest = dict(getattr(index, "manifest", {}) or {})
        self.dim = int(index.dim)
        self.ntotal = int(index.ntotal)
        self.kind = str(self.manifest.get("kind", "flat"))
        self.random_init = _manifest_random_init(self.manifest)
        meta = index.metadata()
        self.meta = meta
        pid = meta.column("patch_id")
        self.patch_ids = pid.to_numpy() if pid.num_chunks == 1 else pid.combine_chunks().to_numpy()
        if len(self.patch_ids) > 1 and not np.all(self.patch_ids[1:] > self.patch_ids[:-1]):
            order = np.argsort(self.patch_ids, kind="stable")
            self.meta = meta = meta.take(pa.array(order))
            self.patch_ids = meta.column("patch_id").combine_chunks().to_numpy()
        self.boxes = np.stack([meta.column(c).to_numpy() for c in ("x0", "y0", "x1", "y1")], axis=1).astype(np.int32)
        img = pc.dictionary_encode(meta.column("image_id")).combine_chunks()
        self.image_codes = img.indices.to_numpy(zero_copy_only=False).astype(np.int32)
        self.image_dict = img.dictionary
        if "date" in meta.column_names:
            d = pc.dictionary_encode(meta.column("date")).combine_chunks()
            self.date_codes = d.indices.to_numpy(zero_copy_only=False).astype(np.int32)
            self.date_dict = np.asarray(d.dictionary.to_pylist(), dtype=object)
        else:
            self.date_codes = np.zeros(len(self.patch_ids), np.int32)
            self.date_dict = np.asarray([""], dtype=object)
        self._out_cols = [c for c in ("patch_id", "image_id", "image_uri", "x0", "y0", "x1", "y1", "date", "level")
                          if c in meta.column_names]
        # per-record-batch views: ``take`` on a multi-chunk (memory-mapped) table would first
        # concatenate whole string columns (tens of ms at 1M rows); taking from the few batches
        # that hold the hits touches only those rows
        self._batches = self.meta.select(self._out_cols).to_batches()
        lens = np.asarray([b.num_rows for b in self._batches], np.int64)
        self._batch_starts = np.concatenate([[0], np.cumsum(lens)[:-1]]) if len(lens) else np.zeros(0, np.int64)
        self.load_s = time.perf_counter() - t0

    def take(self, rows: np.ndarray) -> pa.Table:
        """Output columns of metadata ``rows`` ((n,) int positions), in the given order."""
        rows = np.asarray(rows, np.int64)
        if len(self._batches) == 1:
            return pa.Table.from_batches([self._batches[0].take(pa.array(rows))])
        b = np.searchsorted(self._batch_starts, rows, side="right") - 1
        order = np.argsort(b, kind="stable")
        parts = []
        for bi in np.unique(b):
            sel = rows[order][b[order] == bi] - self._batch_starts[bi]
            parts.append(self._batches[bi].take(pa.array(sel)))
        t = pa.Table.from_batches(parts).combine_chunks()
        inv = np.empty(len(rows), np.int64)
        inv[order] = np.arange(len(rows))
        return t.take(pa.array(inv))

    def rows_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n,) int64 patch ids -> ((n,) int64 row positions, (n,) bool found mask)."""
        pos = np.searchsorted(self.patch_ids, ids)
        pos = np.minimum(pos, max(len(self.patch_ids) - 1, 0))
        found = (ids >= 0) & (len(self.patch_ids) > 0)
        if len(self.patch_ids):
            found &= self.patch_ids[pos] == ids
        return pos, found

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """(n,) int64 patch ids -> (n, dim) float32 stored exact vectors (``reconstruct_exact``)."""
        if not len(ids):
            return np.zeros((0, self.dim), np.float32)
        return np.asarray(self.index.reconstruct_exact(ids), np.float32)

    def filter_mask(self, rows: np.ndarray, filters: dict) -> np.ndarray:
        """(n,) bool: which metadata rows pass the (validated) filters.

        Raises:
            QueryError: a ``where`` condition DuckDB rejects.
        """
        mask = np.ones(len(rows), bool)
        if "date_from" in filters or "date_to" in filters:
            lo, hi = filters.get("date_from", ""), filters.get("date_to", "9999-99-99")
            ok_dates = np.asarray([lo <= str(d) <= hi for d in self.date_dict], bool)
            mask &= ok_dates[self.date_codes[rows]]
        if "exclude_image_ids" in filters:
            codes = pc.index_in(pa.array(filters["exclude_image_ids"], pa.string()), value_set=self.image_dict)
            bad = codes.drop_null().to_numpy().astype(np.int32)
            if len(bad):
                mask &= ~np.isin(self.image_codes[rows], bad)
        if "where" in filters:
            mask &= self.where_mask(filters["where"])[self.image_codes[rows]]
        return mask

    def where_mask(self, where: str) -> np.ndarray:
        """(n images,) bool over the image dictionary: frames whose metadata satisfy ``where``
        (:func:`mining.where.image_dict_mask`, cached per expression). Raises QueryError."""
        from mining.where import WhereError, image_dict_mask

        cache = self.__dict__.setdefault("_where_cache", {})
        if where not in cache:
            try:
                cache[where] = image_dict_mask(self.manifest.get("data_root"), where, self.image_dict)
            except WhereError as e:
                raise QueryError(str(e)) from None
            while len(cache) > 16:
                cache.pop(next(iter(cache)))
        return cache[where]


# --------------------------------------------------------------------------- index access

def _current_version(root: str) -> str | None:
    """The version ``<root>/CURRENT`` names (None when nothing is published)."""
    from mining.index import current_version

    return current_version(root)


def _open_index(root: str, version: str | None = None):
    """``mining.index.open_index(root, version)``; raises FileNotFoundError when there is none."""
    from mining.index import open_index

    return open_index(root, version=version)
