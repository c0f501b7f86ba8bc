"""The named detached query actor on a real Ray head (``ray start --head``, see conftest.py).

Started by a job submitted through the Jobs API; queried from separate processes through the Ray
client (``ray://``) and through the Jobs API; hot reload under a stream of queries; restart after
a kill; bad queries. No mocks.
"""
from __future__ import annotations

import json
import os
import threading
import time
import uuid
import warnings

import numpy as np
import pytest

from conftest import REPO, run_cli
from test_query import BOXES, copy_dataset, embedder, frame_bytes, query_dataset  # noqa: F401 (session fixture)

pytestmark = pytest.mark.ray


def _wait_job(client, job_id: str, timeout: float = 300) -> str:
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout
    status = None
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"job {job_id} ended {status}:\n{logs[-5000:]}"
    return logs


def _runtime_env(ray_head) -> dict:
    env = {k: v for k, v in ray_head.env.items() if k.startswith(("AWS_", "RAY_AUTH", "HF_"))}
    env.update({"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"})
    return {"working_dir": str(REPO), "env_vars": env}


@pytest.fixture(scope="module")
def served(ray_head, query_dataset, tmp_path_factory):  # noqa: F811 - the imported session fixture
    """Dataset + index, the actor started by a submitted serve job, and a driver connection."""
    import ray
    from ray.job_submission import JobSubmissionClient

    qd = copy_dataset(query_dataset, str(tmp_path_factory.mktemp("qactor")))
    name = f"rare-object-query-test-{uuid.uuid4().hex[:8]}"
    client = JobSubmissionClient(ray_head.dashboard)
    img_dir = os.path.dirname(qd.images[0])
    job = client.submit_job(
        entrypoint=f"python -m jobs.serve_query --index {qd.index} --name {name} --allow-prefix {img_dir} --k-cap 50",
        submission_id=f"serve-query-{uuid.uuid4().hex[:8]}", runtime_env=_runtime_env(ray_head))
    logs = _wait_job(client, job)
    health = json.loads([x for x in logs.splitlines() if x.startswith("{")][-1])
    ray.init(address=ray_head.address, namespace="mining", logging_level="WARNING", ignore_reinit_error=True)
    try:
        actor = ray.get_actor(name, namespace="mining")
        yield dict(qd=qd, name=name, actor=actor, client=client, health=health, head=ray_head)
    finally:
        try:
            cp = run_cli(["jobs.serve_query", "--stop", "--name", name, "--address", ray_head.address], timeout=120)
            assert json.loads(cp.stdout.strip().splitlines()[-1])["stopped"]
            deadline = time.time() + 30
            while time.time() < deadline:  # ray.kill is asynchronous
                try:
                    ray.get_actor(name, namespace="mining")
                    time.sleep(0.5)
                except ValueError:
                    break
            with pytest.raises(ValueError):
                ray.get_actor(name, namespace="mining")
        finally:
            ray.shutdown()


def test_started_by_job_on_gpu_slot_with_cpu_fallback(served):
    h = served["health"]
    assert h["ok"] and h["index_root"] == served["qd"].index
    assert h["model"] == "tiny-test-random/random-init" and h["random_init"]
    assert h["gpu_ids"], "the cluster has a (fake) GPU: the actor must have been given one"
    assert h["device"] == "cpu"  # torch sees no CUDA device here: CPU fallback
    assert h["ntotal"] == len(served["qd"].rows)


def test_query_through_ray_client_in_another_process(served, tmp_path):
    qd = served["qd"]
    uri = qd.images[1]
    out = tmp_path / "export"
    cp = run_cli(["jobs.query", "--address", served["head"].client, "--actor-name", served["name"], "--image", uri,
                  "--box", ",".join(map(str, BOXES[3])), "--k", "5", "--out", str(out)], timeout=300)
    rows = [x.split() for x in cp.stdout.splitlines() if x.strip() and x.split()[0].isdigit()]
    assert len(rows) == 5
    assert rows[0][2] == ",".join(map(str, BOXES[3])) and rows[0][3] == uri
    for f in ("manifest.jsonl", "manifest.parquet", "contact_sheet.png", "gallery.html"):
        assert (out / f).exists(), f
    m = [json.loads(x) for x in open(out / "manifest.jsonl")]
    assert m[0]["image_uri"] == uri and m[0]["index_version"] == served["health"]["version"]
    # an image URI read by the actor: allowed prefix ok; anything else refused, exit code 2
    cp = run_cli(["jobs.query", "--address", served["head"].client, "--actor-name", served["name"],
                  "--image", "file:///etc/passwd", "--k", "3"], check=False, timeout=300)
    assert cp.returncode == 2 and "outside the allowed prefixes" in cp.stderr, cp.stderr[-2000:]


