"""`deny_network` and `configure_ultralytics`.

Everything that imports Ultralytics runs in a subprocess so this test process keeps a clean state.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import loop
from loop.errors import OfflineViolationError
from loop.offline import ConnectAttempt, deny_network

REPO = Path(loop.__file__).resolve().parent.parent


def _run_py(code: str, extra_env: dict[str, str] | None = None) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter; it must print one JSON object as its last line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLO_", "OMP_"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra_env or {})
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- deny_network -----------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["10.255.255.1", "8.8.8.8"])
def test_deny_network_refuses_remote(host: str) -> None:
    with deny_network() as attempts:
        with (
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s,
            pytest.raises(OfflineViolationError),
        ):
            s.connect((host, 53))
        with (
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s,
            pytest.raises(OfflineViolationError),
        ):
            s.connect_ex((host, 80))
        with pytest.raises(OfflineViolationError):
            socket.create_connection((host, 443), timeout=1)
    assert [a.api for a in attempts] == [
        "socket.connect",
        "socket.connect_ex",
        "socket.create_connection",
    ]
    assert all(host in a.address for a in attempts)


def test_deny_network_refuses_hostnames_and_ipv6() -> None:
    with deny_network() as attempts:
        with pytest.raises(OfflineViolationError):
            socket.create_connection(
                ("github.com", 443), timeout=1
            )  # refused before any DNS lookup
        with (
            socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s,
            pytest.raises(OfflineViolationError),
        ):
            s.connect(("2001:4860:4860::8888", 53, 0, 0))
    assert len(attempts) == 2


def test_deny_network_allows_loopback() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        port = server.getsockname()[1]
        with deny_network() as attempts:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as c:
                c.connect(("127.0.0.1", port))
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as c:
                assert c.connect_ex(("127.0.0.1", port)) == 0
            socket.create_connection(("localhost", port), timeout=5).close()
    assert attempts == []


def test_deny_network_allows_unix_sockets(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)
        with deny_network() as attempts, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(path)
    assert attempts == []


def test_deny_network_covers_other_threads_nesting_and_restores() -> None:
    originals = (socket.socket.connect, socket.socket.connect_ex, socket.create_connection)
    errors: list[BaseException] = []

    def worker() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.connect(("8.8.8.8", 53))
            except OfflineViolationError as exc:
                errors.append(exc)

    with deny_network() as outer:
        with deny_network() as inner:
            t = threading.Thread(target=worker)
            t.start()
            t.join(10)
        # Still guarded after the inner context exits.
        assert socket.socket.connect is not originals[0]
        with (
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s,
            pytest.raises(OfflineViolationError),
        ):
            s.connect(("8.8.8.8", 53))
    assert len(errors) == 1
    assert inner == [ConnectAttempt("socket.connect", repr(("8.8.8.8", 53)))]
    assert len(outer) == 2
    assert (socket.socket.connect, socket.socket.connect_ex, socket.create_connection) == originals


# --- configure_ultralytics --------------------------------------------------------------------

_EXPECTED_OFF = ["sync", "clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb"]

_FRESH = """
import json, os, sys
from pathlib import Path
from loop.offline import configure_ultralytics, deny_network
cfg = Path({cfg!r})
configure_ultralytics(cfg, threads=2)
configure_ultralytics(cfg, threads=2)  # idempotent
assert "ultralytics" not in sys.modules
with deny_network() as attempts:
    import torch
    import ultralytics
    from ultralytics.utils import SETTINGS, USER_CONFIG_DIR, ONLINE
    from ultralytics.utils.checks import check_font
    font = str(check_font("Arial.ttf"))
    font_u = str(check_font("Arial.Unicode.ttf"))
