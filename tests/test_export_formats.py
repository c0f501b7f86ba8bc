"""Standard exports with the real libraries: pycocotools in-process; label-studio-sdk and Datumaro in the
labeling-tools venv (tests/labeltools_check.py); frames read from tar and Parquet shard members,
locally and on a real S3 server (moto)."""
from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET
import zipfile

import numpy as np
import pytest

import labeling_data as LD
from conftest import REPO

LT_PY = os.environ.get("LABELTOOLS_PYTHON", str(REPO / ".venv-labeltools" / "bin" / "python"))


@pytest.fixture(scope="module")
def ld(tmp_path_factory):
    return LD.build(str(tmp_path_factory.mktemp("ldata")))


@pytest.fixture(scope="module")
def eng(ld):
    return LD.engine(ld)


@pytest.fixture(scope="module")
def exported(ld, eng, tmp_path_factory):
    from mining.export import export_hits
    from mining.query import query_info

    out = str(tmp_path_factory.mktemp("exp"))
    t = eng.embedding(ld.emb[1] + ld.emb[8], k=10)
    info = query_info(t)
    res = export_hits(t, out, query={"type": "text", "text": "a road narrows sign"}, index_version=info["index_version"],
                      model=info["model"], random_init=True, formats=["coco,labelstudio", "cvat", "fiftyone"],
                      data_root=ld.data, url_prefix="/data/local-files/?d=exp/")
    return t, res, out


def labeltools(*args, timeout=300):
    if not os.path.exists(LT_PY):
        pytest.skip(f"labeling-tools venv not found at {LT_PY}: run `bash .ci/labeltools-venv` (label-studio-sdk "
                    "and datumaro pin opencv-python-headless, which clashes with opencv-contrib-python-headless)")
    cp = subprocess.run([LT_PY, str(REPO / "tests" / "labeltools_check.py"), *map(str, args)], capture_output=True,
                        text=True, timeout=timeout)
    assert cp.returncode == 0, cp.stderr[-3000:]
    return json.loads(cp.stdout.strip().splitlines()[-1])


def test_frames_from_tar_and_parquet_members(ld):
    from mining.decode import decode_image
    from mining.export import FrameReader, split_member

    r = FrameReader()
    r.prefetch(ld.uris)
    for uri, path in zip(ld.uris, ld.images):
        assert split_member(uri)
        np.testing.assert_array_equal(r.rgb(uri), decode_image(open(path, "rb").read()))
        data, ext = r.export_file(uri)
        assert ext == ".jpg" and data == open(path, "rb").read()  # upright JPEG: the original bytes
    assert split_member(ld.images[0]) is None
    with pytest.raises(KeyError, match="not found"):
        r.bytes(ld.tar + "#nope.jpg")


@pytest.mark.s3
def test_frames_from_shards_on_s3(s3_server, tmp_path):
    from mining.decode import decode_image
    from mining.export import FrameReader, contact_sheet
    from PIL import Image
    import pyarrow as pa

    bucket = s3_server.make_bucket()
    images = [str(p) for p in LD.gtsdb_images(4)]
    tar, pqu, uris = LD.write_shards(f"s3://{bucket}/night", images)
    r = FrameReader()
    for uri, path in zip(uris, images):
        np.testing.assert_array_equal(r.rgb(uri), decode_image(open(path, "rb").read()))
    # the contact sheet shows the crops, not grey "unreadable" tiles
    t = pa.table({"rank": [1, 2], "score": [0.9, 0.8], "image_uri": [uris[0], uris[3]], "image_id": ["a", "b"],
                  "x0": [0, 10], "y0": [0, 10], "x1": [200, 89], "y1": [200, 89]})
    p = contact_sheet(t, str(tmp_path / "cs.png"), reader=FrameReader(), tile=100, title="x" * 400)
    im = np.asarray(Image.open(p).convert("RGB"))
    tile = im[18 * 3 + 6 + 6: 18 * 3 + 6 + 106, 6:106]
    assert tile.std() > 10 and not (np.abs(tile.astype(int) - 200).max() < 3)


def test_manifest_has_sizes_metadata_hit_ids(ld, exported):
    t, res, out = exported
    rows = [json.loads(x) for x in open(res["manifest_jsonl"])]
    assert sum(len(r["hit_ids"]) for r in rows) == t.num_rows == 10
    for r in rows:
        i = ld.uris.index(r["image_uri"])
        assert (r["width"], r["height"]) == (1360, 800)
        assert json.loads(r["metadata"]) == LD.META[i]
        assert r["hit_ids"] == [f"{p:016x}" for p in r["patch_ids"]] and r["category"] == "a road narrows sign"
    assert not res["unreadable"] and len(os.listdir(os.path.join(out, "images"))) == len(rows)


