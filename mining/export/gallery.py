"""Review page (``gallery.html``) and contact sheet (``contact_sheet.png``) of query hits.

``gallery.html`` is a static page (no server, no network): a grid of hit crops (``gallery/crops/``,
enlarged to the tile size) with a readable label on a dark background (rank, score, frame id); a
click on a crop opens the frame (``gallery/frames/<image_id>.jpg``, at most ``frame_width`` px wide)
with the hit's box drawn and the source URI; accept / reject toggles on every tile (keys ``a`` / ``r``
on the focused tile), and "Download feedback JSON" saves ``feedback-<run_id>.json``::

    {"format": "fleet-mining-feedback", "version": 1, "run_id", "campaign", "category", "index_version",
     "hits": [{"hit_id", "patch_id", "image_id", "image_uri", "box": [x0, y0, x1, y1], "verdict":
               "accepted" | "rejected"}]}

which ``python -m jobs.feedback --labels feedback-<run_id>.json`` reads. Only hits with a verdict are
listed. ``patch_id`` is a decimal string: JavaScript numbers cannot hold 63-bit ids exactly (the
``hit_id``, 16 hex digits of the patch id, is the authoritative key).
"""
from __future__ import annotations

import html
import json
import math
import os

FEEDBACK_FORMAT = "fleet-mining-feedback"


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # old Pillow
        return ImageFont.load_default()


def _crop_tile(frame, box, tile: int):
    """The box's crop, scaled UP or down so its longer side is ``tile`` px (79-px patches enlarged)."""
    from PIL import Image

    crop = frame.crop(tuple(box))
    s = tile / max(crop.width, crop.height)
    return crop.resize((max(1, round(crop.width * s)), max(1, round(crop.height * s))), Image.BICUBIC)


def _wrap(text: str, width_px: int, char_px: int = 7, max_lines: int = 3) -> list[str]:
    n = max(20, width_px // char_px)
    lines = [text[i:i + n] for i in range(0, len(text), n)] or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][:-1] + "\u2026"
    return lines


