"""Query engine, exports and the in-process query CLI on a small real dataset.

The dataset: a few real GTSDB frames, a handful of boxes each (two of them overlapping in the
same frame), embedded with the tiny randomly initialised open_clip config, written with
``write_shard`` (two shards with two ingest dates) and indexed with ``build_index(kind="flat")``.
"""
from __future__ import annotations

import io
import json
import os
import warnings

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import gtsdb_images, run_cli

# boxes per frame: B_A and B_A2 overlap (intersection / larger area = 214^2 / 224^2 = 0.91)
B_A = (100, 100, 324, 324)
B_A2 = (110, 110, 334, 334)
BOXES = [B_A, B_A2, (600, 300, 824, 524), (1000, 200, 1224, 424), (0, 352, 448, 800), (800, 500, 1024, 724)]
DATES = ("2026-01-01", "2026-01-02")
N_IMAGES = 4


def planted_novelty(image: int, box: int) -> float:
    """The epitome novelty written for box ``box`` of frame ``image`` (distinct values; each frame's
    rarest box differs), so query-free novelty queries have a known answer."""
    return float((image * 5 + box * 7) % 13) + 0.01 * image


class QueryData:
    """Paths and ground truth of the test dataset."""

    def __init__(self, root, data, index, images, emb, rows):
        self.root, self.data, self.index, self.images = root, data, index, images
        self.emb = emb      # (N, D) float32 normalised, aligned with rows
        self.rows = rows    # list of dicts: patch_id, image_id, image_uri, box, date, novelty


def embedder():
    from mining.embed import ClipEmbedder, ClipSpec, TEST_MODEL

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ClipEmbedder(ClipSpec(TEST_MODEL, None, True), device="cpu")


