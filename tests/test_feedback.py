"""Labels come back (every reader, through jobs.feedback), the labels table, campaign queries with the
probe and labeled-frame exclusion, --where metadata filters (DuckDB), and the feedback scorers."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import labeling_data as LD
from conftest import REPO, run_cli


@pytest.fixture(scope="module")
def ld(tmp_path_factory):
    return LD.build(str(tmp_path_factory.mktemp("fdata")))


@pytest.fixture(scope="module")
def eng(ld):
    return LD.engine(ld)


@pytest.fixture
def fresh(ld, tmp_path):
    """A private copy of the index; its manifest still names the module's store, whose labels/ the
    test removes at the end."""
    shutil.copytree(ld.index, tmp_path / "index")
    return tmp_path


def _export(ld, eng, out, k=10, formats=("coco", "labelstudio"), frames=None):
    import pyarrow as pa
    import pyarrow.compute as pc

    from mining.export import export_hits
    from mining.query import query_info

    t = eng.embedding(ld.emb[1] + ld.emb[8], k=k)
    info = query_info(t)
    if frames is not None:  # only the hits of these frames (the others stay unlabeled)
        t = t.filter(pc.is_in(t.column("image_id"), value_set=pa.array(frames)))
    res = export_hits(t, str(out), query={"type": "text", "text": "narrows"}, index_version=info["index_version"],
                      random_init=True, formats=list(formats), data_root=ld.data, campaign="narrows")
    return t, res


def _split(t):
    """accepted = hits ranked 1, 3, 5, ...; rejected = the others (hit ids)."""
    hids = [f"{p:016x}" for p in t.column("patch_id").to_pylist()]
    return set(hids[0::2]), set(hids[1::2])


def _labels(root, campaign="narrows"):
    from mining.labels import read_labels

    return read_labels(root, campaign).to_pylist()


def _sets(rows):
    return ({r["hit_id"] for r in rows if r["label"] == "positive" and not r["added"]},
            {r["hit_id"] for r in rows if r["label"] == "negative"})


def test_gallery_labelstudio_coco_datumaro_come_back_with_the_same_sets(ld, eng, tmp_path):
    from mining.feedback import ingest

    t, res = _export(ld, eng, tmp_path / "exp")
    acc, rej = _split(t)
    store = str(tmp_path / "store")
    # 1. the review page's feedback JSON
    g = {"format": "fleet-mining-feedback", "version": 1, "run_id": res["run_id"], "campaign": "narrows",
         "category": "narrows", "hits": [{"hit_id": h, "patch_id": int(h, 16), "image_id": "", "image_uri": "",
                                          "box": [0, 0, 10, 10], "verdict": "accepted" if h in acc else "rejected"}
                                         for h in acc | rej]}
    (tmp_path / "fb.json").write_text(json.dumps(g))
    # 2. Label Studio: the labeler deletes the rejected regions, moves one accepted box, adds one box
    tasks = json.load(open(res["formats"]["labelstudio"]["tasks"]))
    moved = sorted(acc)[0]
    export = []
    for i, tk in enumerate(tasks):
        result = []
        for r in tk["predictions"][0]["result"]:
            if r["id"] in acc:
                r = json.loads(json.dumps(r))
                if r["id"] == moved:
                    r["value"]["x"] += 1.0
                result.append(r)
        if i == 0:
            result.append({**json.loads(json.dumps(tk["predictions"][0]["result"][0])), "id": "new1",
                           "value": {"x": 1.0, "y": 1.0, "width": 5.0, "height": 5.0, "rotation": 0,
                                     "rectanglelabels": ["narrows"]}})
        export.append({**tk, "id": i + 1, "annotations": [{"id": i, "result": result, "was_cancelled": False}]})
    (tmp_path / "exp" / "ls_export.json").write_text(json.dumps(export))
    # 3. COCO back from a tool that drops our extra fields (CVAT): accepted boxes only, new ids
    coco = json.load(open(res["formats"]["coco"]))
    kept = [a for a in coco["annotations"] if a["hit_id"] in acc]
    coco["annotations"] = [{"id": 100 + i, "image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"],
                            "area": a["area"], "iscrowd": 0} for i, a in enumerate(kept)]
    (tmp_path / "exp" / "cvat_labeled.json").write_text(json.dumps(coco))
    # 4. Datumaro JSON (CVAT "Datumaro 1.0")
    items = []
    for im in coco["images"]:
        anns = [{"id": i, "type": "bbox", "label_id": 0, "bbox": a["bbox"], "attributes": {}}
                for i, a in enumerate(coco["annotations"]) if a["image_id"] == im["id"]]
        items.append({"id": im["file_name"].rsplit(".", 1)[0].split("/")[-1],
                      "media": {"path": im["file_name"]}, "annotations": anns})
    (tmp_path / "exp" / "dm.json").write_text(json.dumps({"items": items, "categories": {"label": {
        "labels": [{"name": "narrows"}]}}}))
    got = {}
    for name in ("fb.json", "exp/ls_export.json", "exp/cvat_labeled.json", "exp/dm.json"):
        r = ingest(str(tmp_path / name), "narrows", data_root=store)
        rows = [x for x in _labels(store) if x["round"] == r["round"]]
        got[r["format"]] = (rows, r)
        assert _sets(rows) == (acc, rej), r["format"]
        assert r["accepted"] == len(acc) and r["rejected"] == len(rej)
    ls_rows, ls_res = got["labelstudio"]
    assert ls_res["corrected"] == 1 and ls_res["added"] == 1
    mv = [x for x in ls_rows if x["hit_id"] == moved][0]
    assert mv["corrected"] and mv["patch_id"] == int(moved, 16)
    assert [r["round"] for r in got["coco"][1]["rounds"]] == [1, 2, 3]
    assert got["coco"][1]["rounds"][0]["precision"] == pytest.approx(len(acc) / (len(acc) + len(rej)))
    assert {x["source"] for x in got["datumaro"][0]} == {"datumaro"}
    assert all(x["method"] == "text" for x in got["coco"][0])  # the exported query, from the manifest


def test_jobs_feedback_cli_and_campaign_query(ld, eng, fresh):
    t, res = _export(ld, eng, fresh / "exp", k=len(ld.rows), frames=ld.image_ids[:2])
    acc, rej = _split(t)
    g = {"format": "fleet-mining-feedback", "version": 1, "run_id": res["run_id"], "category": "narrows",
         "hits": [{"hit_id": h, "patch_id": int(h, 16), "image_id": r["image_id"], "image_uri": r["image_uri"],
                   "box": [r["x0"], r["y0"], r["x1"], r["y1"]], "verdict": "accepted" if h in acc else "rejected"}
                  for r in t.to_pylist() for h in [f"{r['patch_id']:016x}"]]}
    (fresh / "exp" / "feedback.json").write_text(json.dumps(g))
    cp = run_cli(["jobs.feedback", "--labels", str(fresh / "exp" / "feedback.json"), "--index", str(fresh / "index"),
                  "--campaign", "narrows"], timeout=300)
    assert f"round 1 from gallery labels: {len(acc)} accepted, {len(rej)} rejected" in cp.stdout
    data_root = ld.data  # the copied index's manifest still names the module's store
    from mining.labels import campaign_state

    st = campaign_state(data_root, "narrows")
    try:
        assert set(st.positives) == {int(h, 16) for h in acc}
        labeled = set(t.column("image_id").to_pylist())
        from mining.campaign import campaign_query
        from mining.query import QueryError

        for method in ("probe", "mean", "mean_neg", "single"):
            r = campaign_query(eng, "narrows", k=5, method=method, dedup=False)
            assert r.num_rows > 0 and not labeled & set(r.column("image_id").to_pylist()), method
            q = json.loads(r.schema.metadata[b"query"])
            assert q["method"] == method and q["positives"] == len(acc) and q["round"] == 2
        # mean (Eq. 4.1): exactly the brute-force ranking of the normalised mean of the positives
        pid = {x["patch_id"]: i for i, x in enumerate(ld.rows)}
        P = ld.emb[[pid[int(h, 16)] for h in acc]]
        qv = P.mean(0) / np.linalg.norm(P.mean(0))
        r = campaign_query(eng, "narrows", k=5, method="mean", dedup=False)
        allowed = [i for i, x in enumerate(ld.rows) if x["image_id"] not in labeled]
        best = sorted(allowed, key=lambda i: -(ld.emb[i] @ qv))[:5]
        assert r.column("patch_id").to_pylist() == [ld.rows[i]["patch_id"] for i in best]
        # the CLI: campaign query without a seed, exported for the next round
        cp = run_cli(["jobs.query", "--index", ld.index, "--campaign", "narrows", "--k", "4", "--out",
                      str(fresh / "q2"), "--format", "labelstudio"], timeout=300)
        m = [json.loads(x) for x in open(fresh / "q2" / "manifest.jsonl")]
        assert m and not labeled & {x["image_id"] for x in m} and json.loads(m[0]["query"])["method"] == "probe"
        # seed queries of the campaign exclude the labeled frames too
        np.save(fresh / "q.npy", ld.emb[1])
        cp = run_cli(["jobs.query", "--index", ld.index, "--embedding", str(fresh / "q.npy"), "--campaign",
                      "narrows", "--k", "3"], timeout=300)
        assert f"excluding {len(labeled)} labeled frames" in cp.stderr
        with pytest.raises(QueryError, match="no accepted hit"):
            campaign_query(eng, "other", k=5)
        cp = run_cli(["jobs.query", "--index", ld.index, "--campaign", "bad name!"], timeout=120, check=False)
        assert cp.returncode == 2 and "bad campaign name" in cp.stderr
    finally:
        shutil.rmtree(os.path.join(data_root, "labels"), ignore_errors=True)


def test_where_filter_on_sidecar_metadata(ld, eng):
    from mining.query import QueryError

    n = len(ld.rows)
    t = eng.embedding(ld.emb[0], k=n, dedup=False, filters={"where": "camera = 'front' and hour >= 20"})
    assert set(t.column("image_id").to_pylist()) == {ld.image_ids[0], ld.image_ids[2]}
    t = eng.embedding(ld.emb[0], k=n, dedup=False, filters={"where": "vehicle = 'v2' and width = 1360"})
    assert set(t.column("image_id").to_pylist()) == {ld.image_ids[2], ld.image_ids[3]}
    for bad, msg in [("camera = ", "bad --where"), ("nope = 1", "nope.*columns: image_id"),
                     ("1=1; DROP TABLE frames", "bad --where"), ("1=1) UNION SELECT image_uri FROM frames WHERE (1=1", "bad --where"),
                     ("image_id IN (SELECT column0 FROM read_csv('/etc/passwd'))", "bad --where")]:
        with pytest.raises(QueryError, match=msg):
            eng.embedding(ld.emb[0], k=3, filters={"where": bad})
    assert eng.embedding(ld.emb[0], k=3).num_rows == 3  # still serving


def test_bad_labels_files(ld, tmp_path):
    from mining.feedback import LabelsError, parse_labels

    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(LabelsError, match="cannot read labels file"):
        parse_labels(str(tmp_path / "x.json"))
    (tmp_path / "y.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(LabelsError, match="cannot tell the labels format"):
        parse_labels(str(tmp_path / "y.json"))
    (tmp_path / "z.json").write_text(json.dumps({"format": "fleet-mining-feedback", "hits": [{"verdict": "maybe"}]}))
    with pytest.raises(LabelsError, match="verdict 'maybe'"):
        parse_labels(str(tmp_path / "z.json"))
    cp = run_cli(["jobs.feedback", "--labels", str(tmp_path / "y.json"), "--data", str(tmp_path / "s"),
                  "--campaign", "c"], timeout=120, check=False)
    assert cp.returncode == 2 and cp.stderr.strip().startswith("error: cannot tell the labels format")


def test_probe_scorers():
    from mining.probe import FeedbackError, fit_probe, mean_neg_query, mean_query, search_directions

    rng = np.random.default_rng(0)
    u = np.zeros(16, np.float32)
    u[3] = 1
    X = rng.standard_normal((400, 16)).astype(np.float32)
    y = X @ u > 1.0
    probe = fit_probe(X[y][:20], X[~y][:60], background=X[200:], C=10)
    s = probe.score(X)
    assert np.mean(y[np.argsort(-s)[:20]]) >= 0.9 and abs(probe.direction @ u) > 0.8
    q = mean_query(X[:3])
    np.testing.assert_allclose(q, X[:3].mean(0) / np.linalg.norm(X[:3].mean(0)), rtol=1e-5)
    qn = mean_neg_query(X[:3], X[3:5], 0.5)
    v = X[:3].mean(0) - 0.5 * X[3:5].mean(0)
    np.testing.assert_allclose(qn, v / np.linalg.norm(v), rtol=1e-5)
    Q, sc = search_directions("probe", X[y][:5], X[~y][:5])
    assert Q.shape == (2, 16)
    with pytest.raises(FeedbackError, match="at least one rejected hit"):
        fit_probe(X[:3], np.zeros((0, 16)))
    with pytest.raises(FeedbackError, match="unknown feedback method"):
        search_directions("svm", X[:3])
    with pytest.raises(FeedbackError, match="no positive"):
        mean_query(np.zeros((0, 16)))


def test_feedback_benchmark_small():
    cp = subprocess.run([sys.executable, str(REPO / "benchmarks" / "feedback.py"), "--n", "3000", "--rare", "300",
                         "--campaigns", "1", "--rounds", "2", "--k", "20", "--candidates", "400", "--background",
                         "500"], capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert cp.returncode == 0, cp.stderr[-3000:]
    res = json.loads(cp.stdout.strip().splitlines()[-1])
    assert set(res["precision_at_50"]) == {"single", "mean", "mean_neg", "probe"}
    assert all(len(v) == 2 and all(0 <= x <= 1 for x in v) for v in res["precision_at_50"].values())
    assert 0 <= res["single_example_precision"] <= 1
    cp = subprocess.run([sys.executable, str(REPO / "benchmarks" / "feedback.py"), "--n", "10"], capture_output=True,
                        text=True, timeout=60, cwd=str(REPO))
    assert cp.returncode == 2 and "error: need --n >= 1000" in cp.stderr
