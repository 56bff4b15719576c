"""`loop.quality` and `loop.testsplit`: the record step's gate with fake models, the champion's
quality record, pre-annotations below the usefulness bar, the test split in `status`, and
growing the test split with `datasets add-test`. Real training is in
tests/integration/test_promotion_gate.py."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from loop.cli import app
from loop.config import ProjectConfig
from loop.datasets import DatasetVersion, LabeledImage, assign_split
from loop.detections import Detections
from loop.evaluation import ImageMatches
from loop.project import FitResult, Project, ScoredImage
from loop.quality import (
    QualityRecord,
    gate_and_record,
    preannotation_filter,
    read_quality,
    split_status,
    write_quality,
)
from loop.testsplit import add_test_images
from loop.tracking import Promotion

CLASSES = ["scratch", "pit"]
ALL = np.ones(10, dtype=bool)


def _cfg(tmp: Path, **kw: Any) -> ProjectConfig:
    return ProjectConfig(classes=CLASSES, workspace=tmp / "ws", **kw)


def _rec(**kw: Any) -> QualityRecord:
    base: dict[str, Any] = {
        "round": 2,
        "model_version": "3",
        "candidate_version": "3",
        "promoted": True,
        "n_test_images": 40,
        "test_split_digest": "d" * 64,
        "map50": [0.4, 0.3, 0.5],
        "per_class_ap50": {"scratch": [0.6, 0.4, 0.8], "pit": [0.04, 0.0, 0.1]},
        "test_boxes": {"scratch": 30, "pit": 12},
    }
    return QualityRecord(**{**base, **kw})


# ------------------------------------------------------------------ pre-annotations


@pytest.mark.parametrize(
    ("model_version", "bar", "hidden"),
    [
        ("defect-loop-detector-v3", 0.1, ["pit"]),  # the champion of the record
        ("3", 0.1, ["pit"]),
        ("defect-loop-detector-v4", 0.1, []),  # another model: its quality is unknown
        ("defect-loop-detector-v3", 0.0, []),  # bar 0 shows everything
        ("defect-loop-detector-v3", 0.7, ["scratch", "pit"]),
    ],
)
def test_preannotation_filter(tmp_path: Path, model_version, bar, hidden) -> None:
    cfg = _cfg(tmp_path, advice={"preannotation_min_ap50": bar})
    write_quality(cfg, _rec())
    names, keep = preannotation_filter(cfg, model_version)
    assert sorted(names) == sorted(hidden)
    det = Detections(
        np.array([[0, 0, 5, 5], [1, 1, 6, 6], [2, 2, 7, 7]], dtype=float),
        np.array([0, 1, 1]),
        (10, 10),
        confidence=np.array([0.9, 0.8, 0.7]),
    )
    shown = keep(det)
    assert [CLASSES[c] for c in shown.class_id.tolist()] == [
        c for c in ["scratch", "pit", "pit"] if c not in hidden
    ]


def test_no_record_hides_nothing_and_a_broken_record_is_an_error(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    assert preannotation_filter(cfg, "x-v1")[0] == []
    cfg.workspace.mkdir(parents=True)
    (cfg.workspace / "evaluation.json").write_text("{not json")
    with pytest.raises(Exception, match="not a defect-loop evaluation record"):
        read_quality(cfg)


@dataclass
class FakeGateway:
    items: list[Any] = field(default_factory=list)

    def ensure_project(self, *a: Any, **k: Any) -> int:
        return 1

    def ensure_local_storage(self, *a: Any, **k: Any) -> None:
        return None

    def push(self, pid: int, items: list[Any], **kw: Any) -> Any:
        self.items.extend(items)
        return SimpleNamespace(task_ids={})


def test_push_leaves_out_the_boxes_of_useless_classes(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    project = Project(cfg)
    src = tmp_path / "img.png"
    Image.new("RGB", (32, 32), (90, 90, 90)).save(src)
    report, _ = project.ingest(src)
    sha = report.added[0].sha256
    write_quality(cfg, _rec())
    det = Detections(
        np.array([[0, 0, 5, 5], [1, 1, 6, 6]], dtype=float),
        np.array([0, 1]),
        (32, 32),
        confidence=np.array([0.9, 0.8]),
    )
    gw = FakeGateway()
    project.push(gw, [ScoredImage(sha, 1.0, det)], "defect-loop-detector-v3")
    assert gw.items[0].detections.class_id.tolist() == [0]  # 'pit' (AP50 0.04) left out
    gw2 = FakeGateway()
    project.push(gw2, [ScoredImage(sha, 1.0, det)], "defect-loop-detector-v9")
    assert gw2.items[0].detections.class_id.tolist() == [0, 1]  # another model: unfiltered


# ------------------------------------------------------------------ status


def _labeled(sha: str, split: str, classes: list[int]) -> LabeledImage:
    boxes = Detections(
        np.array([[1, 1, 5, 5]] * len(classes), dtype=float).reshape(-1, 4),
        np.array(classes, dtype=np.int64),
        (16, 16),
    )
    return LabeledImage(sha, f"{sha}.png", 16, 16, split, boxes)  # type: ignore[arg-type]


def test_status_reports_the_test_split_and_its_warnings(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, evaluation={"min_test_boxes": 3, "max_halfwidth": 0.05})
    rows = [_labeled(f"{i:064x}", "test", [0, 0]) for i in range(3)]
    rows += [_labeled(f"{i + 10:064x}", "train", [1]) for i in range(3)]
    version = DatasetVersion.create(CLASSES, rows)
    out = split_status(cfg, version)
    assert out["images"] == 3 and out["boxes_per_class"] == {"scratch": 6, "pit": 0}
    assert out["map50_halfwidth"] is None and out["champion"] is None
    assert len(out["warnings"]) == 1 and "'pit' has 0 test boxes" in out["warnings"][0]
    write_quality(cfg, _rec(test_split_digest=version.split_digest("test")))
    out = split_status(cfg, version)
    assert out["map50_halfwidth"] == pytest.approx(0.1) and out["champion"] == "3"
    assert any("resolves only mAP50 differences larger than ±0.100" in w for w in out["warnings"])
    assert out["preannotations_hidden"] == ["pit"]
    write_quality(cfg, _rec(test_split_digest="e" * 64))
    out = split_status(cfg, version)
    assert out["map50_halfwidth"] is None
    assert any("test split changed" in w for w in out["warnings"])


# ------------------------------------------------------------------ the record step's gate


def _stats(found: float, seed: int, n: int = 60) -> ImageMatches:
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        hit = rng.random() < found
        tp = np.array([ALL] if hit else [], dtype=bool).reshape(-1, 10)
        conf = np.array([0.5 + 0.5 * rng.random()] if hit else [], dtype=np.float32)
        cls = np.array([i % 2] if hit else [], dtype=np.float32)
        images.append((f"{i:064x}", tp, conf, cls, np.array([i % 2], dtype=np.float32)))
    return ImageMatches.from_images(images, 2)


@dataclass
class FakeTracker:
    champ: Any = None
    metrics: dict[str, float] = field(default_factory=dict)
    applied: list[Any] = field(default_factory=list)

    def champion(self) -> Any:
        return self.champ

    def log_metrics(self, run_id: str, metrics: dict[str, float]) -> None:
        self.metrics.update(metrics)

    def apply_promotion(self, mv: str, run_id: str, decision: Promotion, compared: str, tags):
        self.applied.append((mv, decision, compared, dict(tags)))
        return decision

    def promote_if_better(self, mv: str, run_id: str) -> Promotion:
        return Promotion(self.champ is None, "point gate")


def _fit(project: Project, with_test: bool = True) -> FitResult:
    rows = [_labeled(f"{i:064x}", "test", [i % 2]) for i in range(60)]
    rows += [_labeled(f"{i + 100:064x}", s, [0]) for i, s in enumerate(["train", "val"])]
    version = DatasetVersion.create(CLASSES, rows)
    result = SimpleNamespace(weights=Path("cand.pt"))
    test = SimpleNamespace() if with_test else None
    return FitResult(version, result, test, None, 4)


@pytest.fixture
def fake_models(monkeypatch: pytest.MonkeyPatch):
    """The candidate finds 90% of the boxes, a good champion 88% (noise), a bad one 30%."""
    from loop import model

    by_weights = {"cand.pt": _stats(0.9, 1), "good.pt": _stats(0.88, 2), "bad.pt": _stats(0.3, 3)}
    calls: list[str] = []

    def evaluate_matches(weights, data_yaml, split, imgsz, ycd, classes, **kw):
        calls.append(Path(weights).name)
        return None, by_weights[Path(weights).name]

    monkeypatch.setattr(model, "evaluate_matches", evaluate_matches)
    monkeypatch.setattr(model, "model_class_names", lambda w, ycd, t=2: list(CLASSES))
    monkeypatch.setattr(Project, "export", lambda self, version: Path("data.yaml"))
    return calls


@pytest.mark.parametrize(
    ("champion", "promoted", "verdict"),
    [(None, True, None), ("good.pt", False, "noise"), ("bad.pt", True, "improvement")],
)
def test_gate_and_record(tmp_path: Path, fake_models, champion, promoted, verdict) -> None:
    project = Project(_cfg(tmp_path, evaluation={"resamples": 300}))
    champ = None if champion is None else SimpleNamespace(version="2", weights=Path(champion))
    tracker = FakeTracker(champ)
    decision = gate_and_record(project, tracker, _fit(project), "run", "3")  # type: ignore[arg-type]
    assert decision.promoted is promoted, decision.reason
    assert fake_models == ["cand.pt"] + ([champion] if champion else [])
    _, applied, compared, tags = tracker.applied[0]
    assert applied is decision and compared == ("" if champion is None else "2")
    assert tags.get("gate_verdict") == verdict
    if champion is None:
        assert decision.reason.startswith("first model: no champion yet (test mAP50 0.")
        assert "95% bootstrap over 60 test images" in decision.reason
    assert tags["bootstrap"] == "300 resamples, 95%, seed 0, 60 test images"
    m = tracker.metrics
    assert m["test_map50_lo"] <= m["test_map50_hi"] and "test_map50" not in m
    assert ("gate_diff_map50_95_lo" in m) is (champion is not None)
    rec = read_quality(project.cfg)
    assert rec is not None and rec.round == 4 and rec.n_test_images == 60
    assert rec.model_version == ("3" if promoted else "2") and rec.promoted is promoted
    if champion is not None:
        assert rec.gate is not None and rec.gate["verdict"] == verdict
        # The record describes the model that holds the alias: the kept champion's figures.
        kept = m["compared_test_map50"] if not promoted else None
        if kept is not None:
            assert rec.map50 is not None and rec.map50[0] == pytest.approx(kept)


def test_gate_and_record_promotes_over_a_champion_with_other_classes(
    tmp_path: Path, fake_models, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loop import model

    monkeypatch.setattr(model, "model_class_names", lambda w, ycd, t=2: ["scratch"])
    project = Project(_cfg(tmp_path, evaluation={"resamples": 100}))
    tracker = FakeTracker(SimpleNamespace(version="2", weights=Path("good.pt")))
    decision = gate_and_record(project, tracker, _fit(project), "run", "3")  # type: ignore[arg-type]
    assert decision.promoted and "cannot be evaluated on this test split" in decision.reason
    assert fake_models == ["cand.pt"]


def test_gate_and_record_without_test_images_uses_the_point_gate(
    tmp_path: Path, fake_models
) -> None:
    project = Project(_cfg(tmp_path))
    tracker = FakeTracker(None)
    decision = gate_and_record(project, tracker, _fit(project, False), "run", "3")  # type: ignore[arg-type]
    assert decision.reason == "point gate" and fake_models == []
    rec = read_quality(project.cfg)
    assert rec is not None and rec.map50 is None and rec.hidden_classes == []


# ------------------------------------------------------------------ datasets add-test


def _png(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (shade, shade, shade)).save(path)


def test_add_test_images(tmp_path: Path) -> None:
    project = Project(_cfg(tmp_path))
    seed_dir, seed_lbl = tmp_path / "seed", tmp_path / "seed-labels"
    seed_lbl.mkdir()
    for i in range(12):
        _png(seed_dir / f"s{i}.png", 10 + i)
        (seed_lbl / f"s{i}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    _, v0 = project.ingest(seed_dir, seed_lbl)
    assert v0 is not None
    train_row = next(r for r in v0.rows if r.split != "test")
    train_src = next(
        p for p in seed_dir.iterdir() if project.pool.get(train_row.sha256).source == str(p)
    )
    new_dir, new_lbl = tmp_path / "new", tmp_path / "new-labels"
    new_lbl.mkdir()
    for i in range(6):
        _png(new_dir / f"n{i}.png", 100 + i)
        (new_lbl / f"n{i}.txt").write_text("1 0.5 0.5 0.2 0.2\n" if i else "")  # n0: defect-free
    _png(new_dir / "nolabel.png", 200)
    _png(new_dir / "queued.png", 201)
    (new_lbl / "queued.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    _png(new_dir / "train_copy.png", 0)
    (new_dir / "train_copy.png").write_bytes(train_src.read_bytes())  # same bytes, same sha
    (new_lbl / "train_copy.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (new_lbl / "bad.txt").write_text("7 0.5 0.5 0.2 0.2\n")
    _png(new_dir / "bad.png", 202)
    from loop.images import sha256_file

    project.state.pending[sha256_file(new_dir / "queued.png")] = 55
    rep = add_test_images(project, new_dir, new_lbl)
    reasons = {Path(s).name: r for s, r in rep.skipped}
    assert rep.added == 6 and rep.updated == 0 and rep.version is not None
    assert set(reasons) == {"nolabel.png", "queued.png", "train_copy.png", "bad.png"}
    assert "already labeled in the" in reasons["train_copy.png"]
    assert "Label Studio" in reasons["queued.png"] and "no label file" in reasons["nolabel.png"]
    v1 = project.current_version()
    assert v1 is not None and v1.digest == rep.version.digest and v1.parent == v0.digest
    new_rows = [r for r in v1.rows if r.provenance.get("source") == "import-test"]
    assert len(new_rows) == 6 and all(r.split == "test" for r in new_rows)
    assert sum(len(r.boxes) == 0 for r in new_rows) == 1
    # The hash would have put most of them elsewhere; the loop still never selects them.
    assert any(assign_split(r.sha256, project.cfg.split) != "test" for r in new_rows)
    assert not {r.sha256 for r in new_rows} & set(project.candidates())
    assert v1.split_counts()["test"] == v0.split_counts()["test"] + 6
    # Importing the same again changes nothing; a limit draws a seeded subset.
    again = add_test_images(project, new_dir, new_lbl)
    assert again.version is None and again.added == 0


def test_add_test_cli(tmp_path: Path) -> None:
    cfg_path = tmp_path / "defect-loop.yaml"
    runner = CliRunner()
    assert (
        runner.invoke(app, ["init", "--classes", "scratch,pit", "-c", str(cfg_path)]).exit_code == 0
    )
    imgs, lbls = tmp_path / "imgs", tmp_path / "lbls"
    lbls.mkdir()
    for i in range(5):
        _png(imgs / f"t{i}.png", 50 + i)
        (lbls / f"t{i}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    r = runner.invoke(
        app,
        [
            "datasets",
            "add-test",
            str(imgs),
            "--labels",
            str(lbls),
            "--limit",
            "3",
            "-c",
            str(cfg_path),
        ],
    )
    assert r.exit_code == 0, r.output
    assert "3 test images added" in r.output and "test split now 3 images" in r.output
    status = json.loads(runner.invoke(app, ["status", "-c", str(cfg_path)]).output)
    assert status["test_split"]["images"] == 3
    assert status["test_split"]["boxes_per_class"] == {"scratch": 3, "pit": 0}
    r = runner.invoke(app, ["datasets", "add-test", str(imgs), "-c", str(cfg_path)])
    assert r.exit_code != 0  # --labels is required


def test_next_batch_counts_only_the_boxes_labelers_see(tmp_path: Path) -> None:
    from loop.report import write_next_batch

    project = Project(_cfg(tmp_path, select={"batch_size": 2}))
    det = Detections(
        np.array([[0, 0, 5, 5], [1, 1, 6, 6]], dtype=float), np.array([0, 1]), (32, 32)
    )
    only_pit = Detections(np.array([[0, 0, 5, 5]], dtype=float), np.array([1]), (32, 32))
    ranked = [ScoredImage("a" * 64, 0.9, det), ScoredImage("b" * 64, 0.8, only_pit)]
    doc = json.loads(write_next_batch(project, ranked).read_text())
    assert doc["class_mix"] == {"scratch": 1, "pit": 2} and doc["hidden_classes"] == []
    write_quality(project.cfg, _rec())  # champion v3: 'pit' below the bar
    doc = json.loads(write_next_batch(project, ranked).read_text())
    assert doc["class_mix"] == {"scratch": 1} and doc["hidden_classes"] == ["pit"]
    assert doc["images_without_boxes"] == 1
