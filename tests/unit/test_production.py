"""The ``production`` alias of deployment bundles against a real local MLflow store (SQLite +
file artifacts): registration, explicit moves with who and when, history, rollback."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from loop.config import ProjectConfig
from loop.errors import ModelError
from loop.tracking import CHAMPION, PRODUCTION, Tracker


@pytest.fixture(scope="module")
def db_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'm.db'}"


def make_tracker(tmp_path: Path, db_uri: str) -> Tracker:
    tag = uuid.uuid4().hex[:8]
    cfg = ProjectConfig(
        classes=["scratch", "pit"],
        workspace=tmp_path / "ws",
        mlflow={"tracking_uri": db_uri, "experiment": f"e-{tag}", "registered_model": f"m-{tag}"},
    )
    return Tracker(cfg)


def fake_bundle(root: Path, marker: str) -> Path:
    """A folder shaped like a bundle (the registry does not look inside)."""
    root.mkdir(parents=True)
    (root / "bundle.json").write_text(json.dumps({"marker": marker}))
    (root / "model.onnx").write_bytes(b"onnx " + marker.encode())
    return root


def register(tracker: Tracker, tmp_path: Path, marker: str) -> str:
    _, version = tracker.log_bundle(
        fake_bundle(tmp_path / f"b-{marker}", marker),
        detector_version="7",
        detector_run_id="r" * 32,
        dataset_digest="d" * 64,
        digest=marker * 8,
    )
    return version


def test_bundle_versions_live_in_their_own_model(tmp_path: Path, db_uri: str):
    tracker = make_tracker(tmp_path, db_uri)
    assert tracker.bundle_model == f"{tracker.cfg.mlflow.registered_model}-bundle"
    assert tracker.production_version() is None and tracker.production() is None
    v1 = register(tracker, tmp_path, "a")
    assert v1 == "1" and tracker.production_version() is None  # registering moves nothing
    mv = tracker.client.get_model_version(tracker.bundle_model, v1)
    assert mv.tags["detector_version"] == "7" and mv.tags["bundle_digest"] == "a" * 8
    run = tracker.client.get_run(mv.run_id)
    assert run.data.tags["defect_loop.kind"] == "deploy"
    # The champion alias of the detector model is untouched by anything here.
    names = [m.name for m in tracker.client.search_registered_models()]
    assert tracker.cfg.mlflow.registered_model not in names or CHAMPION not in (
        tracker.client.get_registered_model(tracker.cfg.mlflow.registered_model).aliases
    )


def test_moves_record_who_and_when_and_rollback_restores_the_previous(tmp_path: Path, db_uri: str):
    tracker = make_tracker(tmp_path, db_uri)
    v1, v2, v3 = (register(tracker, tmp_path, m) for m in "abc")
    first = tracker.move_production(v1, "ana@line3", "deploy", "first line model")
    assert (first.version, first.previous, first.moved_by) == ("1", None, "ana@line3")
    tracker.move_production(v2, "bo@line3", "deploy")
    tracker.move_production(v3, "bo@line3", "promote", "hotfix")
    assert tracker.production_version() == "3"
    alias = tracker.client.get_model_version_by_alias(tracker.bundle_model, PRODUCTION)
    assert str(alias.version) == "3" and alias.tags["production_moved_by"] == "bo@line3"

    back = tracker.rollback_production("cy@qa", "v3 misses pits")
    assert (back.version, back.previous, back.action) == ("2", "3", "rollback")
    assert tracker.production_version() == "2"
    # A second rollback goes one further back, not forth to v3.
    assert tracker.rollback_production("cy@qa").version == "1"
    with pytest.raises(ModelError, match="first production bundle"):
        tracker.rollback_production("cy@qa")

    hist = tracker.production_history()
    assert [(m.action, m.version, m.previous) for m in hist] == [
        ("deploy", "1", None),
        ("deploy", "2", "1"),
        ("promote", "3", "2"),
        ("rollback", "2", "3"),
        ("rollback", "1", "2"),
    ]
    assert [m.moved_by for m in hist] == ["ana@line3", "bo@line3", "bo@line3", "cy@qa", "cy@qa"]
    assert hist[0].reason == "first line model" and hist[3].reason == "v3 misses pits"
    assert hist == sorted(hist, key=lambda m: m.moved_at) and all(m.moved_at for m in hist)


def test_production_downloads_the_bundle_once(tmp_path: Path, db_uri: str):
    tracker = make_tracker(tmp_path, db_uri)
    v1 = register(tracker, tmp_path, "a")
    v2 = register(tracker, tmp_path, "b")
    tracker.move_production(v1, "ana", "deploy")
    tracker.move_production(v2, "ana", "deploy")
    prod = tracker.production()
    assert prod is not None and prod.version == v2 and prod.detector_version == "7"
    assert json.loads((prod.path / "bundle.json").read_text()) == {"marker": "b"}
    assert prod.path.is_relative_to(tracker.cfg.paths.bundles)
    tracker.rollback_production("ana")
    again = tracker.production()
    assert again is not None and again.version == v1
    assert json.loads((again.path / "bundle.json").read_text()) == {"marker": "a"}


def test_unknown_version_and_alias_moved_outside_are_refused(tmp_path: Path, db_uri: str):
    tracker = make_tracker(tmp_path, db_uri)
    with pytest.raises(ModelError, match="nothing is in production"):
        tracker.rollback_target()
    v1, v2 = register(tracker, tmp_path, "a"), register(tracker, tmp_path, "b")
    with pytest.raises(ModelError, match="has no version 9"):
        tracker.move_production("9", "ana")
    tracker.move_production(v1, "ana", "deploy")
    tracker.move_production(v2, "ana", "deploy")
    # Someone moves the alias in the MLflow UI: rollback will not guess.
    tracker.client.set_registered_model_alias(tracker.bundle_model, PRODUCTION, v1)
    with pytest.raises(ModelError, match="moved outside defect-loop"):
        tracker.rollback_production("ana")
