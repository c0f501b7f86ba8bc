"""Issue 16: bad settings are refused in the driver, before Ray starts, with one line and exit code 2.

Each case failed before (tracebacks from actors, a shard mined three times, a silent default,
or "140 patch rows but 0 embeddings"). No Ray is started here: the checks run before ``ray.init``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, free_port, gtsdb_images

TINY = ["--clip-model", "tiny-test-random", "--clip-random-init"]


@pytest.fixture()
def frames(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for p in gtsdb_images(2):
        shutil.copy(p, d / p.name)
    return d


def run_mine(args: list[str], env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # no cluster: nothing may start Ray
    e.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "jobs.mine", *args], cwd=str(REPO), env=e, capture_output=True,
                          text=True, timeout=timeout)


def in_process(capsys, args: list[str]) -> tuple[int, list[str]]:
    from jobs.mine import main

    rc = main(args)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return rc, err


def assert_refused(rc: int, err_lines: list[str], *needles: str) -> None:
    assert rc == 2, err_lines
    assert 1 <= len(err_lines) <= 3, err_lines
    assert err_lines[-1].startswith("error: "), err_lines
    for n in needles:
        assert n in err_lines[-1], err_lines


# ---------------------------------------------------------------------- the CLI, as a user runs it

def test_batch_size_zero_is_refused_not_silently_64(frames, tmp_path):
    cp = run_mine(["--input", str(frames), "--output", str(tmp_path / "o"), *TINY, "--batch-size", "0"])
    assert_refused(cp.returncode, cp.stderr.splitlines(), "--batch-size must be >= 1 (got 0)")
    assert not (tmp_path / "o" / "ledger").exists()


def test_output_that_is_a_file_is_refused_before_any_shard(frames, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    cp = run_mine(["--input", str(frames), "--output", str(f), *TINY])
    assert_refused(cp.returncode, cp.stderr.splitlines(), "is a file, not a directory")


def test_missing_weights_are_one_line_naming_both_options(frames, tmp_path):
    t = time.perf_counter()
    cp = run_mine(["--input", str(frames), "--output", str(tmp_path / "o"), "--clip-model", "ViT-B-16",
                   "--clip-pretrained", str(tmp_path / "nope.pt")])
    assert_refused(cp.returncode, cp.stderr.splitlines(), "--clip-pretrained", "--clip-random-init", "does not exist")
    assert time.perf_counter() - t < 60


# ---------------------------------------------------------------------- in-process (same code path, faster)

@pytest.mark.parametrize("extra,needle", [
    (["--batch-size", "-1"], "--batch-size must be >= 1 (got -1)"),
    (["--preset", "no-such-preset"], "unknown --preset 'no-such-preset'"),
    (["--saliency", "no-such-backend"], "unknown --saliency 'no-such-backend'"),
    (["--actors", "0"], "--actors must be >= 1"),
    (["--images-per-shard", "0"], "--images-per-shard must be >= 1"),
    (["--startup-timeout", "0"], "--startup-timeout must be > 0"),
    (["--date", "../../../escaped"], "--date must be an ISO date YYYY-MM-DD (got '../../../escaped')"),
    (["--date", "2026-13-45"], "--date must be an ISO date YYYY-MM-DD (got '2026-13-45')"),
    (["--date", "20261120"], "--date must be an ISO date YYYY-MM-DD"),
])
def test_bad_setting_is_one_line(capsys, frames, tmp_path, extra, needle):
    rc, err = in_process(capsys, ["--input", str(frames), "--output", str(tmp_path / "o"), *TINY, *extra])
    assert_refused(rc, err, needle)


def test_toy_model_without_random_init_and_unknown_model(capsys, frames, tmp_path):
    rc, err = in_process(capsys, ["--input", str(frames), "--output", str(tmp_path / "o"), "--clip-model", "tiny-test-random"])
    assert_refused(rc, err, "--clip-random-init")
    rc, err = in_process(capsys, ["--input", str(frames), "--output", str(tmp_path / "o"), "--clip-model", "ViT-Nope"])
    assert_refused(rc, err, "unknown open_clip model 'ViT-Nope'")


def test_uncached_tag_offline_is_refused(capsys, frames, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))            # an empty cache
    monkeypatch.setenv("OPEN_CLIP_CACHE_DIR", str(tmp_path / "oc"))
    rc, err = in_process(capsys, ["--input", str(frames), "--output", str(tmp_path / "o"),
                                  "--clip-model", "ViT-B-16", "--clip-pretrained", "openai"])
    assert_refused(rc, err, "not in the local cache", "--clip-random-init")


def test_checkpoint_that_does_not_load_is_refused(capsys, frames, tmp_path):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"not a checkpoint")
    rc, err = in_process(capsys, ["--input", str(frames), "--output", str(tmp_path / "o"),
                                  "--clip-model", "ViT-B-16", "--clip-pretrained", str(bad)])
    assert_refused(rc, err, "does not open")


def test_input_without_shards_or_missing(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    rc, err = in_process(capsys, ["--input", str(empty), "--output", str(tmp_path / "o"), *TINY])
    assert_refused(rc, err, "--input", "no shards")
    rc, err = in_process(capsys, ["--input", str(tmp_path / "absent"), "--output", str(tmp_path / "o"), *TINY])
    assert_refused(rc, err, "does not exist")


def test_unreachable_s3_output_fails_in_seconds(capsys, frames, monkeypatch):
    port = free_port()  # nothing listens there
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.setenv(k, f"http://127.0.0.1:{port}")
    for k, v in {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    t = time.perf_counter()
    rc, err = in_process(capsys, ["--input", str(frames), "--output", "s3://bucket-x/mined", *TINY])
    assert_refused(rc, err, "s3://bucket-x/mined", "not reachable")
    assert time.perf_counter() - t < 30


@pytest.mark.s3
def test_s3_output_probe_on_a_real_s3_server(s3_server):
    from mining.errors import SettingsError
    from mining.validate import check_output

    bucket = s3_server.make_bucket()
    check_output(f"s3://{bucket}/mined")                         # reachable + writable: passes
    assert s3_server.fs().find(bucket) == []                     # and leaves nothing behind
    with pytest.raises(SettingsError, match="not reachable or not writable"):
        check_output("s3://no-such-bucket-16/mined")


def test_folder_mixing_tar_and_loose_images_lists_all(tmp_path):
    from mining.shards import iter_shard, list_shards, write_tar_shard

    imgs = gtsdb_images(3)
    d = tmp_path / "mixed"
    d.mkdir()
    write_tar_shard(str(d / "a.tar"), [(imgs[0].stem, {"jpg": imgs[0].read_bytes()})])
    for p in imgs[1:]:
        shutil.copy(p, d / p.name)
    refs = list_shards(str(d), images_per_dir_shard=64)
    uris = sorted(r.image_uri for ref in refs for r in iter_shard(ref))
    assert len(uris) == 3, uris                                   # before: the two loose JPEGs were ignored
    assert sorted(r.kind for r in refs) == ["dir", "tar"]


def test_bad_date_or_index_path_is_refused_by_nightly_before_any_work(capsys, frames, tmp_path):
    from jobs.nightly import main

    (tmp_path / "idx").write_text("a file")
    for extra, needle in ((["--date", "2026-02-30"], "--date must be an ISO date"),
                          (["--index", str(tmp_path / "idx")], "is a file, not a directory")):
        rc = main(["--input", str(frames), "--output", str(tmp_path / "o"), *TINY, *extra])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert_refused(rc, err, needle)
    assert not (tmp_path / "o" / "shards").exists()     # nothing was written
