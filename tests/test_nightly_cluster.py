"""Issue 8's CI test: the nightly run on a real cluster, end to end, with real components.

- a real ``ray start --head`` on 127.0.0.1 (the ``ray_head`` fixture: RAY_AUTH_MODE=disabled set
  explicitly, its own temp dir, torn down by the fixture even on failure -- never ``ray stop``,
  which would kill the other clusters on this machine);
- a real S3 server (moto, ``s3_server``) holding 2 WebDataset tar shards of 2 GTSDB frames each;
- ``jobs.nightly`` submitted through the Jobs API by ``jobs.submit_nightly`` with
  ``submission_id=nightly-<date>`` and the S3 settings in ``runtime_env["env_vars"]``;
- then: the ledger, the dataset and the index version; ``jobs.status`` through ``ray://``; the
  query actor started by a submitted ``jobs.serve_query`` job and queried with ``jobs.query``
  through ``ray://127.0.0.1:<port>`` from a separate process; resubmitting the night is refused.
"""
from __future__ import annotations

import json
import time

import pytest

from tests.conftest import REPO, gtsdb_images, run_cli

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]

TINY = ["--clip-model", "tiny-test-random", "--clip-random-init"]
NIGHT = "2030-01-02"  # a date no other test submits, so nightly-<date> is free on the shared head


