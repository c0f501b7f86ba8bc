"""Standard labeling-tool exports of query hits: COCO, Label Studio, CVAT, FiftyOne.

All of them start from the manifest rows (:mod:`mining.export.manifest`, one per frame, with width,
height and hits) and from the frame copies written by :func:`write_frames` into ``<out>/images/``
as ``<image_id>.jpg|.png`` (frames in tar/Parquet shards have no file a tool could open). The file
stem is the image id, which is how labels come back (:mod:`mining.feedback`).

- ``coco``: ``coco.json``, COCO detection (``images`` with width/height, ONE category = the query /
  campaign, the hits as ``annotations`` with ``bbox`` [x, y, w, h] in pixels, ``score``, ``hit_id``,
  ``patch_id``, ``rank``). Loads with ``pycocotools.coco.COCO`` and ``COCO.loadRes``.
- ``labelstudio``: ``labelstudio/tasks.json`` (a JSON list of tasks, the ``.json`` Label Studio
  imports) with ``predictions`` in percent coordinates (``rectanglelabels``, one region per hit, region
  ``id`` = hit id, ``score``) and ``labelstudio/config.xml``, the labeling config to paste in the
  project. ``url_prefix`` makes the frame URLs (see :func:`frame_url`).
- ``cvat``: ``cvat/`` in the COCO 1.0 layout CVAT and Datumaro import
  (``annotations/instances_default.json`` + ``images/default/<frame files>``) and
  ``cvat_coco_1.0.zip`` (the annotations alone, for CVAT's "Upload annotations" on a task made from
  the frame files).
- ``fiftyone``: ``fiftyone/`` in ``fo.types.COCODetectionDataset`` layout (``data/`` + ``labels.json``).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import zipfile
from xml.sax.saxutils import quoteattr

FORMATS = ("manifest", "coco", "labelstudio", "cvat", "fiftyone")
REJECT_LABEL = "reject"


class ExportError(ValueError):
    """Bad export settings (unknown format, unusable URL prefix, ...). One line for the user."""


def check_formats(formats) -> list[str]:
    """Validate ``--format`` values ("coco,labelstudio" or a list). Raises ExportError."""
    out: list[str] = []
    for f in formats or ["manifest"]:
        for x in str(f).split(","):
            x = x.strip().lower().replace("label-studio", "labelstudio")
            if not x:
                continue
            if x not in FORMATS:
                raise ExportError(f"unknown export format {x!r}; use one or more of {', '.join(FORMATS)}")
            if x not in out:
                out.append(x)
    return out or ["manifest"]


def _link(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if os.path.exists(dst):
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_frames(rows: list[dict], out_dir: str, reader) -> dict[str, str]:
    """Write each frame once as ``<out>/images/<image_id><ext>`` (see ``FrameReader.export_file``).

    Returns: {image_uri: file name}; frames that cannot be read are left out (the caller reports them).
    """
    d = os.path.join(out_dir, "images")
    os.makedirs(d, exist_ok=True)
    names = {}
    for r in rows:
        try:
            data, ext = reader.export_file(r["image_uri"])
        except Exception:
            continue
        name = f"{r['image_id']}{ext}"
        with open(os.path.join(d, name + ".tmp"), "wb") as f:
            f.write(data)
        os.replace(os.path.join(d, name + ".tmp"), os.path.join(d, name))
        names[r["image_uri"]] = name
    return names


def coco_dict(rows: list[dict], files: dict[str, str], category: str, *, prefix: str = "",
              description: str = "") -> dict:
    """COCO detection dict of the hits. ``files``: image_uri -> frame file name (rows without a file
    are skipped); ``prefix`` is put before each ``file_name`` (e.g. "images/")."""
    images, anns = [], []
    for r in rows:
        if r["image_uri"] not in files:
            continue
        iid = len(images) + 1
        images.append({"id": iid, "file_name": prefix + files[r["image_uri"]], "width": int(r["width"]),
                       "height": int(r["height"]), "fleet_image_id": r["image_id"], "fleet_image_uri": r["image_uri"]})
        for box, s, rk, pid, hid in zip(r["boxes"], r["scores"], r["ranks"], r["patch_ids"], r["hit_ids"]):
            w, h = box[2] - box[0], box[3] - box[1]
            anns.append({"id": len(anns) + 1, "image_id": iid, "category_id": 1,
                         "bbox": [float(box[0]), float(box[1]), float(w), float(h)], "area": float(w * h),
                         "iscrowd": 0, "score": round(float(s), 6), "rank": int(rk), "hit_id": hid,
                         "patch_id": int(pid), "attributes": {"hit_id": hid, "score": round(float(s), 6)}})
    first = rows[0] if rows else {}
    return {
        "info": {"description": description or f"fleet-mining hits for {category!r}",
                 "version": str(first.get("index_version", "")),
                 "date_created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                 "run_id": first.get("run_id", ""), "query": first.get("query", ""),
                 "campaign": first.get("campaign", "")},
        "licenses": [],
        "categories": [{"id": 1, "name": category, "supercategory": "query"}],
        "images": images,
        "annotations": anns,
    }


def _dump(obj, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def write_coco(rows, files, out_dir: str, category: str) -> str:
    return _dump(coco_dict(rows, files, category, prefix="images/"), os.path.join(out_dir, "coco.json"))


def write_cvat(rows, files, out_dir: str, category: str) -> dict:
    d = os.path.join(out_dir, "cvat")
    for name in files.values():
        _link(os.path.join(out_dir, "images", name), os.path.join(d, "images", "default", name))
    ann = _dump(coco_dict(rows, files, category), os.path.join(d, "annotations", "instances_default.json"))
    z = os.path.join(out_dir, "cvat_coco_1.0.zip")
    with zipfile.ZipFile(z + ".tmp", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(ann, "annotations/instances_default.json")
    os.replace(z + ".tmp", z)
    return {"dir": d, "zip": z}


def write_fiftyone(rows, files, out_dir: str, category: str) -> str:
    d = os.path.join(out_dir, "fiftyone")
    for name in files.values():
        _link(os.path.join(out_dir, "images", name), os.path.join(d, "data", name))
    _dump(coco_dict(rows, files, category), os.path.join(d, "labels.json"))
    return d


def frame_url(uri: str, file_name: str | None, out_dir: str, url_prefix: str | None, expiry_s: int) -> str:
    """The URL Label Studio loads a frame from.

    - ``url_prefix`` None: Label Studio's local-files serving of the exported copy,
      ``/data/local-files/?d=<absolute path without the leading />`` (start Label Studio with
      ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=/``);
    - ``"s3-presign"``: a presigned HTTPS URL of the frame's own ``s3://`` object, valid ``expiry_s``
      seconds (plain S3 files only: a shard member has no object of its own);
    - any other string: ``url_prefix + "images/<file>"`` (the copy's path relative to the export
      directory), e.g. ``/data/local-files/?d=exports/q1/`` or ``https://frames.example/q1/``.

    Raises:
        ExportError: presigning a non-S3 or shard-member frame, or a frame without an exported copy.
    """
    from mining.export.frames import split_member

    if url_prefix == "s3-presign":
        if not uri.startswith("s3://") or split_member(uri):
            raise ExportError(f"--url-prefix s3-presign needs plain s3:// frame files; {uri!r} is not one "
                              f"(use a prefix that serves the exported copies instead)")
        from mining.fs import get_fs

        fs, path = get_fs(uri)
        return fs.url(path, expires=int(expiry_s))
    if file_name is None:
        raise ExportError(f"frame {uri!r} could not be read, so it has no exported copy to link")
    if url_prefix is None:
        return "/data/local-files/?d=" + os.path.abspath(os.path.join(out_dir, "images", file_name)).lstrip("/")
    return url_prefix + "images/" + file_name


def labelstudio_config(category: str) -> str:
    """Label Studio labeling config: the frame, one rectangle label for the category and a ``reject``
    label (re-label a predicted box ``reject``, or delete it, to reject that hit)."""
    return (
        "<View>\n"
        '  <Header value="$image_uri"/>\n'
        '  <Image name="image" value="$image" zoom="true" zoomControl="true"/>\n'
        '  <RectangleLabels name="label" toName="image">\n'
        f'    <Label value={quoteattr(category)} background="#2ca02c"/>\n'
        f'    <Label value={quoteattr(REJECT_LABEL)} background="#d62728"/>\n'
        "  </RectangleLabels>\n"
        "</View>\n"
    )


def labelstudio_tasks(rows, files, out_dir: str, category: str, url_prefix: str | None = None,
                      expiry_s: int = 3600) -> list[dict]:
    """Label Studio tasks with predictions (percent coordinates of the upright frame)."""
    tasks = []
    for r in rows:
        W, H = int(r["width"]), int(r["height"])
        if W <= 0 or H <= 0:
            continue
        url = frame_url(r["image_uri"], files.get(r["image_uri"]), out_dir, url_prefix, expiry_s)
        result = []
        for box, s, hid in zip(r["boxes"], r["scores"], r["hit_ids"]):
            result.append({
                "id": hid, "type": "rectanglelabels", "from_name": "label", "to_name": "image",
                "original_width": W, "original_height": H, "image_rotation": 0, "score": round(float(s), 6),
                "value": {"x": 100.0 * box[0] / W, "y": 100.0 * box[1] / H, "width": 100.0 * (box[2] - box[0]) / W,
                          "height": 100.0 * (box[3] - box[1]) / H, "rotation": 0, "rectanglelabels": [category]},
            })
        tasks.append({
            "data": {"image": url, "image_uri": r["image_uri"], "image_id": r["image_id"], "run_id": r["run_id"],
                     "campaign": r.get("campaign", ""), "hit_ids": list(r["hit_ids"])},
            "predictions": [{"model_version": r.get("index_version") or "fleet-mining",
                             "score": round(float(max(r["scores"])), 6) if r["scores"] else 0.0, "result": result}],
        })
    return tasks


def write_labelstudio(rows, files, out_dir: str, category: str, url_prefix: str | None = None,
                      expiry_s: int = 3600) -> dict:
    d = os.path.join(out_dir, "labelstudio")
    tasks = _dump(labelstudio_tasks(rows, files, out_dir, category, url_prefix, expiry_s),
                  os.path.join(d, "tasks.json"))
    cfg = os.path.join(d, "config.xml")
    with open(cfg, "w") as f:
        f.write(labelstudio_config(category))
    return {"tasks": tasks, "config": cfg}
