"""Faults around the Delta store (issue 15), on the real local Ray head and S3 server: a truncated tar
later replaced by the full one, a transient 503 in the middle of a tar read, a run killed between the
data write and the Delta commit, and a growing image folder. (The actor SIGKILL, driver SIGKILL + rerun
equality and flaky-S3 tests live in tests/test_nightly.py and run on the Delta store too.)"""
from __future__ import annotations

import io
import json
import shutil
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
def test_truncated_tar_is_partial_then_remined_when_replaced(ray_head, s3_server):
    bucket = s3_server.make_bucket()
    fs, _ = get_fs(f"s3://{bucket}")
    full = _tar_bytes(3)
    fs.pipe(f"{bucket}/night/a.tar", full[: int(len(full) * 0.8)])    # the third frame is cut off
    out = f"s3://{bucket}/out"
    env = {"RAY_ADDRESS": ray_head.address}
    args = ["jobs.mine", "--input", f"s3://{bucket}/night", "--output", out, "--date", "2026-11-20", *TINY, "--json"]
    s1 = _summary(run_cli(args, env=env))
    assert s1["shards_mined"] == 1 and s1["shards_failed"] == 0
    (rec,) = read_ledger(out)
    assert rec["status"] == "partial" and rec["gen"] == 1 and rec["num_images"] == 2, rec
    assert any(e["stage"] == "read" for e in open_errors(out).to_table().to_pylist())
    n_partial = _unique(out)
    s2 = _summary(run_cli(args, env=env))                       # unchanged: not mined again
    assert s2["shards_skipped"] == 1 and s2.get("shards_mined", 0) == 0
    fs.pipe(f"{bucket}/night/a.tar", full)                      # the full tar arrives (new size + ETag)
    s3 = _summary(run_cli(args, env=env))
    assert s3["shards_mined"] == 1
    (rec,) = read_ledger(out)
    assert rec["status"] == "committed" and rec["gen"] == 2 and rec["num_images"] == 3, rec
    assert _unique(out) > n_partial and open_images(out).count_rows() == 3
    assert not [e for e in open_errors(out).to_table().to_pylist() if e["stage"] == "read"]
    from deltalake import DeltaTable

    from mining.store import delta_storage_options

    plain = DeltaTable(table_uri(out, "patches"), storage_options=delta_storage_options(out)).to_pyarrow_dataset()
    assert plain.count_rows() == open_patches(out).count_rows()    # generation 1 was removed when published


@pytest.mark.s3
def test_transient_503_mid_tar_read_fails_the_attempt_not_the_shard(ray_head, s3_server):
    bucket = s3_server.make_bucket()
    fs, _ = get_fs(f"s3://{bucket}")
    fs.pipe(f"{bucket}/night/a.tar", _tar_bytes(3, pad_bytes=9 << 20))
    # 503 ServiceUnavailable on the second 8 MiB range of the tar, twice: s3fs retries a range once, so
    # the read fails mid-tar, the attempt fails, and the driver's second attempt reads the whole tar
    mid_read = lambda method, path, headers: (method == "GET" and ".tar" in path  # noqa: E731
                                              and (headers.get("Range") or "bytes=0-").split("=")[1][:1] != "0")
    with FlakyProxy(s3_server.endpoint, fail_every=1, only=mid_read, max_failures=2, body=UNAVAILABLE) as proxy:
        env = {**s3_server.env, "AWS_ENDPOINT_URL": proxy.endpoint, "AWS_ENDPOINT_URL_S3": proxy.endpoint,
               "MINING_S3_RETRIES": "1", "RAY_ADDRESS": ray_head.address}
        cp = run_cli(["jobs.mine", "--input", f"s3://{bucket}/night", "--output", f"s3://{bucket}/out", *TINY,
                      "--max-attempts", "3", "--json"], env=env)
        assert proxy.failed >= 1, (proxy.requests, proxy.failed)
    s = _summary(cp)
    assert s["shards_mined"] == 1 and s["shards_failed"] == 0
    assert s["attempts"].get(f"s3://{bucket}/night/a.tar", 1) >= 2, s["attempts"]   # the attempt failed, was retried
    (rec,) = read_ledger(f"s3://{bucket}/out")
    assert rec["status"] == "committed" and rec["num_images"] == 3 and rec["num_errors"] == 0, rec


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


def test_growing_image_folder_mines_only_new_files(ray_head, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    imgs = gtsdb_images(5)
    for p in imgs[:3]:
        shutil.copy(p, folder / p.name)
    out = str(tmp_path / "out")
    args = ["jobs.mine", "--input", str(folder), "--output", out, *TINY, "--images-per-shard", "2", "--json"]
    env = {"RAY_ADDRESS": ray_head.address}
    s1 = _summary(run_cli(args, env=env))
    assert s1["shards_mined"] == 2 and s1["images"] == 3
    n1 = _unique(out)
    for p in imgs[3:]:
        shutil.copy(p, folder / p.name)
    s2 = _summary(run_cli(args, env=env))
    assert s2["shards_mined"] == 1 and s2["images"] == 2, s2          # only the 2 new files
    assert _unique(out) > n1 and open_images(out).count_rows() == 5
    s3 = _summary(run_cli(args, env=env))
    assert s3.get("shards_mined", 0) == 0
