"""Active-learning export of query hits: labeling manifest, standard tool formats, review page.

``export_hits(table, out_dir, query=..., index_version=..., formats=[...])`` writes into ``out_dir``:

- always: ``manifest-<run>.jsonl/.parquet`` + ``manifest.jsonl/.parquet`` (the latest run; one row per
  frame, :mod:`mining.export.manifest`), ``contact_sheet.png`` and the review page ``gallery.html``
  (:mod:`mining.export.gallery`: crops, click-through frames, accept/reject -> feedback JSON);
- per ``formats`` (:mod:`mining.export.formats`): ``coco`` (``coco.json``), ``labelstudio``
  (``labelstudio/tasks.json`` + ``config.xml``), ``cvat`` (``cvat/`` COCO 1.0 layout +
  ``cvat_coco_1.0.zip``), ``fiftyone`` (``fiftyone/``, ``fo.types.COCODetectionDataset``); these
  need the frames, copied once into ``images/<image_id>.jpg|png``.

Frames are read by :class:`mining.export.frames.FrameReader`: image files and members of tar /
Parquet shards, locally or on S3. Width, height and sidecar metadata come from the store's ``images``
table (``data_root``, normally the index manifest's), else from decoding the frame.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import uuid
from typing import Callable

import pyarrow as pa

from mining.export.formats import FORMATS, ExportError, check_formats
from mining.export.frames import FrameReader, read_uri_bytes, split_member
from mining.export.gallery import FEEDBACK_FORMAT, contact_sheet, review_page
from mining.export.manifest import (MANIFEST_SCHEMA, exported_image_ids, frame_info, hit_id_of, manifest_rows,
                                    patch_id_of_hit, read_manifests, write_manifest)

__all__ = ["FORMATS", "FEEDBACK_FORMAT", "MANIFEST_SCHEMA", "ExportError", "FrameReader", "check_formats",
           "contact_sheet", "default_category", "export_hits", "exported_image_ids", "frame_info", "hit_id_of",
           "manifest_rows", "patch_id_of_hit", "read_manifests", "read_uri_bytes", "review_page", "split_member",
           "write_manifest"]


def default_category(query: dict | str, campaign: str = "") -> str:
    """The one COCO / Label Studio category of an export: the campaign, else the text query, else "hit"."""
    if campaign:
        return campaign
    if isinstance(query, dict) and query.get("type") == "text" and query.get("text"):
        return str(query["text"])
    return "hit"


def export_hits(table: pa.Table, out_dir: str, *, query: dict | str, index_version: str, model: str = "",
                random_init: bool = False, loader: Callable[[str], bytes] | None = None,
                run_id: str | None = None, formats=None, category: str | None = None,
                url_prefix: str | None = None, url_expiry: int = 3600, data_root: str | None = None,
                campaign: str = "") -> dict:
    """Write the manifest, contact sheet, review page and the requested tool formats for a result table.

    Args:
        table: query result (``mining.query.RESULT_SCHEMA``). out_dir: local export directory.
        formats: any of :data:`FORMATS` (list, or comma-separated strings); "manifest" is always written.
        category: the label name (default :func:`default_category`). url_prefix / url_expiry: Label
            Studio frame URLs (``formats.frame_url``). data_root: store root for width/height/metadata.
        loader: ``uri -> bytes`` for plain frame files (default fsspec).
    Returns:
        {"run_id", "manifest_jsonl", "manifest_parquet", "contact_sheet", "gallery", "images", "hits",
         "formats": {name: path(s)}, "unreadable": [uri, ...]}.
    Raises:
        ExportError: unknown format or unusable ``url_prefix`` (nothing is half-written for those).
    """
    from mining.export import formats as F

    fmts = check_formats(formats)
    if url_prefix is not None and url_prefix != "s3-presign" and not url_prefix.strip():
        raise ExportError("--url-prefix is empty")
    run_id = run_id or _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    category = category or default_category(query, campaign)
    reader = FrameReader(loader)
    reader.prefetch(table.column("image_uri").to_pylist() if table.num_rows else [])
    ids = [x for x in (table.column("image_id").to_pylist() if table.num_rows else []) if x]
    rows = manifest_rows(table, query=query, index_version=index_version, model=model, random_init=random_init,
                         run_id=run_id, info=frame_info(data_root, ids), campaign=campaign, category=category)
    from mining.export.manifest import fill_sizes

    unreadable = fill_sizes(rows, reader)
    out: dict = {}
    files: dict[str, str] = {}
    if any(f != "manifest" for f in fmts):
        files = F.write_frames(rows, out_dir, reader)
        unreadable = sorted(set(unreadable) | {r["image_uri"] for r in rows if r["image_uri"] not in files})
    if "labelstudio" in fmts:  # first: a bad --url-prefix fails before the other files are written
        out["labelstudio"] = F.write_labelstudio(rows, files, out_dir, category, url_prefix, url_expiry)
    paths = write_manifest(rows, out_dir, run_id)
    if "coco" in fmts:
        out["coco"] = F.write_coco(rows, files, out_dir, category)
    if "cvat" in fmts:
        out["cvat"] = F.write_cvat(rows, files, out_dir, category)
    if "fiftyone" in fmts:
        out["fiftyone"] = F.write_fiftyone(rows, files, out_dir, category)
    qtxt = query if isinstance(query, str) else json.dumps(query, default=str)
    title = f"{category}: query {qtxt}"
    warning = "results from RANDOMLY INITIALISED CLIP weights: not semantic" if random_init else None
    sheet = contact_sheet(table, os.path.join(out_dir, "contact_sheet.png"), reader=reader,
                          title=("[random CLIP weights] " if random_init else "") + title)
    gallery = review_page(table, rows, out_dir, reader=reader, title=title, warning=warning, category=category,
                          campaign=campaign)
    return {"run_id": run_id, "manifest_jsonl": paths["jsonl"], "manifest_parquet": paths["parquet"],
            "contact_sheet": sheet, "gallery": gallery, "images": len(rows), "hits": table.num_rows,
            "formats": out, "unreadable": unreadable, "category": category}
