"""`loop.review_tasks`: the record of review pushes, the pull rule for untouched seed
annotations, and the refusal of stale suspects (the Label Studio side is tested against the
real server in tests/integration/test_review_tasks_ls.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from loop.config import load_config
from loop.datasets import DatasetVersion, LabeledImage
from loop.detections import Detections
from loop.errors import DatasetError
from loop.labeling import PulledLabel
from loop.project import Project
from loop.review_tasks import ReviewRecord, SeedAnnotations, Suspects, push_review_tasks

SHA = "a" * 64
WH = (64, 48)
LABEL = Detections(np.array([[2.0, 3, 20, 30]]), [1], WH)
ROWS = {SHA: LabeledImage(SHA, "a.png", 64, 48, "train", LABEL, {"source": "import"})}


def _pulled(annotation_id: int, det: Detections, sha: str = SHA) -> PulledLabel:
    return PulledLabel(
        task_id=7,
        sha256=sha,
        detections=det,
        annotation_id=annotation_id,
        annotator="admin@x",
        lead_time=None,
        updated_at=None,
    )


MOVED = Detections(np.array([[2.0, 3, 24, 30]]), [1], WH)
# Percent round trips leave ~1e-13 px: still the same label.
ROUNDED = Detections(LABEL.xyxy + 1e-9, [1], WH)


@pytest.mark.parametrize(
    ("lab", "rows", "unchanged"),
    [
        (_pulled(5, LABEL), ROWS, True),
        (_pulled(5, ROUNDED), ROWS, True),
        (_pulled(5, MOVED), ROWS, False),  # the reviewer corrected it: taken
        (_pulled(5, Detections.empty(WH)), ROWS, False),  # corrected to defect-free
        (_pulled(6, LABEL), ROWS, False),  # a reviewer's own annotation: taken
        (_pulled(5, LABEL, sha="b" * 64), ROWS, False),  # not the image it was made for
        (_pulled(5, LABEL), {}, False),  # the image lost its label meanwhile
    ],
    ids=[
        "untouched",
        "rounding",
        "moved",
        "emptied",
        "other-annotation",
        "other-image",
        "no-row",
    ],
)
def test_only_an_untouched_seed_annotation_is_ignored(
    lab: PulledLabel, rows: dict[str, LabeledImage], unchanged: bool
) -> None:
    seeds = SeedAnnotations({5: SHA}, ("scratch", "pit"))
    assert seeds.unchanged(lab, rows) is unchanged


def test_record_keeps_every_run_and_its_seeds_per_project(tmp_path: Path) -> None:
    path = tmp_path / "label-review.json"
    record = ReviewRecord(path)
    assert record.latest() is None and record.seed_annotations(1) == {}
    record.add({"version": "v1", "project_id": 1, "tasks": [
        {"sha256": SHA, "task_id": 3, "seed_annotation": 11},
        {"sha256": "b" * 64, "task_id": 4, "seed_annotation": None},
    ]})  # fmt: skip
    record.add({"version": "v2", "project_id": 2, "tasks": [
        {"sha256": "c" * 64, "task_id": 9, "seed_annotation": 12},
    ]})  # fmt: skip
    again = ReviewRecord(path)
    assert [r["version"] for r in again.runs] == ["v1", "v2"]
    assert again.latest()["version"] == "v2"
    assert again.seed_annotations(1) == {11: SHA}
    assert again.seed_annotations(2) == {12: "c" * 64}


def test_an_unreadable_record_is_an_error_that_says_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "label-review.json"
    path.write_text("{not json")
    with pytest.raises(DatasetError, match="restore or delete it"):
        ReviewRecord(path)


def test_suspects_of_another_version_are_not_pushed(tmp_path: Path) -> None:
    cfg = tmp_path / "defect-loop.yaml"
    cfg.write_text(yaml.safe_dump({"classes": ["scratch", "pit"]}))
    project = Project(load_config(cfg))
    stale = DatasetVersion.create(("scratch", "pit"), ROWS.values())

    class NoGateway:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"Label Studio must not be called ({name})")

    with pytest.raises(DatasetError, match="run review-labels again"):
        push_review_tasks(project, NoGateway(), Suspects(stale, [], {}, 2, 0), 5)  # type: ignore[arg-type]
