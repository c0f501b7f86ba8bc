"""Issue 16: user-facing errors cross Ray as their own one line (driver, ``ray://`` client, actor init)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.ray

SCRIPT = """
import sys, ray
from mining.connect import connect
from mining.errors import one_line
connect(sys.argv[1], namespace="errors-16")

class Bad:
    def __init__(self, fail_init=False):
        if fail_init:
            from mining.embed import WeightsError
            raise WeightsError("no CLIP weights given. use --clip-pretrained or --clip-random-init")
    def query(self):
        from mining.query import QueryError
        raise QueryError("k must be >= 1")
    def bug(self):
        raise KeyError("internal")

A = ray.remote(Bad)
for call in (lambda: A.remote().query.remote(), lambda: A.remote(True).query.remote(), lambda: A.remote().bug.remote()):
    try:
        ray.get(call())
    except Exception as e:
        print("LINE", one_line(e))
"""


@pytest.mark.parametrize("via", ["driver", "client"])
def test_user_errors_come_back_as_one_line(ray_head, via):
    address = ray_head.address if via == "driver" else ray_head.client
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    cp = subprocess.run([sys.executable, "-c", SCRIPT, address], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=180)
    lines = [ln[5:] for ln in cp.stdout.splitlines() if ln.startswith("LINE ")]
    assert lines[:2] == ["error: k must be >= 1",
                         "error: no CLIP weights given. use --clip-pretrained or --clip-random-init"], cp.stdout + cp.stderr
    assert lines[2].startswith("error: ") and "KeyError" in lines[2]          # a bug stays recognisable as one


def test_user_error_of_a_local_exception():
    from mining.errors import SettingsError, one_line, user_error

    e = SettingsError("--batch-size must be >= 1 (got 0)")
    assert user_error(e) is e and one_line(e) == "error: --batch-size must be >= 1 (got 0)"
    assert user_error(RuntimeError("x")) is None
