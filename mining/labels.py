"""The ``labels`` table of the store: what labelers said about hits, per campaign and feedback round.

Layout (beside ``patches``/``images``/``errors`` under the same store root, local or ``s3://``)::

    <root>/labels/campaign=<name>/round-<NNNN>.parquet     one file per feedback round (jobs.feedback)

Schema (:data:`LABEL_SCHEMA`): ``campaign``, ``round`` (1, 2, ...), ``hit_id`` (16 hex, "" for a box
the labeler added), ``patch_id`` (int64, null when the box matches no mined patch), ``image_id``,
``image_uri``, ``x0, y0, x1, y1`` (int32 pixels of the upright frame, x1/y1 exclusive: the labeler's
box, corrected when ``corrected``), ``label`` (``positive`` | ``negative``), ``corrected`` (bool: an
accepted hit whose box was moved), ``added`` (bool: a box the labeler drew), ``category``, ``source``
(``coco`` | ``labelstudio`` | ``gallery`` | ``datumaro``), ``source_file``, ``run_id`` (the export run
that showed the hit), ``method`` (how that run ranked: ``text``, ``probe``, ...), ``labeled_at`` (UTC).

Each round file is written whole in one PUT (local: temp file + ``os.replace``), so a reader sees a
round completely or not at all. One writer per campaign at a time (round numbers are assigned by
listing). A later round's verdict on a hit overrides an earlier one (:func:`campaign_state`).
"""
from __future__ import annotations

import datetime as _dt
import io
import re
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from mining.fs import get_fs, join

LABELS_DIR = "labels"
LABELS = ("positive", "negative")
LABEL_SCHEMA = pa.schema([
    ("campaign", pa.string()), ("round", pa.int32()), ("hit_id", pa.string()), ("patch_id", pa.int64()),
    ("image_id", pa.string()), ("image_uri", pa.string()), ("x0", pa.int32()), ("y0", pa.int32()),
    ("x1", pa.int32()), ("y1", pa.int32()), ("label", pa.string()), ("corrected", pa.bool_()),
    ("added", pa.bool_()), ("category", pa.string()), ("source", pa.string()), ("source_file", pa.string()),
    ("run_id", pa.string()), ("method", pa.string()), ("labeled_at", pa.string()),
])
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_campaign(name: str) -> str:
    """A campaign name: 1-64 of letters, digits, ``._-``, starting with a letter or digit. Raises ValueError."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"bad campaign name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return name


def campaign_dir(root: str, campaign: str) -> str:
    return join(root, LABELS_DIR, f"campaign={check_campaign(campaign)}")


def _round_files(root: str, campaign: str) -> list[tuple[int, str]]:
    fs, path = get_fs(campaign_dir(root, campaign))
    if not fs.exists(path):
        return []
    out = []
    for p in fs.ls(path, detail=False):
        m = re.search(r"round-(\d+)\.parquet$", p)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def write_round(root: str, campaign: str, rows: list[dict]) -> dict:
    """Append one feedback round: ``rows`` are dicts with the :data:`LABEL_SCHEMA` columns (campaign,
    round and labeled_at are filled here).

    Returns: {"round", "path", "rows"}.
    Raises: ValueError on a bad campaign name, an unknown label or an empty round.
    """
    from mining.store import _write_bytes_atomic

    check_campaign(campaign)
    if not rows:
        raise ValueError("no labeled hits to record (is the export labeled? were any hits reviewed?)")
    bad = {r.get("label") for r in rows} - set(LABELS)
    if bad:
        raise ValueError(f"unknown label(s) {sorted(map(str, bad))}; use {list(LABELS)}")
    files = _round_files(root, campaign)
    rnd = (files[-1][0] + 1) if files else 1
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    full = [{**{f.name: None for f in LABEL_SCHEMA}, **r, "campaign": campaign, "round": rnd, "labeled_at": now}
            for r in rows]
    for r in full:
        for b in ("corrected", "added"):
            r[b] = bool(r.get(b))
        for s in ("hit_id", "category", "source", "source_file", "run_id", "method", "image_uri", "image_id"):
            r[s] = "" if r.get(s) is None else str(r[s])
    table = pa.Table.from_pylist(full, schema=LABEL_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    uri = join(campaign_dir(root, campaign), f"round-{rnd:04d}.parquet")
    _write_bytes_atomic(uri, buf.getvalue())
    return {"round": rnd, "path": uri, "rows": len(full)}


def read_labels(root: str, campaign: str) -> pa.Table:
    """All rounds of a campaign, in round order (an empty table when there are none)."""
    files = _round_files(root, campaign)
    if not files:
        return LABEL_SCHEMA.empty_table()
    fs, _ = get_fs(root)
    parts = []
    for _, p in files:
        with fs.open(p, "rb") as f:
            parts.append(pq.read_table(f).cast(LABEL_SCHEMA))
    return pa.concat_tables(parts)


@dataclass
class CampaignState:
    """The current labels of a campaign (latest verdict per hit / box wins).

    Attributes:
        positives / negatives: patch ids (int) labeled positive / negative.
        added_boxes: (image_id, image_uri, (x0, y0, x1, y1)) of drawn boxes matching no mined patch.
        image_ids: every labeled frame (excluded from later queries of the campaign).
        rounds: number of rounds. category: the latest category name.
    """

    positives: list[int] = field(default_factory=list)
    negatives: list[int] = field(default_factory=list)
    added_boxes: list[tuple] = field(default_factory=list)
    image_ids: set[str] = field(default_factory=set)
    rounds: int = 0
    category: str = ""


def campaign_state(root: str, campaign: str) -> CampaignState:
    """Fold the rounds of a campaign into its current labels (:class:`CampaignState`)."""
    t = read_labels(root, campaign)
    st = CampaignState()
    verdict: dict[int, str] = {}
    for r in t.to_pylist():
        st.rounds = max(st.rounds, int(r["round"]))
        st.category = r["category"] or st.category
        if r["image_id"]:
            st.image_ids.add(r["image_id"])
        if r["patch_id"] is not None:
            verdict.pop(int(r["patch_id"]), None)
            verdict[int(r["patch_id"])] = r["label"]
        elif r["label"] == "positive":
            st.added_boxes.append((r["image_id"], r["image_uri"], (r["x0"], r["y0"], r["x1"], r["y1"])))
    st.positives = [p for p, v in verdict.items() if v == "positive"]
    st.negatives = [p for p, v in verdict.items() if v == "negative"]
    return st


def campaign_rounds(root: str, campaign: str) -> list[dict]:
    """Per round: {"round", "reviewed", "accepted", "rejected", "corrected", "added", "precision",
    "method", "source", "labeled_at"}. ``precision`` = accepted / reviewed hits of that round, i.e. the
    precision of the query the labeler reviewed (what a campaign plot shows over rounds)."""
    t = read_labels(root, campaign)
    out: dict[int, dict] = {}
    for r in t.to_pylist():
        d = out.setdefault(r["round"], {"round": r["round"], "reviewed": 0, "accepted": 0, "rejected": 0,
                                        "corrected": 0, "added": 0, "method": r["method"], "source": r["source"],
                                        "labeled_at": r["labeled_at"]})
        if r["added"]:
            d["added"] += 1
            continue
        d["reviewed"] += 1
        d["accepted" if r["label"] == "positive" else "rejected"] += 1
        d["corrected"] += int(bool(r["corrected"]))
    for d in out.values():
        d["precision"] = round(d["accepted"] / d["reviewed"], 4) if d["reviewed"] else None
    return [out[k] for k in sorted(out)]
