"""Issue 14, item 4: per-patch novelty (mining), kNN uniqueness (reduce) and query-free novelty queries.

The mining tests train a tiny epitome on a few real GTSDB photos (downscaled to 340 x 200 to keep
the CPU runs short; skipped with a message when ../shared is absent), save it, and mine a tar shard
with the ``epitome`` backend through the mining actor's own code (:class:`ShardMiner`, no Ray).
"""
from __future__ import annotations

import io
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
from tests.conftest import gtsdb_images

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
