"""Test helpers of the index: a real mining store (Parquet + ledger) of clustered vectors (tests, examples)."""
from __future__ import annotations

import numpy as np

from mining.index.synthetic import ClusteredMixture
from mining.store import ShardOutput, make_image_id, make_patch_id, write_shard

DIM = 32


def mixture(seed: int = 0, dim: int = DIM, **kw) -> ClusteredMixture:
    kw.setdefault("n_clusters", 40)
    kw.setdefault("rank", 8)
    return ClusteredMixture(dim, seed=seed, **kw)


def write_store(root: str, n_shards: int, per_shard: int, *, mix: ClusteredMixture | None = None, seed: int = 1,
                date: str = "2026-11-20", prefix: str = "shard", random_init: bool = False) -> np.ndarray:
    """Write ``n_shards`` committed shards of ``per_shard`` patches each; returns all vectors (float32)."""
    mix = mix or mixture()
    allx = []
    for s in range(n_shards):
        x = mix.sample(per_shard, seed=seed * 1000 + s)
        uri = f"/data/{prefix}-{date}-{s:03d}"
        out = ShardOutput(shard=uri, date=date, run_id="test", model="synthetic", dim=mix.dim, random_init=random_init)
        for i in range(per_shard):
            image_uri = f"{uri}/img{i // 10:05d}.jpg"
            iid = make_image_id(image_uri)
            box = (i % 10, 0, i % 10 + 8, 8)
            out.patches.append(dict(patch_id=make_patch_id(iid, box, 1), image_id=iid, image_uri=image_uri, shard=uri,
                                    date=date, x0=box[0], y0=box[1], x1=box[2], y1=box[3], level=1, score=1.0,
                                    model="synthetic", run_id="test"))
        out.embeddings.append(x.astype(np.float16))
        write_shard(root, out)
        allx.append(x)
    return np.concatenate(allx)
