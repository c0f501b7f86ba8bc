"""A short real Ray Train run of ``jobs.train_ltrp`` on CPU: writes a checkpoint, then resumes from it."""
from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch

from tests.conftest import gtsdb_images

pytestmark = pytest.mark.ray


@pytest.fixture
def local_ray():
    # explicit: no token auth (Ray 2.60 would otherwise write ~/.ray/auth_token), no usage stats
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.5"  # the controller notices a finished run sooner
    import ray

    if ray.is_initialized():
        ray.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="rt_", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    yield
    ray.shutdown()


def test_train_ltrp_checkpoint_and_resume(local_ray, tmp_path):
    from jobs.train_ltrp import CKPT_FILE, LOSS_FILE, find_latest_checkpoint, main
    from mining.ranking.ltrp import load_ranker

    imgs = [str(p) for p in gtsdb_images(2)]
    common = ["--data", *imgs, "--tiny-random-init", "--batch-size", "2", "--loader-workers", "0",
              "--storage-path", str(tmp_path / "runs"), "--name", "smoke", "--use-gpu", "auto", "--log-every", "1",
              "--lr", "1e-3"]
    out1 = main(common + ["--epochs", "1"])
    ck1 = out1["checkpoint"]
    assert ck1 and os.path.exists(os.path.join(ck1, CKPT_FILE))
    state1 = torch.load(os.path.join(ck1, CKPT_FILE), map_location="cpu", weights_only=True)
    assert state1["epoch"] == 0 and state1["step"] == 1
    assert any(k.startswith("score_net.") for k in state1["model"])
    assert find_latest_checkpoint(str(tmp_path / "runs"), "smoke") == ck1
    with pytest.raises(SystemExit, match="--resume auto"):  # never restore silently
        main(common + ["--epochs", "1"])

    out2 = main(common + ["--epochs", "2", "--resume", "auto"])
    ck2 = out2["checkpoint"]
    assert ck2 != ck1
    state2 = torch.load(os.path.join(ck2, CKPT_FILE), map_location="cpu", weights_only=True)
    assert state2["epoch"] == 1 and state2["step"] == 2  # continued, not restarted
    with open(os.path.join(ck2, LOSS_FILE)) as f:
        hist = [json.loads(line) for line in f]
    assert [h["step"] for h in hist] == [1, 2] and all(h["loss"] > 0 for h in hist)
    assert os.path.exists(tmp_path / "runs" / "smoke" / "loss_log.jsonl")
    # the trained ranker loads through the inference loader (official layout)
    r = load_ranker(os.path.join(ck2, CKPT_FILE))
    assert not torch.equal(r.vit.head.weight, load_ranker(os.path.join(ck1, CKPT_FILE)).vit.head.weight)
    assert not os.path.exists(os.path.expanduser("~/.ray/auth_token"))