def build_query_dataset(root: str, emb=None, n_images: int = N_IMAGES) -> QueryData:
    """Mine-like dataset + flat index under ``root`` (data/, index/)."""
    from PIL import Image

    from mining.index import build_index
    from mining.store import ShardOutput, make_image_id, make_patch_id, write_shard

    emb = emb or embedder()
    data, index = os.path.join(root, "data"), os.path.join(root, "index")
    images = [str(p) for p in gtsdb_images(n_images)]
    all_emb, rows = [], []
    for s, date in enumerate(DATES):
        out = ShardOutput(shard=f"file://{root}/shard-{s}", date=date, run_id="test", model=emb.model_id,
                          dim=emb.dim, random_init=True)
        for uri in images[s::2]:
            arr = np.array(Image.open(uri).convert("RGB"))
            iid = make_image_id(uri)
            z = emb.embed_crops(arr, np.asarray(BOXES))
            for j, b in enumerate(BOXES):
                pid = make_patch_id(iid, b, 1)
                nov = planted_novelty(images.index(uri), j)
                out.patches.append(dict(patch_id=pid, image_id=iid, image_uri=uri, shard=out.shard, date=date,
                                        x0=b[0], y0=b[1], x1=b[2], y1=b[3], level=1, score=0.5, novelty=nov,
                                        model=emb.model_id, run_id="test"))
                rows.append(dict(patch_id=pid, image_id=iid, image_uri=uri, box=b, date=date, novelty=nov))
            out.embeddings.append(z)
            all_emb.append(z)
            out.images.append(dict(image_id=iid, image_uri=uri, shard=out.shard, date=date, width=arr.shape[1],
                                   height=arr.shape[0], num_patches=len(BOXES), status="ok", reason="",
                                   metadata="{}", run_id="test"))
        write_shard(data, out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_index(data, index, kind="flat", use_ray=False, verbose=False)
    E = np.concatenate(all_emb).astype(np.float16).astype(np.float32)
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    return QueryData(root, data, index, images, E, rows)


@pytest.fixture(scope="session")
def query_dataset(tmp_path_factory):
    """Built once per session (test_query_actor.py works on a copy: it adds a version)."""
    return build_query_dataset(str(tmp_path_factory.mktemp("qdata")))


@pytest.fixture(scope="module")
def qd(query_dataset):
    return query_dataset


def copy_dataset(qd: QueryData, root: str) -> QueryData:
    """A private copy of the dataset + index (same frames) under ``root``."""
    import shutil

    shutil.copytree(qd.data, os.path.join(root, "data"))
    shutil.copytree(qd.index, os.path.join(root, "index"))
    return QueryData(root, os.path.join(root, "data"), os.path.join(root, "index"), qd.images, qd.emb, qd.rows)


@pytest.fixture(scope="module")
def engine(qd):
    from mining.query import QueryEngine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return QueryEngine(qd.index)


def crop_bytes(uri: str, box) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.open(uri).convert("RGB").crop(box).save(buf, format="PNG")
    return buf.getvalue()


def frame_bytes(uri: str) -> bytes:
    with open(uri, "rb") as f:
        return f.read()


# --------------------------------------------------------------------------- pure helpers

def test_overlap_larger_and_dedup_rule():
    from mining.query import dedup_per_image, overlap_larger

    assert overlap_larger((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(0.5)
    assert overlap_larger((0, 0, 10, 10), (0, 0, 20, 20)) == pytest.approx(100 / 400)  # / LARGER area
    assert overlap_larger((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # touching, x1 exclusive
    codes = np.array([0, 0, 1, 0])
    boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [0, 0, 10, 10], [20, 0, 30, 10]])
    assert dedup_per_image(codes, boxes, 10, 0.0).tolist() == [0, 2, 3]   # any overlap drops
    assert dedup_per_image(codes, boxes, 10, 0.6).tolist() == [0, 1, 2, 3]  # 0.5 <= 0.6 kept
    assert dedup_per_image(codes, boxes, 2, 0.0).tolist() == [0, 2]
    assert dedup_per_image(codes, boxes, 10, None).tolist() == [0, 1, 2, 3]


def test_uri_prefixes(tmp_path):
    from mining.query import uri_allowed

    allowed = [str(tmp_path / "ok"), "s3://bucket/frames/"]
    (tmp_path / "ok").mkdir()
    assert uri_allowed(str(tmp_path / "ok" / "a.jpg"), allowed)
    assert not uri_allowed(str(tmp_path / "ok" / ".." / "secret"), allowed)
    assert not uri_allowed(str(tmp_path / "okay.jpg"), allowed)
    assert not uri_allowed("/etc/passwd", allowed)
    assert uri_allowed("s3://bucket/frames/x.jpg", allowed)
    assert not uri_allowed("s3://bucket/framesX/x.jpg", allowed)
    assert not uri_allowed("s3://bucket/frames/../other/x.jpg", allowed)
    os.symlink("/etc", tmp_path / "ok" / "link")
    assert not uri_allowed(str(tmp_path / "ok" / "link" / "passwd"), allowed)


# --------------------------------------------------------------------------- engine

def test_image_query_exact_crop_is_top_hit(qd, engine):
    for i in (0, 3):
        uri = qd.images[i]
        for box in (BOXES[2], BOXES[4]):
            t = engine.image(frame_bytes(uri), box=box, k=5)
            top = t.slice(0, 1).to_pylist()[0]
            assert (top["image_uri"], (top["x0"], top["y0"], top["x1"], top["y1"])) == (uri, box)
            assert top["score"] > 0.999
            assert t.column_names[:11] == ["rank", "score", "patch_id", "image_id", "image_uri", "x0", "y0", "x1",
                                           "y1", "date", "level"]
            assert t.column("rank").to_pylist() == list(range(1, t.num_rows + 1))
            s = t.column("score").to_numpy()
            assert np.all(np.diff(s) <= 1e-6)
    # the same crop sent as a cropped PNG (box None = whole crop) also finds it
    t = engine.image(crop_bytes(qd.images[1], BOXES[3]), k=3)
    top = t.to_pylist()[0]
    assert top["image_uri"] == qd.images[1] and (top["x0"], top["y0"]) == BOXES[3][:2]


def test_scores_match_brute_force(qd, engine):
    q = qd.emb[7] + 0.3 * qd.emb[15]
    t = engine.embedding(q, k=10, dedup=False)
    qn = q / np.linalg.norm(q)
    truth = np.argsort(-(qd.emb @ qn))[:10]
    assert t.column("patch_id").to_pylist()[:3] == [qd.rows[i]["patch_id"] for i in truth[:3]]
    np.testing.assert_allclose(t.column("score").to_numpy(), np.sort(qd.emb @ qn)[::-1][:10], atol=2e-3)


def test_dedup_drops_overlapping_lower_hit_from_same_frame(qd, engine):
    from mining.query import QueryConfig, QueryEngine

    uri = qd.images[0]
    n = len(qd.rows)
    raw = engine.image(frame_bytes(uri), box=B_A, k=n, dedup=False)
    boxes_raw = [(r["image_uri"], (r["x0"], r["y0"], r["x1"], r["y1"])) for r in raw.to_pylist()]
    assert boxes_raw[0] == (uri, B_A) and (uri, B_A2) in boxes_raw
    ded = engine.image(frame_bytes(uri), box=B_A, k=n)
    rows = ded.to_pylist()
    got = [(r["image_uri"], (r["x0"], r["y0"], r["x1"], r["y1"])) for r in rows]
    assert got[0] == (uri, B_A) and (uri, B_A2) not in got
    # every (B_A, B_A2) pair and (B_A2, big box 4) overlap: no two kept hits of one frame overlap
    from mining.query import overlap_larger

    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            if a["image_uri"] == b["image_uri"]:
                assert overlap_larger((a["x0"], a["y0"], a["x1"], a["y1"]), (b["x0"], b["y0"], b["x1"], b["y1"])) == 0
    # threshold is configurable: 0.95 keeps the 0.91-overlap pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loose = QueryEngine(qd.index, config=QueryConfig(dedup_overlap=0.95), embedder=engine.embedder)
    got2 = [(r["image_uri"], (r["x0"], r["y0"], r["x1"], r["y1"])) for r in
            loose.image(frame_bytes(uri), box=B_A, k=n).to_pylist()]
    assert (uri, B_A2) in got2
    # k hits are still returned after dedup (over-fetch grows)
    assert engine.image(frame_bytes(uri), box=B_A, k=8).num_rows == 8


def test_filters(qd, engine):
    from mining.query import QueryError

    n = len(qd.rows)
    t = engine.text("a road narrows sign", k=n, dedup=False, filters={"date_from": "2026-01-02"})
    assert t.num_rows == n // 2 and set(t.column("date").to_pylist()) == {"2026-01-02"}
    t = engine.text("a road narrows sign", k=n, dedup=False, filters={"date_to": "2026-01-01"})
    assert set(t.column("date").to_pylist()) == {"2026-01-01"}
    excl = {qd.rows[0]["image_id"], qd.rows[-1]["image_id"]}
    t = engine.text("a road narrows sign", k=n, dedup=False, filters={"exclude_image_ids": sorted(excl) + ["nope"]})
    assert t.num_rows == n - 2 * len(BOXES) and not excl & set(t.column("image_id").to_pylist())
    t = engine.text("a road narrows sign", k=5, filters={"date_from": "2030-01-01"})
    assert t.num_rows == 0
    with pytest.raises(QueryError, match="unknown filter name.*'camera'.*known filters"):
        engine.text("a road narrows sign", k=5, filters={"camera": "front"})
    with pytest.raises(QueryError, match="date_from must be a date"):
        engine.text("x", k=5, filters={"date_from": "yesterday"})


def test_multi_example_mean_max_sum_negatives(qd, engine):
    from mining.query import QueryError

    i1, i2 = 2, 3 * len(BOXES) + 3  # frame 0 box 2, frame 3 box 3
    ex = [{"image": frame_bytes(qd.rows[i]["image_uri"]), "box": qd.rows[i]["box"]} for i in (i1, i2)]
    n = len(qd.rows)
    Z = np.stack([engine.encode_example(e) for e in ex])
    # mean (Eq. 4.1): ranking by cos(normalise(mean z), x)
    q = Z.mean(0)
    q /= np.linalg.norm(q)
    t = engine.examples(ex, k=n, mode="mean", dedup=False)
    np.testing.assert_allclose(t.column("score").to_numpy(), np.sort(qd.emb @ q)[::-1], atol=2e-3)
    assert t.column("patch_id").to_pylist()[0] == qd.rows[int(np.argmax(qd.emb @ q))]["patch_id"]
    # max: each example's own patch scores ~1 -> both at the top
    t = engine.examples(ex, k=n, mode="max", dedup=False)
    assert set(t.column("patch_id").to_pylist()[:2]) == {qd.rows[i1]["patch_id"], qd.rows[i2]["patch_id"]}
    np.testing.assert_allclose(t.column("score").to_numpy(), np.sort((qd.emb @ Z.T).max(1))[::-1], atol=2e-3)
    # sum: scores are the sum of the per-example cosines
    t = engine.examples(ex, k=n, mode="sum", dedup=False)
    np.testing.assert_allclose(t.column("score").to_numpy(), np.sort((qd.emb @ Z.T).sum(1))[::-1], atol=4e-3)
    assert t.column("score").to_numpy()[0] > 1.5
    # negatives push the negative example's patch down (max mode: score - w * cos(neg, x))
    def rank_of(t, i):
        return t.column("patch_id").to_pylist().index(qd.rows[i]["patch_id"])

    plain = engine.examples(ex[:1], k=n, mode="max", dedup=False)
    t = engine.examples(ex[:1], k=n, mode="max", negatives=ex[1:], negative_weight=1.0, dedup=False)
    np.testing.assert_allclose(t.column("score").to_numpy(), np.sort(qd.emb @ Z[0] - qd.emb @ Z[1])[::-1], atol=4e-3)
    assert rank_of(t, i2) > rank_of(plain, i2)
    t = engine.examples(ex[:1], k=n, mode="mean", negatives=ex[1:], negative_weight=1.0, dedup=False)
    qn = (Z[0] - Z[1]) / np.linalg.norm(Z[0] - Z[1])
    assert t.column("patch_id").to_pylist()[-1] == qd.rows[int(np.argmin(qd.emb @ qn))]["patch_id"]
    assert rank_of(t, i2) > rank_of(plain, i2)
    # text examples mix with images
    assert engine.examples(["a deer at night", ex[0]], k=3).num_rows == 3
    with pytest.raises(QueryError, match="mode"):
        engine.examples(ex, k=3, mode="median")
    with pytest.raises(QueryError, match="non-empty list"):
        engine.examples([], k=3)
    with pytest.raises(QueryError, match="example 1: .*unreadable"):
        engine.examples([ex[0], {"image": b"not an image"}], k=3)


def test_bad_queries_give_clear_errors(qd, engine, tmp_path):
    from mining.query import QueryError

    img = frame_bytes(qd.images[0])
    bad = [
        (lambda: engine.text("", k=5), "text query is empty"),
        (lambda: engine.text("   ", k=5), "text query is empty"),
        (lambda: engine.image(b"\x89PNG garbage", k=5), "unreadable"),
        (lambda: engine.image(b"", k=5), "empty"),
        (lambda: engine.image(img, box=(1200, 700, 1400, 900), k=5), r"outside the 1360x800 image"),
        (lambda: engine.image(img, box=(-1, 0, 100, 100), k=5), "outside"),
        (lambda: engine.image(img, box=(100, 100, 50, 200), k=5), "empty"),
        (lambda: engine.image(img, box="1,2,3", k=5), "4 integers"),
        (lambda: engine.text("x", k=0), "k must be >= 1"),
        (lambda: engine.text("x", k=-3), "k must be >= 1"),
        (lambda: engine.text("x", k=engine.config.k_cap + 1), "above the cap"),
        (lambda: engine.text("x", k=2.5), "k must be an integer"),
        (lambda: engine.text("x", k=5, filters={"colour": "red"}), "unknown filter"),
        (lambda: engine.image(qd.images[0], k=5), "outside the allowed prefixes"),
        (lambda: engine.image("/etc/passwd", k=5), "outside the allowed prefixes"),
        (lambda: engine.embedding(np.ones(3), k=5), "dim 3"),
        (lambda: engine.embedding(np.full(engine.snapshot.dim, np.nan), k=5), "NaN"),
    ]
    for fn, msg in bad:
        with pytest.raises(QueryError, match=msg):
            fn()
    assert engine.text("still serving", k=3).num_rows == 3


def test_allowed_uri_prefix_and_text_cache(qd, engine):
    from mining.query import QueryConfig, QueryEngine, QueryError, timings_of

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e = QueryEngine(qd.index, config=QueryConfig(allowed_prefixes=(os.path.dirname(qd.images[0]),)),
                        embedder=engine.embedder)
    t = e.image(qd.images[1], box=BOXES[3], k=2)
    assert t.to_pylist()[0]["image_uri"] == qd.images[1]
    with pytest.raises(QueryError, match="cannot read"):
        e.image(os.path.join(os.path.dirname(qd.images[0]), "missing.jpg"), k=2)
    t1 = e.text("a deer crossing at night", k=4)
    t2 = e.text("a deer crossing at night", k=4)
    assert not timings_of(t1)["cache_hit"] and timings_of(t2)["cache_hit"]
    assert t1.column("patch_id").to_pylist() == t2.column("patch_id").to_pylist()
    assert e.cache_hits == 1 and e.cache_misses == 1
    tm = timings_of(t2)
    assert {"encode_ms", "search_ms", "rerank_dedup_ms", "metadata_ms", "total_ms"} <= set(tm)


def test_random_init_warning_and_model_from_manifest(qd):
    from mining.query import QueryEngine, query_info

    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        e = QueryEngine(qd.index)
    assert e.embedder.model_id == "tiny-test-random/random-init"  # derived from the manifest
    info = query_info(e.text("x", k=1))
    assert info["random_init"] and info["model"] == "tiny-test-random/random-init" and info["index_version"]


def test_dim_mismatch_is_a_clear_error(tmp_path, engine):
    """An index whose vectors do not have the model's dim is refused with a clear message."""
    from mining.index import build_index
    from mining.query import QueryEngine
    from mining.store import ShardOutput, write_shard

    out = ShardOutput(shard="file:///x/shard", date="2026-01-01", run_id="t", model="tiny-test-random/random-init",
                      dim=8, random_init=True)
    rng = np.random.default_rng(0)
    for i in range(20):
        out.patches.append(dict(patch_id=i + 1, image_id="img", image_uri="/x/a.jpg", shard=out.shard, date=out.date,
                                x0=0, y0=0, x1=10 + i, y1=10 + i, level=1, score=0.5, model=out.model, run_id="t"))
    out.embeddings.append(rng.standard_normal((20, 8)).astype(np.float32))
    write_shard(str(tmp_path / "d"), out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_index(str(tmp_path / "d"), str(tmp_path / "i"), kind="flat", use_ray=False, verbose=False)
        with pytest.raises(ValueError, match="embeds to dim 64 but index version .* has dim 8"):
            QueryEngine(str(tmp_path / "i"))
        with pytest.raises(ValueError, match="dim 64 but index .* has dim 8"):
            QueryEngine(str(tmp_path / "i"), embedder=engine.embedder)


# --------------------------------------------------------------------------- exports + CLI

def test_export_files_readable(qd, engine, tmp_path):
    from PIL import Image

    from mining.export import export_hits, exported_image_ids
    from mining.query import query_info

    t = engine.text("a road narrows sign", k=8)
    info = query_info(t)
    res = export_hits(t, str(tmp_path), query={"type": "text", "text": "a road narrows sign"},
                      index_version=info["index_version"], model=info["model"], random_init=info["random_init"])
    lines = [json.loads(x) for x in open(res["manifest_jsonl"])]
    tab = pq.read_table(res["manifest_parquet"])
    assert tab.num_rows == len(lines) == len(set(t.column("image_uri").to_pylist()))
    assert sum(len(r["boxes"]) for r in lines) == 8
    r0 = lines[0]
    assert {"image_uri", "boxes", "scores", "query", "index_version", "exported_at"} <= set(r0)
    assert r0["index_version"] == info["index_version"] and "road narrows" in r0["query"]
    assert r0["boxes"][0] == [t.column(c)[0].as_py() for c in ("x0", "y0", "x1", "y1")]
    assert os.path.exists(tmp_path / "manifest.jsonl") and os.path.exists(tmp_path / "manifest.parquet")
    im = Image.open(res["contact_sheet"])
    assert im.format == "PNG" and im.width > 160 and im.height > 160
    html = open(res["gallery"]).read()
    assert html.count('class="tile"') == t.num_rows == 8 and "RANDOMLY" in html
    for r in lines:
        Image.open(tmp_path / "gallery" / "frames" / f"{r['image_id']}.jpg").verify()
        assert r["width"] == 1360 and r["height"] == 800 and r["hit_ids"][0] == f"{r['patch_ids'][0]:016x}"
        for h in r["hit_ids"]:
            Image.open(tmp_path / "gallery" / "crops" / f"{h}.jpg").verify()
    assert exported_image_ids(str(tmp_path)) == set(tab.column("image_id").to_pylist())


def test_cli_in_process_image_query_and_exclude_exported(qd, engine, tmp_path):
    from mining.export import export_hits

    out = tmp_path / "out"
    # an earlier export of frame 0 (what --exclude-exported must skip)
    prev = engine.image(frame_bytes(qd.images[0]), box=BOXES[2], k=2)
    export_hits(prev.filter(pc.equal(prev.column("image_uri"), qd.images[0])), str(out), query="earlier",
                index_version="v0")
    uri = qd.images[2]
    cp = run_cli(["jobs.query", "--index", qd.index, "--image", uri, "--box", ",".join(map(str, BOXES[2])),
                  "--k", "5", "--out", str(out), "--exclude-exported"], timeout=300)
    lines = [x.split() for x in cp.stdout.splitlines() if x.strip() and x.split()[0].isdigit()]
    assert len(lines) == 5
    assert lines[0][:1] == ["1"] and lines[0][2] == ",".join(map(str, BOXES[2])) and lines[0][3] == uri
    assert qd.images[0] not in {x[3] for x in lines}
    assert "RANDOMLY INITIALISED" in cp.stderr and "excluding 1 already exported images" in cp.stderr
    for f in ("manifest.jsonl", "manifest.parquet", "contact_sheet.png", "gallery.html"):
        assert (out / f).exists(), f
    m = [json.loads(x) for x in open(out / "manifest.jsonl")]
    assert {r["image_uri"] for r in m} == {x[3] for x in lines}
    assert m[0]["boxes"][0] == list(BOXES[2]) and json.loads(m[0]["query"])["type"] == "image"
