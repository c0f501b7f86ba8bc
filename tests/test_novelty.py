"""Issue 14, item 4: per-patch novelty (mining), kNN uniqueness (reduce) and query-free novelty queries.

The mining tests train a tiny epitome on a few real GTSDB photos (downscaled to 340 x 200 to keep
the CPU runs short; skipped with a message when ../shared is absent), save it, and mine a tar shard
with the ``epitome`` backend through the mining actor's own code (:class:`ShardMiner`, no Ray).
"""
from __future__ import annotations

import io

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
