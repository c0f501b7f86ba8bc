"""The review page in a real headless Chromium (Debian's ``chromium``, driven by Playwright's Python
package through that binary): crops with labels, click-through to the frame with its box, accept /
reject, and the downloaded feedback JSON read back by ``mining.feedback``.

Skips with a clear message where Chromium or Playwright is absent. ``MINING_SCREENSHOT_DIR=docs``
saves the screenshot committed as ``docs/gallery_review.png``.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest

import labeling_data as LD

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def page_export(tmp_path_factory):
    if not CHROMIUM:
        pytest.skip("Chromium not found (apt-get install -y chromium; .ci/run installs it where apt works)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright (Python package) not installed: pip install -e '.[dev]'")
    from mining.export import export_hits
    from mining.query import query_info

    ld = LD.build(str(tmp_path_factory.mktemp("gdata")))
    eng = LD.engine(ld)
    t = eng.embedding(ld.emb[1] + ld.emb[8], k=12)
    out = str(tmp_path_factory.mktemp("gexp"))
    info = query_info(t)
    res = export_hits(t, out, query={"type": "text", "text": "a road narrows sign"}, index_version=info["index_version"],
                      model=info["model"], random_init=True, data_root=ld.data, campaign="narrows")
    return t, res, out


def test_review_page_accept_reject_download(page_export, tmp_path):
    from playwright.sync_api import sync_playwright

    from mining.feedback import parse_labels

    t, res, out = page_export
    hits = t.to_pylist()
    h = [f"{r['patch_id']:016x}" for r in hits]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto("file://" + os.path.abspath(res["gallery"]))
            assert page.locator(".tile").count() == len(hits) == 12
            # every crop image loaded (no broken images), labels readable: white on a dark background
            assert page.evaluate("Array.from(document.querySelectorAll('.crop img')).every(i => i.complete && i.naturalWidth > 0)")
            lbl = page.locator(f"#t-{h[0]} .lbl")
            assert lbl.inner_text().startswith("#1 ")
            assert page.evaluate("getComputedStyle(document.querySelector('.lbl')).backgroundColor") == "rgba(0, 0, 0, 0.75)"
            # click-through: the frame with the hit's box at its place
            page.click(f"#t-{h[1]} .crop")
            assert page.locator("#view").is_visible()
            img = page.locator("#view img")
            page.wait_for_function("document.querySelector('#view img').naturalWidth > 0")
            bb, ib = page.locator("#view .box").bounding_box(), img.bounding_box()
            s = ib["width"] / 1360  # displayed px per frame px
            assert abs(bb["x"] - ib["x"] - hits[1]["x0"] * s) < 3 and abs(bb["width"] - (hits[1]["x1"] - hits[1]["x0"]) * s) < 4
            assert hits[1]["image_uri"] in page.locator("#view .cap").inner_text()
            page.keyboard.press("Escape")
            assert not page.locator("#view").is_visible()
            # accept two hits, reject one (toggled twice = cleared, then set)
            page.click(f"#t-{h[0]} .acc")
            page.click(f"#t-{h[3]} .acc")
            page.click(f"#t-{h[2]} .rej")
            page.click(f"#t-{h[5]} .acc")
            page.click(f"#t-{h[5]} .acc")  # second click clears the verdict
            assert "accepted" in page.locator(f"#t-{h[0]}").get_attribute("class")
            assert page.locator("#count").inner_text() == "3 of 12 reviewed"
            if os.environ.get("MINING_SCREENSHOT_DIR"):
                page.screenshot(path=os.path.join(os.environ["MINING_SCREENSHOT_DIR"], "gallery_review.png"))
            with page.expect_download() as dl:
                page.click("#dl")
            path = str(tmp_path / dl.value.suggested_filename)
            dl.value.save_as(path)
            assert not errors, errors
        finally:
            browser.close()
    doc = json.load(open(path))
    assert os.path.basename(path) == f"feedback-{res['run_id']}.json" and doc["campaign"] == "narrows"
    assert {x["hit_id"]: x["verdict"] for x in doc["hits"]} == {h[0]: "accepted", h[3]: "accepted", h[2]: "rejected"}
    x0 = [x for x in doc["hits"] if x["hit_id"] == h[0]][0]
    assert x0["box"] == [hits[0]["x0"], hits[0]["y0"], hits[0]["x1"], hits[0]["y1"]] and x0["patch_id"] == str(hits[0]["patch_id"])
    fmt, rows = parse_labels(path)
    assert fmt == "gallery" and {(r["hit_id"], r["patch_id"], r["label"]) for r in rows} == {
        (h[0], hits[0]["patch_id"], "positive"), (h[3], hits[3]["patch_id"], "positive"),
        (h[2], hits[2]["patch_id"], "negative")}
