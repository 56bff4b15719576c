"""`bench/monitoring.py --smoke` runs as a user runs it: ONE JSON line, the result file with
repository-relative paths, and a second run that reuses the model and the features."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NEU_DET = Path(
    os.environ.get("DEFECT_LOOP_NEU_DET") or REPO.parent / "shared" / "datasets" / "neu-det"
)
WEIGHTS = REPO.parent / "shared" / "models" / "yolov8n.pt"


def run_bench(*args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "monitoring.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one JSON line on stdout, got: {out.stdout[-2000:]}"
    return json.loads(lines[0])


@pytest.mark.skipif(
    not NEU_DET.is_dir() or not WEIGHTS.is_file(),
    reason=f"NEU-DET ({NEU_DET}) or the pretrained yolov8n.pt ({WEIGHTS}) not found",
)
def test_monitoring_smoke(tmp_path: Path) -> None:
    work, results = tmp_path / "work", tmp_path / "results"
    args = ("--smoke", "--work", str(work), "--results", str(results))
    line = run_bench(*args)
    assert line["bench"] == "monitoring" and line["smoke"] is True
    assert line["novel_class"] == "scratches"
    doc = json.loads((results / "monitoring_smoke.json").read_text())
    text = (results / "monitoring_smoke.json").read_text()
    assert str(REPO) not in text and str(tmp_path) not in text  # relative paths only
    assert doc["dataset"] == os.path.relpath(NEU_DET.resolve(), REPO)
    # the protocol: every scenario, sequence and window accounted for
    n_nd = doc["no_drift_windows"]
    assert n_nd == 6 and doc["false_alarms"] == round(doc["false_alarm_rate"] * n_nd)
    assert set(doc["drift"]) == {
        "blur-2.4",
        "brightness-24",
        "contrast-0.6",
        "noise-8",
        "novel_class-0.2",
    }
    for name, d in doc["drift"].items():
        assert len(d["delays"]) == 2, name  # sequences
        assert all(x is None or 0 <= x < 2 for x in d["delays"]), name
        assert d["detection_rate"] == sum(x is not None for x in d["delays"]) / 2
    # A strong blur is caught by the image statistics whatever the (1-epoch) model does.
    assert doc["drift"]["blur-2.4"]["detection_rate"] == 1.0
    assert doc["drift"]["blur-2.4"]["median_delay_windows"] == 0.0
    q = doc["queue"]["0.2"]
    assert 0.0 <= q["novel_share_of_top"] <= 1.0 and q["top_size_mean"] <= 10
    assert (
        doc["images"]["novel"] > 0 and doc["model"]["classes"] and len(doc["model"]["classes"]) == 5
    )
    assert "scratches" not in doc["model"]["classes"]
    stamps = {
        p: p.stat().st_mtime_ns for p in [work / "model.pt", *sorted((work / "features").iterdir())]
    }
    # A second run resumes: no training, no scoring.
    again = run_bench(*args)
    assert again["false_alarm_rate"] == line["false_alarm_rate"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
