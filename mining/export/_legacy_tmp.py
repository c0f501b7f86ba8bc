"""Active-learning export of query hits: labeling manifest, contact sheet, static HTML gallery.

``export_hits(table, out_dir, query=..., index_version=...)`` writes into ``out_dir``:

- ``manifest-<run>.jsonl`` and ``manifest-<run>.parquet`` (and copies ``manifest.jsonl`` /
  ``manifest.parquet`` = the latest run): ONE ROW PER IMAGE, the unit a labeler works on:
  ``image_uri``, ``image_id``, ``boxes`` (list of [x0, y0, x1, y1], pixels, x1/y1 exclusive),
  ``scores``, ``ranks``, ``patch_ids``, ``query`` (JSON text), ``index_version``, ``model``,
  ``random_init``, ``exported_at`` (UTC ISO-8601), ``run_id``;
- ``contact_sheet.png``: the hit crops in rank order, each with "#rank score" under it (the way
  the thesis presents retrieval results, Fig. 4.3 / 4.7);
- ``gallery.html`` + ``gallery/<image_id>.jpg``: a static page with every hit frame, the hit boxes
  drawn on it with their rank and score, and the manifest as a table.

:func:`exported_image_ids` reads all earlier manifests of a directory (``--exclude-exported``).
Image URIs are read with :func:`mining.fs.get_fs` (local paths or s3://).
"""
from __future__ import annotations

import datetime as _dt
import glob
import html
import io
import json
import math
import os
import uuid
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST_SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),
        ("image_id", pa.string()),
        ("boxes", pa.list_(pa.list_(pa.int32(), 4))),
        ("scores", pa.list_(pa.float32())),
        ("ranks", pa.list_(pa.int32())),
        ("patch_ids", pa.list_(pa.int64())),
        ("query", pa.string()),
        ("index_version", pa.string()),
        ("model", pa.string()),
        ("random_init", pa.bool_()),
        ("exported_at", pa.string()),
        ("run_id", pa.string()),
    ]
)