print(json.dumps({{
    "settings": dict(SETTINGS), "settings_file": str(SETTINGS.file),
    "user_config_dir": str(USER_CONFIG_DIR), "online": ONLINE, "font": font, "font_u": font_u,
    "omp": os.environ["OMP_NUM_THREADS"], "torch_threads": torch.get_num_threads(),
    "env": {{k: os.environ[k] for k in ("YOLO_OFFLINE", "YOLO_AUTOINSTALL", "YOLO_VERBOSE",
                                        "YOLO_CONFIG_DIR", "OMP_WAIT_POLICY")}},
    "attempts": [repr(a) for a in attempts],
}}))
"""


def test_configure_before_import(tmp_path: Path) -> None:
    cfg = tmp_path / "yolo"
    out = _run_py(_FRESH.format(cfg=str(cfg)))
    udir = cfg / "Ultralytics"
    assert out["env"] == {
        "YOLO_OFFLINE": "1",
        "YOLO_AUTOINSTALL": "false",
        "YOLO_VERBOSE": "false",
        "YOLO_CONFIG_DIR": str(cfg),
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    assert out["user_config_dir"] == str(udir)
    assert out["settings_file"] == str(udir / "settings.json")
    assert out["online"] is False
    assert out["omp"] == "2" and out["torch_threads"] == 2
    assert out["font"] == str(udir / "Arial.ttf") and out["font_u"] == str(
        udir / "Arial.Unicode.ttf"
    )
    assert out["attempts"] == []
    # The file on disk, after Ultralytics loaded (and possibly re-saved) it.
    on_disk = json.loads((udir / "settings.json").read_text())
    assert on_disk == out["settings"]
    for key in _EXPECTED_OFF:
        assert on_disk[key] is False, key
    assert on_disk["api_key"] == ""
    assert on_disk["settings_version"] == "0.0.8"  # matches 8.4.x: no schema migration happened
    assert on_disk["runs_dir"] == str(cfg / "runs")
    font_bytes = (udir / "Arial.ttf").read_bytes()
    assert font_bytes[:4] in (b"\x00\x01\x00\x00", b"true")  # a TrueType file
    assert (udir / "Arial.Unicode.ttf").read_bytes() == font_bytes


def test_configure_is_idempotent_and_keeps_other_settings(tmp_path: Path) -> None:
    cfg = tmp_path / "yolo"
    code = (
        "import sys, json; from pathlib import Path; from loop.offline import configure_ultralytics\n"
        "configure_ultralytics(Path(sys.argv[1]))\n"
        "print(json.dumps({'ultralytics': 'ultralytics' in sys.modules}))\n"
    )
    udir = cfg / "Ultralytics"
    udir.mkdir(parents=True)
    (udir / "settings.json").write_text(json.dumps({"sync": True, "uuid": "abc", "mlflow": True}))
    env = {"PYTHONPATH": str(REPO)}
    mtimes = []
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-c", code, str(cfg)],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            cwd=REPO,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"ultralytics": False}
        mtimes.append((udir / "settings.json").stat().st_mtime_ns)
    settings = json.loads((udir / "settings.json").read_text())
    assert settings["sync"] is False and settings["mlflow"] is False
    assert settings["uuid"] == "abc"  # unrelated values survive
    assert mtimes[0] == mtimes[1]  # the second call found nothing to change
    assert (udir / "Arial.ttf").is_file()


_ALREADY_IMPORTED = """
import json, os, sys
from pathlib import Path
import ultralytics  # imported BEFORE configuration, bound to YOLO_CONFIG_DIR from the env
from ultralytics.utils import SETTINGS, checks, torch_utils
assert SETTINGS["sync"] is True and SETTINGS["mlflow"] is True
from loop.offline import configure_ultralytics
configure_ultralytics(Path(sys.argv[1]), threads=2)
import torch
print(json.dumps({
    "settings": dict(SETTINGS), "settings_file": str(SETTINGS.file),
    "autoinstall": checks.AUTOINSTALL, "online": checks.ONLINE,
    "num_threads": torch_utils.NUM_THREADS, "torch_threads": torch.get_num_threads(),
}))
"""


def test_configure_after_import_patches_live_settings(tmp_path: Path) -> None:
    early, late = tmp_path / "early", tmp_path / "late"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("YOLO_", "OMP_"))}
    # YOLO_OFFLINE only so the import-time online probe does no DNS lookup on this offline box.
    env.update({"PYTHONPATH": str(REPO), "YOLO_CONFIG_DIR": str(early), "YOLO_OFFLINE": "1"})
    proc = subprocess.run(
        [sys.executable, "-c", _ALREADY_IMPORTED, str(late)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # The live SETTINGS keep their import-time file but hold the offline values.
    assert out["settings_file"] == str(early / "Ultralytics" / "settings.json")
    for key in _EXPECTED_OFF:
        assert out["settings"][key] is False, key
    early_file = json.loads((early / "Ultralytics" / "settings.json").read_text())
    assert early_file["sync"] is False and early_file["mlflow"] is False
    late_file = json.loads((late / "Ultralytics" / "settings.json").read_text())
    assert late_file["sync"] is False
    assert out["autoinstall"] is False and out["online"] is False
    assert out["num_threads"] == 2 and out["torch_threads"] == 2
    # check_font() looks in the import-time dir: the font must be there too.
    assert (early / "Ultralytics" / "Arial.ttf").is_file()
    assert (late / "Ultralytics" / "Arial.ttf").is_file()


def test_imports_have_no_side_effects() -> None:
    code = (
        "import json, os, sys\n"
        "before = dict(os.environ)\n"
        "import loop.offline, loop.model\n"
        "print(json.dumps({'ultralytics': 'ultralytics' in sys.modules, 'torch': 'torch' in sys.modules,"
        " 'env_changed': dict(os.environ) != before}))\n"
    )
    assert _run_py(code) == {"ultralytics": False, "torch": False, "env_changed": False}
