"""Issue 14, item 4: per-patch novelty (mining), kNN uniqueness (reduce) and query-free novelty queries.

The mining tests train a tiny epitome on a few real GTSDB photos (downscaled to 340 x 200 to keep
the CPU runs short; skipped with a message when ../shared is absent), save it, and mine a tar shard
with the ``epitome`` backend through the mining actor's own code (:class:`ShardMiner`, no Ray).
"""
from __future__ import annotations

import io
import json
import os
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mining.pipeline import MineConfig, ShardMiner
from mining.shards import list_shards, write_tar_shard
from mining.store import open_patches
from conftest import gtsdb_images, run_cli
from test_query import query_dataset  # noqa: F401 (session fixture: the query tests' dataset + flat index)

TINY = dict(clip_model="tiny-test-random", clip_pretrained=None, clip_random_init=True, date="2026-11-20", run_id="t")


def _small_frames(n):
    from PIL import Image

    jpegs, arrays = [], []
    for p in gtsdb_images(n):
        im = Image.open(p).convert("RGB").resize((340, 200))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        jpegs.append(buf.getvalue())
        arrays.append(np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    return jpegs, arrays


@pytest.fixture(scope="module")
def epitome_run(tmp_path_factory):
    """A 4-frame shard and a tiny epitome trained on its frames (unlabelled, as a night's run would)."""
    from mining.epitome.fit import TrainConfig, train_on_images
    from mining.epitome.model import EpitomeSpec, save_epitome

    base = tmp_path_factory.mktemp("nov")
    jpegs, arrays = _small_frames(4)
    shard = list_shards(write_tar_shard(str(base / "s.tar"), [(f"f{i}", {"jpg": d}) for i, d in enumerate(jpegs)]))[0]
    torch.manual_seed(0)
    model, _ = train_on_images(arrays, EpitomeSpec(size=8, patch=3, scale=4), TrainConfig(steps=30, batch=128),
                               device="cpu")
    path = str(base / "epitome.pt")
    save_epitome(model, path, meta={"frames": len(arrays)})
    return dict(shard=shard, model=path, arrays=arrays)


def _cfg(**kw):
    return MineConfig(**TINY, frame_batch=2, batch_size=16, **kw)


@pytest.mark.parametrize("device_path", [False, True], ids=["cpu-per-frame", "batched-device-path"])
def test_mining_with_an_epitome_writes_novelty_from_the_same_map(epitome_run, tmp_path, monkeypatch, device_path):
    from mining.epitome.backend import EpitomeSaliency

    monkeypatch.setenv("MINING_EPITOME", epitome_run["model"])
    miner = ShardMiner(_cfg(saliency="epitome"))
    miner.device_path = device_path  # True: the CUDA path's batched select (select_batch), run on CPU tensors
    rec = miner.mine_shard(epitome_run["shard"], str(tmp_path))
    t = open_patches(str(tmp_path)).to_table()
    assert t.num_rows == rec["num_patches"] > 0
    assert t.schema.field("novelty").type == pa.float32()
    nov = t["novelty"].to_numpy(zero_copy_only=False)
    assert t["novelty"].null_count == 0 and np.isfinite(nov).all()
    assert nov.std() > 0  # boxes differ in novelty
    # the column is the mean raw NLL of the frame's map inside each box (recomputed here)
    ref = EpitomeSaliency(epitome_run["model"], device="cpu")
    for i, frame in enumerate(epitome_run["arrays"]):
        rows = t.filter(pa.compute.ends_with(t["image_uri"], f"#f{i}.jpg"))
        if rows.num_rows == 0:
            continue
        boxes = np.stack([rows[c].to_numpy() for c in ("x0", "y0", "x1", "y1")], 1)
        want = ref.box_novelty(torch.from_numpy(frame).permute(2, 0, 1).contiguous(), boxes)
        np.testing.assert_allclose(rows["novelty"].to_numpy(), want, rtol=1e-5, atol=1e-4)


def test_mining_without_an_epitome_writes_null_novelty(epitome_run, tmp_path):
    ShardMiner(_cfg()).mine_shard(epitome_run["shard"], str(tmp_path))  # default backend: no epitome member
    t = open_patches(str(tmp_path)).to_table()
    assert t.num_rows > 0 and t["novelty"].null_count == t.num_rows


def test_parts_written_before_the_novelty_column_read_as_null(epitome_run, tmp_path):
    from mining.store import read_part_columns

    ShardMiner(_cfg()).mine_shard(epitome_run["shard"], str(tmp_path))
    part = next((tmp_path / "patches").rglob("*.parquet"))
    old = pq.read_table(part).drop_columns(["novelty"])  # what an older miner wrote
    pq.write_table(old, part)
    t = open_patches(str(tmp_path)).to_table()
    assert t.num_rows == old.num_rows and t["novelty"].null_count == t.num_rows
    got = read_part_columns(str(part), ["patch_id", "novelty", "level"])
    assert got.column_names == ["patch_id", "novelty", "level"] and got["novelty"].null_count == got.num_rows
    with pytest.raises(KeyError, match="nope"):
        read_part_columns(str(part), ["patch_id", "nope"])


# --------------------------------------------------------------------------- kNN uniqueness (reduce stage)

def _store_with_outlier(root: str, n_shards: int = 3, per_shard: int = 120, *, date="2026-11-20", prefix="s",
                        outlier: bool = True, novelty: bool = False, seed: int = 1):
    """Committed shards of clustered unit vectors; the last patch of shard 0 is a planted outlier
    (the direction opposite to the data's mean). Returns (patch_ids (N,), vectors (N, D) float32)."""
    from mining.index.testing import mixture
    from mining.store import ShardOutput, make_image_id, make_patch_id, write_shard

    mix = mixture(seed=0)
    pids, xs = [], []
    for s in range(n_shards):
        x = mix.sample(per_shard, seed=seed * 100 + s).astype(np.float32)
        if outlier and s == 0:
            o = -x.mean(axis=0)
            x[-1] = o / np.linalg.norm(o)
        x = x.astype(np.float16)
        uri = f"/data/{prefix}-{s}"
        out = ShardOutput(shard=uri, date=date, run_id="t", model="synthetic", dim=mix.dim)
        for i in range(per_shard):
            image_uri = f"{uri}/img{i // 6:04d}.jpg"
            iid = make_image_id(image_uri)
            box = (10 * (i % 6), 0, 10 * (i % 6) + 8, 8)
            pid = make_patch_id(iid, box, 1)
            row = dict(patch_id=pid, image_id=iid, image_uri=image_uri, shard=uri, date=date, x0=box[0], y0=box[1],
                       x1=box[2], y1=box[3], level=1, score=0.5, model="synthetic", run_id="t")
            if novelty:
                row["novelty"] = float(i % 7)
            out.patches.append(row)
            pids.append(pid)
        out.embeddings.append(x)
        write_shard(root, out)
        xs.append(x.astype(np.float32))
    x = np.concatenate(xs)
    return np.asarray(pids, np.int64), x / np.linalg.norm(x, axis=1, keepdims=True)


def _brute_uniqueness(x: np.ndarray) -> np.ndarray:
    """The documented formula, directly: the 3 nearest other vectors, weights 0.6/0.3/0.1, mean, / max."""
    cos = np.clip(x @ x.T, -1, 1)
    np.fill_diagonal(cos, -np.inf)
    nn = -np.sort(-cos, axis=1)[:, :3]
    r = (np.sqrt(np.maximum(0, 2 - 2 * nn)) * np.array([0.6, 0.3, 0.1])).mean(axis=1)
    return r / r.max()


def test_neighbour_distances_drop_self_by_id_and_count_missing_as_far():
    from mining.index.uniqueness import neighbour_distances, weighted_distance

    ids = np.array([[7, 5, 9, 4], [5, 7, 3, 2], [1, 2, -1, -1]])  # self first / second / absent (ANN miss)
    s = np.array([[1.0, 0.5, 0.0, -1.0], [0.9, 1.0, 0.0, 0.0], [0.5, 0.0, -np.inf, -np.inf]])
    d = neighbour_distances(np.array([7, 7, 3]), s, ids, 3)
    np.testing.assert_allclose(d[0], [1.0, np.sqrt(2), 2.0])           # self (7, column 0) dropped
    np.testing.assert_allclose(d[1], np.sqrt([2 - 1.8, 2, 2]))         # self (column 1) dropped
    np.testing.assert_allclose(d[2], [1.0, np.sqrt(2), 2.0])           # no self: last column dropped, -1 = 2.0
    np.testing.assert_allclose(weighted_distance(d[:1]), [(0.6 + 0.3 * np.sqrt(2) + 0.2) / 3])


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_uniqueness_is_written_with_the_index_and_ranks_the_outlier_first(tmp_path, kind):
    from mining.index import build_index, open_index
    from mining.index.uniqueness import read_uniqueness

    pids, x = _store_with_outlier(str(tmp_path / "data"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = build_index(str(tmp_path / "data"), str(tmp_path / "idx"), kind=kind, use_ray=False, verbose=False)
    assert m["uniqueness"]["n"] == len(pids) and m["uniqueness"]["k"] == 3 and m["uniqueness"]["seconds"] >= 0
    u = read_uniqueness(open_index(str(tmp_path / "idx")).path)
    assert u.column_names == ["patch_id", "uniqueness", "knn_distance"]
    got = u["uniqueness"].to_numpy()
    assert ((got >= 0) & (got <= 1)).all() and got.max() == pytest.approx(1.0)
    assert sorted(u["patch_id"].to_pylist()) == u["patch_id"].to_pylist() == sorted(pids.tolist())
    outlier = pids[len(pids) // 3 - 1]
    assert u["patch_id"][int(np.argmax(got))].as_py() == outlier  # the planted outlier is the most unique
    want = _brute_uniqueness(x)[np.argsort(pids)]
    np.testing.assert_allclose(got, want, atol=2e-3 if kind == "flat" else 0.05)


def test_update_adds_uniqueness_for_all_patches_and_reads_an_older_version_without_novelty(tmp_path):
    from mining.index import build_index, open_index, update_index
    from mining.index.search import META_FILE, read_meta, write_meta
    from mining.index.uniqueness import read_uniqueness

    data, idx = str(tmp_path / "data"), str(tmp_path / "idx")
    pids, _ = _store_with_outlier(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_index(data, idx, kind="flat", use_ray=False, verbose=False)
        path = os.path.join(open_index(idx).path, META_FILE)
        old = read_meta(path).drop_columns(["novelty"])  # a version built before the column existed
        write_meta(path + ".old", old)  # a new file (the old one is memory-mapped), renamed over it
        os.replace(path + ".old", path)
        del old
        pids2, _ = _store_with_outlier(data, n_shards=1, date="2026-11-21", prefix="new", outlier=False,
                                       novelty=True, seed=5)
        m = update_index(data, idx, use_ray=False, verbose=False)
    assert m["changed"] and m["retrained"] is None
    v1 = open_index(idx)
    meta = v1.metadata()
    assert meta.num_rows == len(pids) + len(pids2)
    nov = dict(zip(meta["patch_id"].to_pylist(), meta["novelty"].to_pylist()))
    assert all(nov[p] is None for p in pids.tolist()) and all(nov[p] is not None for p in pids2.tolist())
    u = read_uniqueness(v1.path)
    assert u.num_rows == meta.num_rows and set(u["patch_id"].to_pylist()) == set(nov)


# --------------------------------------------------------------------------- query-free mode (engine, CLI)

@pytest.fixture(scope="module")
def novel_engine(query_dataset):  # noqa: F811 - the session fixture of test_query.py
    from mining.query import QueryEngine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return QueryEngine(query_dataset.index, load_embedder=False)  # no CLIP needed for rarity


def _uniqueness_by_pid(index_root: str) -> dict:
    from mining.index import open_index
    from mining.index.uniqueness import read_uniqueness

    u = read_uniqueness(open_index(index_root).path)
    return dict(zip(u["patch_id"].to_pylist(), u["uniqueness"].to_pylist()))


def _expected(rows: list[dict], score: dict, k: int) -> list[int]:
    """Reference: per frame its highest-scoring patch (ties by patch id), frames by that score."""
    best = {}
    for r in rows:
        key = (-score[r["patch_id"]], r["patch_id"])
        if r["image_id"] not in best or key < best[r["image_id"]][0]:
            best[r["image_id"]] = (key, r["patch_id"])
    return [pid for _, pid in sorted(best.values())][:k]


def test_novel_ranks_one_patch_per_frame_by_novelty_uniqueness_or_both(novel_engine, query_dataset):  # noqa: F811
    from mining.novel import percentile_rank
    from mining.query import RESULT_SCHEMA, query_info

    qd = query_dataset
    nov = {r["patch_id"]: r["novelty"] for r in qd.rows}
    uni = _uniqueness_by_pid(qd.index)
    t = novel_engine.novel(10, by="novelty")
    assert t.schema.remove_metadata().equals(RESULT_SCHEMA) and t.num_rows == len(qd.images)
    assert t["patch_id"].to_pylist() == _expected(qd.rows, nov, 10)
    assert len(set(t["image_id"].to_pylist())) == t.num_rows  # one patch per frame
    np.testing.assert_allclose(t["score"].to_numpy(), [nov[p] for p in t["patch_id"].to_pylist()], rtol=1e-6)
    assert t["rank"].to_pylist() == list(range(1, t.num_rows + 1))

    t = novel_engine.novel(2, by="uniqueness")
    assert t["patch_id"].to_pylist() == _expected(qd.rows, uni, 2)
    assert all(0 <= s <= 1 for s in t["score"].to_pylist())

    pids = [r["patch_id"] for r in qd.rows]
    both = (percentile_rank(np.array([nov[p] for p in pids])) + percentile_rank(np.array([uni[p] for p in pids]))) / 2
    t = novel_engine.novel(10)  # default: both signals present -> both
    assert query_info(t)["query"]["by"] == "both"
    assert t["patch_id"].to_pylist() == _expected(qd.rows, dict(zip(pids, both)), 10)

    # the date range restricts the candidates (and the percentile ranks) to that night
    day = qd.rows[0]["date"]
    t = novel_engine.novel(10, date_from=day, date_to=day, by="novelty")
    assert set(t["date"].to_pylist()) == {day}
    assert t["patch_id"].to_pylist() == _expected([r for r in qd.rows if r["date"] == day], nov, 10)


def test_novel_bad_requests_are_query_errors(novel_engine):
    from mining.query import QueryError

    with pytest.raises(QueryError, match="after"):
        novel_engine.novel(5, date_from="2026-02-01", date_to="2026-01-01")
    with pytest.raises(QueryError, match="YYYY-MM-DD"):
        novel_engine.novel(5, date_from="2026-13-01")
    with pytest.raises(QueryError, match="unknown rarity"):
        novel_engine.novel(5, by="weird")
    with pytest.raises(QueryError, match="k must be"):
        novel_engine.novel(0)


def test_novel_falls_back_to_uniqueness_and_explains_a_missing_signal():
    from mining.novel import rarity_scores
    from mining.query import QueryError

    u = np.array([0.2, 0.9, 0.5])
    s, by = rarity_scores(np.full(3, np.nan), u, None)
    assert by == "uniqueness" and s.tolist() == u.tolist()
    with pytest.raises(QueryError, match="no patch in this range has an epitome novelty"):
        rarity_scores(None, u, "novelty")
    with pytest.raises(QueryError, match="this index version has no uniqueness"):
        rarity_scores(np.array([1.0, 2.0, 3.0]), None, "both")
    s, by = rarity_scores(np.array([1.0, np.nan, 3.0]), u, "both")  # a patch with one signal keeps that rank
    np.testing.assert_allclose(s, [(1 / 2 + 1 / 3) / 2, 1.0, (2 / 2 + 2 / 3) / 2])


def test_novel_cli_prints_exports_and_rejects_bad_dates(query_dataset, tmp_path):  # noqa: F811
    qd = query_dataset
    day = qd.rows[-1]["date"]
    out = tmp_path / "rare"
    cp = run_cli(["jobs.query", "--index", qd.index, "--novel", "--date-from", day, "--date-to", day, "--k", "5",
                  "--by", "novelty", "--out", str(out), "--json"])
    hits = [json.loads(x) for x in cp.stdout.splitlines() if x.startswith("{")]
    nov = {r["patch_id"]: r["novelty"] for r in qd.rows}
    assert [h["patch_id"] for h in hits] == _expected([r for r in qd.rows if r["date"] == day], nov, 5)
    for f in ("manifest.jsonl", "manifest.parquet", "contact_sheet.png", "gallery.html"):
        assert (out / f).exists(), f
    m = [json.loads(x) for x in open(out / "manifest.jsonl")]  # one row per frame: here one patch each
    assert all(len(r["patch_ids"]) == 1 for r in m)
    assert {r["patch_ids"][0]: r["scores"][0] for r in m} == pytest.approx({h["patch_id"]: h["score"] for h in hits})
    for bad, msg in ((["--date-from", "2026-1-32"], "--date-from must be a date YYYY-MM-DD"),
                     (["--date-from", "2026-02-01", "--date-to", "2026-01-01"], "is after --date-to")):
        cp = run_cli(["jobs.query", "--index", qd.index, "--novel", "--k", "3", *bad], check=False)
        lines = cp.stderr.strip().splitlines()
        assert cp.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], cp.stderr
