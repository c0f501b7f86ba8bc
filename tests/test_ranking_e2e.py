"""End to end: the mining job selects patches through ``--selector ltrp`` and ``--selector kpp``.

Tiny random configs: ranker / MAE arch ``tiny-test`` (env ``MINING_RANKER_ARCH`` /
``MINING_MAE_ARCH``, read by :func:`mining.ranking.backend_from_args`),
``--ranker-random-init``, and the job's tiny random CLIP. Each run starts its own
local Ray (so the env reaches the actors) on 2 GTSDB frames.
"""
from __future__ import annotations

import json
import shutil

import pytest

from mining.store import open_patches
from tests.conftest import gtsdb_images, run_cli

pytestmark = [pytest.mark.ray, pytest.mark.slow]
TINY = ["--clip-model", "tiny-test-random", "--clip-random-init", "--ranker-random-init", "--actors", "1"]


# KPP's greedy search is one MAE forward per kept patch and per hierarchy crop: one frame is enough to run
# the whole path (two made it the second-slowest test of the suite)
@pytest.mark.parametrize("selector,extra,frames", [("ltrp", [], 2), ("kpp", ["--kpp-ratio", "0.02"], 1)])
def test_mine_with_ranking_selector(selector, extra, frames, tmp_path, ray_head):
    src = tmp_path / "in"
    src.mkdir()
    for p in gtsdb_images(frames):
        shutil.copy(p, src / p.name)
    out = tmp_path / "out"
    # the session's Ray head; the ranker env vars reach the actors through their runtime_env
    env = {"MINING_RANKER_ARCH": "tiny-test", "MINING_MAE_ARCH": "tiny-test", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_ADDRESS": ray_head.address}
    cp = run_cli(["jobs.mine", "--input", str(src), "--output", str(out), "--selector", selector, "--json",
                  *TINY, *extra], env=env, timeout=300)
    summary = json.loads(cp.stdout.strip().splitlines()[-1])
    assert summary["shards_failed"] == 0 and summary["images"] == frames, cp.stdout
    assert summary["patches"] > 0
    t = open_patches(str(out)).to_table()
    assert t.num_rows == summary["patches"]
