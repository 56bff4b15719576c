"""`defect-loop simulate`'s options become the `ReplaySettings` the replay runs (the replay
itself is replaced by a recorder here; tests/integration/test_simulate.py runs it for real)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import loop.replay
from loop.cli import app
from loop.replay import ReplaySettings

runner = CliRunner()


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[ReplaySettings]:
    seen: list[ReplaySettings] = []

    def fake_run_replay(settings: ReplaySettings, *args: Any, **kwargs: Any) -> dict[str, Any]:
        settings.check()  # what the real replay does first
        seen.append(settings)
        return {}

    monkeypatch.setattr(loop.replay, "run_replay", fake_run_replay)
    return seen


def _simulate(tmp_path: Path, *extra: str) -> Any:
    return runner.invoke(
        app, ["simulate", str(tmp_path), "--out", str(tmp_path / "out"), "--no-mlflow", *extra]
    )


def test_segment_replay_of_a_mask_folder(tmp_path: Path, recorded: list[ReplaySettings]) -> None:
    res = _simulate(
        tmp_path,
        "--task",
        "segment",
        "--folder-class",
        "MT_Crack=crack",
        "--folder-class",
        "MT_Blowhole=blowhole",
        "--mask-threshold",
        "100",
        "--min-area",
        "9",
        "--strategies",
        "random,mask_stability",
    )
    assert res.exit_code == 0, res.output
    (s,) = recorded
    assert s.task == "segment" and s.metric == "test_mask_map50"
    # Classes in the order given, not sorted.
    assert s.mask_classes == (("MT_Crack", "crack"), ("MT_Blowhole", "blowhole"))
    assert (s.mask_threshold, s.mask_min_area) == (100, 9)
    assert s.strategies == ("random", "mask_stability")


def test_boxes_stay_the_default(tmp_path: Path, recorded: list[ReplaySettings]) -> None:
    res = _simulate(tmp_path)
    assert res.exit_code == 0, res.output
    (s,) = recorded
    assert s.task == "detect" and s.mask_classes == () and s.metric == "test_map50"


def test_the_task_comes_from_the_config_unless_given(
    tmp_path: Path, recorded: list[ReplaySettings]
) -> None:
    cfg = tmp_path / "project.yaml"
    cfg.write_text("classes: [crack, blowhole]\ntask: segment\n")
    res = _simulate(tmp_path, "-c", str(cfg), "--folder-class", "MT_Crack=crack")
    assert res.exit_code == 0, res.output
    assert recorded[-1].task == "segment"
    res = _simulate(tmp_path, "-c", str(cfg), "--task", "detect")
    assert res.exit_code == 0, res.output
    assert recorded[-1].task == "detect"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--task", "segment"], "--folder-class FOLDER=CLASS"),
        (["--task", "pose"], "--task must be one of"),
        (["--folder-class", "MT_Crack=crack"], "add --task segment"),
        (["--task", "segment", "--folder-class", "MT_Crack"], "write FOLDER=CLASS"),
        (["--task", "segment", "--folder-class", "MT_Crack="], "write FOLDER=CLASS"),
        (
            ["--task", "segment", "--folder-class", "A=x", "--folder-class", "A=y"],
            "names folder 'A' twice",
        ),
        # Mask strategies need a segment replay (ReplaySettings.check).
        (["--strategies", "random,mask_stability"], "segment"),
    ],
)
def test_bad_options_are_refused_with_what_to_do(
    tmp_path: Path, recorded: list[ReplaySettings], extra: list[str], message: str
) -> None:
    res = _simulate(tmp_path, *extra)
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())
    assert recorded == []
