"""Sharded index versions and the streaming build (issue 18): merge correctness against a single
index and exact search, streaming vs in-memory recall, an s3:// index root on the local moto
server, nightly add without touching old shard files, compaction, Ray tasks.  Real FAISS, real
store fragments (mining.store), real Ray and S3 server where marked."""
from __future__ import annotations

import hashlib
import os

import faiss
import numpy as np
import pytest

import mining.index as mi
from mining.index import core, layout, publish, stream
from mining.index.testing import mixture, write_store
from mining.store import embeddings_from_arrow, open_patches
from tests.test_index import _one_thread  # noqa: F401  (autouse: one OpenMP thread on the shared cores)


def _store(root, days=(1, 2, 3, 4), per=300):
    for d in days:
        write_store(root, 2, per, date=f"2026-11-{d:02d}", prefix=f"d{d}", seed=d)


def _truth(data, q, k=16):
    t = open_patches(data).to_table(columns=["patch_id", "embedding"])
    x = core.normalize(embeddings_from_arrow(t.column("embedding")))
    return core.exact_topk(core.normalize(q), x, t.column("patch_id").to_numpy().astype(np.int64), k)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One store of 4 nights, one root with a 1-shard and a 4-shard version on the SAME codebooks."""
    base = tmp_path_factory.mktemp("sharded")
    data, root = str(base / "data"), str(base / "idx")
    _store(data)
    m1 = mi.build_index(data, root, shards=1, use_ray=False, verbose=False)
    m4 = stream.build_sharded(data, root, shards=4, trained_id=m1["trained"], use_ray=False, verbose=False)
    return data, root, m1, m4


def test_sharded_equals_single_and_exact(built):
    data, root, m1, m4 = built
    assert [s["date_min"] for s in m4["shards"]] == ["2026-11-01", "2026-11-02", "2026-11-03", "2026-11-04"]
    assert m4["layout"] == "sharded" and sum(s["n"] for s in m4["shards"]) == m4["n"] == 2400
    single, sharded = mi.open_index(root, m1["version"]), mi.open_index(root, m4["version"])
    assert isinstance(sharded, mi.ShardedIndex) and sharded.ntotal == single.ntotal == 2400
    q = mixture().sample(40, seed=99)
    ts, ti = _truth(data, q)
    nlist = m1["plan"]["nlist"]
    # every list probed, every vector re-ranked: both must be exact, hence equal
    for ix in (single, sharded):
        ix.set_params({"nprobe": nlist, "k_factor": 256})
    s1, i1 = single.search(q, 16)
    s4, i4 = sharded.search(q, 16)
    assert core.recall_at_k(i1, ti, 16) >= 0.99  # float16 refine vs float32 truth: near-ties may swap
    np.testing.assert_array_equal(i4, i1)
    np.testing.assert_allclose(s4, s1, atol=1e-6)
    # shared codebooks: at equal (small) params the shards' candidates contain the single index's
    p = {"nprobe": 2, "k_factor": 2}
    single.set_params(p)
    sharded.set_params(p)
    assert core.recall_at_k(sharded.search(q, 16)[1], ti, 16) >= core.recall_at_k(single.search(q, 16)[1], ti, 16)
    # metadata / lookup / reconstruct_exact agree
    sharded.set_params({})
    ids = i1[0, :5]
    assert sharded.lookup(ids).column("patch_id").to_pylist() == single.lookup(ids).column("patch_id").to_pylist()
    np.testing.assert_allclose(sharded.reconstruct_exact(ids), single.reconstruct_exact(ids), atol=1e-6)
    assert sharded.metadata().column("patch_id").to_pylist() == single.metadata().column("patch_id").to_pylist()
    with pytest.raises(KeyError):
        sharded.reconstruct_exact([12345])
    # each shard opens alone as a PatchIndex
    one = mi.open_shard(root, m4["shards"][2]["id"])
    assert isinstance(one, mi.PatchIndex) and one.ntotal == 600
    assert set(one.metadata().column("date").to_pylist()) == {"2026-11-03"}


def test_merge_shard_results_by_score():
    a = (np.array([[0.9, 0.5, -np.inf]], np.float32), np.array([[1, 2, -1]]))
    b = (np.array([[0.7, 0.6, 0.1]], np.float32), np.array([[3, 4, 5]]))
    s, i = layout.merge_shard_results([a, b], 4)
    assert i.tolist() == [[1, 3, 4, 2]] and s.dtype == np.float32
    s, i = layout.merge_shard_results([a], 4)
    assert i.tolist() == [[1, 2, -1, -1]]


def test_streaming_recall_equals_in_memory_build(built, tmp_path):
    data, root, m1, _ = built
    legacy = mi.build_index(data, str(tmp_path / "legacy"), kind="ivfpq-refine", use_ray=False, verbose=False,
                            uniqueness=False)
    assert "layout" not in legacy
    q = mixture().sample(60, seed=98)
    ti = _truth(data, q)[1]
    mem, stream = mi.open_index(str(tmp_path / "legacy")), mi.open_index(root, m1["version"])
    for params in (None, legacy["params"]):  # each as tuned; then both at the same search parameters
        if params:
            stream.set_params(params)
        r_mem = core.recall_at_k(mem.search(q, 16)[1], ti, 16)
        r_stream = core.recall_at_k(stream.search(q, 16)[1], ti, 16)
        # as tuned, each stops at the cheapest parameters that reach the 0.95 target on its own tune queries
        assert r_stream >= 0.9 and r_mem >= 0.9, (params, r_stream, r_mem)
        if params:
            assert abs(r_stream - r_mem) <= 0.03, (params, r_stream, r_mem)


def _hashes(root):
    out = {}
    base = os.path.join(root, layout.SHARDS)
    for sid in os.listdir(base):
        for f in os.listdir(os.path.join(base, sid)):
            p = os.path.join(base, sid, f)
            out[(sid, f)] = (os.stat(p).st_mtime_ns, hashlib.sha1(open(p, "rb").read()).hexdigest())
    return out


def test_update_adds_a_shard_without_touching_old_files_then_compacts(tmp_path):
    data, root = str(tmp_path / "data"), str(tmp_path / "idx")
    _store(data, days=(1, 2))
    m0 = mi.build_index(data, root, shards=2, use_ray=False, verbose=False)
    before = _hashes(root)
    assert mi.update_index(data, root, verbose=False)["changed"] is False
    _store(data, days=(3,))
    m1 = mi.update_index(data, root, verbose=False, compact=False)
    assert m1["changed"] and m1["retrained"] is None and m1["parent_version"] == m0["version"]
    assert [s["id"] for s in m1["shards"][:2]] == [s["id"] for s in m0["shards"]]
    assert m1["shards"][2]["date_min"] == "2026-11-03" and m1["n"] == 1800
    after = _hashes(root)
    assert {k: after[k] for k in before} == before, "old shard files were rewritten"
    # uniqueness: the old shards' patches are searched in the new shard only, merged with their stored lists
    assert m1["uniqueness"]["incremental"] and m1["uniqueness"]["searches"] == 2 * 600 * 1 + 600 * 3
    _check_uniqueness(root, m1["version"], data)
    q = mixture().sample(30, seed=97)
    ti = _truth(data, q)[1]
    ix = mi.open_index(root)
    ix.set_params({"nprobe": m1["plan"]["nlist"], "k_factor": 256})
    assert core.recall_at_k(ix.search(q, 16)[1], ti, 16) >= 0.99
    # compaction: the policy merges the run of old small shards, never tonight's; old files stay
    assert stream.compaction_plan(m1["shards"], small_vectors=10**9, min_run=2) == [[0, 1]]
    assert stream.compaction_plan(m1["shards"], small_vectors=10) == []
    _store(data, days=(4,))
    m2 = mi.update_index(data, root, verbose=False, compaction_policy={"small_vectors": 10**9, "min_run": 2})
    assert m2["compacted"] == [[s["id"] for s in m1["shards"]]]
    assert len(m2["shards"]) == 2 and m2["shards"][0]["n"] == 1800 and m2["shards"][1]["date_min"] == "2026-11-04"
    assert {k: v for k, v in _hashes(root).items() if k in after} == after
    # the compacted shard's lists come from the parts of the shards it merged
    assert m2["uniqueness"]["incremental"] and m2["uniqueness"]["searches"] == 1800 * 1 + 600 * 2
    _check_uniqueness(root, m2["version"], data)
    ix = mi.open_index(root)
    ix.set_params({"nprobe": m2["plan"]["nlist"], "k_factor": 256})
    assert core.recall_at_k(ix.search(q, 16)[1], _truth(data, q)[1], 16) >= 0.99
    old = mi.open_index(root, m1["version"])  # the previous version still opens on its (kept) shards
    assert old.ntotal == 1800


def test_hnsw_coarse_quantizer_keeps_results():
    x = mixture().sample(3000, seed=5)
    plan = mi.plan_index(3000, x.shape[1], "ivfpq")
    idx = core.train_index(plan, x)
    core.add_vectors(idx, x, np.arange(3000))
    h = core.train_index(plan, x)
    core.use_hnsw_quantizer(h)
    h = core.deserialize(core.serialize(h))  # the graph is saved with the index
    assert isinstance(faiss.downcast_index(faiss.extract_index_ivf(h).quantizer), faiss.IndexHNSWFlat)
    core.add_vectors(h, x, np.arange(3000))
    q = core.normalize(mixture().sample(20, seed=6))
    for ix in (idx, h):
        core.set_params(ix, {"nprobe": 8})
    a, b = idx.search(q, 10)[1], h.search(q, 10)[1]
    assert np.mean([len(set(u) & set(v)) / 10 for u, v in zip(a, b)]) > 0.9


@pytest.mark.s3
def test_s3_index_root_round_trip(s3_server, tmp_path):
    data = str(tmp_path / "data")
    _store(data, days=(1, 2), per=200)
    root = f"s3://{s3_server.make_bucket()}/index"
    m = mi.build_index(data, root, shards=2, use_ray=False, verbose=False)
    fs = s3_server.fs()
    assert fs.cat(root[5:] + "/CURRENT").decode().strip() == m["version"]
    assert mi.list_versions(root) == [m["version"]] and publish.current_version(root) == m["version"]
    cache = str(tmp_path / "cache")
    vdir = mi.fetch_version(root, None, cache)
    assert vdir == os.path.join(cache, "versions", m["version"])
    stats = layout.download_dir(layout.shard_uri(root, m["shards"][0]["id"]),
                                os.path.join(cache, "shards", m["shards"][0]["id"]))
    assert stats["downloaded"] == 0 and stats["skipped"] >= 5  # immutable files already cached are skipped
    ix = mi.open_index(root, cache_dir=cache)
    assert isinstance(ix, mi.ShardedIndex) and ix.ntotal == 800
    q = mixture().sample(20, seed=96)
    ti = _truth(data, q)[1]
    ix.set_params({"nprobe": m["plan"]["nlist"], "k_factor": 256})
    assert core.recall_at_k(ix.search(q, 16)[1], ti, 16) >= 0.99
    one = mi.open_shard(root, m["shards"][1]["id"], cache_dir=str(tmp_path / "c2"))
    assert one.ntotal == 400
    # nightly add on S3: a new shard object set, then a new CURRENT
    _store(data, days=(3,), per=200)
    m2 = mi.update_index(data, root, verbose=False)
    assert len(m2["shards"]) == 3 and publish.current_version(root) == m2["version"]
    assert mi.open_index(root, cache_dir=cache).ntotal == 1200
    assert not fs.exists(root[5:] + "/.parts-x") and not [p for p in fs.ls(root[5:]) if ".parts-" in p]


@pytest.mark.ray
def test_streaming_build_on_ray_tasks(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    # reuse workers here (the library starts a fresh worker per task, for its memory measurements; ~4 s each)
    monkeypatch.setitem(stream.TASK_OPTIONS, "max_calls", 0)
    data, root = str(tmp_path / "data"), str(tmp_path / "idx")
    _store(data, days=(1, 2), per=200)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        m = mi.build_index(data, root, shards=2, use_ray=True, verbose=False, part_max_vectors=250)
    finally:
        if started:
            ray.shutdown()
    assert m["used_ray"] and m["build_stats"]["tasks"] >= 5  # 2 sample + 1 train + 4 encode (+2 merge)
    assert m["build_stats"]["max_task_peak_rss_mb"] > 0
    assert 0 < m["build_stats"]["max_task_peak_anon_mb"] <= m["build_stats"]["max_task_peak_rss_mb"]
    q = mixture().sample(20, seed=95)
    ix = mi.open_index(root)
    ix.set_params({"nprobe": m["plan"]["nlist"], "k_factor": 256})
    assert core.recall_at_k(ix.search(q, 16)[1], _truth(data, q)[1], 16) >= 0.99


def test_build_index_job_refuses_bad_shard_settings(capsys):
    from jobs.build_index import main

    for argv, msg in ((["--shards", "0"], "--shards must be >= 1"),
                      (["--shards", "2", "--kind", "flat"], "ivfpq-refine indexes only"),
                      (["--part-vectors", "10"], "needs --shards"),
                      (["--shards", "2", "--merge", "ondisk"], "--merge ondisk"),
                      (["--out", "s3://bucket/index"], "needs --shards or --streaming")):
        args = ["--data", "/nonexistent", "--out", "/tmp/never", *argv] if "--out" not in argv else ["--data", "/x", *argv]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err


def test_prefault_refine_touches_the_mapped_codes_and_respects_the_cap(tmp_path):
    """prefault_refine reads the refine file and faiss' mapping of it: the byte count is the codes'
    size, searches are unchanged, and a cap below that size skips it."""
    from mining.index.search import open_refine, prefault_refine, write_refine

    x = np.random.default_rng(0).standard_normal((300, 32)).astype(np.float32)
    path = str(tmp_path / "refine.faiss")
    write_refine(path, x.astype(np.float16))
    ref, vec = open_refine(path)
    q = x[:3].copy()
    before = ref.search(q, 5)
    r = prefault_refine(ref, path=path)
    assert r["skipped"] is None and r["bytes"] == 300 * 32 * 2 and r["seconds"] >= 0
    after = ref.search(q, 5)
    np.testing.assert_array_equal(before[1], after[1])
    assert prefault_refine(ref, max_bytes=100)["skipped"] == "too large"


def _exact_knn_distance(data):
    """patch_id -> FiftyOne kNN distance (K = 3, self excluded) by brute force over the store's vectors."""
    from mining.index.uniqueness import WEIGHTS

    t = open_patches(data).to_table(columns=["patch_id", "embedding"])
    x = core.normalize(embeddings_from_arrow(t.column("embedding")))
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    top = -np.sort(-s, axis=1)[:, :3]
    d = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * np.clip(top, -1, 1)))
    return dict(zip(t.column("patch_id").to_pylist(), (d * np.asarray(WEIGHTS)).mean(1)))


