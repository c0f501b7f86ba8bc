"""Ledger overhead per shard (issue 9).

    python benchmarks/ledger.py [--shards 200] [--patches-per-shard 3500] [--s3]

For each shard, side by side in one run: (a) write its three Parquet parts only,
(b) commit its ledger record (the atomic JSON write that makes the shard visible).
Also times the reader side: listing + parsing all ledger records (what a nightly run
and every index build do once). ``--s3`` repeats everything against a local
S3-compatible server (moto, started here on 127.0.0.1).

Prints medians; the last line is JSON with commit_ms_per_shard, parts_ms_per_shard,
overhead_ratio, read_ledger_ms (for all shards), per storage backend.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mining.store import ShardOutput, commit_record, make_image_id, make_patch_id, read_ledger, write_shard  # noqa: E402


def fake_shard(i: int, n_patches: int, dim: int = 512) -> ShardOutput:
    rng = np.random.default_rng(i)
    o = ShardOutput(shard=f"s3://fleet/night/shard-{i:06d}.tar", date="2026-11-20", run_id="bench", model="ViT-B-16/openai", dim=dim)
    per_img = 35
    for j in range(n_patches):
        uri = f"{o.shard}#f{j // per_img:05d}.jpg"
        iid = make_image_id(uri)
        b = (j % 50, j % 30, j % 50 + 224, j % 30 + 224)
        o.patches.append(dict(patch_id=make_patch_id(iid, b, 2), image_id=iid, image_uri=uri, shard=o.shard, date=o.date,
                              x0=b[0], y0=b[1], x1=b[2], y1=b[3], level=2, score=0.5, model=o.model, run_id="bench"))
    e = rng.normal(size=(n_patches, dim)).astype(np.float32)
    o.embeddings.append((e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float16))
    for f in range((n_patches + per_img - 1) // per_img):
        uri = f"{o.shard}#f{f:05d}.jpg"
        o.images.append(dict(image_id=make_image_id(uri), image_uri=uri, shard=o.shard, date=o.date, width=3848, height=2168,
                             num_patches=per_img, status="ok", reason="", metadata="{}", run_id="bench"))
    return o


def bench(root: str, shards: int, n_patches: int) -> dict:
    parts_ms, commit_ms = [], []
    template = fake_shard(0, n_patches)
    for i in range(shards):
        o = template
        o.shard = f"s3://fleet/night/shard-{i:06d}.tar"
        t0 = time.perf_counter()
        rec = write_shard(root, o, commit=False)
        t1 = time.perf_counter()
        commit_record(root, rec)
        t2 = time.perf_counter()
        parts_ms.append((t1 - t0) * 1e3)
        commit_ms.append((t2 - t1) * 1e3)
    reads = []
    for _ in range(3):
        t0 = time.perf_counter()
        recs = read_ledger(root)
        reads.append((time.perf_counter() - t0) * 1e3)
    assert len(recs) == shards
    p, c = statistics.median(parts_ms), statistics.median(commit_ms)
    return {"shards": shards, "patches_per_shard": n_patches, "parts_ms_per_shard": round(p, 2),
            "commit_ms_per_shard": round(c, 2), "overhead_ratio": round(c / p, 4),
            "read_ledger_ms": round(statistics.median(reads), 1),
            "read_ledger_ms_per_shard": round(statistics.median(reads) / shards, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=200)
    ap.add_argument("--patches-per-shard", type=int, default=3500, help="~100 frames x 35 patches")
    ap.add_argument("--s3", action="store_true", help="also measure against a local moto S3 server")
    args = ap.parse_args(argv)
    results = {}
    tmp = tempfile.mkdtemp(prefix="ledger-bench-")
    try:
        results["local"] = bench(tmp, args.shards, args.patches_per_shard)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.s3:
        from moto.server import ThreadedMotoServer

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        os.environ.update({"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}"})
        import logging

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        from mining.fs import get_fs

        fs, _ = get_fs("s3://bench")
        fs.mkdir("bench")
        try:
            results["s3-moto"] = bench("s3://bench/out", args.shards, args.patches_per_shard)
        finally:
            server.stop()
    print(f"{'backend':<10} {'shards':>6} {'parts ms/shard':>15} {'commit ms/shard':>16} {'commit/parts':>13} {'read ledger ms':>15}")
    for k, r in results.items():
        print(f"{k:<10} {r['shards']:>6} {r['parts_ms_per_shard']:>15.2f} {r['commit_ms_per_shard']:>16.2f} "
              f"{r['overhead_ratio']:>13.4f} {r['read_ledger_ms']:>15.1f}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