def test_coco_roundtrip_pycocotools(ld, exported):
    from pycocotools.coco import COCO

    t, res, out = exported
    c = COCO(res["formats"]["coco"])
    assert len(c.getImgIds()) == len({r for r in t.column("image_uri").to_pylist()})
    assert [x["name"] for x in c.loadCats(c.getCatIds())] == ["a road narrows sign"]
    anns = c.loadAnns(c.getAnnIds())
    assert len(anns) == 10
    by_pid = {a["patch_id"]: a for a in anns}
    for r in t.to_pylist():
        a = by_pid[r["patch_id"]]
        assert a["bbox"] == [r["x0"], r["y0"], r["x1"] - r["x0"], r["y1"] - r["y0"]]
        assert a["score"] == pytest.approx(r["score"], abs=1e-5)
        img = c.loadImgs(a["image_id"])[0]
        assert (img["width"], img["height"]) == (1360, 800) and os.path.exists(os.path.join(out, img["file_name"]))
    dets = c.loadRes([{k: a[k] for k in ("image_id", "category_id", "bbox", "score")} for a in anns])
    assert len(dets.getAnnIds()) == 10
    # CVAT / FiftyOne layouts carry the same COCO and the frame files
    cv = json.load(open(os.path.join(out, "cvat", "annotations", "instances_default.json")))
    for im in cv["images"]:
        assert os.path.exists(os.path.join(out, "cvat", "images", "default", im["file_name"]))
        assert os.path.exists(os.path.join(out, "fiftyone", "data", im["file_name"]))
    assert zipfile.ZipFile(os.path.join(out, "cvat_coco_1.0.zip")).namelist() == ["annotations/instances_default.json"]
    assert COCO(os.path.join(out, "fiftyone", "labels.json")).getAnnIds() == c.getAnnIds()


def test_labelstudio_tasks_and_config(ld, exported):
    t, res, out = exported
    tasks = json.load(open(res["formats"]["labelstudio"]["tasks"]))
    root = ET.parse(res["formats"]["labelstudio"]["config"]).getroot()
    assert [lb.get("value") for lb in root.iter("Label")] == ["a road narrows sign", "reject"]
    n = 0
    by_pid = {r["patch_id"]: r for r in t.to_pylist()}
    for task in tasks:
        assert task["data"]["image"].startswith("/data/local-files/?d=exp/images/")
        for r in task["predictions"][0]["result"]:
            h = by_pid[int(r["id"], 16)]
            v, W, H = r["value"], r["original_width"], r["original_height"]
            assert [round(v["x"] * W / 100), round(v["y"] * H / 100), round((v["x"] + v["width"]) * W / 100),
                    round((v["y"] + v["height"]) * H / 100)] == [h["x0"], h["y0"], h["x1"], h["y1"]]
            assert r["score"] == pytest.approx(h["score"], abs=1e-5)
            n += 1
    assert n == 10


def test_labelstudio_sdk_schema_and_converter(exported, tmp_path):
    t, res, out = exported
    ls = res["formats"]["labelstudio"]
    v = labeltools("ls-validate", ls["config"], ls["tasks"])
    assert v["errors"] == [] and v["labels"] == ["a road narrows sign", "reject"]
    # a labeled export (annotations = the predictions) converts to COCO with the same pixel boxes
    tasks = json.load(open(ls["tasks"]))
    export = [{**tk, "id": i + 1, "annotations": [{"id": i + 1, "result": tk["predictions"][0]["result"],
                                                   "was_cancelled": False}]} for i, tk in enumerate(tasks)]
    p = tmp_path / "ls_export.json"
    p.write_text(json.dumps(export))
    c = labeltools("ls-to-coco", ls["config"], p, tmp_path / "coco")
    assert c["annotations"] == 10 and "a road narrows sign" in c["categories"]
    got = sorted([round(x) for x in b] for b in c["bboxes"])
    want = sorted([r["x0"], r["y0"], r["x1"] - r["x0"], r["y1"] - r["y0"]] for r in t.to_pylist())
    assert got == want


def test_datumaro_detects_cvat_coco(exported):
    t, res, out = exported
    d = labeltools("datumaro-detect", os.path.join(out, "cvat"))
    assert any(f.startswith("coco") for f in d["formats"]), d
    imp = labeltools("datumaro-import", os.path.join(out, "cvat"), "coco_instances")
    assert imp["bboxes"] == 10


def test_fiftyone_import_or_clear_skip(exported):
    try:
        import fiftyone as fo  # noqa: F401
    except Exception as e:  # not installed, or its database (mongod) cannot start offline
        pytest.skip(f"FiftyOne not usable here ({type(e).__name__}: {str(e)[:120]}); its database needs a mongod "
                    "download. The fiftyone/ directory is checked as COCO with pycocotools instead")
    t, res, out = exported
    ds = fo.Dataset.from_dir(dataset_dir=os.path.join(out, "fiftyone"), dataset_type=fo.types.COCODetectionDataset)
    assert sum(len(s.detections.detections) for s in ds) == 10


def test_bad_export_settings(ld, eng, tmp_path):
    from mining.export import ExportError, export_hits

    t = eng.embedding(ld.emb[0], k=2)
    with pytest.raises(ExportError, match="unknown export format 'yolo'"):
        export_hits(t, str(tmp_path), query="q", index_version="v", formats=["coco,yolo"])
    with pytest.raises(ExportError, match="s3-presign needs plain s3:// frame files"):
        export_hits(t, str(tmp_path), query="q", index_version="v", formats=["labelstudio"], url_prefix="s3-presign")
    from conftest import run_cli

    cp = run_cli(["jobs.query", "--index", ld.index, "--embedding", str(tmp_path / "x.npy"), "--format", "yolo",
                  "--out", str(tmp_path)], timeout=120, check=False)
    assert cp.returncode == 2 and "unknown export format 'yolo'" in cp.stderr