def _wait(client, sid: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        st = client.get_job_status(sid)
        st = str(getattr(st, "value", st))
        if st in ("SUCCEEDED", "FAILED", "STOPPED"):
            return st
        if time.monotonic() > deadline:
            return f"TIMEOUT({st})"
        time.sleep(1.0)


def _assert_succeeded(client, sid: str, timeout_s: float) -> str:
    st = _wait(client, sid, timeout_s)
    logs = client.get_job_logs(sid)
    if st != "SUCCEEDED":
        if st.startswith("TIMEOUT"):
            client.stop_job(sid)
        pytest.fail(f"job {sid} ended {st}; its logs:\n{logs[-8000:]}")
    return logs


def _write_night(s3_server, n_shards: int = 2, per_shard: int = 2) -> tuple[str, str]:
    from mining.shards import write_tar_shard

    imgs = gtsdb_images(n_shards * per_shard)  # skips with a clear message when ../shared is absent
    bucket = s3_server.make_bucket()
    prefix = f"s3://{bucket}/fleet/raw/{NIGHT}"
    for s in range(n_shards):
        samples = [(p.stem, {"jpg": p.read_bytes(), "json": json.dumps({"camera": "front", "frame": p.name}).encode()})
                   for p in imgs[s * per_shard:(s + 1) * per_shard]]
        write_tar_shard(f"{prefix}/shard-{s:04d}.tar", samples)
    assert len(s3_server.fs().ls(prefix.removeprefix("s3://"))) == n_shards
    return bucket, prefix + "/"


def test_nightly_job_on_cluster_then_status_and_query_through_ray_client(ray_head, s3_server, tmp_path):
    from ray.job_submission import JobSubmissionClient

    from mining.nightly_submit import AlreadySubmittedError, nightly_submission_id, submit_nightly
    from mining.store import open_images, open_patches, read_ledger

    assert ray_head.env.get("RAY_AUTH_MODE") == "disabled"  # token auth handled explicitly
    bucket, night_prefix = _write_night(s3_server)
    output = f"s3://{bucket}/fleet/mined"
    index = str(tmp_path / "index")
    client = JobSubmissionClient(ray_head.dashboard)
    sid = nightly_submission_id(NIGHT)
    cli_env = {"RAY_ADDRESS": ray_head.address}

    # before the first night: status says so clearly (read in-process here, no Ray needed)
    from mining.status import collect, format_status

    empty = collect(output, index)
    assert empty["nights"] == [] and empty["index"]["version"] is None, empty
    text = format_status({**empty, "query_actor": {"running": False, "detail": "not running"}})
    assert "no committed shards yet" in text and "no index" in text, text

    # a query actor left over by another test on this shared head would serve another index
    run_cli(["jobs.serve_query", "--stop", "--address", ray_head.address], env=cli_env)
    try:
        # ---------------------------------------------------------------- the night, as a job
        t0 = time.monotonic()
        got = submit_nightly(client, input=night_prefix, output=output, index=index, date=NIGHT,
                             extra_args=TINY, working_dir=str(REPO), env_vars=s3_server.env)
        assert got == sid == f"nightly-{NIGHT}"
        info = client.get_job_info(sid)
        assert info.runtime_env["env_vars"]["AWS_ENDPOINT_URL"] == s3_server.endpoint
        assert info.entrypoint.startswith("python -m jobs.nightly --input s3://")
        logs = _assert_succeeded(client, sid, timeout_s=150)
        assert f"night {NIGHT}: 2 new shards" in logs, logs[-3000:]
        nightly_s = time.monotonic() - t0
        print(f"[{nightly_s:.0f}s] nightly job SUCCEEDED")

        # ---------------------------------------------------------------- ledger, dataset, index
        ledger = read_ledger(output)
        assert len(ledger) == 2, ledger
        assert {r["date"] for r in ledger} == {NIGHT}
        assert all(r["status"] == "committed" and r["num_images"] == 2 for r in ledger), ledger
        patches = open_patches(output).to_table(columns=["patch_id", "date", "shard"])
        assert patches.num_rows == sum(r["num_patches"] for r in ledger) > 0
        assert set(patches["date"].to_pylist()) == {NIGHT}
        assert {s.rsplit("/", 1)[-1] for s in patches["shard"].to_pylist()} == {"shard-0000.tar", "shard-0001.tar"}
        assert len(set(patches["patch_id"].to_pylist())) == patches.num_rows
        assert open_images(output).count_rows() == 4

        from mining.index import open_index

        idx = open_index(index)
        version = str(idx.version)
        assert version
        assert int(idx.manifest.get("n", getattr(idx, "ntotal", -1))) == patches.num_rows

        # ---------------------------------------------------------------- status, before the actor
        cp = run_cli(["jobs.status", "--address", ray_head.client, "--data", output, "--index", index, "--json"])
        st = json.loads(cp.stdout.strip().splitlines()[-1])
        night = st["nights"][0]
        assert (night["date"], night["shards"], night["frames"], night["patches"]) == (NIGHT, 2, 4, patches.num_rows)
        assert st["index"]["version"] == version and st["index"]["vectors"] == patches.num_rows
        assert st["query_actor"]["running"] is False
        text = format_status(st)
        assert "not running" in text and NIGHT in text and version in text, text
        print(f"[{time.monotonic() - t0:.0f}s] status via ray://")

        # ---------------------------------------------------------------- query actor, by a job
        serve_id = client.submit_job(
            entrypoint=f"python -m jobs.serve_query --index {index} {' '.join(TINY)}",
            runtime_env={"working_dir": str(REPO), "env_vars": dict(s3_server.env)})
        serve_logs = _assert_succeeded(client, serve_id, timeout_s=120)
        health = json.loads([ln for ln in serve_logs.splitlines() if ln.startswith("{")][-1])
        assert health["index_root"] == index and str(health.get("version")) == version, health
        print(f"[{time.monotonic() - t0:.0f}s] query actor started by a job")

        # ---------------------------------------------------------------- a query through ray://
        out = tmp_path / "export"
        cp = run_cli(["jobs.query", "--address", ray_head.client, "--text", "a stop sign", "--k", "3",
                      "--out", str(out)], timeout=180)
        manifest = out / "manifest.jsonl"
        assert manifest.is_file(), (cp.stdout, list(out.iterdir()) if out.exists() else None)
        rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
        assert rows, cp.stdout
        assert all(r["image_uri"].startswith(night_prefix) for r in rows), rows[:2]

        print(f"[{time.monotonic() - t0:.0f}s] query through ray://: {len(rows)} images")
        # the same status from a submitted job (http:// address: jobs.status runs itself as a job)
        cp = run_cli(["jobs.status", "--address", ray_head.dashboard, "--data", output, "--index", index, "--json"])
        st2 = json.loads(cp.stdout.strip().splitlines()[-1])
        qa = st2["query_actor"]
        assert qa["running"] and qa["healthy"] and qa["health"]["ok"], qa
        assert qa["health"]["version"] == version and qa["health"]["served"] >= 1, qa
        assert st2["nights"] == st["nights"] and st2["index"]["version"] == version

        # ---------------------------------------------------------------- the night cannot run twice
        with pytest.raises(AlreadySubmittedError, match="SUCCEEDED"):
            submit_nightly(client, input=night_prefix, output=output, index=index, date=NIGHT,
                           extra_args=TINY, working_dir=str(REPO), env_vars=s3_server.env)
        with pytest.raises(RuntimeError):  # the Jobs API itself refuses the id, without our pre-check
            client.submit_job(entrypoint="python -c 'print(1)'", submission_id=sid)
        cp = run_cli(["jobs.submit_nightly", "--address", ray_head.dashboard, "--input", night_prefix,
                      "--output", output, "--index", index, "--date", NIGHT, "--", *TINY], env=s3_server.env,
                     check=False)
        assert cp.returncode == 3, (cp.returncode, cp.stdout, cp.stderr)
        assert "already submitted" in cp.stderr and sid in cp.stderr
        assert len([j for j in client.list_jobs() if j.submission_id == sid]) == 1
        assert len(read_ledger(output)) == 2
        print(f"[{time.monotonic() - t0:.0f}s] resubmission refused")
    finally:
        run_cli(["jobs.serve_query", "--stop", "--address", ray_head.address], env=cli_env, check=False)
