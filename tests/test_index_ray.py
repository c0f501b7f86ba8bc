"""The index build on a real local Ray cluster (parts as Ray tasks), plus the build_index job."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import mining.index as mi  # noqa: E402
from mining.index.testing import mixture, write_store  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    # explicit: no token auth, nothing written to ~/.ray (../shared/NOTES.md, Ray token authentication)
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        started = True
    yield ray
    if started:
        ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_build_with_ray_tasks_matches_local(ray_local, tmp_path):
    data = str(tmp_path / "data")
    write_store(data, 3, 300)
    m_ray = mi.build_index(data, str(tmp_path / "ray"), kind="sq8", use_ray=True, n_parts=3, verbose=False)
    m_loc = mi.build_index(data, str(tmp_path / "loc"), kind="sq8", use_ray=False, n_parts=1, verbose=False)
    assert m_ray["used_ray"] and m_ray["n_parts"] == 3 and m_ray["n"] == 900
    assert not m_loc["used_ray"] and m_loc["n_parts"] == 1
    q = mixture().sample(20, seed=3)
    s1, i1 = mi.open_index(str(tmp_path / "ray")).search(q, 8)
    s2, i2 = mi.open_index(str(tmp_path / "loc")).search(q, 8)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=1e-5)


def test_job_cli(tmp_path):
    data, out = str(tmp_path / "data"), str(tmp_path / "idx")
    write_store(data, 2, 100)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    r = subprocess.run([sys.executable, "-m", "jobs.build_index", "--data", data, "--out", out, "--no-ray"],
                       capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"kind": "flat"' in r.stdout.strip().splitlines()[-1]
    assert mi.open_index(out).ntotal == 200
