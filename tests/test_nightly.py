"""Nightly runs and faults (issue 9), on a real Ray head and a real local S3 server.

Every mining run here uses the tiny randomly initialised CLIP config (seeded, so reruns
give identical embeddings) and asks for one GPU per actor on a head started with
--num-gpus=1: the GPU-pinned scheduling path with its CPU fallback.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mining.shards import write_tar_shard
from mining.store import open_errors, open_images, open_patches, read_ledger
from tests.conftest import REPO, gtsdb_images, run_cli

FIX = REPO / "tests" / "fixtures"
TINY = ["--clip-model", "tiny-test-random", "--clip-random-init"]


def _patches(root) -> pa.Table:
    t = open_patches(root).to_table()
    return t.drop_columns(["run_id"]).sort_by("patch_id")


def _tar_night(dirpath, n_shards=3, per_shard=1, offset=0):
    imgs = gtsdb_images(offset + n_shards * per_shard)[offset:]
    for s in range(n_shards):
        samples = [(p.stem, {"jpg": p.read_bytes(), "json": b'{"camera": "front"}'})
                   for p in imgs[s * per_shard:(s + 1) * per_shard]]
        write_tar_shard(str(dirpath / f"shard-{s:04d}.tar"), samples)
    return str(dirpath)


def test_nightly_idempotent_and_driver_killed_rerun_equals_uninterrupted(ray_head, tmp_path):
    """One input, two roots, four runs (each costs ~25 s of start-up, so the two checks share them):

    - ``a``: an uninterrupted ``jobs.nightly``, then the same again: "nothing to do";
    - ``b``: ``jobs.mine`` whose driver is SIGKILLed after its first commit, then rerun: the committed
      shards are skipped, the rest mined;
    - ``a`` and ``b`` are equal row by row (embeddings included): reproducible, and the kill lost and
      duplicated nothing.
    """
    night = _tar_night(tmp_path / "in", n_shards=4, per_shard=1)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    env = {"RAY_ADDRESS": ray_head.address}
    cp1 = run_cli(["jobs.nightly", "--input", night, "--output", a, "--date", "2026-11-20", *TINY], env=env)
    assert "night 2026-11-20: 4 new shards" in cp1.stdout
    cp2 = run_cli(["jobs.nightly", "--input", night, "--output", a, "--date", "2026-11-20", *TINY], env=env)
    assert "nothing to do" in cp2.stdout
    assert len(read_ledger(a)) == 4
    imgs = open_images(a).to_table()
    assert imgs.num_rows == 4 and set(imgs["metadata"].to_pylist()) == {'{"camera": "front"}'}
    parts = sorted(p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a" / "patches").rglob("*.parquet")
                   if "_delta_log" not in p.parts)
    assert len(parts) == 4 and all(p.startswith("patches/2026-11-20/shard-000") for p in parts), parts

    penv = dict(os.environ, RAY_ADDRESS=ray_head.address, RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO))
    args = ["--input", night, "--date", "2026-11-20", *TINY]
    proc = subprocess.Popen([sys.executable, "-m", "jobs.mine", "--output", b, *args], cwd=REPO, env=penv,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(read_ledger(b)) < 1:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(read_ledger(b))
    assert 1 <= n_before < 4, "the driver should have been killed mid-run"
    cp = run_cli(["jobs.mine", "--output", b, *args], env=env)
    assert f"{n_before} skipped" in cp.stdout
    assert len(read_ledger(b)) == 4
    ta, tb = _patches(a), _patches(b)
    assert ta.num_rows > 0 and ta.equals(tb)  # row by row, embeddings included
    assert len(set(ta["patch_id"].to_pylist())) == ta.num_rows
    from deltalake import DeltaTable   # the runs published them: plain Delta readers see the same rows

    assert DeltaTable(str(tmp_path / "a" / "patches")).to_pyarrow_dataset().count_rows() == ta.num_rows
    assert DeltaTable(str(tmp_path / "b" / "patches")).to_pyarrow_dataset().count_rows() == ta.num_rows


def test_actor_killed_mid_shard_is_retried_without_duplicates(ray_head, tmp_path):
    night = _tar_night(tmp_path / "in", n_shards=2, per_shard=6)
    out = str(tmp_path / "out")
    env = dict(os.environ, RAY_ADDRESS=ray_head.address, RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-u", "-m", "jobs.mine", "--input", night, "--output", out, *TINY, "--json"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    import ray
    from ray.util.state import list_actors

    ray.init(address=ray_head.address, namespace="kill-test")
    try:
        for line in proc.stdout:  # wait until the actor is mining
            lines.append(line)
            if "ready" in line and "mining" in line:
                break
        time.sleep(1.0)  # inside the first shard (6 frames take several seconds)
        alive = list_actors(address=ray_head.dashboard,
                            filters=[("class_name", "=", "ShardMiner"), ("state", "=", "ALIVE")])
        assert alive, "no ShardMiner actor found"
        os.kill(alive[0].pid, signal.SIGKILL)
        rest, _ = proc.communicate(timeout=300)
        lines.append(rest)
    finally:
        ray.shutdown()
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines)
    assert proc.returncode == 0, log
    assert "retry 2/3" in log, log
    # issue 16: attempts are per shard: the killed shard took 2, the restart cost no other shard a try
    summary = json.loads(log.strip().splitlines()[-1])
    assert list(summary["attempts"].values()) == [2], summary["attempts"]
    recs = read_ledger(out)
    assert len(recs) == 2
    t = open_patches(out).to_table()
    assert t.num_rows == sum(r["num_patches"] for r in recs)
    assert len(set(t["patch_id"].to_pylist())) == t.num_rows
    assert open_images(out).to_table().num_rows == 12


@pytest.mark.s3
def test_transient_s3_errors_are_retried(ray_head, s3_server, tmp_path):
    from tests.flaky_proxy import FlakyProxy

    bucket = s3_server.make_bucket()
    imgs = gtsdb_images(2)
    for i, p in enumerate(imgs):
        write_tar_shard(f"s3://{bucket}/night/shard-{i}.tar", [(p.stem, {"jpg": p.read_bytes()})])
    with FlakyProxy(s3_server.endpoint, fail_every=4) as proxy:
        env = {**s3_server.env, "AWS_ENDPOINT_URL": proxy.endpoint, "AWS_ENDPOINT_URL_S3": proxy.endpoint,
               "RAY_ADDRESS": ray_head.address}
        # the head was started pointing at the real server: the actors reach the proxy only because
        # the driver passes its S3 settings in the actors' runtime_env (mining.pipeline.actor_env)
        cp = run_cli(["jobs.mine", "--input", f"s3://{bucket}/night", "--output", f"s3://{bucket}/out", *TINY], env=env)
        assert proxy.failed >= 3, (proxy.requests, proxy.failed)
    assert "2 shards mined" in cp.stdout and "0 failed" in cp.stdout
    recs = read_ledger(f"s3://{bucket}/out")
    assert len(recs) == 2
    t = open_patches(f"s3://{bucket}/out").to_table()
    assert t.num_rows == sum(r["num_patches"] for r in recs) > 0


def test_shard_failing_every_time_goes_to_errors_and_night_completes(ray_head, tmp_path):
    night = tmp_path / "in"
    _tar_night(night, n_shards=1)
    pq.write_table(pa.table({"id": ["x"], "pixels": [b"not the right column"]}), night / "bad.parquet")
    out = str(tmp_path / "out")
    cp = run_cli(["jobs.nightly", "--input", str(night), "--output", out, "--max-attempts", "2", *TINY],
                 env={"RAY_ADDRESS": ray_head.address}, check=False)
    assert cp.returncode == 1, cp.stdout + cp.stderr
    assert "FAILED after 2 attempts" in cp.stdout
    assert len(read_ledger(out)) == 1  # the good shard is committed
    errs = open_errors(out).to_table().to_pylist()
    shard_errs = [e for e in errs if e["stage"] == "shard"]
    assert len(shard_errs) == 1 and "no column 'image'" in shard_errs[0]["reason"]
    # the failed shard is retried by the next night (it is not in the committed set)
    cp2 = run_cli(["jobs.nightly", "--input", str(night), "--output", out, "--max-attempts", "1", *TINY],
                  env={"RAY_ADDRESS": ray_head.address}, check=False)
    assert "1 new shards" in cp2.stdout


def test_odd_and_broken_frames_are_mined_or_reported(ray_head, tmp_path):
    night = tmp_path / "in"
    samples = [(p.stem, {p.suffix[1:]: p.read_bytes()}) for p in sorted((FIX / "odd").iterdir())]
    samples += [(p.stem, {p.suffix[1:]: p.read_bytes()}) for p in sorted((FIX / "broken").iterdir())]
    samples.append(("sidecar_bad", {"png": (FIX / "odd" / "gray8.png").read_bytes(), "json": b"{oops"}))
    write_tar_shard(str(night / "odd.tar"), samples)
    out = str(tmp_path / "out")
    run_cli(["jobs.mine", "--input", str(night), "--output", out, *TINY], env={"RAY_ADDRESS": ray_head.address})
    images = {r["image_uri"].rsplit("#", 1)[1]: r for r in open_images(out).to_table().to_pylist()}
    for name in ("gray16.png", "gray8.png", "rgba.png", "palette.png", "cmyk.jpg", "exif_rot90.jpg", "tiny.png", "sidecar_bad.png"):
        assert images[name]["status"] == "ok" and images[name]["num_patches"] >= 1, images[name]
    assert (images["exif_rot90.jpg"]["width"], images["exif_rot90.jpg"]["height"]) == (200, 320)
    assert images["tiny.png"]["num_patches"] == 1 and "whole-frame" in images["tiny.png"]["reason"]
    errs = {(e["uri"].rsplit("#", 1)[1], e["stage"]): e["reason"] for e in open_errors(out).to_table().to_pylist()}
    assert "empty file" in errs[("zero_bytes.jpg", "decode")]
    assert "truncated" in errs[("truncated.jpg", "decode")]
    assert "not an image" in errs[("not_an_image.jpg", "decode")]
    assert "decompression bomb" in errs[("bomb.png", "decode")]
    assert "bad sidecar JSON" in errs[("sidecar_bad.png", "sidecar")]
    t = open_patches(out).to_table()
    ex = t.filter(pa.compute.ends_with(t["image_uri"], "exif_rot90.jpg"))
    assert max(ex["x1"].to_pylist()) <= 200 and max(ex["y1"].to_pylist()) <= 320


def test_nightly_summary_ends_with_the_nights_own_next_command():
    """The nightly already grew the index: its summary points at querying it, not at jobs.build_index."""
    from mining.nightly import format_nightly

    s = {"date": "2026-11-20", "run_id": "r1", "shards_total": 2, "shards_skipped": 0, "shards_mined": 2,
         "shards_failed": 0, "new_shards": 2, "nothing_to_do": False, "images": 2, "patches": 20, "errors": 0,
         "wall_s": 1.0, "images_per_s": 2.0, "patches_per_s": 20.0, "stage_s": {}, "output": "/data/mined",
         "index": {"version": "v2", "kind": "flat", "n": 20, "changed": True}, "index_root": "/data/index",
         "reloaded": {"old": "v1", "new": "v2", "swapped": True}}
    lines = format_nightly(s).splitlines()
    assert not any("jobs.build_index" in ln for ln in lines), lines
    assert lines[-1].startswith("next: python -m jobs.query --index /data/index "), lines[-1]
    assert "--address" in lines[-1]  # the reloaded query actor serves the new version
    assert sum(ln.startswith("next:") for ln in lines) == 1
    # without --index the night did not touch an index: building one is the next step
    lines = format_nightly({**s, "index": None, "index_root": None, "reloaded": None}).splitlines()
    assert lines[-1].startswith("next: python -m jobs.build_index --data /data/mined"), lines[-1]