def read_uri_bytes(uri: str) -> bytes:
    """Bytes of a local path or s3:// object."""
    from mining.fs import get_fs

    fs, path = get_fs(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def _load_rgb(uri: str, loader: Callable[[str], bytes]):
    from PIL import Image

    im = Image.open(io.BytesIO(loader(uri)))
    im.load()
    return im.convert("RGB")


def manifest_rows(table: pa.Table, *, query: dict | str, index_version: str, model: str = "",
                  random_init: bool = False, run_id: str | None = None, exported_at: str | None = None) -> list[dict]:
    """Group result rows (``mining.query.RESULT_SCHEMA``) by image, in order of each image's best rank."""
    run_id = run_id or uuid.uuid4().hex[:12]
    exported_at = exported_at or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    qtext = query if isinstance(query, str) else json.dumps(query, sort_keys=True, default=str)
    by_img: dict[str, dict] = {}
    for r in table.to_pylist():
        row = by_img.get(r["image_uri"])
        if row is None:
            row = by_img[r["image_uri"]] = dict(
                image_uri=r["image_uri"], image_id=r.get("image_id") or "", boxes=[], scores=[], ranks=[],
                patch_ids=[], query=qtext, index_version=str(index_version or ""), model=model or "",
                random_init=bool(random_init), exported_at=exported_at, run_id=run_id)
        row["boxes"].append([int(r["x0"]), int(r["y0"]), int(r["x1"]), int(r["y1"])])
        row["scores"].append(float(r["score"]))
        row["ranks"].append(int(r["rank"]))
        row["patch_ids"].append(int(r["patch_id"]))
    return list(by_img.values())


def write_manifest(rows: list[dict], out_dir: str, run_id: str) -> dict:
    """Write ``manifest-<run_id>.jsonl/.parquet`` and the ``manifest.jsonl/.parquet`` copies.

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


def exported_image_ids(out_dir: str) -> set[str]:
    """Image ids in every earlier ``manifest-*.parquet`` under ``out_dir`` (for --exclude-exported)."""
    ids: set[str] = set()
    for p in glob.glob(os.path.join(out_dir, "manifest-*.parquet")):
        ids.update(x for x in pq.read_table(p, columns=["image_id"]).column("image_id").to_pylist() if x)
    return ids


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # old Pillow
        return ImageFont.load_default()


def contact_sheet(table: pa.Table, path: str, *, tile: int = 160, cols: int | None = None,
                  loader: Callable[[str], bytes] = read_uri_bytes, title: str | None = None) -> str:
    """Contact sheet PNG of the hit crops in rank order with "#rank score" under each (Fig. 4.3).

    Args:
        table: result rows (rank, score, image_uri, x0..y1). tile: crop side in pixels.
        cols: tiles per row (default: ceil(sqrt(n)), at most 8). loader: uri -> bytes.
    Returns: ``path``. An unreadable frame gives a grey tile labelled "unreadable".
    """
    from PIL import Image, ImageDraw

    rows = table.to_pylist()
    n = max(len(rows), 1)
    cols = cols or min(8, max(1, math.ceil(math.sqrt(n))))
    nrows = math.ceil(n / cols)
    label_h, pad = 22, 6
    top = 26 if title else 0
    W = cols * (tile + pad) + pad
    H = top + nrows * (tile + label_h + pad) + pad
    sheet = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = _font(14)
    if title:
        draw.text((pad, 5), title[: max(20, W // 8)], fill=(0, 0, 0), font=font)
    cache: dict[str, object] = {}
    for i, r in enumerate(rows):
        cx = pad + (i % cols) * (tile + pad)
        cy = top + pad + (i // cols) * (tile + label_h + pad)
        try:
            if r["image_uri"] not in cache:
                cache[r["image_uri"]] = _load_rgb(r["image_uri"], loader)
            crop = cache[r["image_uri"]].crop((r["x0"], r["y0"], r["x1"], r["y1"]))
            crop.thumbnail((tile, tile))
            sheet.paste(crop, (cx + (tile - crop.width) // 2, cy + (tile - crop.height) // 2))
        except Exception:
            draw.rectangle([cx, cy, cx + tile - 1, cy + tile - 1], fill=(200, 200, 200))
            draw.text((cx + 8, cy + tile // 2), "unreadable", fill=(0, 0, 0), font=font)
        draw.text((cx + 2, cy + tile + 3), f"#{r['rank']}  {r['score']:.3f}", fill=(0, 0, 0), font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path, format="PNG", optimize=True)
    return path


def html_gallery(rows: list[dict], out_dir: str, *, title: str, loader: Callable[[str], bytes] = read_uri_bytes,
                 max_width: int = 960, warning: str | None = None) -> str:
    """Static ``gallery.html`` with each hit frame (boxes, ranks and scores drawn on it).

    Args:
        rows: manifest rows (:func:`manifest_rows`). out_dir: where gallery.html and gallery/ go.
        max_width: frames are downscaled to this width (JPEG, quality 85).
    Returns: path of gallery.html.
    """
    from PIL import ImageDraw

    gdir = os.path.join(out_dir, "gallery")
    os.makedirs(gdir, exist_ok=True)
    font = _font(16)
    cards = []
    for r in rows:
        fname = f"{r['image_id'] or uuid.uuid4().hex[:16]}.jpg"
        ok = True
        try:
            im = _load_rgb(r["image_uri"], loader)
            s = min(1.0, max_width / im.width)
            d = ImageDraw.Draw(im)
            for box, score, rank in zip(r["boxes"], r["scores"], r["ranks"]):
                w = max(2, int(round(3 / s)))
                d.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline=(255, 40, 40), width=w)
                d.text((box[0] + w + 1, max(0, box[1] - int(20 / s))), f"#{rank} {score:.3f}", fill=(255, 255, 0),
                       font=_font(max(12, int(16 / s))) if s < 1 else font)
            if s < 1.0:
                im = im.resize((int(im.width * s), int(im.height * s)))
            im.save(os.path.join(gdir, fname), format="JPEG", quality=85)
        except Exception:
            ok = False
        boxes = ", ".join(f"#{rk} [{','.join(map(str, b))}] {sc:.3f}"
                          for b, sc, rk in zip(r["boxes"], r["scores"], r["ranks"]))
        img = (f'<img src="gallery/{html.escape(fname)}" loading="lazy">' if ok
               else '<div class="bad">frame unreadable</div>')
        cards.append(f'<div class="card">{img}<div class="cap"><code>{html.escape(r["image_uri"])}</code>'
                     f"<br>{html.escape(boxes)}</div></div>")
    first = rows[0] if rows else {}
    warn = f'<p class="warn">{html.escape(warning)}</p>' if warning else ""
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:16px}} .card{{display:inline-block;vertical-align:top;margin:6px;
max-width:{max_width}px}} .card img{{max-width:100%}} .cap{{font-size:13px}} .warn{{color:#b00;font-weight:bold}}
.bad{{background:#ccc;padding:40px}}</style></head>
<body><h2>{html.escape(title)}</h2>{warn}
<p>index version <code>{html.escape(str(first.get("index_version", "")))}</code>, model
<code>{html.escape(str(first.get("model", "")))}</code>, exported {html.escape(str(first.get("exported_at", "")))},
{sum(len(r["boxes"]) for r in rows)} hits in {len(rows)} frames.</p>
{''.join(cards)}
</body></html>
"""
    path = os.path.join(out_dir, "gallery.html")
    with open(path, "w") as f:
        f.write(page)
    return path


def export_hits(table: pa.Table, out_dir: str, *, query: dict | str, index_version: str, model: str = "",
                random_init: bool = False, loader: Callable[[str], bytes] = read_uri_bytes,
                run_id: str | None = None) -> dict:
    """Write manifest (JSONL + Parquet), contact sheet PNG and HTML gallery for a result table.

    Returns:
        {"run_id", "manifest_jsonl", "manifest_parquet", "contact_sheet", "gallery", "images", "hits"}.
    """
    run_id = run_id or _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    rows = manifest_rows(table, query=query, index_version=index_version, model=model, random_init=random_init,
                         run_id=run_id)
    paths = write_manifest(rows, out_dir, run_id)
    qtxt = query if isinstance(query, str) else json.dumps(query, default=str)
    title = f"query {qtxt}"
    warning = ("results from RANDOMLY INITIALISED CLIP weights: not semantic" if random_init else None)
    sheet = contact_sheet(table, os.path.join(out_dir, "contact_sheet.png"), loader=loader,
                          title=("[random CLIP weights] " if random_init else "") + title)
    gallery = html_gallery(rows, out_dir, title=title, loader=loader, warning=warning)
    return {"run_id": run_id, "manifest_jsonl": paths["jsonl"], "manifest_parquet": paths["parquet"],
            "contact_sheet": sheet, "gallery": gallery, "images": len(rows), "hits": table.num_rows}
