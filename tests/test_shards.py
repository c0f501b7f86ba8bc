"""Shard readers: tar (WebDataset), Parquet, directories; local and on the local S3 server."""
import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mining.shards import iter_shard, list_shards, write_tar_shard
from tests.conftest import gtsdb_images


def _jpgs(n):
    return [p.read_bytes() for p in gtsdb_images(n)]


def test_tar_shard_with_sidecars_local(tmp_path):
    imgs = _jpgs(2)
    uri = write_tar_shard(str(tmp_path / "night/shard-0000.tar"), [
        ("f000", {"jpg": imgs[0], "json": json.dumps({"camera": "front", "timestamp": 1.5}).encode()}),
        ("f001", {"jpg": imgs[1], "json": b"{not json"}),
    ])
    refs = list_shards(str(tmp_path / "night"))
    assert [r.uri for r in refs] == [uri] and refs[0].kind == "tar"
    recs = list(iter_shard(refs[0]))
    assert [r.key for r in recs] == ["f000.jpg", "f001.jpg"]
    assert recs[0].metadata == {"camera": "front", "timestamp": 1.5} and recs[0].sidecar_error is None
    assert recs[1].data == imgs[1] and "bad sidecar JSON" in recs[1].sidecar_error  # frame still mined
    assert recs[0].image_uri == f"{uri}#f000.jpg"


def test_corrupt_tar_member_becomes_an_error_record(tmp_path):
    imgs = _jpgs(2)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i, data in enumerate(imgs):
            ti = tarfile.TarInfo(f"f{i:03d}.jpg")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    raw = bytearray(buf.getvalue())
    # cut the archive in the middle of the second member's data: a truncated member
    second = raw.find(b"f001.jpg")
    p = tmp_path / "bad.tar"
    p.write_bytes(bytes(raw[: second + 512 + 1000]))
    recs = list(iter_shard(list_shards(str(p))[0]))
    good = [r for r in recs if r.error is None]
    bad = [r for r in recs if r.error is not None]
    assert len(good) == 1 and good[0].data == imgs[0]
    assert bad and bad[0].error[0] == "read" and ("truncated" in bad[0].error[1] or "corrupt" in bad[0].error[1])


def test_parquet_shard_streams_rows(tmp_path):
    imgs = _jpgs(3)
    t = pa.table({"id": ["a", "b", "c"], "image": pa.array(imgs, pa.binary()), "camera": ["front", "left", "front"]})
    pq.write_table(t, tmp_path / "s.parquet", row_group_size=1)
    recs = list(iter_shard(list_shards(str(tmp_path / "s.parquet"))[0]))
    assert [r.key for r in recs] == ["a", "b", "c"]
    assert recs[1].metadata == {"camera": "left"} and recs[2].data == imgs[2]


def test_parquet_shard_missing_column_is_a_clear_error(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "bytes": [b"x"]}), tmp_path / "s.parquet")
    with pytest.raises(ValueError, match="no column 'image'"):
        list(iter_shard(list_shards(str(tmp_path / "s.parquet"))[0]))


def test_directory_is_chunked_into_stable_shards(tmp_path):
    for i, data in enumerate(_jpgs(5)):
        (tmp_path / f"{i:05d}.jpg").write_bytes(data)
    a = list_shards(str(tmp_path), images_per_dir_shard=2)
    b = list_shards(str(tmp_path), images_per_dir_shard=2)
    assert [r.uri for r in a] == [r.uri for r in b] and len(a) == 3
    assert sum(len(r.members) for r in a) == 5
    assert len({m for r in a for m in r.members}) == 5


def test_glob_and_missing_input(tmp_path):
    for i in range(3):
        write_tar_shard(str(tmp_path / f"s{i}.tar"), [("k", {"jpg": b"x"})])
    assert len(list_shards(str(tmp_path / "s[01].tar"))) == 2
    with pytest.raises(FileNotFoundError):
        list_shards(str(tmp_path / "nothing-here"))
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        list_shards("gs://bucket/x")


@pytest.mark.s3
def test_tar_and_parquet_shards_on_local_s3(s3_server):
    imgs = _jpgs(2)
    b = s3_server.make_bucket()
    write_tar_shard(f"s3://{b}/night/a.tar", [("f0", {"jpg": imgs[0]})])
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": ["x"], "image": pa.array([imgs[1]], pa.binary())}), buf)
    s3_server.fs().pipe(f"{b}/night/b.parquet", buf.getvalue())
    refs = list_shards(f"s3://{b}/night")
    assert [r.kind for r in refs] == ["tar", "parquet"]
    assert [len(list(iter_shard(r))) for r in refs] == [1, 1]
    # a shard that arrives after the first listing is seen (no stale listing cache)
    write_tar_shard(f"s3://{b}/night/c.tar", [("f0", {"jpg": imgs[0]})])
    assert len(list_shards(f"s3://{b}/night")) == 3
