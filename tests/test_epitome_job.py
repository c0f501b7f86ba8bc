"""Issue 14 items 2 and 5: ``jobs.train_epitome`` on Ray Train (checkpoints, resume, LATEST),
:func:`mining.epitome.resolve.resolve_epitome` (given / root / bootstrap / fallback), and a mining
run on a fresh root that bootstraps its epitome, then a night that mines with it and refreshes it.

Real GTSDB photos (skipped with a message when ../shared is absent), a real Ray head, tiny settings.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from mining.epitome.fit import TrainConfig
from mining.epitome.job import job_config, latest_model, publish_model, run_worker
from mining.epitome.model import Epitome, EpitomeSpec, load_epitome
from mining.epitome.resolve import model_dir, needs_epitome, resolve_epitome
from mining.store import open_patches
from tests.conftest import gtsdb_images, run_cli

TINY_CLIP = ["--clip-model", "tiny-test-random", "--clip-random-init"]
TINY_EP = ["--size", "16", "--patch", "3", "--scale", "16", "--batch", "64", "--max-frames", "4",
           "--images-per-shard", "4", "--checkpoint-every", "5", "--use-gpu", "no"]


def _photos(tmp_path, n: int, name: str = "in"):
    d = tmp_path / name
    d.mkdir()
    for p in gtsdb_images(n):
        shutil.copy(p, d / p.name)
    return d


def _synthetic(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(n)]


def test_publish_versions_and_latest(tmp_path):
    d = str(tmp_path / "models")
    assert latest_model(d) is None
    m = Epitome(EpitomeSpec(size=8, patch=3))
    p1 = publish_model(m, d, {"steps": 1})
    p2 = publish_model(m, d, {"steps": 2})  # same second: a suffixed name, never an overwrite
    assert p1 != p2 and latest_model(d) == p2
    assert (tmp_path / "models" / "LATEST").read_text().strip() == p2.rsplit("/", 1)[-1]
    assert load_epitome(p2)[1]["steps"] == 2 and "created" in load_epitome(p2)[1]
    assert not [f for f in (tmp_path / "models").iterdir() if "tmp" in f.name]


def test_resolve_epitome_each_outcome(tmp_path):
    lines: list[str] = []
    root = str(tmp_path / "root")
    # fallback: fresh root, bootstrap disabled
    assert resolve_epitome(None, root, None, lines.append) == (None, "fallback")
    assert "--no-epitome-bootstrap; falling back to sr-bms" in lines[-1]
    # fallback: bootstrap possible in principle, but the run has no frames
    assert resolve_epitome(None, root, lambda n: iter(()), lines.append) == (None, "fallback")
    # bootstrap: trained on the first frames (at most bootstrap_frames of them), published into the root
    asked = []
    path, how = resolve_epitome(None, root, lambda n: asked.append(n) or iter(_synthetic(6)), lines.append,
                                bootstrap_frames=4, bootstrap_steps=3, device="cpu")
    assert how == "bootstrap" and asked == [4] and path == latest_model(model_dir(root))
    assert lines[-1].startswith("epitome: trained on the first 6 frames of this run") and path in lines[-1]
    model, meta = load_epitome(path)
    assert meta["steps"] == 3 and isinstance(model, Epitome)
    # root: the next run finds it, and trains nothing
    assert resolve_epitome(None, root, lambda n: pytest.fail("must not bootstrap"), lines.append) == (path, "root")
    # given: --epitome wins over the root's
    other = str(tmp_path / "given.pt")
    shutil.copy(path, other)
    assert resolve_epitome(other, root, None, lines.append) == (other, "given")
    assert len(lines) == 5  # one line per resolution
    assert needs_epitome("epitome") and needs_epitome("sr-bms-epitome")
    assert not needs_epitome("sr-bms") and not needs_epitome("no-such-backend") and not needs_epitome(None)


def test_train_epitome_bad_settings_exit_2(tmp_path, capsys):
    from jobs.train_epitome import main

    inp = _photos(tmp_path, 2)
    out = str(tmp_path / "out")
    assert main(["--input", str(tmp_path / "missing"), "--out", out]) == 2
    assert main(["--input", str(inp), "--out", out, "--steps", "0"]) == 2
    assert main(["--input", str(inp), "--out", out, "--workers", "2"]) == 2   # 1 shard of 2 images
    assert main(["--input", str(inp), "--out", out, "--size", "4", "--patch", "5"]) == 2
    assert main(["--input", str(inp), "--out", out, "--init", str(tmp_path / "nope.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(e.startswith("error: ") for e in err), err
    assert "--workers 2 > 1 shard(s)" in err[2] and "--steps must be >= 1" in err[1]


def test_train_job_checkpoints_resumes_and_writes_latest(ray_head, tmp_path, monkeypatch, capsys):
    """20 steps as 10 + a resumed 10 on a real Ray Train worker == 20 uninterrupted steps, bit for bit."""
    import ray

    from jobs.train_epitome import main

    inp = _photos(tmp_path, 8)
    out = tmp_path / "models"
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # the controller notices the end sooner
    base = ["--input", str(inp), "--out", str(out), "--address", ray_head.address, *TINY_EP]
    try:
        assert main([*base, "--steps", "10"]) == 0
        first = latest_model(str(out))
        assert first and "epitome: 10 steps on 8 frames" in capsys.readouterr().out
        assert main([*base, "--steps", "20"]) == 0   # the same --out and settings: continues at step 10
        assert "resuming from" in capsys.readouterr().out
    finally:
        ray.shutdown()
    second = latest_model(str(out))
    assert second != first and (out / "LATEST").read_text().strip() == second.rsplit("/", 1)[-1]
    model, meta = load_epitome(second)
    assert meta["steps"] == 20 and meta["frames_seen"] == 8 and meta["num_shards"] == 2
    assert meta["spec"]["size"] == 16 and meta["final_nll"] == meta["final_nll"] and meta["train_s"] > 0

    from mining.shards import list_shards

    cfg = job_config(list_shards(str(inp), images_per_dir_shard=4), EpitomeSpec(size=16, patch=3, scale=16),
                     TrainConfig(steps=20, batch=64), max_frames=4, checkpoint_every=5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the Ray worker's thread count (1 CPU): the same float reductions
    try:
        ref = run_worker(cfg, log=lambda s: None)["trainer"]["model"]["state_dict"]
    finally:
        torch.set_num_threads(threads)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_mine_fresh_root_bootstraps_the_epitome(ray_head, tmp_path):
    inp = _photos(tmp_path, 3)
    root = tmp_path / "root"
    env = {"RAY_ADDRESS": ray_head.address}
    cp = run_cli(["jobs.mine", "--input", str(inp), "--output", str(root), "--saliency", "epitome",
                  "--epitome-bootstrap-steps", "5", *TINY_CLIP], env=env, timeout=300)
    line = [s for s in cp.stdout.splitlines() if s.startswith("epitome: ")]
    assert len(line) == 1 and line[0].startswith("epitome: trained on the first 3 frames of this run"), cp.stdout
    assert "images 3, patches" in cp.stdout
    path = latest_model(str(root / "models" / "epitome"))
    assert path and path in line[0]
    assert open_patches(str(root)).count_rows() > 0

    bad = run_cli(["jobs.mine", "--input", str(inp), "--output", str(root), "--saliency", "epitome",
                   "--epitome", str(tmp_path / "missing.pt"), *TINY_CLIP], env=env, check=False, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"error: --epitome '{tmp_path / 'missing.pt'}' does not exist"], bad.stderr


def test_nightly_mines_with_the_roots_epitome_and_refreshes_it(ray_head, tmp_path):
    root = tmp_path / "root"
    boot, _ = resolve_epitome(None, str(root), lambda n: iter(_synthetic(4)), lambda s: None,
                              bootstrap_steps=3, device="cpu")
    night = _photos(tmp_path, 2, "night")
    cp = run_cli(["jobs.nightly", "--input", str(night), "--output", str(root), "--date", "2026-11-30",
                  "--saliency", "sr-bms-epitome", "--no-epitome-bootstrap", "--refresh-epitome",
                  "--refresh-epitome-steps", "5", *TINY_CLIP],
                 env={"RAY_ADDRESS": ray_head.address, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}, timeout=400)
    assert f"epitome: {boot} (the latest in" in cp.stdout, cp.stdout[-3000:]
    assert "epitome refresh: 5 steps on 2 frames of the night" in cp.stdout, cp.stdout[-3000:]
    new = latest_model(model_dir(str(root)))
    assert new != boot
    meta = load_epitome(new)[1]
    assert meta["init"] == boot and meta["night"] == "2026-11-30" and meta["steps"] == 5


def _dp_worker(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(run_worker(cfg, rank=rank, world=world, log=lambda s: None), f"{out}/w{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_data_parallel_workers_hold_the_same_epitome_and_counters(tmp_path):
    """The job's data-parallel step without Ray: gloo all-reduce of gradients and promotion posteriors."""
    from mining.shards import list_shards
    from tests.conftest import free_port

    inp = _photos(tmp_path, 4)
    shards = list_shards(str(inp), images_per_dir_shard=2)
    cfg = job_config(shards, EpitomeSpec(size=16, patch=3, scale=16), TrainConfig(steps=6, batch=32), max_frames=2,
                     checkpoint_every=3, workers=2)
    torch.multiprocessing.spawn(_dp_worker, args=(2, free_port(), cfg, str(tmp_path)), nprocs=2)
    a, b = (torch.load(tmp_path / f"w{r}.pt", weights_only=True) for r in (0, 1))
    for k, v in a["trainer"]["model"]["state_dict"].items():
        assert torch.equal(v, b["trainer"]["model"]["state_dict"][k]), k
    assert torch.equal(a["trainer"]["promotion"]["counts"], b["trainer"]["promotion"]["counts"])
    assert a["reservoir"]["seen"] == b["reservoir"]["seen"] == 2      # each read only its own shard
    assert not torch.equal(a["reservoir"]["frames"][0], b["reservoir"]["frames"][0])
