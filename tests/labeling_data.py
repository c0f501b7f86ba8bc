"""A small mined dataset whose frames live in shards (WebDataset tar + Parquet), with sidecar metadata.

Four GTSDB frames: two in ``frames.tar`` (members ``f0.jpg``/``f1.jpg`` + ``.json`` sidecars), two in
``frames.parquet`` (id column ``id``, bytes column ``image``); six boxes each, embedded with the tiny
randomly initialised open_clip config, written with ``write_shard`` and indexed (flat). Sidecars:
camera front/rear and a timestamp (hours 21, 08, 22, 14 UTC).
"""
from __future__ import annotations

import io
import json
import os
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conftest import gtsdb_images

BOXES = [(100, 100, 324, 324), (600, 300, 824, 524), (1000, 200, 1224, 424), (0, 352, 448, 800),
         (800, 500, 1024, 724), (300, 450, 379, 529)]
META = [{"camera": "front", "timestamp": "2026-11-20T21:05:00Z", "vehicle": "v1"},
        {"camera": "rear", "timestamp": "2026-11-20T08:00:00Z", "vehicle": "v1"},
        {"camera": "front", "timestamp": "2026-11-20T22:30:00Z", "vehicle": "v2"},
        {"camera": "front", "timestamp": "2026-11-20T14:00:00Z", "vehicle": "v2"}]


class Data:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def write_shards(root: str, images: list[str]) -> tuple[str, str, list[str]]:
    """(tar uri, parquet uri, image_uris) with frames 0-1 in the tar and 2-3 in the Parquet shard."""
    from mining.fs import get_fs, join
    from mining.shards import write_tar_shard

    raw = [open(p, "rb").read() for p in images]
    tar = write_tar_shard(join(root, "frames.tar"),
                          [(f"f{i}", {"jpg": raw[i], "json": json.dumps(META[i]).encode()}) for i in (0, 1)])
    t = pa.table({"id": ["f2", "f3"], "image": pa.array([raw[2], raw[3]], pa.binary()),
                  "camera": [META[2]["camera"], META[3]["camera"]]})
    buf = io.BytesIO()
    pq.write_table(t, buf)
    fs, path = get_fs(join(root, "frames.parquet"))
    with fs.open(path, "wb") as f:
        f.write(buf.getvalue())
    pqu = join(root, "frames.parquet")
    return tar, pqu, [f"{tar}#f0.jpg", f"{tar}#f1.jpg", f"{pqu}#f2", f"{pqu}#f3"]


def build(root: str, shard_root: str | None = None) -> Data:
    """Store + flat index under ``root`` (data/, index/) over frames in shards under ``shard_root``."""
    from PIL import Image

    from mining.embed import TEST_MODEL, ClipEmbedder, ClipSpec
    from mining.index import build_index
    from mining.store import ShardOutput, make_image_id, make_patch_id, write_shard

    images = [str(p) for p in gtsdb_images(4)]
    tar, pqu, uris = write_shards(shard_root or root, images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emb = ClipEmbedder(ClipSpec(TEST_MODEL, None, True), device="cpu")
    data, index = os.path.join(root, "data"), os.path.join(root, "index")
    rows, E = [], []
    for shard, idx in ((tar, (0, 1)), (pqu, (2, 3))):
        out = ShardOutput(shard=shard, date="2026-11-20", run_id="t", model=emb.model_id, dim=emb.dim,
                          random_init=True)
        for i in idx:
            arr = np.array(Image.open(images[i]).convert("RGB"))
            iid = make_image_id(uris[i])
            z = emb.embed_crops(arr, np.asarray(BOXES))
            for b in BOXES:
                pid = make_patch_id(iid, b, 1)
                out.patches.append(dict(patch_id=pid, image_id=iid, image_uri=uris[i], shard=shard, date=out.date,
                                        x0=b[0], y0=b[1], x1=b[2], y1=b[3], level=1, score=0.5, model=emb.model_id,
                                        run_id="t"))
                rows.append(dict(patch_id=pid, image_id=iid, image_uri=uris[i], box=b, frame=i))
            out.embeddings.append(z)
            E.append(z)
            out.images.append(dict(image_id=iid, image_uri=uris[i], shard=shard, date=out.date, width=arr.shape[1],
                                   height=arr.shape[0], num_patches=len(BOXES), status="ok", reason="",
                                   metadata=json.dumps(META[i]), run_id="t"))
        write_shard(data, out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_index(data, index, kind="flat", use_ray=False, verbose=False)
    E = np.concatenate(E).astype(np.float16).astype(np.float32)
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    return Data(root=root, data=data, index=index, images=images, uris=uris, tar=tar, parquet=pqu, rows=rows,
                emb=E, embedder=emb, image_ids=[make_image_id(u) for u in uris])


def engine(d: Data):
    from mining.query import QueryEngine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return QueryEngine(d.index, embedder=d.embedder)
