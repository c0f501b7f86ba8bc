"""Faults around the Delta store (issue 15), on the real local Ray head and S3 server: a truncated tar
later replaced by the full one, a transient 503 in the middle of a tar read and a growing image folder
(one night of faults, three runs), and a run killed between the data write and the Delta commit. (The actor SIGKILL, driver SIGKILL + rerun
equality and flaky-S3 tests live in tests/test_nightly.py and run on the Delta store too.)"""
from __future__ import annotations

import io
import json
import tarfile

import pytest

from mining.fs import get_fs
from mining.shards import write_tar_shard
from mining.store import open_errors, open_images, open_patches, publish, read_ledger, table_uri
from tests.conftest import gtsdb_images, run_cli
from tests.flaky_proxy import UNAVAILABLE, FlakyProxy

TINY = ["--clip-model", "tiny-test-random", "--clip-random-init"]


def _tar_bytes(n: int, pad_bytes: int = 0) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for p in gtsdb_images(n):
            data = p.read_bytes()
            ti = tarfile.TarInfo(f"{p.stem}.jpg")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        if pad_bytes:     # a non-image member: makes the tar span several 8 MiB ranged reads
            ti = tarfile.TarInfo("zz-padding.bin")
            ti.size = pad_bytes
            tf.addfile(ti, io.BytesIO(b"\0" * pad_bytes))
    return buf.getvalue()


def _summary(cp) -> dict:
    return json.loads([ln for ln in cp.stdout.splitlines() if ln.startswith("{")][-1])


def _unique(root: str) -> int:
    t = open_patches(root).to_table(columns=["patch_id"])
    assert len(set(t.column("patch_id").to_pylist())) == t.num_rows
    return t.num_rows


