"""`defect-loop simulate --task segment` on a small mask-PNG folder the test writes: the mask
import, the polygon oracle, real yolov8n-seg training (64 px, 1 epoch, random weights) and the
mask metrics, from the command line as a user runs it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from loop.cli import app

pytestmark = pytest.mark.integration

INITIAL, STEP = 10, 4


def _write_tiles(root: Path, per_folder: int = 8) -> None:
    """MT_Crack: one thin line per image; MT_Pit: one or two filled discs; MT_Free: none. Each
    image is ``<stem>.jpg`` with its mask ``<stem>.png`` beside it (magnetic-tile's layout)."""
    rng = np.random.default_rng(3)
    for folder in ("MT_Crack", "MT_Pit", "MT_Free"):
        d = root / folder / "Imgs"
        d.mkdir(parents=True)
        for k in range(per_folder):
            img = rng.integers(90, 140, (64, 64), dtype=np.uint8)
            mask = np.zeros((64, 64), dtype=np.uint8)
            if folder == "MT_Crack":
                x0, y0 = (int(v) for v in rng.integers(4, 24, 2))
                cv2.line(mask, (x0, y0), (x0 + 30, y0 + 28), 255, 2)
            elif folder == "MT_Pit":
                for _ in range(1 + k % 2):
                    cx, cy = (int(v) for v in rng.integers(10, 54, 2))
                    cv2.circle(mask, (cx, cy), 5, 255, -1)
            img[mask > 0] = 20
            cv2.imwrite(str(d / f"{folder[3:].lower()}{k}.jpg"), img)
            cv2.imwrite(str(d / f"{folder[3:].lower()}{k}.png"), mask)


def test_simulate_segment_replays_a_mask_folder(tmp_path: Path) -> None:
    tiles, out = tmp_path / "tiles", tmp_path / "out"
    _write_tiles(tiles)
    res = CliRunner().invoke(
        app,
        [
            "simulate",
            str(tiles),
            "--task",
            "segment",
            "--folder-class",
            "MT_Pit=pit",
            "--folder-class",
            "MT_Crack=crack",
            "--strategies",
            "random,mask_stability",
            "--initial",
            str(INITIAL),
            "--step",
            str(STEP),
            "--rounds",
            "1",
            "--seeds",
            "0",
            "--imgsz",
            "64",
            "--epochs",
            "1",
            "--min-iterations",
            "0",
            "--batch",
            "8",
            "--no-mlflow",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "replay.json").read_text())
    assert doc["task"] == "segment" and doc["classes"] == ["pit", "crack"]
    assert doc["n_images"] == 24 and doc["n_defect_free"] == 8
    assert [c["strategy"] for c in doc["curves"]] == ["random", "mask_stability"]
    for curve in doc["curves"]:
        rounds = curve["rounds"]
        assert [r["labeled"] for r in rounds] == [INITIAL, INITIAL + STEP]
        for r in rounds:
            assert r["test_mask_map50"] is not None and math.isfinite(r["test_mask_map50"])
            # The oracle answered with the imported polygons: every labeled instance outlined.
            assert r["polygon_instances"] == sum(r["labeled_boxes"].values()) > 0
    assert (out / "replay.png").stat().st_size > 0
