"""The project's task type (issue 13, step 1): ``task: detect | segment``, chosen once per
workspace; a change for an existing workspace is refused with `TaskTypeChangedError`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from loop.cli import app
from loop.config import load_config, write_default_config
from loop.errors import ConfigError, TaskTypeChangedError
from loop.project import Project
from loop.synth import write_dataset

CLASSES = ["scratch", "pit", "crack", "patch"]


def _yaml(path: Path, task: str | None) -> Path:
    doc: dict[str, object] = {"classes": CLASSES}
    if task is not None:
        doc["task"] = task
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    ("task", "expected"), [(None, "detect"), ("detect", "detect"), ("segment", "segment")]
)
def test_config_task_defaults_to_detect(tmp_path: Path, task: str | None, expected: str):
    assert load_config(_yaml(tmp_path / "c.yaml", task)).task == expected


@pytest.mark.parametrize("bad", ["pose", "Segment", "", "classify"])
def test_an_unknown_task_type_is_refused_when_the_config_loads(tmp_path: Path, bad: str):
    with pytest.raises(ConfigError, match="task"):
        load_config(_yaml(tmp_path / "c.yaml", bad))


@pytest.mark.parametrize(("first", "second"), [("detect", "segment"), ("segment", "detect")])
def test_changing_the_task_of_a_used_workspace_is_refused(tmp_path: Path, first: str, second: str):
    cfg_path = _yaml(tmp_path / "c.yaml", first)
    project = Project(load_config(cfg_path))
    project.save_state()  # what every writing step does first time it records anything
    assert json.loads((tmp_path / ".defect-loop" / "state.json").read_text())["task"] == first
    _yaml(cfg_path, second)
    with pytest.raises(TaskTypeChangedError, match=f"made for task '{first}'"):
        Project(load_config(cfg_path))
    _yaml(cfg_path, first)  # setting it back works
    assert Project(load_config(cfg_path)).state.task == first


def test_a_fresh_workspace_takes_whatever_task_the_config_says(tmp_path: Path):
    cfg_path = _yaml(tmp_path / "c.yaml", "detect")
    Project(load_config(cfg_path))  # nothing written yet: nothing recorded
    _yaml(cfg_path, "segment")
    assert Project(load_config(cfg_path)).state.task == "segment"


def test_a_workspace_from_before_task_types_is_a_detect_workspace(tmp_path: Path):
    """state.json without a ``task`` key was written when only boxes existed."""
    cfg_path = _yaml(tmp_path / "c.yaml", "segment")
    ws = tmp_path / ".defect-loop"
    ws.mkdir()
    (ws / "state.json").write_text(json.dumps({"current_version": None, "round": 2}))
    with pytest.raises(TaskTypeChangedError, match="made for task 'detect'"):
        Project(load_config(cfg_path))
    _yaml(cfg_path, None)
    assert Project(load_config(cfg_path)).state.round == 2


def test_the_task_is_recorded_by_ingest_and_the_cli_refuses_a_change(tmp_path: Path):
    runner = CliRunner()
    cfg = tmp_path / "defect-loop.yaml"
    r = runner.invoke(
        app, ["init", "--classes", ",".join(CLASSES), "--task", "segment", "-c", str(cfg)]
    )
    assert r.exit_code == 0, r.output
    assert yaml.safe_load(cfg.read_text())["task"] == "segment"
    write_dataset(tmp_path / "data", 4, seed=1, size=48)
    r = runner.invoke(app, ["ingest", str(tmp_path / "data" / "images"), "-c", str(cfg)])
    assert r.exit_code == 0, r.output
    doc = yaml.safe_load(cfg.read_text())
    doc["task"] = "detect"
    cfg.write_text(yaml.safe_dump(doc))
    r = runner.invoke(app, ["status", "-c", str(cfg)])
    assert r.exit_code != 0
    assert "made for task 'segment'" in r.output


def test_write_default_config_refuses_an_unknown_task(tmp_path: Path):
    with pytest.raises(ConfigError, match="task must be one of detect, segment"):
        write_default_config(tmp_path / "c.yaml", CLASSES, task="pose")  # type: ignore[arg-type]
    assert not (tmp_path / "c.yaml").exists()
