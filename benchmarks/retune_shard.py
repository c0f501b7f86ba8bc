"""Held-out recall@16 and batch-1 latency of the 5M single shard at deeper re-rank settings than the tuner's
K_FACTORS (which stop at 256): the follow-up to the 5M run in RESULTS.md (issue 18). Reads the shard and the
benchmark's held-out truth left by ``benchmarks/index.py --n 5000000 --shards 1,4,8 --keep --workdir
/tmp/idxbench-5m``; prefaults the refine file first; one thread; medians of 50 single-query calls. JSON last.

    python benchmarks/retune_shard.py
"""
import json, os, time, numpy as np, faiss, sys
sys.path.insert(0, "/work/main")
faiss.omp_set_num_threads(1)
from mining.index import core, publish, layout
from mining.index.synthetic import ClusteredMixture
root = "/tmp/idxbench-5m/index"
vs = [v for v in publish.list_versions(root) if len(publish.read_manifest(root, v)["shards"]) == 1]
m = publish.read_manifest(root, vs[-1]); sid = m["shards"][0]["id"]
ix = layout.open_shard(root, sid)
print("prefault", ix.prefault(), flush=True)
mix = ClusteredMixture(512, seed=0)
q = core.normalize(mix.sample(400, seed=2))[200:]
gt = np.load("/tmp/idxbench-5m/store/bench_gt.npy")
out = {}
for p in ({"nprobe": 16, "k_factor": 256}, {"nprobe": 16, "k_factor": 512}, {"nprobe": 32, "k_factor": 512}, {"nprobe": 64, "k_factor": 512}):
    ix.set_params(p)
    r = core.recall_at_k(ix.search(q, 16)[1], gt, 16)
    ts = []
    for i in range(60):
        t = time.perf_counter(); ix.search(q[i:i+1], 16); ts.append(time.perf_counter() - t)
    out[json.dumps(p)] = (round(r, 4), round(float(np.median(ts[10:])) * 1e3, 3))
    print(p, out[json.dumps(p)], flush=True)
print(json.dumps({"n": 5000000, "shard": sid, "held_out_recall_and_b1_ms": out, "load_avg": os.getloadavg()[0]}))
