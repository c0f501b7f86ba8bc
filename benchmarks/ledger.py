"""The store's commit protocol at scale (issue 15): the Delta Lake store next to the old JSON ledger.

    python benchmarks/ledger.py [--sizes 1000,10000,100000] [--s3-sizes 1000,10000] [--json-s3-sizes 1000]
                                [--commits 20] [--procs 8 --conc-shards 1000]

For each backend (local disk; the moto S3 server on 127.0.0.1, started here) and each size N:

- **state**: a store with N committed shards, mined as nights of 1,000 shards, one night a day going
  back from the benchmark's "tonight" (shard URIs ``s3://fleet/<night>/vehicle-<v>/shard-<i>.tar``:
  a fleet's upload layout, date first). Committing N shards one by one would take hours here, so
  each night is one bulk commit of its 1,000 rows carrying the 1,000 app transactions (``txn``,
  stamped with the night's time, so nights older than the retention have expired, as in a store
  that has run for N/1,000 days) and, in the data tables, 1,000 add actions (for data files that
  are not written: the table state is what a commit or a lookup reads). Delta-rs writes its
  checkpoints (every 100 versions) as usual; each month of ``shards`` is compacted (sorted by
  shard) as a mining run does at its end.
- **commit cost per shard**: ``--commits`` real shard commits (``write_shard``: 100 patches, 512-d,
  3 data files + 1 Delta commit) on top of that state; the time inside the Delta commits
  (``commit_s_per_shard``) and the whole shard write (``write_s_per_shard``), medians.
- **lookup**: the planner's question "which of tonight's 1,000 shards are committed?"
  (``shard_states(root, shards=...)``, what ``mining.driver.plan_shards`` asks) from a cold process
  state (table cache cleared), median of 5 (3 on S3): ``lookup_s`` for a rerun of the latest night
  (all 1,000 committed: rows are read) and ``lookup_new_s`` for a new night (none committed).
  ``all_s``: every committed shard (``committed_shards``, what the index build and status read):
  O(shards) by nature, for reference.
- **JSON ledger** (the old protocol, ``mining.migrate``): N records, commit = one record PUT, lookup =
  list + read + parse all records.
- **concurrency** (S3): ``--procs`` processes commit ``--conc-shards`` shards at once to the ``shards``
  table, each also re-committing 20 shards of its neighbour at the same time; then every row is
  checked: each shard exactly once, with the values its owner wrote. Retries are reported.

The last line is one JSON object: lookup_s_<N>, lookup_new_s_<N>, all_s_<N>, commit_s_per_shard_<N>, write_s_per_shard_<N>,
json_lookup_s_<N>, json_commit_s_<N> (local), the same under "s3", and "concurrency".
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mining import store  # noqa: E402
from mining.migrate import read_json_ledger, write_json_record  # noqa: E402
from mining.store import ShardOutput, make_image_id, make_patch_id, shard_key  # noqa: E402

BATCH = 1000          # shards per night
TONIGHT = "2026-11-30"
DAY_MS = 86_400_000


def night(i: int) -> str:
    """Ingest date of shard i: night 0 = tonight, night k = k days earlier (1,000 shards a night)."""
    import datetime as dt

    return (dt.date.fromisoformat(TONIGHT) - dt.timedelta(days=i // BATCH)).isoformat()


def shard_uri(i: int) -> str:
    return f"s3://fleet/{night(i)}/vehicle-{i % 37:03d}/shard-{i:07d}.tar"


def _label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def fake_shard(i: int, n_patches: int = 100, dim: int = 512) -> ShardOutput:
    o = ShardOutput(shard=shard_uri(i), date=night(i), run_id="bench", model="ViT-B-16/openai", dim=dim)
    per_img = 35
    for j in range(n_patches):
        uri = f"{o.shard}#f{j // per_img:05d}.jpg"
        iid = make_image_id(uri)
        b = (j % 50, j % 30, j % 50 + 224, j % 30 + 224)
        o.patches.append(dict(patch_id=make_patch_id(iid, b, 2), image_id=iid, image_uri=uri, shard=o.shard, date=o.date,
                              x0=b[0], y0=b[1], x1=b[2], y1=b[3], level=2, score=0.5, model=o.model, run_id="bench"))
    e = np.random.default_rng(i).normal(size=(n_patches, dim)).astype(np.float32)
    o.embeddings.append((e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float16))
    for f in range((n_patches + per_img - 1) // per_img):
        uri = f"{o.shard}#f{f:05d}.jpg"
        o.images.append(dict(image_id=make_image_id(uri), image_uri=uri, shard=o.shard, date=o.date, width=3848, height=2168,
                             num_patches=per_img, status="ok", reason="", metadata="{}", run_id="bench"))
    return o


def _record(i: int, status: str = "committed", run_id: str = "bench") -> dict:
    uri = shard_uri(i)
    return {"schema_version": 1, "shard": uri, "shard_key": shard_key(uri), "date": night(i), "gen": 1, "status": status,
            "run_id": run_id, "model": "ViT-B-16/openai", "embedding_dim": 512, "random_init": False, "fingerprint": "",
            "files": {}, "bytes": 0, "num_images": 3, "num_patches": 100, "num_errors": 0,
            "committed_at": "2026-11-20T00:00:00+00:00"}


def bulk_state(root: str, lo: int, hi: int) -> None:
    """Commit shards lo..hi-1 (the nights before tonight: shard i is night i // BATCH + 1) in one commit
    per night, each with the night's app transactions stamped with the night's time."""
    from deltalake import CommitProperties, Transaction, write_deltalake
    from deltalake.transaction import AddAction

    opts = store.delta_storage_options(root)
    now = int(time.time() * 1000)
    for a in range(lo, hi, BATCH):
        ids = range(a + BATCH, min(hi, a + BATCH) + BATCH)      # skip night 0 (tonight)
        recs = [_record(i) for i in ids]
        stamp = now - (ids[0] // BATCH) * DAY_MS
        txns = [Transaction(store.app_id(r["shard_key"]), 1, stamp) for r in recs]
        for table in ("patches", "images", "errors"):
            dt = store._load(store.table_uri(root, table), opts, create=True)
            adds = [AddAction(f"{r['date']}/{r['shard_key']}-g1-bulk.parquet", 1000, {}, now, True,
                              json.dumps({"numRecords": 100})) for r in recs]
            dt.create_write_transaction(adds, "append", store.delta_schema(table),
                                        commit_properties=CommitProperties(app_transactions=txns))
        rows = [{k: r.get(k) for k in store.SHARDS_SCHEMA.names if k != "record"}
                | {"record": json.dumps(r), "month": r["date"][:7]} for r in recs]
        dt = store._load(store.table_uri(root, store.SHARDS_TABLE), opts, create=True)
        write_deltalake(dt, pa.Table.from_pylist(rows, schema=store.SHARDS_SCHEMA), mode="append",
                        commit_properties=CommitProperties(app_transactions=txns))


def bulk_json(root: str, lo: int, hi: int) -> None:
    from mining.fs import get_fs, join

    fs, base = get_fs(join(root, "ledger"))
    if "://" not in root:
        os.makedirs(base, exist_ok=True)
        for i in range(lo, hi):
            r = _record(i)
            with open(f"{base}/{r['shard_key']}.json", "w") as f:
                json.dump(r, f)
    else:
        fs.pipe({f"{base}/{_record(i)['shard_key']}.json": json.dumps(_record(i)).encode() for i in range(lo, hi)})


def timed_commits(root: str, start: int, n: int) -> tuple[float, float]:
    """Median (Delta commit seconds, whole write_shard seconds) over n real shard commits."""
    from mining import store_delta

    inner = store_delta._commit_once
    spent = [0.0]

    def wrapped(*a, **k):
        t = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            spent[0] += time.perf_counter() - t

    store_delta._commit_once = wrapped
    try:
        commit_s, write_s = [], []
        template = fake_shard(0)
        for i in range(start, start + n):      # tonight's shards (night 0)
            template.shard, template.date = shard_uri(i), night(i)
            spent[0] = 0.0
            t = time.perf_counter()
            store.write_shard(root, template)
            write_s.append(time.perf_counter() - t)
            commit_s.append(spent[0])
    finally:
        store_delta._commit_once = inner
    return statistics.median(commit_s), statistics.median(write_s)


def lookup(root: str, uris: list[str], expect: int, reps: int) -> float:
    """Median seconds of the planner's lookup of ``uris`` from a cold table cache; checks the count."""
    ts = []
    for _ in range(reps):
        store._TABLE_CACHE.clear()
        t = time.perf_counter()
        n = store.shard_states(root, columns=("shard", "gen", "status", "fingerprint"), shards=uris).num_rows
        ts.append(time.perf_counter() - t)
        assert n == expect, (n, expect)
    return statistics.median(ts)


def lookup_all(root: str, expect: int, reps: int) -> float:
    ts = []
    for _ in range(reps):
        store._TABLE_CACHE.clear()
        t = time.perf_counter()
        n = len(store.committed_shards(root))
        ts.append(time.perf_counter() - t)
        assert n == expect, (n, expect)
    return statistics.median(ts)


def json_costs(root: str, sizes: list[int], reps: int) -> dict:
    out, have, extra = {}, 0, 0
    for n in sizes:
        bulk_json(root, have, n)
        have = n
        ts = []
        for _ in range(reps if n <= 10_000 else 1):
            t = time.perf_counter()
            got = {r["shard"] for r in read_json_ledger(root)}
            ts.append(time.perf_counter() - t)
        assert len(got) == n + extra
        cs = []
        for j in range(10):
            r = _record(10_000_000 + n + j)
            t = time.perf_counter()
            write_json_record(root, r)
            cs.append(time.perf_counter() - t)
        extra += 10
        out[f"json_lookup_s_{_label(n)}"] = round(statistics.median(ts), 4)
        out[f"json_commit_s_{_label(n)}"] = round(statistics.median(cs), 5)
        print(f"  json ledger {n:>7}: lookup {statistics.median(ts):.3f} s, commit {1e3 * statistics.median(cs):.2f} ms",
              flush=True)
    return out


def delta_costs(root: str, sizes: list[int], commits: int, reps: int) -> dict:
    out, have, extra = {}, 0, 0
    for n in sizes:
        t = time.perf_counter()
        bulk_state(root, have, n)
        store.compact_shards_table(root)
        build = time.perf_counter() - t
        have = n
        rerun = [shard_uri(i) for i in range(BATCH, 2 * BATCH)]          # the latest committed night
        new = [shard_uri(i) for i in range(BATCH)]                       # tonight: nothing committed yet
        lk = lookup(root, rerun, BATCH, reps)
        lk_new = lookup(root, new, min(extra, BATCH), reps)
        la = lookup_all(root, n + extra, max(1, reps // 2))
        c, w = timed_commits(root, extra, commits)
        extra += commits
        out[f"lookup_s_{_label(n)}"] = round(lk, 4)
        out[f"lookup_new_s_{_label(n)}"] = round(lk_new, 4)
        out[f"all_s_{_label(n)}"] = round(la, 4)
        out[f"commit_s_per_shard_{_label(n)}"] = round(c, 4)
        out[f"write_s_per_shard_{_label(n)}"] = round(w, 4)
        out[f"build_s_{_label(n)}"] = round(build, 1)
        print(f"  delta {n:>7}: lookup {lk:.4f} s (rerun night), {lk_new:.4f} s (new night), all {la:.3f} s, commit {1e3 * c:.1f} ms/shard (1 Delta commit), "
              f"whole shard write {1e3 * w:.1f} ms, state built in {build:.1f} s", flush=True)
    return out


def _conc_worker(args):
    root, env, own, dup = args
    os.environ.update(env)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    from mining import store as st

    for i in own + dup:
        st.commit_record(root, _record(i, run_id=f"p{own[0]}"))
    return dict(st.COMMIT_STATS)


def concurrency(root: str, env: dict, procs: int, shards: int) -> dict:
    per = shards // procs
    jobs = []
    for k in range(procs):
        own = list(range(k * per, (k + 1) * per))
        nb = ((k + 1) % procs) * per
        jobs.append((root, env, own, list(range(nb, nb + min(20, per)))))
    t = time.perf_counter()
    with mp.get_context("spawn").Pool(procs) as pool:
        stats = pool.map(_conc_worker, jobs)
    wall = time.perf_counter() - t
    from deltalake import DeltaTable

    tab = DeltaTable(store.table_uri(root, store.SHARDS_TABLE), storage_options=store.delta_storage_options(root)).to_pyarrow_table()
    got = tab.column("shard").to_pylist()
    want = [_record(i)["shard"] for i in range(per * procs)]
    lost = sorted(set(want) - set(got))
    dups = len(got) - len(set(got))
    res = {"procs": procs, "shards": per * procs, "duplicate_commit_attempts": sum(len(j[3]) for j in jobs),
           "rows": len(got), "lost": len(lost), "duplicated": dups,
           "commits": sum(s["commits"] for s in stats), "noops": sum(s["noops"] for s in stats),
           "retries": sum(s["retries"] for s in stats), "wall_s": round(wall, 1),
           "table_version": DeltaTable(store.table_uri(root, store.SHARDS_TABLE),
                                       storage_options=store.delta_storage_options(root)).version()}
    print(f"  concurrency: {res}", flush=True)
    return res


def start_moto() -> tuple[object, dict]:
    from moto.server import ThreadedMotoServer

    from tests.moto_atomic import atomic_conditional_puts

    atomic_conditional_puts()      # moto's conditional PUT is check-then-put; S3's is atomic

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    os.environ.update(env)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    return server, env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--sizes", type=ints, default=[1000, 10000, 100000])
    ap.add_argument("--s3-sizes", type=ints, default=[1000, 10000])
    ap.add_argument("--json-s3-sizes", type=ints, default=[1000])
    ap.add_argument("--commits", type=int, default=20)
    ap.add_argument("--procs", type=int, default=8)
    ap.add_argument("--conc-shards", type=int, default=1000)
    args = ap.parse_args(argv)
    res: dict = {}
    tmp = tempfile.mkdtemp(prefix="store-bench-")
    try:
        print("local disk", flush=True)
        res.update(delta_costs(os.path.join(tmp, "delta"), args.sizes, args.commits, 5))
        res.update(json_costs(os.path.join(tmp, "json"), args.sizes, 3))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.s3_sizes or args.procs:
        server, env = start_moto()
        from mining.fs import get_fs

        fs, _ = get_fs("s3://bench-store")
        for b in ("bench-store", "bench-json", "bench-conc"):
            fs.mkdir(b)
        try:
            print("S3 (moto on 127.0.0.1)", flush=True)
            s3 = {}
            if args.s3_sizes:
                s3.update(delta_costs("s3://bench-store/d", args.s3_sizes, max(5, args.commits // 2), 3))
            if args.json_s3_sizes:
                s3.update(json_costs("s3://bench-json/j", args.json_s3_sizes, 1))
            res["s3"] = s3
            if args.procs:
                res["concurrency"] = concurrency("s3://bench-conc/c", env, args.procs, args.conc_shards)
        finally:
            server.stop()
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