def contact_sheet(table, path: str, *, reader, tile: int = 160, cols: int | None = None,
                  title: str | None = None) -> str:
    """Contact sheet PNG of the hit crops in rank order (thesis Fig. 4.3 / 4.7).

    Each tile: the crop enlarged/shrunk to ``tile`` px, "#rank score" and the frame id (8 hex) under
    it; the title is wrapped over up to 3 lines. An unreadable frame gives a grey "unreadable" tile.
    ``reader``: a :class:`mining.export.frames.FrameReader`. Returns ``path``.
    """
    from PIL import Image, ImageDraw

    rows = table.to_pylist()
    n = max(len(rows), 1)
    cols = cols or min(8, max(1, math.ceil(math.sqrt(n))))
    nrows = math.ceil(n / cols)
    label_h, pad = 36, 6
    W = cols * (tile + pad) + pad
    tlines = _wrap(title, W - 2 * pad) if title else []
    top = 18 * len(tlines) + (6 if tlines else 0)
    H = top + nrows * (tile + label_h + pad) + pad
    sheet = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = _font(13)
    for i, line in enumerate(tlines):
        draw.text((pad, 4 + 18 * i), line, fill=(0, 0, 0), font=font)
    reader.prefetch(r["image_uri"] for r in rows)
    for i, r in enumerate(rows):
        cx = pad + (i % cols) * (tile + pad)
        cy = top + pad + (i // cols) * (tile + label_h + pad)
        try:
            crop = _crop_tile(reader.pil(r["image_uri"]), (r["x0"], r["y0"], r["x1"], r["y1"]), tile)
            sheet.paste(crop, (cx + (tile - crop.width) // 2, cy + (tile - crop.height) // 2))
        except Exception:
            draw.rectangle([cx, cy, cx + tile - 1, cy + tile - 1], fill=(200, 200, 200))
            draw.text((cx + 8, cy + tile // 2), "unreadable", fill=(0, 0, 0), font=font)
        draw.text((cx + 2, cy + tile + 3), f"#{r['rank']}  {r['score']:.3f}", fill=(0, 0, 0), font=font)
        draw.text((cx + 2, cy + tile + 19), f"frame {str(r.get('image_id') or '')[:8]}", fill=(90, 90, 90),
                  font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path, format="PNG", optimize=True)
    return path


_CSS = """
body{font-family:system-ui,sans-serif;margin:12px;background:#f4f4f4;color:#111}
h2{margin:4px 0;font-size:18px} .meta{font-size:13px;color:#333;margin:4px 0 10px}
.warn{color:#fff;background:#b00;padding:4px 8px;font-weight:bold;display:inline-block}
.bar{position:sticky;top:0;background:#f4f4f4;padding:6px 0;z-index:2;font-size:14px}
.bar button{font-size:14px;padding:4px 10px;margin-right:8px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:10px}
.tile{background:#fff;border:3px solid #ccc;border-radius:4px;overflow:hidden;outline:none}
.tile.accepted{border-color:#2ca02c} .tile.rejected{border-color:#d62728;opacity:.75}
.tile:focus{box-shadow:0 0 0 2px #1f77b4}
.crop{position:relative;display:block;cursor:zoom-in;background:#222;aspect-ratio:1;width:100%}
.crop img{width:100%;height:100%;object-fit:contain;display:block}
.lbl{position:absolute;left:0;top:0;background:rgba(0,0,0,.75);color:#fff;font:12px/1.3 monospace;
padding:2px 5px;border-bottom-right-radius:4px}
.btns{display:flex} .btns button{flex:1;border:0;padding:6px;font-size:13px;cursor:pointer;background:#eee}
.btns button.on.acc{background:#2ca02c;color:#fff} .btns button.on.rej{background:#d62728;color:#fff}
#view{display:none;position:fixed;inset:0;background:rgba(0,0,0,.85);z-index:5;overflow:auto;padding:16px}
#view .fw{position:relative;display:inline-block;max-width:100%} #view img{max-width:100%;display:block}
#view .box{position:absolute;border:3px solid #ff2828;box-sizing:border-box}
#view .cap{color:#fff;font:13px monospace;margin:6px 0;word-break:break-all}
#view .close{position:fixed;top:10px;right:16px;font-size:16px}
.bad{padding:40px 8px;color:#fff;text-align:center}
"""

_JS = """
const D = JSON.parse(document.getElementById('hits').textContent);
const V = {};
function setv(id, v){ V[id] = (V[id] === v ? undefined : v);
  const t = document.getElementById('t-' + id); t.classList.remove('accepted','rejected');
  if (V[id]) t.classList.add(V[id]);
  t.querySelector('.acc').classList.toggle('on', V[id] === 'accepted');
  t.querySelector('.rej').classList.toggle('on', V[id] === 'rejected');
  const n = Object.values(V).filter(x => x).length;
  document.getElementById('count').textContent = n + ' of ' + D.hits.length + ' reviewed'; }
function openv(i){ const h = D.hits[i], v = document.getElementById('view');
  const img = v.querySelector('img'), b = v.querySelector('.box');
  img.src = h.frame; b.style.left = (100*h.box[0]/h.width)+'%'; b.style.top = (100*h.box[1]/h.height)+'%';
  b.style.width = (100*(h.box[2]-h.box[0])/h.width)+'%'; b.style.height = (100*(h.box[3]-h.box[1])/h.height)+'%';
  v.querySelector('.cap').textContent = '#' + h.rank + '  score ' + h.score.toFixed(3) + '  box [' + h.box.join(', ') +
    ']  ' + h.image_uri; v.style.display = 'block'; }
function closev(){ document.getElementById('view').style.display = 'none'; }
function download(){ const hits = D.hits.filter(h => V[h.hit_id]).map(h => ({hit_id: h.hit_id,
    patch_id: h.patch_id, image_id: h.image_id, image_uri: h.image_uri, box: h.box, verdict: V[h.hit_id]}));
  const out = {format: D.format, version: 1, run_id: D.run_id, campaign: D.campaign, category: D.category,
    index_version: D.index_version, saved_at: new Date().toISOString(), hits: hits};
  const a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob([JSON.stringify(out, null, 1)], {type: 'application/json'}));
  a.download = 'feedback-' + D.run_id + '.json'; document.body.appendChild(a); a.click(); a.remove(); }
document.addEventListener('keydown', e => { if (e.key === 'Escape') closev();
  const t = document.activeElement; if (!t || !t.dataset || !t.dataset.hit) return;
  if (e.key === 'a') setv(t.dataset.hit, 'accepted'); if (e.key === 'r') setv(t.dataset.hit, 'rejected'); });
"""


def review_page(table, rows: list[dict], out_dir: str, *, reader, title: str, warning: str | None = None,
                tile: int = 224, frame_width: int = 1600, category: str = "", campaign: str = "") -> str:
    """Write ``gallery.html`` + ``gallery/crops/<hit_id>.jpg`` + ``gallery/frames/<image_id>.jpg``.

    Args:
        table: result rows (``mining.query.RESULT_SCHEMA``), rank order. rows: manifest rows (sizes,
            hit ids, run id). reader: ``FrameReader``. tile: crop side (px, enlarged when smaller).
        frame_width: frames are downscaled to at most this width (JPEG, quality 85).
    Returns: path of gallery.html.
    """
    from mining.export.manifest import hit_id_of

    cdir, fdir = os.path.join(out_dir, "gallery", "crops"), os.path.join(out_dir, "gallery", "frames")
    os.makedirs(cdir, exist_ok=True)
    os.makedirs(fdir, exist_ok=True)
    by_uri = {r["image_uri"]: r for r in rows}
    reader.prefetch(by_uri)
    frames_ok: dict[str, bool] = {}
    hits, tiles = [], []
    for i, r in enumerate(table.to_pylist()):
        hid = hit_id_of(r["patch_id"])
        box = [int(r["x0"]), int(r["y0"]), int(r["x1"]), int(r["y1"])]
        mrow = by_uri.get(r["image_uri"], {})
        iid = r.get("image_id") or mrow.get("image_id") or ""
        ok = True
        try:
            im = reader.pil(r["image_uri"])
            _crop_tile(im, box, tile).save(os.path.join(cdir, hid + ".jpg"), format="JPEG", quality=88)
            if r["image_uri"] not in frames_ok:
                s = min(1.0, frame_width / im.width)
                small = im.resize((round(im.width * s), round(im.height * s))) if s < 1 else im
                small.save(os.path.join(fdir, iid + ".jpg"), format="JPEG", quality=85)
                frames_ok[r["image_uri"]] = True
            w, h = im.width, im.height
        except Exception:
            ok = False
            w, h = int(mrow.get("width") or 1), int(mrow.get("height") or 1)
        hits.append({"hit_id": hid, "patch_id": str(int(r["patch_id"])), "image_id": iid, "image_uri": r["image_uri"],
                     "box": box, "rank": int(r["rank"]), "score": float(r["score"]), "width": w, "height": h,
                     "frame": f"gallery/frames/{iid}.jpg"})
        lbl = f"#{r['rank']} {r['score']:.3f} &middot; {html.escape(iid[:8])}"
        img = (f'<img src="gallery/crops/{hid}.jpg" alt="hit {r["rank"]}" loading="lazy">' if ok
               else '<div class="bad">frame unreadable</div>')
        tiles.append(
            f'<div class="tile" id="t-{hid}" data-hit="{hid}" tabindex="0">'
            f'<a class="crop" href="#" onclick="openv({i});return false" title="{html.escape(r["image_uri"])}">'
            f'{img}<span class="lbl">{lbl}</span></a>'
            f'<div class="btns"><button class="acc" onclick="setv(\'{hid}\',\'accepted\')">&#10003; accept</button>'
            f'<button class="rej" onclick="setv(\'{hid}\',\'rejected\')">&#10007; reject</button></div></div>')
    first = rows[0] if rows else {}
    data = {"format": FEEDBACK_FORMAT, "run_id": first.get("run_id", ""), "campaign": campaign,
            "category": category, "index_version": first.get("index_version", ""), "hits": hits}
    payload = json.dumps(data).replace("</", "<\\/")
    warn = f'<p class="warn">{html.escape(warning)}</p>' if warning else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body><h2>{html.escape(title)}</h2>{warn}
<p class="meta">index version <code>{html.escape(str(first.get("index_version", "")))}</code>, model
<code>{html.escape(str(first.get("model", "")))}</code>, exported {html.escape(str(first.get("exported_at", "")))},
{len(hits)} hits in {len(rows)} frames{", campaign <b>" + html.escape(campaign) + "</b>" if campaign else ""}.
Click a crop for its frame; accept / reject each hit (or focus a tile and press a / r), then download.</p>
<div class="bar"><button id="dl" onclick="download()">&#11015; Download feedback JSON</button>
<span id="count">0 of {len(hits)} reviewed</span></div>
<div class="grid">{''.join(tiles)}</div>
<div id="view" onclick="if(event.target===this)closev()"><button class="close" onclick="closev()">close (Esc)</button>
<div class="fw"><img alt="frame"><div class="box"></div></div><div class="cap"></div></div>
<script type="application/json" id="hits">{payload}</script>
<script>{_JS}</script>
</body></html>
"""
    path = os.path.join(out_dir, "gallery.html")
    with open(path + ".tmp", "w") as f:
        f.write(page)
    os.replace(path + ".tmp", path)
    return path