def test_query_through_jobs_api(served):
    client = served["client"]
    job = client.submit_job(
        entrypoint=f"python -m jobs.query --address auto --actor-name {served['name']} "
                   f"--text 'a road narrows sign' --k 4 --json",
        submission_id=f"query-{uuid.uuid4().hex[:8]}", runtime_env=_runtime_env(served["head"]))
    logs = _wait_job(client, job)
    rows = [json.loads(x) for x in logs.splitlines() if x.startswith('{"rank"')]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert {r["image_uri"] for r in rows} <= set(served["qd"].images)


def test_bad_queries_keep_the_actor_serving(served):
    import ray

    from mining.query import QueryError

    actor, qd = served["actor"], served["qd"]
    img = frame_bytes(qd.images[0])
    before = ray.get(actor.health.remote())
    bad = [
        (actor.text.remote("", 5), "text query is empty"),
        (actor.image.remote(b"definitely not a jpeg", None, 5), "unreadable"),
        (actor.image.remote(img, (1300, 700, 1400, 900), 5), "outside the 1360x800 image"),
        (actor.text.remote("deer", 0), "k must be >= 1"),
        (actor.text.remote("deer", 51), "above the cap of 50"),
        (actor.text.remote("deer", 5, {"weather": "rain"}), "unknown filter"),
        (actor.image.remote("/etc/passwd", None, 5), "outside the allowed prefixes"),
        (actor.image.remote(qd.root + "/../../etc/passwd", None, 5), "outside the allowed prefixes"),
    ]
    for ref, msg in bad:
        with pytest.raises(QueryError, match=msg):
            ray.get(ref, timeout=120)
    t = ray.get(actor.image.remote(qd.images[2], BOXES[2], 3))  # allowed prefix: read by the actor
    assert t.num_rows == 3 and t.to_pylist()[0]["image_uri"] == qd.images[2]
    after = ray.get(actor.health.remote())
    assert after["pid"] == before["pid"] and after["errors"] - before["errors"] == len(bad)


def test_novel_query_through_the_actor(served, tmp_path):
    """Query-free mode: the rarest patch of each frame, ranked by rarity, through the actor
    (a Ray handle, then the CLI over the Ray client with an export)."""
    import ray

    from mining.query import QueryError, query_info

    actor, qd = served["actor"], served["qd"]
    nov = {r["patch_id"]: r["novelty"] for r in qd.rows}
    best = {}
    for r in qd.rows:  # reference: each frame's most novel patch, frames by that novelty
        if r["image_id"] not in best or nov[r["patch_id"]] > nov[best[r["image_id"]]]:
            best[r["image_id"]] = r["patch_id"]
    want = sorted(best.values(), key=lambda p: -nov[p])
    t = ray.get(actor.novel.remote(10, by="novelty"), timeout=120)
    assert t.column("patch_id").to_pylist() == want
    assert t.column("score").to_pylist() == pytest.approx([nov[p] for p in want])
    t = ray.get(actor.novel.remote(10), timeout=120)  # default: novelty and uniqueness -> both
    assert query_info(t)["query"]["by"] == "both" and t.num_rows == len(qd.images)
    assert len(set(t.column("image_id").to_pylist())) == t.num_rows
    s = t.column("score").to_pylist()
    assert s == sorted(s, reverse=True) and all(0 < x <= 1 for x in s)
    with pytest.raises(QueryError, match="after"):
        ray.get(actor.novel.remote(3, "2026-02-01", "2026-01-01"), timeout=120)

    out = tmp_path / "rare"
    day = qd.rows[0]["date"]
    cp = run_cli(["jobs.query", "--address", served["head"].client, "--actor-name", served["name"], "--novel",
                  "--by", "novelty", "--date-from", day, "--date-to", day, "--k", "5", "--out", str(out), "--json"],
                 timeout=300)
    hits = [json.loads(x) for x in cp.stdout.splitlines() if x.startswith('{"rank"')]
    assert [h["patch_id"] for h in hits] == [p for p in want if nov[p] is not None and
                                             next(r["date"] for r in qd.rows if r["patch_id"] == p) == day]
    for f in ("manifest.jsonl", "manifest.parquet", "contact_sheet.png", "gallery.html"):
        assert (out / f).exists(), f