@pytest.mark.s3
def test_a_night_of_faults_on_s3_truncated_tar_transient_503_growing_folder(ray_head, s3_server):
    """Three scenarios share three mining runs (each run costs ~25 s of start-up here):

    - ``a.tar`` is truncated (the third frame cut off): committed ``partial`` with the frames read and a
      ``read`` error; not mined again while unchanged; re-mined as generation 2 when the full tar
      arrives (new size + ETag), replacing generation 1 for plain Delta readers too;
    - ``b.tar`` gets a 503 on its second 8 MiB range, twice (s3fs retries a range once): the read fails
      mid-tar, the attempt fails, and the driver's next attempt reads the whole tar;
    - loose images in the same folder grow from 3 to 5: the second run mines only the 2 new files.
    """
    bucket = s3_server.make_bucket()
    fs, _ = get_fs(f"s3://{bucket}")
    full = _tar_bytes(3)
    fs.pipe(f"{bucket}/night/a.tar", full[: int(len(full) * 0.8)])    # the third frame is cut off
    fs.pipe(f"{bucket}/night/b.tar", _tar_bytes(3, pad_bytes=9 << 20))
    imgs = gtsdb_images(8)[3:]
    for p in imgs[:3]:
        fs.pipe(f"{bucket}/night/{p.name}", p.read_bytes())
    out = f"s3://{bucket}/out"
    args = ["jobs.mine", "--input", f"s3://{bucket}/night", "--output", out, "--date", "2026-11-20", *TINY,
            "--images-per-shard", "2", "--max-attempts", "3", "--json"]
    b_mid_read = lambda method, path, headers: (method == "GET" and "b.tar" in path  # noqa: E731
                                                and (headers.get("Range") or "bytes=0-").split("=")[1][:1] != "0")
    with FlakyProxy(s3_server.endpoint, fail_every=1, only=b_mid_read, max_failures=2, body=UNAVAILABLE) as proxy:
        env = {**s3_server.env, "AWS_ENDPOINT_URL": proxy.endpoint, "AWS_ENDPOINT_URL_S3": proxy.endpoint,
               "MINING_S3_RETRIES": "1", "RAY_ADDRESS": ray_head.address}
        s1 = _summary(run_cli(args, env=env))
        assert proxy.failed >= 1, (proxy.requests, proxy.failed)
    env = {"RAY_ADDRESS": ray_head.address}
    assert s1["shards_mined"] == 4 and s1["shards_failed"] == 0, s1        # a, b, 2 folder chunks
    assert s1["attempts"].get(f"s3://{bucket}/night/b.tar", 1) >= 2, s1["attempts"]   # b's attempt failed, retried
    recs = {r["shard"].rsplit("/", 1)[-1]: r for r in read_ledger(out)}
    a = recs["a.tar"]
    assert a["status"] == "partial" and a["gen"] == 1 and a["num_images"] == 2, a
    b = recs["b.tar"]
    assert b["status"] == "committed" and b["num_images"] == 3 and b["num_errors"] == 0, b
    assert sum(r["num_images"] for k, r in recs.items() if "#" in k) == 3
    assert any(e["stage"] == "read" and "a.tar" in e["uri"] for e in open_errors(out).to_table().to_pylist())
    n1 = _unique(out)

    s2 = _summary(run_cli(args, env=env))                       # unchanged: nothing mined again
    # the two tars are planned and skipped; the folder's files are all in committed chunks, so no chunk is made
    assert s2.get("shards_mined", 0) == 0 and s2["shards_total"] == s2["shards_skipped"] == 2, s2

    fs.pipe(f"{bucket}/night/a.tar", full)                      # the full tar arrives (new size + ETag)
    for p in imgs[3:]:
        fs.pipe(f"{bucket}/night/{p.name}", p.read_bytes())     # 2 more frames in the folder
    s3 = _summary(run_cli(args, env=env))
    assert s3["shards_mined"] == 2 and s3["images"] == 3 + 2, s3      # a (gen 2) + one chunk of the 2 new files
    recs = {r["shard"].rsplit("/", 1)[-1]: r for r in read_ledger(out)}
    a = recs["a.tar"]
    assert a["status"] == "committed" and a["gen"] == 2 and a["num_images"] == 3, a
    assert _unique(out) > n1 and open_images(out).count_rows() == 3 + 3 + 5
    assert not [e for e in open_errors(out).to_table().to_pylist() if e["stage"] == "read"]
    from deltalake import DeltaTable

    from mining.store import delta_storage_options

    plain = DeltaTable(table_uri(out, "patches"), storage_options=delta_storage_options(out)).to_pyarrow_dataset()
    assert plain.count_rows() == open_patches(out).count_rows()    # generation 1 was removed when published


def test_killed_between_data_write_and_commit(ray_head, tmp_path):
    night = tmp_path / "in"
    night.mkdir()
    for i, p in enumerate(gtsdb_images(2)):
        write_tar_shard(str(night / f"s{i}.tar"), [(p.stem, {"jpg": p.read_bytes()})])
    out = str(tmp_path / "out")
    fault = tmp_path / "fault-fired"
    cp = run_cli(["jobs.mine", "--input", str(night), "--output", out, *TINY, "--json"],
                 env={"RAY_ADDRESS": ray_head.address, "MINING_FAULT_EXIT_BEFORE_COMMIT": str(fault)})
    assert fault.exists()                                         # one actor died after writing, before committing
    s = _summary(cp)
    assert s["shards_mined"] == 2 and sum(s["attempts"].values()) >= 2, s
    recs = read_ledger(out)
    assert len(recs) == 2 and {r["status"] for r in recs} == {"committed"}
    n = _unique(out)
    assert n == sum(r["num_patches"] for r in recs)
    files = [p for p in (tmp_path / "out" / "patches").rglob("*.parquet") if "_delta_log" not in p.parts]
    assert len(files) == 3                                        # the dead attempt's file: written, never referenced
    from deltalake import DeltaTable

    publish(out)
    dt = DeltaTable(table_uri(out, "patches"))
    assert len(dt.file_uris()) == 2 and dt.to_pyarrow_dataset().count_rows() == n
