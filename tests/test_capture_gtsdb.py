"""Smoke test of the capture benchmark on the shared GTSDB images (skipped without ../shared)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "gtsdb"


@pytest.mark.skipif(not (DATA / "annotations.csv").exists(), reason="../shared/data/gtsdb absent")
def test_capture_benchmark_last_line_is_json():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "capture.py"), "--data", str(DATA), "--limit", "3",
         "--variant", "hierarchical-filtered", "--saliency", "spectral-residual"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout.strip().splitlines()
    res = json.loads(out[-1])
    for key in ("variant", "saliency", "images", "objects", "capture", "patches_per_image", "ms_per_image"):
        assert key in res
    assert res["images"] == 3 and res["variant"] == "hierarchical-filtered"
    assert 0.0 <= res["capture"] <= 1.0 and res["patches_per_image"] <= 35
    assert any(line.startswith("danger") for line in out)


def test_capture_benchmark_skips_without_data(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "capture.py"), "--data", str(tmp_path / "none")],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip().splitlines()
    assert out[0].startswith("SKIP") and json.loads(out[-1])["skipped"] is True
