"""The labeling manifest: one row per frame with its hits, and the frame facts tools need.

Row fields (:data:`MANIFEST_SCHEMA`): ``image_uri``, ``image_id``, ``width`` / ``height`` (pixels of the
upright frame the boxes refer to), ``metadata`` (the frame's sidecar JSON as text, "{}" when none),
``boxes`` (list of [x0, y0, x1, y1], pixels, x1/y1 exclusive), ``scores``, ``ranks``, ``patch_ids``,
``hit_ids`` (stable: :func:`hit_id_of`), ``query`` (JSON text), ``index_version``, ``model``,
``random_init``, ``exported_at`` (UTC ISO-8601), ``run_id``, ``campaign``, ``category``.
"""
from __future__ import annotations

import datetime as _dt
import glob
import json
import os
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST_SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),
        ("image_id", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("metadata", pa.string()),
        ("boxes", pa.list_(pa.list_(pa.int32(), 4))),
        ("scores", pa.list_(pa.float32())),
        ("ranks", pa.list_(pa.int32())),
        ("patch_ids", pa.list_(pa.int64())),
        ("hit_ids", pa.list_(pa.string())),
        ("query", pa.string()),
        ("index_version", pa.string()),
        ("model", pa.string()),
        ("random_init", pa.bool_()),
        ("exported_at", pa.string()),
        ("run_id", pa.string()),
        ("campaign", pa.string()),
        ("category", pa.string()),
    ]
)


def hit_id_of(patch_id: int) -> str:
    """Stable id of a hit: the 16 lowercase hex digits of its patch id (same patch -> same hit id in
    every export and every tool; :func:`patch_id_of_hit` inverts it)."""
    return f"{int(patch_id):016x}"


def patch_id_of_hit(hit_id: str) -> int:
    """Inverse of :func:`hit_id_of`. Raises ValueError for anything but 16 hex digits."""
    s = str(hit_id).strip().lower()
    if len(s) != 16 or any(c not in "0123456789abcdef" for c in s):
        raise ValueError(f"not a hit id (16 hex digits): {hit_id!r}")
    return int(s, 16)


def frame_info(data_root: str | None, image_ids: list[str]) -> dict[str, dict]:
    """width, height and metadata (JSON text) of frames from the store's ``images`` table.

    Args:
        data_root: mining store root (local or s3://), usually the index manifest's ``data_root``.
        image_ids: frames to look up (the filter is pushed down to the Parquet scan).
    Returns:
        {image_id: {"width", "height", "metadata"}}; frames not found (or no root) are absent.
    """
    if not data_root or not image_ids:
        return {}
    import pyarrow.compute as pc

    from mining.store import open_images

    try:
        ds = open_images(data_root)
        t = ds.to_table(columns=["image_id", "width", "height", "metadata"],
                        filter=pc.field("image_id").isin(sorted(set(image_ids))))
    except (FileNotFoundError, OSError, ValueError):
        return {}
    return {r["image_id"]: {"width": r["width"], "height": r["height"], "metadata": r["metadata"] or "{}"}
            for r in t.to_pylist()}


def manifest_rows(table: pa.Table, *, query: dict | str, index_version: str, model: str = "",
                  random_init: bool = False, run_id: str | None = None, exported_at: str | None = None,
                  info: dict[str, dict] | None = None, campaign: str = "", category: str = "") -> list[dict]:
    """Group result rows (``mining.query.RESULT_SCHEMA``) by frame, in order of each frame's best rank.

    ``info``: {image_id: {"width", "height", "metadata"}} (:func:`frame_info`); frames missing there
    get width/height 0 and metadata "{}" until :func:`fill_sizes` fills them.
    """
    run_id = run_id or uuid.uuid4().hex[:12]
    exported_at = exported_at or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    qtext = query if isinstance(query, str) else json.dumps(query, sort_keys=True, default=str)
    info = info or {}
    by_img: dict[str, dict] = {}
    for r in table.to_pylist():
        row = by_img.get(r["image_uri"])
        if row is None:
            fi = info.get(r.get("image_id") or "", {})
            row = by_img[r["image_uri"]] = dict(
                image_uri=r["image_uri"], image_id=r.get("image_id") or "", width=int(fi.get("width") or 0),
                height=int(fi.get("height") or 0), metadata=fi.get("metadata") or "{}", boxes=[], scores=[],
                ranks=[], patch_ids=[], hit_ids=[], query=qtext, index_version=str(index_version or ""),
                model=model or "", random_init=bool(random_init), exported_at=exported_at, run_id=run_id,
                campaign=campaign or "", category=category or "")
        row["boxes"].append([int(r["x0"]), int(r["y0"]), int(r["x1"]), int(r["y1"])])
        row["scores"].append(float(r["score"]))
        row["ranks"].append(int(r["rank"]))
        row["patch_ids"].append(int(r["patch_id"]))
        row["hit_ids"].append(hit_id_of(r["patch_id"]))
    return list(by_img.values())


def fill_sizes(rows: list[dict], reader) -> list[str]:
    """Set width/height of rows that lack them by decoding the frame (``FrameReader``).

    Returns: the image URIs that could not be read (their size stays 0).
    """
    bad = []
    for r in rows:
        if r["width"] > 0 and r["height"] > 0:
            continue
        try:
            h, w = reader.rgb(r["image_uri"]).shape[:2]
            r["width"], r["height"] = int(w), int(h)
        except Exception:
            bad.append(r["image_uri"])
    return bad


def write_manifest(rows: list[dict], out_dir: str, run_id: str) -> dict:
    """Write ``manifest-<run_id>.jsonl/.parquet`` and the ``manifest.jsonl/.parquet`` copies (latest).

    Returns: {"jsonl": path, "parquet": path} of the per-run files.
    """
    os.makedirs(out_dir, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    paths = {}
    for name in (f"manifest-{run_id}", "manifest"):
        jl = os.path.join(out_dir, name + ".jsonl")
        with open(jl + ".tmp", "w") as f:
            for r in rows:
                f.write(json.dumps(r, sort_keys=True) + "\n")
        os.replace(jl + ".tmp", jl)
        pqp = os.path.join(out_dir, name + ".parquet")
        pq.write_table(table, pqp + ".tmp")
        os.replace(pqp + ".tmp", pqp)
        if name != "manifest":
            paths = {"jsonl": jl, "parquet": pqp}
    return paths


def read_manifests(paths: list[str]) -> list[dict]:
    """Rows of manifest Parquet / JSONL files (older manifests without the new columns read too)."""
    rows = []
    for p in paths:
        if p.endswith(".parquet"):
            rows += pq.read_table(p).to_pylist()
        else:
            with open(p) as f:
                rows += [json.loads(x) for x in f if x.strip()]
    for r in rows:
        if not r.get("hit_ids"):
            r["hit_ids"] = [hit_id_of(p) for p in r.get("patch_ids") or []]
    return rows


def exported_image_ids(out_dir: str) -> set[str]:
    """Image ids in every earlier ``manifest-*.parquet`` under ``out_dir`` (for --exclude-exported)."""
    ids: set[str] = set()
    for p in glob.glob(os.path.join(out_dir, "manifest-*.parquet")):
        ids.update(x for x in pq.read_table(p, columns=["image_id"]).column("image_id").to_pylist() if x)
    return ids
