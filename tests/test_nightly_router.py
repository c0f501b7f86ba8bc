"""The nightly job on a sharded index version with the router serving it (issue 18, "the nightly job adds
a shard and reloads"), on the session's real Ray head (conftest.py).

A module of its own: the mining actors of ``jobs.nightly`` ask for 1 CPU + 1 GPU on the 2-CPU head, so
this test must not run while another module's router and shard actors (tests/test_query_router.py's
module-scoped ``routed``) hold CPUs; pytest tears a module's fixtures down when the module ends.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401
import pytest

from conftest import run_cli
from test_query_router import SERVE, _local_engine, _queries, _same

pytestmark = pytest.mark.ray


@pytest.mark.slow
def test_nightly_job_adds_a_shard_and_reloads_the_router(ray_head, tmp_path):
    """The nightly path end to end on a sharded version (issue 18, "the nightly job adds a shard and
    reloads"): ``jobs.nightly`` mines night 1 (real GTSDB frames, tiny random-init CLIP),
    ``jobs.build_index --shards 1`` builds a sharded version, ``jobs.serve_query`` starts the router
    under the default name; ``jobs.nightly --index`` for night 2 then adds night 2 as a NEW shard
    (night 1's shard files untouched) and reloads the running router, which afterwards serves both
    nights, equal to the in-process engine over the new version."""
    import ray

    from conftest import gtsdb_images
    from mining.shards import write_tar_shard

    imgs = gtsdb_images(12)  # 6 frames a night, ~35 patches each: enough to train ivfpq-refine on night 1
    nights = []
    for k, day in enumerate(("2026-11-21", "2026-11-22")):
        d = tmp_path / f"in-{day}"
        d.mkdir()
        for s in range(2):
            write_tar_shard(str(d / f"shard-{s:04d}.tar"),
                            [(p.stem, {"jpg": p.read_bytes()}) for p in imgs[6 * k + 3 * s:6 * k + 3 * s + 3]])
        nights.append((day, str(d)))
    out, idx = str(tmp_path / "mined"), str(tmp_path / "idx")
    tiny = ["--clip-model", "tiny-test-random", "--clip-random-init"]
    env = {"RAY_ADDRESS": ray_head.address}
    run_cli(["jobs.nightly", "--input", nights[0][1], "--output", out, "--date", nights[0][0], *tiny], env=env)
    run_cli(["jobs.build_index", "--data", out, "--out", idx, "--shards", "1", "--no-ray"], timeout=600)
    from mining.index import publish

    v1 = publish.current_version(idx)
    m1 = publish.read_manifest(idx, v1)
    assert m1["layout"] == "sharded" and len(m1["shards"]) == 1
    shard1 = os.path.join(idx, "shards", m1["shards"][0]["id"])
    before = {f: os.stat(os.path.join(shard1, f)).st_mtime_ns for f in os.listdir(shard1)}

    run_cli(["jobs.serve_query", "--stop", "--address", ray_head.address], timeout=120, check=False)
    cp = run_cli(["jobs.serve_query", "--index", idx, "--address", ray_head.address, *SERVE], timeout=300)
    h = json.loads(cp.stdout.strip().splitlines()[-1])
    started = False
    try:
        assert str(h["version"]) == str(v1)
        cp = run_cli(["jobs.nightly", "--input", nights[1][1], "--output", out, "--date", nights[1][0],
                      "--index", idx, "--json", *tiny], env=env, timeout=600)
        s = json.loads(cp.stdout.strip().splitlines()[-1])
        assert s["new_shards"] == 2 and s["index"]["changed"], s
        v2 = s["index"]["version"]
        assert isinstance(s["reloaded"], dict) and s["reloaded"].get("swapped") and s["reloaded"]["new"] == v2, s
        m2 = publish.read_manifest(idx, v2)
        assert [sh["id"] for sh in m2["shards"]][:1] == [m1["shards"][0]["id"]] and len(m2["shards"]) == 2
        assert {f: os.stat(os.path.join(shard1, f)).st_mtime_ns for f in os.listdir(shard1)} == before
        started = not ray.is_initialized()
        ray.init(address=ray_head.address, namespace="mining", logging_level="WARNING", ignore_reinit_error=True)
        actor = ray.get_actor("rare-object-query", namespace="mining")
        h2 = ray.get(actor.health.remote(), timeout=60)
        assert str(h2["version"]) == str(v2) and h2["ntotal"] == m2["n"] > m1["n"]
        ref = _local_engine(idx, v2)
        for v in _queries(3, seed=23):
            _same(ray.get(actor.embedding.remote(v, 8), timeout=120), ref.embedding(v, 8))
        # a night-2 patch's own embedding finds it: the new shard is served
        from mining.store import embeddings_from_arrow, open_patches

        t = open_patches(out).to_table(columns=["patch_id", "date", "embedding"])
        row = t.filter(pa.compute.equal(t["date"], nights[1][0])).slice(0, 1)
        v = embeddings_from_arrow(row.column("embedding")).astype(np.float32)[0]
        got = ray.get(actor.embedding.remote(v, 4), timeout=120)
        assert row["patch_id"][0].as_py() in got.column("patch_id").to_pylist()
    finally:
        run_cli(["jobs.serve_query", "--stop", "--address", ray_head.address], timeout=120, check=False)
        if started:
            ray.shutdown()
