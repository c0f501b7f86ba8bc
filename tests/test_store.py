"""Store: schema, stable patch ids, commit visibility, deterministic rewrites."""
import numpy as np
import pyarrow as pa
import pytest

from mining.store import (ShardOutput, embeddings_from_arrow, make_image_id, make_patch_id, open_errors, open_images,
                          open_patches, patch_schema, read_ledger, write_shard)


def _out(shard="s3://b/night/a.tar", n=3, dim=8, seed=0, date="2026-11-20"):
    rng = np.random.default_rng(seed)
    o = ShardOutput(shard=shard, date=date, run_id="r1", model="m/x", dim=dim)
    iid = make_image_id(f"{shard}#f0.jpg")
    for i in range(n):
        box = (10 * i, 0, 10 * i + 50, 50)
        o.patches.append(dict(patch_id=make_patch_id(iid, box, 2), image_id=iid, image_uri=f"{shard}#f0.jpg", shard=shard,
                              date=o.date, x0=box[0], y0=box[1], x1=box[2], y1=box[3], level=2, score=0.5, model=o.model,
                              run_id="r1"))
    e = rng.normal(size=(n, dim)).astype(np.float32)
    o.embeddings.append(e / np.linalg.norm(e, axis=1, keepdims=True))
    o.images.append(dict(image_id=iid, image_uri=f"{shard}#f0.jpg", shard=shard, date=o.date, width=100, height=50,
                         num_patches=n, status="ok", reason="", metadata="{}", run_id="r1"))
    o.add_error(f"{shard}#f1.jpg", "decode", "empty file (0 bytes)")
    return o


def test_patch_id_stable_and_sensitive():
    iid = make_image_id("s3://b/a.tar#f0.jpg")
    assert iid == make_image_id("s3://b/a.tar#f0.jpg") and len(iid) == 16
    a = make_patch_id(iid, (0, 0, 10, 10), 1)
    assert a == make_patch_id(iid, [0, 0, 10, 10], 1) and 0 <= a < 2**63
    assert len({a, make_patch_id(iid, (0, 0, 10, 11), 1), make_patch_id(iid, (0, 0, 10, 10), 2),
                make_patch_id(make_image_id("s3://b/a.tar#f1.jpg"), (0, 0, 10, 10), 1)}) == 4


def test_schema_has_the_documented_columns():
    s = patch_schema(512)
    assert s.field("patch_id").type == pa.int64()
    for c in ("x0", "y0", "x1", "y1"):
        assert s.field(c).type == pa.int32()
    assert s.field("embedding").type == pa.list_(pa.float16(), 512)
    assert set(s.names) >= {"image_id", "image_uri", "shard", "level", "score", "model", "run_id"}


def test_uncommitted_shard_is_invisible_then_visible(tmp_path):
    root = str(tmp_path)
    o = _out()
    rec = write_shard(root, o, commit=False)
    assert read_ledger(root) == []
    with pytest.raises(FileNotFoundError):
        open_patches(root)
    from mining.store import commit_record

    commit_record(root, rec)
    t = open_patches(root).to_table()
    assert t.num_rows == 3 and t.schema.field("embedding").type.list_size == 8
    emb = embeddings_from_arrow(t["embedding"])
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=2e-3)
    assert open_images(root).to_table().num_rows == 1
    assert open_errors(root).to_table().column("reason").to_pylist() == ["empty file (0 bytes)"]


def test_rewriting_a_shard_replaces_it(tmp_path):
    root = str(tmp_path)
    write_shard(root, _out(n=3))
    write_shard(root, _out(n=3))  # a retry of the same shard
    t = open_patches(root).to_table()
    assert t.num_rows == 3 and len(set(t["patch_id"].to_pylist())) == 3
    assert len(read_ledger(root)) == 1


def test_failed_shards_are_not_read_as_patches(tmp_path):
    root = str(tmp_path)
    write_shard(root, _out(shard="a"))
    write_shard(root, _out(shard="b", n=0), status="failed")
    assert {r["shard"] for r in read_ledger(root)} == {"a"}
    assert open_patches(root).to_table().num_rows == 3
    assert open_errors(root).to_table().num_rows == 2


def test_mixed_embedding_dims_refused(tmp_path):
    write_shard(str(tmp_path), _out(shard="a", dim=8))
    write_shard(str(tmp_path), _out(shard="b", dim=16))
    with pytest.raises(ValueError, match="mix embedding dims"):
        open_patches(str(tmp_path))
