"""`defect-loop deploy` and `defect-loop monitor` on the command line (help, errors, status);
the full paths run in tests/integration/test_deploy_monitor.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loop.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    "args",
    [
        ["deploy"],
        ["deploy", "promote"],
        ["deploy", "rollback"],
        ["deploy", "history"],
        ["deploy", "verify"],
        ["deploy", "score"],
        ["monitor"],
        ["monitor", "status"],
        ["monitor", "alerts"],
        ["monitor", "queue"],
    ],
)
def test_every_new_command_has_help(args):
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


@pytest.fixture
def cfg_path(tmp_path: Path) -> Path:
    path = tmp_path / "defect-loop.yaml"
    r = runner.invoke(app, ["init", "--classes", "scratch,pit", "-c", str(path)])
    assert r.exit_code == 0, r.output
    return path


def test_deploy_without_a_champion_says_what_to_do(cfg_path: Path):
    r = runner.invoke(app, ["deploy", "-c", str(cfg_path)])
    assert r.exit_code == 2 and "no champion model yet" in r.output
    r = runner.invoke(app, ["deploy", "rollback", "-c", str(cfg_path)])
    assert r.exit_code == 2 and "nothing is in production yet" in r.output
    r = runner.invoke(app, ["deploy", "history", "-c", str(cfg_path)])
    assert r.exit_code == 0 and "nothing deployed yet" in r.output


def test_verify_refuses_a_folder_that_is_not_a_bundle(tmp_path: Path):
    r = runner.invoke(app, ["deploy", "verify", str(tmp_path)])
    assert r.exit_code == 2 and "is not a deployment bundle" in r.output


def test_monitor_status_of_a_fresh_workspace(cfg_path: Path):
    r = runner.invoke(app, ["monitor", "status", "-c", str(cfg_path)])
    assert r.exit_code == 0, r.output
    status = json.loads(r.output)
    assert status["windows"] == 0 and status["alerts"] == 0
    r = runner.invoke(app, ["monitor", "alerts", "-c", str(cfg_path)])
    assert r.exit_code == 0 and "no alerts" in r.output
    r = runner.invoke(app, ["monitor", "queue", "-c", str(cfg_path)])
    assert r.exit_code == 0
    assert not (cfg_path.parent / ".defect-loop" / "monitor" / "monitor.sqlite").exists()


def test_monitor_deployment_polls_the_watch_folder(tmp_path: Path):
    from flows.deployments import build_deployments

    path = tmp_path / "defect-loop.yaml"
    path.write_text(
        "name: line-3\nclasses: [scratch]\nmonitor:\n  watch_dir: incoming\n  interval_s: 30\n"
    )
    deps = {d.flow_name: d for d in build_deployments(path)}
    (sched,) = deps["monitor"].schedules
    assert sched.schedule.interval.total_seconds() == 30
    assert deps["monitor"].parameters["config_path"] == str(path.resolve())
    assert str(tmp_path / "incoming") in (deps["monitor"].description or "")
    path.write_text("name: line-3\nclasses: [scratch]\n")
    assert not {d.flow_name: d for d in build_deployments(path)}["monitor"].schedules
