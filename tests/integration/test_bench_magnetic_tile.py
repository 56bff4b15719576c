"""The magnetic-tile label-efficiency benchmark in its smoke configuration, in a subprocess as a
user runs it: a segment oracle replay (mask import -> polygon oracle -> yolov8n-seg -> mask
metrics) printing ONE JSON line and writing the result file and its PNG.

The figures are not asserted (1 epoch at 64 px learns nothing); the protocol is: the keys, the
curves' points, the defect-free counts adding up, the polygons in the dataset versions and the
mask metrics. Skips when ``../shared/datasets/magnetic-tile`` (or
``$DEFECT_LOOP_MAGNETIC_TILE``) is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MAGNETIC_TILE = Path(
    os.environ.get("DEFECT_LOOP_MAGNETIC_TILE")
    or REPO.parent / "shared" / "datasets" / "magnetic-tile"
)
STRATEGIES = {"random", "class_diversity", "mask_stability"}


@pytest.mark.skipif(
    not MAGNETIC_TILE.is_dir(),
    reason=f"magnetic-tile not found at {MAGNETIC_TILE} (set DEFECT_LOOP_MAGNETIC_TILE)",
)
def test_magnetic_tile_smoke_writes_the_result_file(tmp_path: Path) -> None:
    work, results = tmp_path / "work", tmp_path / "results"
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "label_efficiency_magnetic_tile.py"),
            "--smoke",
            "--work",
            str(work),
            "--results",
            str(results),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one JSON line on stdout, got: {out.stdout[-2000:]}"
    line = json.loads(lines[0])
    assert line["complete"] is True and line["curves_done"] == line["curves_total"] == 3
    assert set(line["strategies"]) == STRATEGIES and line["metric"] == "test_mask_map50"
    assert line["goal"]["savings_at_least"] == 0.5 and line["goal"]["metric"] == "test_mask_map50"

    text = (results / "label_efficiency_magnetic_tile_smoke.json").read_text()
    assert '"/' not in text, "the result file names absolute paths of this machine"
    doc = json.loads(text)
    assert (results / "label_efficiency_magnetic_tile_smoke.png").stat().st_size > 0
    assert doc["task"] == "segment" and doc["seeds"] == [0]
    assert doc["classes"] == ["blowhole", "break", "crack", "fray", "uneven"]
    # The 120-image subset, defect-free images included (the set is 71 % defect-free).
    assert doc["n_images"] == 120 and 40 <= doc["n_defect_free"] < 120
    assert doc["settings"]["task"] == "segment" and doc["settings"]["mask_import"]
    seed_free = set()
    for name in STRATEGIES:
        s = doc["strategies"][name]
        for key in (
            "savings_mean",
            "savings_box_map50_mean",
            "defect_free_total_mean",
            "defect_free_selected_mean",
            "defect_free_by_round_mean",
            "final_test_mask_map50_mean",
            "curve",
        ):
            assert key in s, (name, key)
        # initial 16 + two rounds of 8: three points per curve.
        assert [p["labeled"] for p in s["curve"]] == [16, 24, 32], name
        assert all(0.0 <= p["mask_map50_mean"] <= 1.0 for p in s["curve"]), name
        free = s["defect_free_per_seed"]["0"]
        assert [r["added"] for r in free] == [16, 8, 8]
        assert all(0 <= r["defect_free_added"] <= r["added"] for r in free)
        assert sum(r["defect_free_added"] for r in free) == free[-1]["defect_free"]
        assert s["defect_free_total_mean"] == free[-1]["defect_free"]
        assert s["defect_free_selected_mean"] == free[-1]["defect_free"] - free[0]["defect_free"]
        assert [r["defect_free_added_mean"] for r in s["defect_free_by_round_mean"]] == [
            r["defect_free_added"] for r in free
        ]
        seed_free.add(free[0]["defect_free"])
        rounds = s["rounds_per_seed"]["0"]
        assert len(rounds) == 3
        for r in rounds:
            assert r["test_mask_map50"] is not None and 0.0 <= r["test_mask_map50"] <= 1.0
            assert r["test_map50"] is not None
            # The oracle answered with polygons: every labeled instance is stored outlined.
            assert r["polygon_instances"] == sum(r["labeled_boxes"].values())
            assert r["defect_free"] == [f["defect_free"] for f in free][r["round"]]
        assert sum(rounds[-1]["labeled_boxes"].values()) > 0
    # Every strategy of a seed starts from the same seed set.
    assert len(seed_free) == 1
    assert doc["strategies"]["random"]["savings_mean"] in (0.0, None)  # random against itself
