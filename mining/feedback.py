"""Labels come back: read a labeling tool's export of our hits, record it as a campaign round.

Readers (format detected from the file, or forced with ``fmt``):

- ``gallery``: the review page's ``feedback-<run>.json`` (``"format": "fleet-mining-feedback"``):
  every listed hit has its verdict.
- ``labelstudio``: Label Studio's JSON export (a list of tasks with ``annotations``). A task counts
  as reviewed when it has a submitted, not cancelled annotation (the last one is used). A predicted hit
  whose region (same region ``id`` = hit id) is still there is accepted, or rejected when re-labeled
  ``reject``; a predicted hit the labeler deleted is rejected; a moved box is accepted and corrected;
  a new region with the category is an added box.
- ``coco``: a COCO detection file from any tool (CVAT's "COCO 1.0" export, FiftyOne's, ours edited).
  The frames in it are the reviewed ones (matched by ``fleet_image_id`` or by the file stem, which
  is the image id); its annotations are the truth. A shown hit (from the annotation's ``hit_id``
  when the tool kept it, else from the export's manifest) is accepted when an annotation of the
  category overlaps it with IoU >= 0.5 (one-to-one, best first), else rejected; annotations labeled
  ``reject`` reject the hit they overlap; other annotations are added boxes.
- ``datumaro``: Datumaro's JSON (``annotations/default.json``, CVAT's "Datumaro 1.0" export), read
  like COCO.

Added boxes are matched to a mined patch of the same frame (IoU >= 0.5, the index metadata) so
that their embeddings are known; otherwise they are stored with a null patch id.
"""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np

IOU_MATCH = 0.5
READERS = ("gallery", "labelstudio", "coco", "datumaro")


class LabelsError(ValueError):
    """A labels file that cannot be read as the expected format. One line for the user."""


