"""The query router over shard actors (issue 18, item 3) on a real Ray head (conftest.py), real FAISS
and the moto S3 server: merge correctness through actors (router == in-process sharded engine),
shard grouping, a ``ray://`` client query, a shard actor killed during queries, an atomic reload
across shards under a query stream, an ``s3://`` index root built by ``jobs.build_index --shards`` through
``ray://`` and served end to end, the nightly job adding a shard and reloading, bad settings.

The router is started by ``python -m jobs.serve_query`` (a separate driver process) as in
production; the test process talks to it through Ray handles and the ``jobs.query`` CLI.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
import warnings

import numpy as np
import pytest

from conftest import run_cli
from test_query_actor import reload_under_stream

pytestmark = pytest.mark.ray

DIM = 64  # the tiny random-init CLIP (tiny-test-random) embeds to 64-d
SERVE = ["--clip-model", "tiny-test-random", "--clip-random-init", "--num-gpus", "0", "--num-cpus", "0.25",
         "--shard-cpus", "0.1"]


def _write_nights(data: str, days, per: int = 150) -> None:
    from mining.index.testing import mixture, write_store

    for d in days:
        write_store(data, 1, per, mix=mixture(dim=DIM), date=f"2026-11-{d:02d}", prefix=f"d{d}", seed=d)


def _local_engine(root: str, version: str | None = None, cache_dir: str | None = None):
    """The in-process reference: QueryEngine over mining.index.open_index (ShardedIndex)."""
    import mining.index as mi
    from mining.query import QueryEngine

    return QueryEngine(index=mi.open_index(root, version, cache_dir=cache_dir), load_embedder=False)


def _serve(head, root: str, name: str, *extra: str) -> dict:
    cp = run_cli(["jobs.serve_query", "--index", root, "--address", head.address, "--name", name, *SERVE, *extra],
                 timeout=300)
    return json.loads(cp.stdout.strip().splitlines()[-1])


def _stop(head, name: str) -> None:
    run_cli(["jobs.serve_query", "--stop", "--name", name, "--address", head.address], timeout=120, check=False)


def _same(a, b) -> None:
    assert a.column("patch_id").to_pylist() == b.column("patch_id").to_pylist()
    np.testing.assert_allclose(a.column("score").to_numpy(), b.column("score").to_numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def routed(ray_head, tmp_path_factory):
    """4 nights -> a 4-shard version; the router (4 shard actors) started by jobs.serve_query."""
    import ray

    import mining.index as mi

    base = tmp_path_factory.mktemp("router")
    data, root = str(base / "data"), str(base / "idx")
    _write_nights(data, (1, 2, 3, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = mi.build_index(data, root, shards=4, use_ray=False, verbose=False)
    name = f"rare-object-query-router-{uuid.uuid4().hex[:8]}"
    health = _serve(ray_head, root, name)
    ray.init(address=ray_head.address, namespace="mining", logging_level="WARNING", ignore_reinit_error=True)
    try:
        yield dict(data=data, root=root, manifest=m, name=name, health=health, head=ray_head, base=base,
                   actor=ray.get_actor(name, namespace="mining"))
    finally:
        _stop(ray_head, name)
        ray.shutdown()


def _queries(n: int, seed: int = 5) -> np.ndarray:
    from mining.index.testing import mixture

    return mixture(dim=DIM).sample(n, seed=seed)


def test_router_results_equal_in_process_sharded_results(routed):
    import ray

    h = routed["health"]
    assert h["version"] == routed["manifest"]["version"] and h["ntotal"] == 600
    sv = h["serving"]
    assert sv["layout"] == "sharded" and sv["shards"] == 4 and len(sv["actors"]) == 4
    assert all(a["ok"] and a["ntotal"] == 150 for a in sv["actors"]) and len({a["pid"] for a in sv["actors"]}) == 4
    for a in sv["actors"]:  # each actor read its refine file into the page cache before reporting ready
        want = sum(os.path.getsize(os.path.join(p, "refine.faiss")) for p in a["paths"])
        assert a["prefault"]["skipped"] is None and 0 < a["prefault"]["bytes"] <= want, a["prefault"]
    actor, ref = routed["actor"], _local_engine(routed["root"])
    q = _queries(12)
    got = ray.get([actor.embedding.remote(v, 10) for v in q], timeout=120)
    for v, t in zip(q, got):
        _same(t, ref.embedding(v, 10))
    f = {"date_from": "2026-11-02", "date_to": "2026-11-03"}
    t = ray.get(actor.embedding.remote(q[0], 8, f), timeout=60)
    _same(t, ref.embedding(q[0], 8, filters=f))
    assert set(t.column("date").to_pylist()) <= {"2026-11-02", "2026-11-03"} and t.num_rows == 8
    ex = [{"embedding": v} for v in q[:3]]  # max: exact per-example scores through the actors' vectors
    for mode in ("max", "mean"):
        _same(ray.get(actor.examples.remote(ex, 10, mode), timeout=60), ref.examples(ex, 10, mode=mode))
    _same(ray.get(actor.embedding.remote(q[1], 6, None, False, True), timeout=60),  # no dedup, forced re-rank
          ref.embedding(q[1], 6, dedup=False, rerank=True))
    # query-free rarity: the version's uniqueness parts (one per shard) reach the router
    assert routed["manifest"]["uniqueness"]["n"] == 600
    _same(ray.get(actor.novel.remote(8, None, None, "uniqueness"), timeout=60), ref.novel(8, by="uniqueness"))


def test_shard_grouping_gives_the_same_results(routed):
    """Three shards per actor (2 actors: 3 + 1 shards), a router built in this driver."""
    from mining.query.router import RouterEngine
    from mining.query.shards import ServingConfig

    eng = RouterEngine(routed["root"], serving=ServingConfig(shards_per_actor=3, shard_cpus=0.1), load_embedder=False)
    try:
        info = eng.serving_info()
        assert [a["shards"] for a in info["actors"]] == [[s["id"] for s in routed["manifest"]["shards"][:3]],
                                                         [routed["manifest"]["shards"][3]["id"]]]
        ref = _local_engine(routed["root"])
        for v in _queries(6, seed=8):
            with eng.pinned():
                _same(eng.embedding(v, 10), ref.embedding(v, 10))
    finally:
        eng.close()


def test_query_through_ray_client(routed, tmp_path):
    v = _queries(1, seed=11)[0]
    np.save(tmp_path / "q.npy", v)
    cp = run_cli(["jobs.query", "--address", routed["head"].client, "--actor-name", routed["name"], "--embedding",
                  str(tmp_path / "q.npy"), "--k", "5", "--json"], timeout=300)
    rows = [json.loads(x) for x in cp.stdout.splitlines() if x.startswith('{"rank"')]
    assert [r["patch_id"] for r in rows] == _local_engine(routed["root"]).embedding(v, 5).column("patch_id").to_pylist()


def test_killed_shard_actor_fails_queries_with_one_line_then_serves_again(routed):
    """os.kill of a shard actor's process during a query stream: every query either returns the full,
    correct result or fails with a one-line ShardUnavailableError; Ray restarts the actor (same
    shards) and queries succeed again."""
    import ray

    actor = routed["actor"]
    before = ray.get(actor.health.remote(), timeout=60)["serving"]["actors"]
    victim = before[1]
    q = _queries(4, seed=13)
    want = [_local_engine(routed["root"]).embedding(v, 5).column("patch_id").to_pylist() for v in q]
    ok, failed, other = [], [], []
    stop = threading.Event()

    def stream():
        i = 0
        while not stop.is_set():
            try:
                t = ray.get(actor.embedding.remote(q[i % 4], 5), timeout=120)
                ok.append(t.column("patch_id").to_pylist() == want[i % 4])
            except Exception as e:  # noqa: BLE001 - classified below
                from mining.query_cli import _shard_unavailable

                (failed if _shard_unavailable(e) is not None else other).append(e)
            i += 1

    th = threading.Thread(target=stream)
    th.start()
    try:
        time.sleep(1.0)
        n0 = len(ok)
        os.kill(victim["pid"], signal.SIGKILL)
        deadline, after = time.time() + 120, None
        while time.time() < deadline:
            after = ray.get(actor.health.remote(), timeout=60)["serving"]["actors"][1]
            if after.get("ok") and after["pid"] != victim["pid"]:
                break
            time.sleep(0.5)
        n1 = len(ok)
        deadline = time.time() + 60  # a query queued during the restart may still be waiting: bounded
        while time.time() < deadline and len(ok) < n1 + 3:
            time.sleep(0.2)
    finally:
        stop.set()
        th.join(timeout=180)
    assert not other, other[:3]
    assert n0 > 0 and len(ok) > n1 and all(ok), (n0, n1, len(ok), sum(ok), len(failed), [str(e)[:300] for e in failed[-2:]])
    assert after["restarted"] and after["shards"] == victim["shards"] and after["version"] == victim["version"]
    for e in failed:
        from mining.query_cli import _shard_unavailable

        msg = str(_shard_unavailable(e))
        assert "\n" not in msg and "shard actor 2/4" in msg and "unavailable" in msg, msg
    print(f"during the restart: {len(failed)} queries failed with one line, {len(ok)} answered in full")


def test_atomic_reload_across_shards_under_a_query_stream(routed):
    """A nightly add (a 5th shard) and a reload while queries stream: every result comes from one
    version's shard set, the old shard actors are released, the new night is served."""
    import psutil
    import ray

    import mining.index as mi
    from mining.query import query_info

    actor, root = routed["actor"], routed["root"]
    old_v = ray.get(actor.health.remote(), timeout=60)["version"]
    old_pids = [a["pid"] for a in ray.get(actor.health.remote(), timeout=60)["serving"]["actors"]]
    ids_of = {old_v: set(mi.open_index(root, old_v).metadata().column("patch_id").to_pylist())}
    _write_nights(routed["data"], (5,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = mi.update_index(routed["data"], root, verbose=False, compact=False, use_ray=False)
    new_v = m["version"]
    new_ix = mi.open_index(root, new_v)
    ids_of[new_v] = set(new_ix.metadata().column("patch_id").to_pylist())
    night5 = sorted(ids_of[new_v] - ids_of[old_v])
    assert len(m["shards"]) == 5 and len(night5) == 150
    probe = new_ix.reconstruct_exact(night5[:1])[0]  # a vector of the new night: its own top hit there

    # one query at a time: results are in the order the router answered them
    rel, results, n_before = reload_under_stream(actor, lambda: [ray.get(actor.embedding.remote(probe, 5), timeout=120)])
    assert rel["swapped"] and rel["old"] == old_v and rel["new"] == new_v and rel["retired"] in ("closed", "draining")
    assert n_before > 0 and len(results) > n_before
    versions = [query_info(t)["index_version"] for t in results]
    assert versions[0] == old_v and versions[-1] == new_v and set(versions) == {old_v, new_v}
    assert versions == sorted(versions, key=lambda v: v == new_v)  # one switch, never back
    for t, v in zip(results, versions):
        ids = t.column("patch_id").to_pylist()
        assert t.num_rows == 5 and set(ids) <= ids_of[v]
        assert (ids[0] == night5[0]) == (v == new_v)
    h = ray.get(actor.health.remote(), timeout=60)
    assert h["version"] == new_v and h["ntotal"] == 750 and len(h["serving"]["actors"]) == 5
    deadline = time.time() + 30
    while time.time() < deadline and any(psutil.pid_exists(p) for p in old_pids):
        time.sleep(0.5)
    assert not any(psutil.pid_exists(p) for p in old_pids), "the old version's shard actors were not released"
    assert h["serving"]["retired_closed"] >= 1


@pytest.mark.s3
def test_s3_index_root_served_end_to_end_with_nightly_reload(ray_head, s3_server, tmp_path):
    import ray

    import mining.index as mi

    data = str(tmp_path / "data")
    _write_nights(data, (1, 2), per=100)
    root = f"s3://{s3_server.make_bucket()}/index"
    # the streaming, sharded build as a user runs it: the job's driver on a Ray client (ray://), its
    # sample / train / encode / merge tasks on the cluster, the shards written to the s3:// root
    run_cli(["jobs.build_index", "--data", data, "--out", root, "--shards", "2", "--address", ray_head.client],
            timeout=600)
    from mining.index import layout

    _, m0 = layout.read_version_manifest(root)
    assert m0["layout"] == "sharded" and len(m0["shards"]) == 2 and m0["used_ray"] and m0["n"] == 200, m0
    cache, name = str(tmp_path / "cache"), f"rare-object-query-s3-{uuid.uuid4().hex[:8]}"
    started = False
    h = _serve(ray_head, root, name, "--cache-dir", cache, "--shards-per-actor", "2")
    try:
        assert h["index_root"] == root and h["ntotal"] == 200
        acts = h["serving"]["actors"]
        assert len(acts) == 1 and len(acts[0]["shards"]) == 2
        assert all(p.startswith(os.path.join(cache, "shards")) for p in acts[0]["paths"])
        for sid in acts[0]["shards"]:  # the shard actor fetched the shard's files into the local cache
            assert {"index.faiss", "refine.faiss", "meta.arrow"} <= set(os.listdir(os.path.join(cache, "shards", sid)))
        started = not ray.is_initialized()
        ray.init(address=ray_head.address, namespace="mining", logging_level="WARNING", ignore_reinit_error=True)
        actor = ray.get_actor(name, namespace="mining")
        q = _queries(3, seed=17)
        ref = _local_engine(root, cache_dir=str(tmp_path / "ref-cache"))
        for v in q:
            _same(ray.get(actor.embedding.remote(v, 8), timeout=120), ref.embedding(v, 8))
        # the nightly path: a new night becomes a new shard on S3, then the actor reloads
        _write_nights(data, (3,), per=100)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = mi.update_index(data, root, verbose=False, compact=False, use_ray=False)
        cp = run_cli(["jobs.serve_query", "--reload", "--name", name, "--address", ray_head.address], timeout=300)
        rel = json.loads(cp.stdout.strip().splitlines()[-1])
        assert rel["swapped"] and rel["new"] == m["version"]
        h2 = ray.get(actor.health.remote(), timeout=60)
        assert h2["ntotal"] == 300 and [len(a["shards"]) for a in h2["serving"]["actors"]] == [2, 1]
        assert os.path.isdir(os.path.join(cache, "shards", m["shards"][2]["id"]))
        ref = _local_engine(root, cache_dir=str(tmp_path / "ref-cache"))
        _same(ray.get(actor.embedding.remote(q[0], 8), timeout=120), ref.embedding(q[0], 8))
        # uniqueness parts on S3: written by the build's tasks, updated incrementally by the nightly add,
        # fetched by the router with the version directory
        assert m0["uniqueness"]["n"] == 200 and m["uniqueness"]["incremental"] and m["uniqueness"]["n"] == 300
        assert len(os.listdir(os.path.join(cache, "versions", m["version"], "uniqueness"))) == 3
        _same(ray.get(actor.novel.remote(6, None, None, "uniqueness"), timeout=60), ref.novel(6, by="uniqueness"))
    finally:
        _stop(ray_head, name)
        if started:
            ray.shutdown()


def test_bad_serving_settings_exit_2_with_one_line():
    for flag, value, msg in (("--shards-per-actor", "0", "--shards-per-actor must be an integer >= 1"),
                             ("--shard-timeout", "0", "--shard-timeout must be > 0")):
        cp = run_cli(["jobs.serve_query", "--index", "/nonexistent", flag, value, "--address", "127.0.0.1:1"],
                     check=False, timeout=120)
        err = cp.stderr.strip()
        assert cp.returncode == 2 and err.startswith(f"error: {msg}") and "\n" not in err, cp.stderr

