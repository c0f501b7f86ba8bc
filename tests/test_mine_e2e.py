"""The vertical slice (issue 2): real GTSDB photos -> jobs.mine on a real Ray -> Parquet ->
jobs.build_index (FAISS) -> jobs.query returns the right image and box.

Uses the tiny randomly initialised open_clip config (tiny-test-random, seeded): results
are not semantic, but an exact crop of a mined box must come back as its own top hit.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from mining.store import delta_schema, open_errors, open_images, open_patches, patch_schema, read_ledger
from tests.conftest import gtsdb_images, run_cli

TINY = ["--clip-model", "tiny-test-random", "--clip-random-init"]


def test_mine_index_query_end_to_end(ray_head, tmp_path):
    src = gtsdb_images(4)
    inp = tmp_path / "in"
    inp.mkdir()
    for p in src[:3]:
        shutil.copy(p, inp / p.name)
    (inp / "corrupt.jpg").write_bytes(src[3].read_bytes()[:4000])  # a truncated JPEG
    data, index, out = tmp_path / "data", tmp_path / "index", tmp_path / "q"
    env = {"RAY_ADDRESS": ray_head.address}

    cp = run_cli(["jobs.mine", "--input", str(inp), "--output", str(data), *TINY], env=env)
    assert "images 3, patches" in cp.stdout and "errors 1" in cp.stdout, cp.stdout
    assert "RANDOM" in cp.stdout

    # the Delta table's one data file carries the Delta schema (embedding list<float32>: Delta has no
    # float16), and open_patches gives exactly the documented schema
    files = [f for f in (data / "patches").rglob("*.parquet") if "_delta_log" not in f.parts]
    assert len(files) == 1
    schema = pq.read_schema(files[0])
    assert schema.remove_metadata().equals(delta_schema("patches")), schema
    t = open_patches(str(data)).to_table()
    assert t.schema.remove_metadata().equals(patch_schema(64).remove_metadata()), t.schema
    assert t.num_rows >= 3 and len(set(t["patch_id"].to_pylist())) == t.num_rows
    assert set(t["level"].to_pylist()) <= {1, 2}
    x0, y0, x1, y1 = (np.array(t[c].to_pylist()) for c in ("x0", "y0", "x1", "y1"))
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 1360).all() and (y1 <= 800).all() and (x1 > x0).all()
    assert read_ledger(str(data))[0]["random_init"] is True

    # the corrupt image is in the errors table, the three good ones in the images table
    errs = open_errors(str(data)).to_table().to_pylist()
    assert [e["stage"] for e in errs] == ["decode"] and errs[0]["uri"].endswith("corrupt.jpg")
    imgs = open_images(str(data)).to_table().to_pylist()
    assert sorted(r["status"] for r in imgs) == ["error", "ok", "ok", "ok"]

    cp = run_cli(["jobs.build_index", "--data", str(data), "--out", str(index)], env=env)
    assert "random" in (cp.stdout + cp.stderr).lower()  # later steps warn: not semantic

    # an image query with a patch cut exactly from a mined box returns that image and box first
    row = t.filter(t["level"].cast("int32").to_numpy() == 2).to_pylist()[0] if 2 in t["level"].to_pylist() else t.to_pylist()[0]
    box = f"{row['x0']},{row['y0']},{row['x1']},{row['y1']}"
    frame = row["image_uri"]
    cp = run_cli(["jobs.query", "--index", str(index), "--image", frame, "--box", box, "--k", "5",
                  "--allow-prefix", str(inp), "--out", str(out), "--json", *TINY], env=env)
    hits = [json.loads(line) for line in cp.stdout.splitlines() if line.startswith("{")]
    assert hits, cp.stdout + cp.stderr
    top = hits[0]
    assert top["image_uri"] == frame and (top["x0"], top["y0"], top["x1"], top["y1"]) == (
        row["x0"], row["y0"], row["x1"], row["y1"]), (top, row)
    assert top["score"] > 0.99
    # no two hits from one frame overlap (thesis §3.3.1)
    from mining.query import overlap_larger

    for i, a in enumerate(hits):
        for b in hits[i + 1:]:
            if a["image_uri"] == b["image_uri"]:
                assert overlap_larger((a["x0"], a["y0"], a["x1"], a["y1"]), (b["x0"], b["y0"], b["x1"], b["y1"])) == 0
    sheet = out / "contact_sheet.png"
    assert sheet.exists() and Image.open(sheet).size[0] > 100

    # a text query runs too
    cp = run_cli(["jobs.query", "--index", str(index), "--text", "a road narrows sign", "--k", "4", "--json", *TINY], env=env)
    assert len([line for line in cp.stdout.splitlines() if line.startswith("{")]) == 4
