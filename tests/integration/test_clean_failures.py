"""Clean failures (issue 15): an unwritable workspace, Label Studio down or MLflow down each end a
command with ONE clear line and a non-zero exit, fast, with the traceback in the log file, not
on the console; a command killed with SIGKILL leaves no Prefect server behind. Each command runs
in a subprocess, as a user runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from loop.services import free_port
from loop.synth import write_dataset

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-c", "from loop.cli import app; app()"]
CLASSES = ["scratch", "pit", "crack", "patch"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        {
            "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
            "DO_NOT_TRACK": "true",
            "XDG_CACHE_HOME": str(tmp_path / "cache"),  # where the fallback log goes
            "DEFECT_LOOP_LABELSTUDIO__API_TOKEN": "0123456789abcdef",
            "COLUMNS": "400",
        }
    )
    env.update(extra)
    return env


def _config(tmp_path: Path, **overrides: object) -> Path:
    doc: dict[str, object] = {
        "classes": CLASSES,
        "workspace": "ws",
        "labelstudio": {"url": f"http://127.0.0.1:{free_port()}"},  # nothing listens there
    }
    doc.update(overrides)
    path = tmp_path / "defect-loop.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _cli(tmp_path: Path, *args: str, timeout: float = 120) -> tuple[int, str, float]:
    t0 = time.monotonic()
    out = subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        env=_env(tmp_path),
        cwd=tmp_path,
        timeout=timeout,
    )
    return out.returncode, out.stdout + out.stderr, time.monotonic() - t0


def _one_clear_line(output: str, *needles: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert "Traceback" not in output, output[-3000:]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("command", [["ingest", "images"], ["train"], ["pull"], ["status"]])
def test_an_unwritable_workspace_is_one_line_not_tracebacks(tmp_path: Path, command):
    """It gave raw PermissionError tracebacks, then 20 s of Prefect database retries."""
    write_dataset(tmp_path / "data", 2, seed=1, size=32)
    (tmp_path / "images").symlink_to(tmp_path / "data" / "images")
    blocker = tmp_path / "blocked"
    blocker.write_text("a file, so nothing can be created below it (root ignores chmod)")
    cfg = _config(tmp_path, workspace=str(blocker / "ws"))
    code, output, took = _cli(tmp_path, *command, "-c", str(cfg), timeout=60)
    assert code != 0
    _one_clear_line(output, str(blocker / "ws"))
    assert took < 30, took
    log = tmp_path / "cache" / "defect-loop" / "logs" / "defect-loop.log"
    assert "Traceback" in log.read_text()  # the details are kept, off the console


def test_label_studio_down_is_one_line_at_once(tmp_path: Path):
    """It showed about 42 s of retries with 6-7 tracebacks before the clear message."""
    cfg = _config(tmp_path)
    code, output, took = _cli(tmp_path, "pull", "-c", str(cfg), timeout=120)
    assert code == 2
    _one_clear_line(output, "Label Studio at", "unreachable", "defect-loop services up")
    assert took < 20, took
    assert "unreachable" in (tmp_path / "ws" / "logs" / "defect-loop.log").read_text()


def test_mlflow_down_is_one_line_at_once(tmp_path: Path):
    cfg = _config(tmp_path, mlflow={"tracking_uri": f"http://127.0.0.1:{free_port()}"})
    code, output, took = _cli(tmp_path, "score", "-c", str(cfg), timeout=150)
    assert code == 2
    _one_clear_line(output, "MLflow at", "unreachable", "mlflow.tracking_uri")
    assert took < 20, took


def test_an_unexpected_error_is_one_line_with_the_log_path(tmp_path: Path):
    cfg = _config(tmp_path)
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "state.json").write_text("{not json")
    code, output, _ = _cli(tmp_path, "status", "-c", str(cfg), timeout=60)
    assert code == 1
    line = _one_clear_line(output, "JSONDecodeError")
    log = tmp_path / "ws" / "logs" / "defect-loop.log"
    assert str(log) in line and "Traceback" in log.read_text()


def _children(pid: int) -> list[tuple[int, bytes]]:
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (p / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append((int(p.name), cmd))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux /proc")
def test_a_killed_command_leaves_no_prefect_server_behind(tmp_path: Path):
    """`kill -9` of a command left Prefect's temporary server running."""
    write_dataset(tmp_path / "data", 4, seed=1, size=32)
    cfg = _config(tmp_path)
    subprocess.run(
        [*CLI, "ingest", str(tmp_path / "data" / "images"), "--labels",
         str(tmp_path / "data" / "labels"), "-c", str(cfg)],
        check=True, capture_output=True, env=_env(tmp_path), cwd=tmp_path, timeout=120,
    )  # fmt: skip
    proc = subprocess.Popen(
        [*CLI, "train", "-c", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(tmp_path),
        cwd=tmp_path,
    )
    server = None
    deadline = time.monotonic() + 120
    try:
        while server is None and proc.poll() is None and time.monotonic() < deadline:
            server = next((pid for pid, cmd in _children(proc.pid) if b"uvicorn" in cmd), None)
            time.sleep(0.05)
        assert server is not None, "the command started no Prefect server"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    gone = time.monotonic() + 10
    while _alive(server) and time.monotonic() < gone:
        time.sleep(0.1)
    still = _alive(server)
    if still:
        os.kill(server, signal.SIGKILL)
    assert not still, "the Prefect server outlived the killed command"