def _check_uniqueness(root, version, data, frac=0.97):
    from mining.index.uniqueness import read_uniqueness

    t = read_uniqueness(mi.open_index(root, version).path)
    truth = _exact_knn_distance(data)
    assert t is not None and t.num_rows == len(truth)
    ids = t.column("patch_id").to_pylist()
    assert ids == sorted(truth)
    r = t.column("knn_distance").to_numpy()
    want = np.array([truth[i] for i in ids])
    assert np.mean(np.abs(r - want) < 1e-3) >= frac, np.abs(r - want).max()
    u = t.column("uniqueness").to_numpy()
    assert u.min() >= 0 and abs(u.max() - 1.0) < 1e-6
    np.testing.assert_allclose(u, r / r.max(), rtol=1e-6)
    return t


def test_sharded_uniqueness_equals_exact_knn_and_single(built):
    """Each shard's task searches every shard; the per-shard parts equal brute-force kNN distances
    (up to ANN misses) and the 1-shard version's."""
    data, root, m1, m4 = built
    assert m4["uniqueness"]["parts"] == "uniqueness" and m4["uniqueness"]["incremental"] is False
    assert m4["uniqueness"]["searches"] == 4 * 2400 and m1["uniqueness"]["searches"] == 2400
    assert len(os.listdir(os.path.join(publish.version_dir(root, m4["version"]), "uniqueness"))) == 4
    t1, t4 = _check_uniqueness(root, m1["version"], data), _check_uniqueness(root, m4["version"], data)
    assert np.mean(np.abs(t1.column("knn_distance").to_numpy() - t4.column("knn_distance").to_numpy()) < 1e-4) >= 0.95


