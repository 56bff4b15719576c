import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loop.cli import app
from loop.synth import write_dataset

runner = CliRunner()


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["init"],
        ["ingest"],
        ["train"],
        ["score"],
        ["push"],
        ["pull"],
        ["cycle"],
        ["status"],
        ["services"],
        ["services", "up"],
        ["services", "down"],
        ["services", "status"],
        ["demo"],
        ["label-from-truth"],
        ["report"],
        ["simulate"],
        ["import"],
        ["import", "voc"],
        ["serve"],
        ["prefect-server"],
        ["labelstudio"],
        ["datasets"],
        ["datasets", "list"],
        ["datasets", "show"],
        ["datasets", "diff"],
        ["datasets", "export"],
        ["datasets", "add-test"],
    ],
)
def test_every_command_has_help(args):
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_init_ingest_status(tmp_path: Path):
    cfg = tmp_path / "defect-loop.yaml"
    r = runner.invoke(app, ["init", "--classes", "scratch,pit,crack,patch", "-c", str(cfg)])
    assert r.exit_code == 0, r.output
    again = runner.invoke(app, ["init", "--classes", "a", "-c", str(cfg)])
    assert again.exit_code == 2 and "already exists" in again.output

    data = tmp_path / "data"
    write_dataset(data, 12, seed=1, size=64)
    (data / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    r = runner.invoke(
        app, ["ingest", str(data / "images"), "--labels", str(data / "labels"), "-c", str(cfg)]
    )
    assert r.exit_code == 0, r.output
    assert "12 added, 0 duplicates, 1 rejected" in r.output
    assert "broken.png" in r.output

    r = runner.invoke(app, ["status", "-c", str(cfg)])
    assert r.exit_code == 0, r.output
    status = json.loads(r.output)
    assert status["pool_images"] == 12 and status["labeled_images"] == 12
    assert [Path(x["source"]).name for x in status["rejected_files"]] == ["broken.png"]


def test_errors_are_reported_not_raised(tmp_path: Path):
    r = runner.invoke(app, ["status", "-c", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2
    assert "defect-loop init" in r.output