def reload_under_stream(actor, one_round, warm_s: float = 1.0) -> tuple[dict, list, int]:
    """``actor.reload()`` while a thread keeps calling ``one_round()`` (-> list of result tables).

    Returns (the reload reply, every result in order, how many came before the reload). Fails the
    test when any query raised (none may be lost)."""
    import ray

    results, errors = [], []
    stop = threading.Event()

    def stream():
        while not stop.is_set():
            try:
                results.extend(one_round())
            except Exception as e:  # any lost query fails the test
                errors.append(e)
                return

    th = threading.Thread(target=stream)
    th.start()
    try:
        time.sleep(warm_s)
        n_before = len(results)
        rel = ray.get(actor.reload.remote(), timeout=300)
        time.sleep(warm_s)
    finally:
        stop.set()
        th.join(timeout=300)
    assert not errors, errors[:3]
    return rel, results, n_before


def test_reload_during_query_stream_loses_none(served):
    import ray
    from PIL import Image

    from mining.index import build_index
    from mining.store import ShardOutput, make_image_id, make_patch_id, write_shard

    actor, qd = served["actor"], served["qd"]
    old = ray.get(actor.health.remote())["version"]
    # a new shard (a new frame) arrives and a new index version is built next to the old one
    emb = embedder()
    new_uri = os.path.join(qd.root, "new-frame.png")
    Image.open(qd.images[-1]).convert("RGB").transpose(Image.FLIP_LEFT_RIGHT).save(new_uri)
    arr = np.array(Image.open(new_uri).convert("RGB"))
    iid = make_image_id(new_uri)
    box = (400, 300, 624, 524)
    z = emb.embed_crops(arr, np.asarray([box]))
    new_pid = make_patch_id(iid, box, 1)
    out = ShardOutput(shard=f"file://{qd.root}/shard-new", date="2026-01-03", run_id="t2", model=emb.model_id,
                      dim=emb.dim, random_init=True)
    out.patches.append(dict(patch_id=new_pid, image_id=iid, image_uri=new_uri, shard=out.shard, date=out.date,
                            x0=box[0], y0=box[1], x1=box[2], y1=box[3], level=1, score=0.5, model=emb.model_id,
                            run_id="t2"))
    out.embeddings.append(z)
    out.images.append(dict(image_id=iid, image_uri=new_uri, shard=out.shard, date=out.date, width=arr.shape[1],
                           height=arr.shape[0], num_patches=1, status="ok", reason="", metadata="{}", run_id="t2"))
    write_shard(qd.data, out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_index(qd.data, qd.index, kind="flat", use_ray=False, verbose=False)

    rel, results, n_before = reload_under_stream(
        actor, lambda: ray.get([actor.embedding.remote(z[0], 3) for _ in range(4)], timeout=120))
    assert rel["swapped"] and rel["old"] == old and rel["new"] != old
    assert n_before > 0 and len(results) > n_before
    from mining.query import query_info

    versions = [query_info(t)["index_version"] for t in results]
    assert set(versions) <= {old, rel["new"]} and versions[-1] == rel["new"] and versions[0] == old
    for t, v in zip(results, versions):
        assert t.num_rows == 3
        top = t.column("patch_id")[0].as_py()
        # each query ran entirely on one version: the new patch exists only in the new one
        assert (top == new_pid) == (v == rel["new"])
    h = ray.get(actor.health.remote())
    assert h["version"] == rel["new"] and h["ntotal"] == len(qd.rows) + 1 and h["reloads"] >= 1


def test_killed_actor_restarts_and_serves_again(served):
    import ray

    actor, name = served["actor"], served["name"]
    h0 = ray.get(actor.health.remote())
    ray.kill(actor, no_restart=False)
    deadline = time.time() + 180
    h1 = None
    while time.time() < deadline:
        try:
            h1 = ray.get(ray.get_actor(name, namespace="mining").health.remote(), timeout=60)
            if h1["pid"] != h0["pid"]:
                break
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ValueError):
            time.sleep(1)
    assert h1 is not None and h1["pid"] != h0["pid"] and h1["restarted"]
    assert h1["version"] == h0["version"]  # the restart reloads CURRENT
    t = ray.get(actor.text.remote("a deer at night", 4))  # the old handle works again
    assert t.num_rows == 4