def test_sharded_build_refuses_a_patch_id_in_two_shards(tmp_path):
    """The same frames committed under another store shard on another night land in two index shards:
    the publish fails with one line naming both shards (with and without uniqueness), nothing is published."""
    from mining.index.shard_uniqueness import DuplicatePatchError
    from mining.store import ShardOutput, write_shard

    data, root = str(tmp_path / "data"), str(tmp_path / "idx")
    _store(data, days=(1,), per=200)
    t = open_patches(data).to_table()
    dup = ShardOutput(shard="/data/copy-of-d1", date="2026-11-02", run_id="test", model="synthetic", dim=32,
                      random_init=False)
    rows = t.slice(0, 5).to_pylist()
    for r in rows:
        dup.patches.append({**{k: r[k] for k in ("patch_id", "image_id", "image_uri", "x0", "y0", "x1", "y1", "level",
                                                 "score", "model", "run_id")}, "shard": dup.shard, "date": dup.date})
    dup.embeddings.append(embeddings_from_arrow(t.slice(0, 5).column("embedding")).astype(np.float16))
    write_shard(data, dup)
    for uniq in (True, False):
        with pytest.raises(DuplicatePatchError, match=r"refusing to publish the index: 5\+ patch_id\(s\) occur in more "
                                                      r"than one shard.*2026-11-01.* & .*2026-11-02"):
            mi.build_index(data, root, shards=2, use_ray=False, verbose=False, uniqueness=uniq)
    assert publish.current_version(root) is None
    vdir = os.path.join(root, "versions")
    assert not (os.path.isdir(vdir) and os.listdir(vdir)), "a failed publish left a (staged) version behind"
