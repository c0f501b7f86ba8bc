"""benchmarks/capture.py --misses: contact sheets + misses.csv of the objects selection did not capture."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mining.metrics import best_coverage, captured

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "gtsdb"


def test_best_coverage_agrees_with_captured():
    rng = np.random.default_rng(0)
    for _ in range(200):
        o = rng.integers(0, 200, (5, 2))
        o = np.c_[o, o + rng.integers(1, 60, (5, 2))]
        p = rng.integers(0, 200, (7, 2))
        p = np.c_[p, p + rng.integers(1, 300, (7, 2))]
        cover, fill = best_coverage(o, p)
        assert cover.shape == fill.shape == (5,) and (0 <= cover).all() and (cover <= 1).all()
        np.testing.assert_array_equal((cover >= 0.5) & (fill >= 0.05), captured(o, p))
    # a patch covering the whole object but 100x its area: cover 1, fill 0.01 (too large)
    cover, fill = best_coverage([[0, 0, 10, 10]], [[0, 0, 100, 100], [5, 5, 15, 15]])
    assert cover[0] == 1.0 and fill[0] == pytest.approx(0.01)
    cover, fill = best_coverage([[0, 0, 10, 10]], np.zeros((0, 4)))
    assert cover[0] == 0.0 and fill[0] == 0.0


def test_capture_misses_contact_sheet(tmp_path):
    if not (DATA / "annotations.csv").exists():
        pytest.skip(f"GTSDB sample data not found at {DATA} (expected ../shared/data/gtsdb beside the repo)")
    import cv2

    out_dir = tmp_path / "misses"
    # images 3..5 with a thesis preset (kept unchanged) and OpenCV spectral residual: 4 of 6 signs missed
    lines = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "capture.py"), "--data", str(DATA), "--start", "3", "--limit", "3",
         "--variant", "hierarchical-filtered", "--saliency", "spectral-residual", "--misses", str(out_dir)],
        capture_output=True, text=True, timeout=300, check=True, cwd=ROOT,
    ).stdout.strip().splitlines()
    res = json.loads(lines[-1])
    assert res["misses_dir"] == str(out_dir) and res["images"] == 3
    n_missed = res["objects"] - round(res["capture"] * res["objects"])
    with open(out_dir / "misses.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n_missed >= 1
    sheets = sorted(out_dir.glob("misses_*.jpg"))
    assert len(sheets) == (n_missed + 47) // 48
    for s in sheets:
        im = cv2.imread(str(s))
        assert im is not None and im.ndim == 3 and im.shape[0] >= 256 and im.shape[1] >= 256
    for r in rows:
        assert not (float(r["best_cover"]) >= 0.5 and float(r["best_fill"]) >= 0.05)
        assert r["sheet"] in {s.name for s in sheets}
