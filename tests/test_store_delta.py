"""The Delta Lake store (issue 15): exactly-once commits with app transactions, visibility through the
authoritative ``shards`` table, readers from other tools, S3 concurrency, and migration of a JSON-ledger
root written by the previous store (``tests/legacy_store_v1.py`` is that code, frozen)."""
import importlib.util
import multiprocessing as mp
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from mining import store
from mining.store import (commit_record, committed_shards, open_errors, open_images, open_patches, publish, read_ledger,
                          shard_states, table_uri, write_shard)

HERE = Path(__file__).resolve().parent


def _out(_mod, shard, n=3, dim=8, seed=0, date="2026-11-20"):
    """A small shard (``tests.test_store._out``); the legacy writer takes the same ShardOutput."""
    from tests.test_store import _out as out

    return out(shard, n=n, dim=dim, seed=seed, date=date)


def _legacy():
    spec = importlib.util.spec_from_file_location("legacy_store_v1", HERE / "legacy_store_v1.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["legacy_store_v1"] = mod      # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_retried_and_duplicate_commits_are_noops(tmp_path):
    from deltalake import DeltaTable

    root = str(tmp_path)
    o = _out(store, "s3://bk/night/a.tar")
    write_shard(root, o, commit=False)           # killed between the data write and the commit
    assert committed_shards(root) == set()
    with pytest.raises(FileNotFoundError):
        open_patches(root)                        # invisible: nothing references the files
    rec2 = write_shard(root, o)                  # the rerun writes new files and commits
    assert commit_record(root, rec2) is False    # a duplicated commit is a no-op
    assert write_shard(root, o)["shard_key"] == rec2["shard_key"]   # a retried whole write: no-op commit
    assert open_patches(root).count_rows() == 3 and open_images(root).count_rows() == 1
    assert open_errors(root).count_rows() == 1
    assert len(DeltaTable(table_uri(root, "shards")).to_pyarrow_table()) == 1
    assert publish(root) == {"patches": 1, "images": 1, "errors": 1}
    assert publish(root) == {"patches": 0, "images": 0, "errors": 0}          # idempotent
    for t in ("patches", "images", "errors", "shards"):
        dt = DeltaTable(table_uri(root, t))
        assert dt.transaction_version("shard:" + rec2["shard_key"]) == 1
        if t != "shards":    # exactly the committed attempt's file: no duplicate rows for plain readers
            assert [u.rsplit("/", 1)[-1] for u in dt.file_uris()] == [rec2["files"][t].rsplit("/", 1)[-1]], t
    assert [r["status"] for r in read_ledger(root)] == ["committed"]


def test_partial_then_new_generation_replaces_rows(tmp_path):
    from deltalake import DeltaTable

    root = str(tmp_path)
    write_shard(root, _out(store, "s3://bk/a.tar", n=2), status="partial", fingerprint="10:e1")
    st = shard_states(root).to_pylist()
    assert [(r["status"], r["gen"], r["fingerprint"]) for r in st] == [("partial", 1, "10:e1")]
    assert open_patches(root).count_rows() == 2
    publish(root)
    assert DeltaTable(table_uri(root, "patches")).to_pyarrow_dataset().count_rows() == 2
    write_shard(root, _out(store, "s3://bk/a.tar", n=5), gen=2, fingerprint="20:e2")
    assert [(r["status"], r["gen"]) for r in shard_states(root).to_pylist()] == [("committed", 2)]
    assert open_patches(root).count_rows() == 5
    publish(root)
    assert DeltaTable(table_uri(root, "patches")).to_pyarrow_dataset().count_rows() == 5   # gen 1 removed


def test_store_readable_by_pyarrow_pandas_duckdb_polars(tmp_path):
    import duckdb
    import polars as pl
    from deltalake import DeltaTable

    root = str(tmp_path)
    for i, n in enumerate((3, 4, 5)):
        write_shard(root, _out(store, f"s3://bk/s{i}.tar", n=n, seed=i))
    publish(root)
    committed = {r["shard"]: r["num_patches"] for r in read_ledger(root)}
    assert sum(committed.values()) == 12
    patches = DeltaTable(table_uri(root, "patches")).to_pyarrow_dataset()
    shards = DeltaTable(table_uri(root, "shards")).to_pyarrow_dataset()
    assert patches.count_rows() == 12                                                    # pyarrow
    pdf = DeltaTable(table_uri(root, "patches")).to_pandas(columns=["shard", "patch_id"])  # pandas
    assert pdf.groupby("shard").size().to_dict() == committed
    got = duckdb.execute("SELECT shard, count(*) FROM patches WHERE shard IN "           # DuckDB over Arrow
                         "(SELECT shard FROM shards WHERE status IN ('committed', 'partial')) GROUP BY shard").fetchall()
    assert dict(got) == committed
    assert pl.read_delta(table_uri(root, "patches")).height == 12                       # Polars
    assert pl.read_delta(table_uri(root, "images")).height == 3
    assert open_patches(root).count_rows() == 12
    del patches, shards


def _commit_many(args):
    root, env, lo, hi, dup = args
    os.environ.update(env)
    from mining import store as st

    for i in list(range(lo, hi)) + dup:    # dup: shards another process commits too, at the same time
        o = st.ShardOutput(shard=f"s3://in/s{i:04d}.tar", date="2026-11-20", run_id=f"p{lo}", model="m", dim=4)
        rec = {"shard": o.shard, "shard_key": st.shard_key(o.shard), "date": o.date, "gen": 1, "status": "committed",
               "run_id": o.run_id, "model": "m", "embedding_dim": 4, "num_images": i, "num_patches": 0,
               "num_errors": 0, "files": {}}
        st.commit_record(root, rec)
    return dict(st.COMMIT_STATS)


@pytest.mark.s3
def test_concurrent_commits_on_s3_lose_and_duplicate_nothing(s3_server):
    """4 processes commit 15 shards each to one table on the local S3 server (conditional PUTs, no lock),
    each also re-committing 5 shards of its neighbour: every shard exactly once."""
    bucket = s3_server.make_bucket()
    root = f"s3://{bucket}/store"
    n, per = 4, 15
    jobs = [(root, s3_server.env, k * per, (k + 1) * per, list(range(((k + 1) % n) * per, ((k + 1) % n) * per + 5)))
            for k in range(n)]
    with mp.get_context("spawn").Pool(n) as pool:
        stats = pool.map(_commit_many, jobs)
    from deltalake import DeltaTable

    t = DeltaTable(table_uri(root, "shards"), storage_options=store.delta_storage_options(root)).to_pyarrow_table()
    shards = t.column("shard").to_pylist()
    assert len(shards) == n * per and len(set(shards)) == n * per              # row by row: none lost, none twice
    assert sorted(shards) == [f"s3://in/s{i:04d}.tar" for i in range(n * per)]
    assert all(int(s[-8:-4]) == v for s, v in zip(shards, t.column("num_images").to_pylist()))
    assert sum(s["noops"] for s in stats) >= 1 and sum(s["commits"] for s in stats) == n * per
    assert committed_shards(root) == set(shards)


def test_migrate_a_json_ledger_root(tmp_path):
    legacy = _legacy()
    root = tmp_path / "old"
    for i, n in enumerate((3, 4)):
        legacy.write_shard(str(root), _out(legacy, f"s3://bk/s{i}.tar", n=n, seed=i, date=f"2026-11-2{i}"))
    legacy.write_shard(str(root), _out(legacy, "s3://bk/bad.tar", n=0), status="failed")
    before = legacy.open_patches(str(root)).to_table().sort_by("patch_id")
    assert (root / "ledger").is_dir() and len(legacy.read_ledger(str(root))) == 2

    cp = run_cli(["jobs.migrate_store", "--root", str(root)])
    assert "migrated 3 shards (2 committed, 1 failed): 7 patches" in cp.stdout, cp.stdout
    after = open_patches(str(root)).to_table().sort_by("patch_id")
    assert after.schema.remove_metadata().equals(before.schema.remove_metadata())
    assert after.drop_columns(["embedding"]).equals(before.drop_columns(["embedding"]))
    np.testing.assert_array_equal(store.embeddings_from_arrow(after.column("embedding")),
                                  store.embeddings_from_arrow(before.column("embedding")))
    assert {r["shard"] for r in read_ledger(str(root))} == {"s3://bk/s0.tar", "s3://bk/s1.tar"}
    assert {r["status"] for r in read_ledger(str(root), statuses=None)} == {"committed", "failed"}
    assert open_errors(str(root)).count_rows() == 3 and open_images(str(root)).count_rows() == 2
    assert not (root / "ledger").exists() and (root / "ledger-migrated").is_dir()
    assert not list(root.glob("patches/date=*"))                   # old parts gone
    cp = run_cli(["jobs.migrate_store", "--root", str(root)], check=False)
    assert cp.returncode == 2 and "nothing to migrate" in cp.stderr


def test_build_index_refuses_duplicate_patch_ids_and_names_the_shards(tmp_path):
    from mining.index.build import build_index

    root = str(tmp_path / "d")
    a = _out(store, "s3://bk/a.tar", n=4)
    b = _out(store, "s3://bk/a.tar", n=4)       # the same frames ...
    b.shard = "s3://bk/copy-of-a.tar"            # ... committed under another shard key
    write_shard(root, a)
    write_shard(root, b)
    with pytest.raises(ValueError, match=r"refusing to build the index: 4 patch_id\(s\).*s3://bk/a.tar, s3://bk/copy-of-a.tar"):
        build_index(root, str(tmp_path / "idx"), kind="flat", use_ray=False, verbose=False, uniqueness=False)


def test_lookup_prunes_by_shard_stats_and_finds_every_committed_uri(tmp_path):
    """The planner's lookup (``shard_states(shards=..., prefixes=...)``) reads only the files and row
    groups whose ``shard`` statistics can hold a wanted URI; URIs longer than Delta's truncated string
    statistics (64 chars), differing only past the cut, must all still be found."""
    from deltalake import DeltaTable

    from mining.store import compact_shards_table

    root = str(tmp_path)
    long = "s3://fleet-uploads-production-eu-central-1/raw/camera-front-wide/2026-11-"
    uris = {d: [f"{long}{d[-2:]}/vehicle-{v:04d}/shard-{i:03d}.tar" for v in range(2) for i in range(3)]
            for d in ("2026-10-31", "2026-11-20")}
    for d, us in uris.items():
        for u in us:
            commit_record(root, {"shard": u, "shard_key": store.shard_key(u), "date": d, "gen": 1, "status": "committed"})
    commit_record(root, {"shard": "/data/cam#a.jpg..b.jpg.1234", "shard_key": "dir-1", "date": "2026-11-20", "gen": 1,
                         "status": "committed"})
    res = compact_shards_table(root)
    assert res["months"] == ["2026-10", "2026-11"] and res["rows"] == 13
    dt = DeltaTable(table_uri(root, "shards"))
    assert dt.metadata().partition_columns == ["month"] and len(dt.file_uris()) == 2
    store._TABLE_CACHE.clear()
    want = uris["2026-11-20"][1:4] + [long + "20/vehicle-0000/shard-999.tar", "s3://elsewhere/x.tar"]
    got = shard_states(root, columns=("shard", "gen"), shards=want).column("shard").to_pylist()
    assert sorted(got) == sorted(uris["2026-11-20"][1:4])
    # the file of October cannot hold November URIs: it is never opened
    adds = DeltaTable(table_uri(root, "shards")).get_add_actions(flatten=True)
    from mining.store_delta import _files_that_may_hold
    assert len(_files_that_may_hold(DeltaTable(table_uri(root, "shards")), sorted(want), [])) == 1 < len(adds)
    assert shard_states(root, columns=("shard",), prefixes=["/data/cam#"]).num_rows == 1
    assert shard_states(root, columns=("shard",), prefixes=["/data/other#"]).num_rows == 0
    assert shard_states(root, columns=("shard",), months=["2026-10"]).num_rows == 6
    assert shard_states(root, columns=("shard",), shards=[]).num_rows == 0
    assert len(committed_shards(root)) == 13
    with pytest.raises(ValueError, match="bad month"):
        compact_shards_table(root, months=["2026-11' OR 1=1 --"])


def test_app_transactions_expire_but_committed_shards_stay_skipped(tmp_path):
    """Old app transactions leave the snapshot (``delta.setTransactionRetentionDuration``), so it does not
    grow with every shard ever committed; the planner still skips those shards from the rows."""
    import time

    from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

    from mining.driver import plan_shards
    from mining.shards import ShardRef
    from mining.store_delta import SHARDS_SCHEMA, _load, app_id

    root = str(tmp_path)
    u = "s3://fleet/2026-11-01/shard-1.tar"
    commit_record(root, {"shard": "s3://fleet/2026-11-29/new.tar", "shard_key": "k-new", "date": "2026-11-29", "gen": 1,
                         "status": "committed"})           # creates the table with its retention settings
    dt = _load(table_uri(root, "shards"), None, create=False)
    row = {n: None for n in SHARDS_SCHEMA.names} | {"shard": u, "shard_key": "k-old", "date": "2026-11-01", "gen": 1,
                                                     "status": "committed", "month": "2026-11"}
    old = int(time.time() * 1000) - 30 * 86_400_000       # committed 30 days ago
    write_deltalake(dt, __import__("pyarrow").Table.from_pylist([row], schema=SHARDS_SCHEMA), mode="append",
                    commit_properties=CommitProperties(app_transactions=[Transaction(app_id("k-old"), 1, old)]))
    fresh = DeltaTable(table_uri(root, "shards"))
    assert fresh.transaction_version(app_id("k-old")) is None          # expired
    assert fresh.transaction_version(app_id("k-new")) == 1             # this run's: kept
    todo = plan_shards(root, [ShardRef(uri=u, kind="tar"), ShardRef(uri="s3://fleet/2026-11-30/t.tar", kind="tar")])
    assert [r.uri for r in todo] == ["s3://fleet/2026-11-30/t.tar"]


def test_a_missing_committed_file_is_left_out_with_a_warning(tmp_path):
    root = str(tmp_path)
    recs = [write_shard(root, _out(store, f"s3://bk/n/{k}.tar", n=2 + k, seed=k)) for k in range(3)]
    os.remove(os.path.join(root, recs[1]["files"]["patches"]))      # lost by a lifecycle rule
    with pytest.warns(UserWarning, match=r"1 committed patches file\(s\) .* missing"):
        ds = open_patches(root)
    assert ds.count_rows() == 2 + 4                                  # the other two shards, complete
    assert open_images(root).count_rows() == 3                       # other tables untouched


def test_the_s3_server_conditional_put_lets_exactly_one_writer_win(s3_server):
    """delta-rs' S3 log store needs ``If-None-Match: *`` PUTs to be atomic (S3's are): 16 writers race for
    each of 20 keys, and exactly one must win each. (moto's check-then-put race, which
    tests/moto_atomic.py closes, is rare: 0 double winners in 3 x 20 keys unpatched here; this checks the
    semantics the store depends on, e.g. against a server that ignores the header.)"""
    import threading

    import boto3
    from botocore.exceptions import ClientError

    bucket = s3_server.make_bucket()
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                          aws_access_key_id=s3_server.env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=s3_server.env["AWS_SECRET_ACCESS_KEY"])
    outcomes: dict[str, list] = {}
    lock = threading.Lock()

    def put(key: str, body: bytes):
        try:
            client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
            got = 200
        except ClientError as e:
            got = e.response["ResponseMetadata"]["HTTPStatusCode"]
        with lock:
            outcomes.setdefault(key, []).append(got)

    threads = [threading.Thread(target=put, args=(f"_delta_log/{k:020d}.json", f"w{w}".encode()))
               for k in range(20) for w in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outcomes) == 20
    for key, codes in outcomes.items():        # one winner, and every loser told so (412), per key
        assert sorted(codes) == [200] + [412] * 15, (key, codes)