def iou(a, b) -> float:
    """Intersection over union of two boxes x0, y0, x1, y1 (x1/y1 exclusive)."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def detect_format(obj) -> str:
    """Which reader a parsed JSON document needs. Raises LabelsError."""
    from mining.export import FEEDBACK_FORMAT

    if isinstance(obj, dict) and obj.get("format") == FEEDBACK_FORMAT:
        return "gallery"
    if isinstance(obj, dict) and "images" in obj and "annotations" in obj:
        return "coco"
    if isinstance(obj, dict) and "items" in obj and "categories" in obj:
        return "datumaro"
    if isinstance(obj, list) and (not obj or isinstance(obj[0], dict) and "data" in obj[0]):
        return "labelstudio"
    raise LabelsError("cannot tell the labels format: expected a review-page feedback JSON, a Label Studio "
                      "JSON export, a COCO file or a Datumaro JSON file")


def _row(hit: dict, label: str, box=None, corrected=False, added=False, category="") -> dict:
    b = [int(round(v)) for v in (box if box is not None else hit["box"])]
    return {"hit_id": hit.get("hit_id", ""), "patch_id": hit.get("patch_id"), "image_id": hit.get("image_id", ""),
            "image_uri": hit.get("image_uri", ""), "x0": b[0], "y0": b[1], "x1": b[2], "y1": b[3], "label": label,
            "corrected": corrected, "added": added, "category": category, "run_id": hit.get("run_id", "")}


def read_gallery(doc: dict) -> list[dict]:
    from mining.export import patch_id_of_hit

    rows = []
    for h in doc.get("hits", []):
        v = h.get("verdict")
        if v not in ("accepted", "rejected"):
            raise LabelsError(f"hit {h.get('hit_id')!r} has verdict {v!r}; expected accepted or rejected")
        try:  # the hit id is authoritative (a browser's JSON numbers cannot hold 63-bit patch ids)
            pid = patch_id_of_hit(h["hit_id"])
        except ValueError as e:
            raise LabelsError(str(e)) from None
        rows.append(_row({**h, "patch_id": pid, "run_id": doc.get("run_id", "")},
                         "positive" if v == "accepted" else "negative", category=doc.get("category", "")))
    return rows


def _ls_box(value: dict, W: int, H: int) -> list[float]:
    x, y = value["x"] * W / 100.0, value["y"] * H / 100.0
    return [x, y, x + value["width"] * W / 100.0, y + value["height"] * H / 100.0]


def read_labelstudio(tasks: list) -> list[dict]:
    from mining.export import patch_id_of_hit
    from mining.export.formats import REJECT_LABEL

    rows = []
    for t in tasks:
        anns = [a for a in t.get("annotations") or [] if not a.get("was_cancelled")]
        if not anns:
            continue  # not reviewed
        data = t.get("data") or {}
        preds = {}
        for p in t.get("predictions") or []:
            for r in p.get("result") or []:
                if r.get("type") == "rectanglelabels":
                    preds[r["id"]] = r
        final = {r.get("id"): r for r in anns[-1].get("result") or [] if r.get("type") == "rectanglelabels"}
        base = {"image_id": data.get("image_id", ""), "image_uri": data.get("image_uri", ""),
                "run_id": data.get("run_id", "")}
        for hid, p in preds.items():
            W, H = p["original_width"], p["original_height"]
            box0 = _ls_box(p["value"], W, H)
            cat = (p["value"].get("rectanglelabels") or [""])[0]
            hit = {**base, "hit_id": hid, "patch_id": patch_id_of_hit(hid), "box": box0}
            r = final.get(hid)
            if r is None or REJECT_LABEL in (r["value"].get("rectanglelabels") or []):
                rows.append(_row(hit, "negative", category=cat))
                continue
            box1 = _ls_box(r["value"], r.get("original_width", W), r.get("original_height", H))
            moved = max(abs(a - b) for a, b in zip(box0, box1)) > 1.0
            rows.append(_row(hit, "positive", box=box1 if moved else box0, corrected=moved,
                             category=(r["value"].get("rectanglelabels") or [cat])[0]))
        for rid, r in final.items():
            labs = r["value"].get("rectanglelabels") or []
            if rid in preds or REJECT_LABEL in labs:
                continue
            box = _ls_box(r["value"], r["original_width"], r["original_height"])
            rows.append(_row({**base, "hit_id": "", "patch_id": None, "box": box}, "positive", added=True,
                             category=labs[0] if labs else ""))
    return rows


def _coco_like(doc: dict, fmt: str) -> list[tuple[dict, list[dict]]]:
    """[(image {image_id, image_uri}, [ann {box, category, hit_id}])] from COCO or Datumaro JSON."""
    out = []
    if fmt == "coco":
        cats = {c["id"]: c["name"] for c in doc.get("categories", [])}
        by_img: dict = {im["id"]: [] for im in doc.get("images", [])}
        for a in doc.get("annotations", []):
            x, y, w, h = a["bbox"]
            attrs = a.get("attributes") or {}
            by_img.setdefault(a["image_id"], []).append(
                {"box": [x, y, x + w, y + h], "category": cats.get(a.get("category_id"), ""),
                 "hit_id": a.get("hit_id") or attrs.get("hit_id") or ""})
        for im in doc.get("images", []):
            iid = im.get("fleet_image_id") or Path(im.get("file_name", "")).stem
            out.append(({"image_id": iid, "image_uri": im.get("fleet_image_uri", "")}, by_img.get(im["id"], [])))
        return out
    labels = [c["name"] for c in (doc.get("categories", {}).get("label", {}) or {}).get("labels", [])]
    for it in doc.get("items", []):
        path = ((it.get("media") or {}).get("path")) or ((it.get("image") or {}).get("path")) or it.get("id", "")
        anns = []
        for a in it.get("annotations", []):
            if a.get("type") != "bbox":
                continue
            x, y, w, h = a["bbox"]
            lid = a.get("label_id")
            anns.append({"box": [x, y, x + w, y + h], "category": labels[lid] if lid is not None and lid < len(labels)
                         else "", "hit_id": (a.get("attributes") or {}).get("hit_id", "")})
        out.append(({"image_id": Path(str(path)).stem, "image_uri": ""}, anns))
    return out


def read_coco_like(doc: dict, fmt: str, shown: dict[str, list[dict]]) -> list[dict]:
    """``shown``: image_id -> the hits the export showed ({hit_id, patch_id, box, image_uri, run_id})."""
    from mining.export import patch_id_of_hit
    from mining.export.formats import REJECT_LABEL

    rows = []
    for im, anns in _coco_like(doc, fmt):
        hits = list(shown.get(im["image_id"], []))
        known = {h["hit_id"] for h in hits}
        for a in anns:  # hits named in the file itself (our COCO, a tool that kept hit_id)
            if a["hit_id"] and a["hit_id"] not in known and a["category"] != REJECT_LABEL:
                hits.append({"hit_id": a["hit_id"], "patch_id": patch_id_of_hit(a["hit_id"]), "box": a["box"],
                             "image_id": im["image_id"], "image_uri": im["image_uri"]})
                known.add(a["hit_id"])
        for h in hits:
            h.setdefault("image_id", im["image_id"])
            if not h.get("image_uri"):
                h["image_uri"] = im["image_uri"]
        used = set()
        # candidate pairs, best IoU first (a hit_id match counts as IoU 2)
        pairs = sorted(((2.0 if a["hit_id"] and a["hit_id"] == h["hit_id"] else iou(h["box"], a["box"]), hi, ai)
                        for hi, h in enumerate(hits) for ai, a in enumerate(anns)), reverse=True)
        verdict: dict[int, tuple] = {}
        for s, hi, ai in pairs:
            if s < IOU_MATCH or hi in verdict or ai in used:
                continue
            verdict[hi] = (ai, anns[ai])
            used.add(ai)
        for hi, h in enumerate(hits):
            m = verdict.get(hi)
            if m is None or m[1]["category"] == REJECT_LABEL:
                rows.append(_row(h, "negative", category=m[1]["category"] if m else ""))
            else:
                moved = max(abs(a - b) for a, b in zip(h["box"], m[1]["box"])) > 1.0
                rows.append(_row(h, "positive", box=m[1]["box"] if moved else h["box"], corrected=moved,
                                 category=m[1]["category"]))
        for ai, a in enumerate(anns):
            if ai not in used and a["category"] != REJECT_LABEL:
                rows.append(_row({"image_id": im["image_id"], "image_uri": im["image_uri"], "hit_id": "",
                                  "patch_id": None, "box": a["box"]}, "positive", added=True, category=a["category"]))
    return rows


def find_manifests(labels_path: str) -> list[str]:
    """``manifest-*.parquet`` beside the labels file or up to two directories above it."""
    d = os.path.dirname(os.path.abspath(labels_path))
    for _ in range(3):
        found = sorted(glob.glob(os.path.join(d, "manifest-*.parquet")))
        if found:
            return found
        d = os.path.dirname(d)
    return []


def shown_hits(manifests: list[str]) -> dict[str, list[dict]]:
    """image_id -> hits shown by the given exports (latest export of a hit wins)."""
    from mining.export import read_manifests

    out: dict[str, dict[str, dict]] = {}
    for r in read_manifests(manifests):
        for box, pid, hid in zip(r["boxes"], r["patch_ids"], r["hit_ids"]):
            out.setdefault(r["image_id"], {})[hid] = {"hit_id": hid, "patch_id": int(pid), "box": list(box),
                                                       "image_id": r["image_id"], "image_uri": r["image_uri"],
                                                       "run_id": r["run_id"]}
    return {k: list(v.values()) for k, v in out.items()}


def parse_labels(path: str, *, fmt: str = "auto", manifests: list[str] | None = None) -> tuple[str, list[dict]]:
    """Read a labels file -> (format, label rows as in ``mining.labels.LABEL_SCHEMA``, without campaign/round).

    Raises:
        LabelsError: unreadable JSON, unknown or wrong format, malformed entries.
    """
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise LabelsError(f"cannot read labels file {path!r}: {e}") from None
    if fmt == "auto":
        fmt = detect_format(doc)
    elif fmt not in READERS:
        raise LabelsError(f"unknown labels format {fmt!r}; use auto or one of {list(READERS)}")
    try:
        if fmt == "gallery":
            rows = read_gallery(doc)
        elif fmt == "labelstudio":
            if not isinstance(doc, list):
                raise LabelsError("a Label Studio JSON export is a list of tasks")
            rows = read_labelstudio(doc)
        else:
            rows = read_coco_like(doc, fmt, shown_hits(manifests if manifests is not None else find_manifests(path)))
    except (KeyError, TypeError, IndexError) as e:
        raise LabelsError(f"malformed {fmt} labels in {path!r}: missing or bad field {e}") from None
    return fmt, rows


def match_added_boxes(rows: list[dict], meta) -> int:
    """Give added boxes the patch id of the mined patch of their frame with IoU >= 0.5 (best).

    ``meta``: the index metadata table (patch_id, image_id, x0..y1). Returns how many were matched.
    """
    import pyarrow.compute as pc

    todo = [r for r in rows if r["patch_id"] is None and r["image_id"]]
    if not todo or meta is None:
        return 0
    sub = meta.filter(pc.is_in(meta.column("image_id"), value_set=__import__("pyarrow").array(
        sorted({r["image_id"] for r in todo})))).select(["patch_id", "image_id", "x0", "y0", "x1", "y1"]).to_pylist()
    by_img: dict[str, list] = {}
    for p in sub:
        by_img.setdefault(p["image_id"], []).append(p)
    n = 0
    for r in todo:
        box = (r["x0"], r["y0"], r["x1"], r["y1"])
        best = max(by_img.get(r["image_id"], []), key=lambda p: iou(box, (p["x0"], p["y0"], p["x1"], p["y1"])),
                   default=None)
        if best is not None and iou(box, (best["x0"], best["y0"], best["x1"], best["y1"])) >= IOU_MATCH:
            r["patch_id"] = int(best["patch_id"])
            n += 1
    return n


def _methods_by_run(manifests: list[str]) -> dict[str, str]:
    from mining.export import read_manifests

    out = {}
    for r in read_manifests(manifests):
        try:
            q = json.loads(r.get("query") or "{}")
        except ValueError:
            q = {}
        out[r["run_id"]] = str(q.get("method") or q.get("type") or "")
    return out


def ingest(labels_path: str, campaign: str, *, data_root: str, fmt: str = "auto", manifests: list[str] | None = None,
           index_meta=None, source: str | None = None) -> dict:
    """Read a labeled export and record it as the campaign's next round in ``<data_root>/labels``.

    Returns:
        {"round", "path", "format", "accepted", "rejected", "corrected", "added", "matched_added",
         "rounds": ``mining.labels.campaign_rounds``}.
    Raises:
        LabelsError: bad labels file. ValueError: bad campaign name or nothing reviewed.
    """
    from mining.labels import campaign_rounds, check_campaign, write_round

    check_campaign(campaign)
    manifests = manifests if manifests is not None else find_manifests(labels_path)
    fmt, rows = parse_labels(labels_path, fmt=fmt, manifests=manifests)
    matched = match_added_boxes(rows, index_meta)
    methods = _methods_by_run(manifests) if manifests else {}
    for r in rows:
        r["source"] = source or fmt
        r["source_file"] = os.path.abspath(labels_path)
        r["method"] = methods.get(r.get("run_id") or "", "")
    rec = write_round(data_root, campaign, rows)
    count = lambda pred: sum(1 for r in rows if pred(r))  # noqa: E731
    return {**rec, "format": fmt,
            "accepted": count(lambda r: r["label"] == "positive" and not r["added"]),
            "rejected": count(lambda r: r["label"] == "negative"),
            "corrected": count(lambda r: r["corrected"]), "added": count(lambda r: r["added"]),
            "matched_added": matched, "rounds": campaign_rounds(data_root, campaign)}


def positives_negatives(state, patch_ids_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The campaign's positive / negative patch ids that exist in an index (int64 arrays)."""
    pos = np.asarray(sorted(set(state.positives)), np.int64)
    neg = np.asarray(sorted(set(state.negatives)), np.int64)
    keep = lambda a: a[np.isin(a, patch_ids_sorted)]  # noqa: E731
    return keep(pos), keep(neg)


def run_feedback(labels_path: str, campaign: str, *, index: str | None = None, data_root: str | None = None,
                 fmt: str = "auto", manifests: list[str] | None = None, source: str | None = None) -> dict:
    """``jobs.feedback``: resolve the store root (``data_root``, else the index manifest's), read the
    index metadata for box matching, and :func:`ingest`.

    Raises:
        FileNotFoundError: labels file or index missing. ValueError / LabelsError: bad input.
    """
    if not os.path.isfile(labels_path):
        raise FileNotFoundError(f"labels file {labels_path!r} does not exist")
    for m in manifests or []:
        if not os.path.isfile(m):
            raise FileNotFoundError(f"manifest {m!r} does not exist")
    meta = None
    if index:
        from mining.index import open_index

        idx = open_index(index)
        data_root = data_root or idx.manifest.get("data_root")
        meta = idx.metadata()
    if not data_root:
        raise ValueError("no store root: the index manifest records no data_root; pass --data")
    return ingest(labels_path, campaign, data_root=data_root, fmt=fmt, manifests=manifests, index_meta=meta,
                  source=source)
