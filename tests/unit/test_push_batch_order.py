"""The push records what it sent, in the order it sent it: monitor-queued images first."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from loop.config import load_config
from loop.datasets import assign_split
from loop.detections import Detections
from loop.labeling import PushSummary
from loop.project import Project, ScoredImage
from loop.report import write_next_batch
from loop.review_queue import QueueEntry, ReviewQueue


class _Backend:
    def __init__(self) -> None:
        self.items: list = []

    def ensure_project(self, *a, **k) -> int:
        return 1

    def ensure_local_storage(self, *a, **k) -> None:
        return None

    def push(self, pid, items, **kw) -> PushSummary:
        ids = {it.sha256: 10 + len(self.items) + i for i, it in enumerate(items)}
        self.items.extend(items)
        return PushSummary(created=len(items), task_ids=ids)


def test_queued_image_leads_the_batch_and_the_next_batch_file(tmp_path: Path) -> None:
    cfg_path = tmp_path / "defect-loop.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {"classes": ["scratch", "dent"], "workspace": "ws", "select": {"batch_size": 2}}
        )
    )
    project = Project(load_config(cfg_path))
    for i in range(30):
        Image.new("RGB", (32, 32), (i * 7, 60, 250 - i)).save(tmp_path / f"im{i}.png")
    report, _ = project.ingest(tmp_path)
    shas = [p.sha256 for p in report.added if assign_split(p.sha256, project.cfg.split) != "test"]
    a, b, c, queued = shas[:4]
    scratch = Detections(np.array([[2.0, 2, 12, 12]]), np.array([0]), (32, 32), confidence=[0.9])
    dent = Detections(np.array([[2.0, 2, 12, 12]]), np.array([1]), (32, 32), confidence=[0.9])
    ReviewQueue(project.cfg.paths.monitor).add(
        [QueueEntry(queued, 2.0, "novelty", 2.0, 0.5, 1, "1", "line/x.png", 32, 32, in_pool=True)]
    )
    ranked = [
        ScoredImage(a, 3.0, scratch),
        ScoredImage(b, 2.0, scratch),
        ScoredImage(c, 1.0, scratch),
        ScoredImage(queued, 0.1, dent),
    ]
    summary = project.push(_Backend(), ranked, "m1")
    # The ranking's top two would be a, b; the queued image leads and a follows.
    assert summary.batch == [queued, a]
    by_sha = {s.sha256: s for s in ranked}
    path = write_next_batch(project, [by_sha[s] for s in summary.batch], len(summary.batch))
    doc = json.loads(path.read_text())
    assert doc["size"] == 2 and doc["class_mix"] == {"scratch": 1, "dent": 1}
