"""Issue 16: resource-aware start on a real local Ray head where another actor holds resources.

Before: the pool was sized from the cluster's *total* CPUs and the driver waited for every actor,
so ``jobs.mine`` printed nothing for 12 minutes while ``ray status`` showed pending demands.
Every run here is bounded by a subprocess timeout (a hang fails the test instead of blocking it).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, gtsdb_images

pytestmark = pytest.mark.ray
TINY = ["--clip-model", "tiny-test-random", "--clip-random-init"]

HOLDER = """
import sys, ray
ray.init(address=sys.argv[1], namespace="holder", logging_level="WARNING")
@ray.remote
class Holder:
    def ping(self):
        return 1
h = Holder.options(num_cpus=float(sys.argv[2]), num_gpus=float(sys.argv[3])).remote()
ray.get(h.ping.remote())
print("held", flush=True)
sys.stdin.read()   # hold until the test closes stdin or kills this process
"""


class Holder:
    """Another job's actor holding ``cpus`` CPUs and ``gpus`` GPUs of the head, until :meth:`release`."""

    def __init__(self, address: str, cpus: float, gpus: float):
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, address, str(cpus), str(gpus)], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline()
        assert line.strip() == "held", "the holder actor did not start"

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        time.sleep(1.0)  # the head frees the dead driver's actor resources


@pytest.fixture()
def frames(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for p in gtsdb_images(2):
        shutil.copy(p, d / p.name)
    return d


def mine_cmd(frames, out, *extra):
    return [sys.executable, "-u", "-m", "jobs.mine", "--input", str(frames), "--output", str(out), *TINY, *extra]


def mine_env(ray_head, **kw):
    return dict(os.environ, RAY_ADDRESS=ray_head.address, PYTHONPATH=str(REPO), MINING_PENDING_REPORT_S="2", **kw)


def test_starts_with_what_is_free(ray_head, frames, tmp_path):
    """One of the two CPUs is held: the job starts one 1-CPU actor instead of waiting for 2 CPUs."""
    holder = Holder(ray_head.address, cpus=1, gpus=1)
    try:
        cp = subprocess.run(mine_cmd(frames, tmp_path / "o", "--no-gpu", "--startup-timeout", "90"), cwd=REPO,
                            env=mine_env(ray_head), capture_output=True, text=True, timeout=240)
    finally:
        holder.release()
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert "actor 1/1 ready" in cp.stdout and "images 2," in cp.stdout, cp.stdout
    # progress people expect: frames/s, patches/s, ETA; where the outputs are; the next command
    assert "frames/s" in cp.stdout and "patches/s | ETA" in cp.stdout, cp.stdout
    assert f"outputs: {tmp_path / 'o'}" in cp.stdout, cp.stdout
    assert cp.stdout.strip().splitlines()[-1].startswith("next: python -m jobs.build_index --data "), cp.stdout
    # the random-weights warning once per command (before: 3-4 times, from every actor and open_clip)
    both = (cp.stdout + cp.stderr).lower()
    assert both.count("clip weights were random") == 1, both
    assert "initialized randomly" not in both and "randomly initialised" not in both, both
    assert "waiting for resources" not in both, both     # one actor fitted in the free CPU: it only loads


def test_all_resources_held_says_it_waits_then_gives_up(ray_head, frames, tmp_path):
    holder = Holder(ray_head.address, cpus=2, gpus=1)
    try:
        t = time.perf_counter()
        cp = subprocess.run(mine_cmd(frames, tmp_path / "o", "--no-gpu", "--startup-timeout", "8"), cwd=REPO,
                            env=mine_env(ray_head), capture_output=True, text=True, timeout=180)
        took = time.perf_counter() - t
    finally:
        holder.release()
    assert cp.returncode == 2, cp.stdout + cp.stderr
    assert "waiting for resources: 1 actor(s) want {'CPU': 1} each; cluster has {'CPU': 0.0" in cp.stdout, cp.stdout
    err = [ln for ln in cp.stderr.splitlines() if ln.strip()]
    assert 1 <= len(err) <= 3 and err[-1].startswith("error: no mining actor could start within 8 s"), cp.stderr
    assert took < 120


def test_actor_that_comes_up_late_joins_and_the_job_finishes(ray_head, frames, tmp_path):
    holder = Holder(ray_head.address, cpus=2, gpus=1)
    proc = subprocess.Popen(mine_cmd(frames, tmp_path / "o", "--no-gpu", "--startup-timeout", "120"), cwd=REPO,
                            env=mine_env(ray_head), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:          # the job says it waits ...
            lines.append(line)
            if line.startswith("waiting for resources"):
                break
        holder.release()                  # ... then the resources come free
        rest, _ = proc.communicate(timeout=240)
        lines.append(rest)
    finally:
        holder.release()
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines)
    assert proc.returncode == 0, log
    assert "waiting for resources" in log and "actor 1/1 ready" in log and "images 2," in log, log
