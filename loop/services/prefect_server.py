"""A local Prefect server (SQLite, 127.0.0.1): the long-lived one of `defect-loop
prefect-server` (`PrefectService`) and a command's own temporary one that dies with it
(`TemporaryPrefectServer`). Nothing here imports prefect: the server runs as a subprocess.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import httpx

from loop.errors import ServiceError
from loop.services.process import DetachedServer, _port_in_use, _tail, free_port

PREFECT_PID_FILE_NAME = "prefect-server.pid"

PREFECT_LOG_FILE_NAME = "prefect-server.log"


def _is_prefect_server(pid: int) -> bool:
    """Best effort: does ``pid`` run ``prefect server start``? (Guards against a reused PID.)"""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.parent.exists():
        return True
    try:
        raw = cmdline.read_bytes()
    except OSError:
        return False
    return b"prefect" in raw and b"server" in raw


@dataclass
class PrefectService(DetachedServer):
    """A local Prefect server: ``prefect server start --host 127.0.0.1 --port P``, detached.

    ``home`` is its PREFECT_HOME: the SQLite database ``prefect.db``, the PID file and the log
    file. Analytics are off (``PREFECT_SERVER_ANALYTICS_ENABLED=false``, ``DO_NOT_TRACK=true``).
    Point clients at it with ``PREFECT_API_URL=<api_url>``; the UI is at ``url``.
    """

    home: Path
    port: int = 4200
    host: str = "127.0.0.1"
    extra_env: dict[str, str] = field(default_factory=dict)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.home = Path(self.home).expanduser().resolve()

    @property
    def url(self) -> str:
        """The UI, e.g. ``http://127.0.0.1:4200``."""
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        """What ``PREFECT_API_URL`` must be set to, e.g. ``http://127.0.0.1:4200/api``."""
        return f"{self.url}/api"

    @property
    def pid_file(self) -> Path:
        return self.home / PREFECT_PID_FILE_NAME

    @property
    def log_file(self) -> Path:
        return self.home / PREFECT_LOG_FILE_NAME

    @property
    def database(self) -> Path:
        return self.home / "prefect.db"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--analytics-off",
        ]

    def server_env(self) -> dict[str, str]:
        """The caller's environment without any ``PREFECT_*`` setting, plus the server's own."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "PREFECT_HOME": str(self.home),
                "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{self.database}",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "DO_NOT_TRACK": "true",
                "PREFECT_UI_API_URL": self.api_url,
            }
        )
        env.update(self.extra_env)
        return env

    display_name: ClassVar[str] = "the Prefect server"

    @property
    def health_url(self) -> str:
        return f"{self.api_url}/health"

    def _is_ours(self, pid: int) -> bool:
        return _is_prefect_server(pid)

    def start(self, timeout_s: float = 90) -> None:
        """Start the server detached and wait for ``/api/health`` (~3-6 s; longer on a busy
        machine). Idempotent: a running server recorded in the PID file is reused.

        Raises `ServiceError` naming the log file and its last lines when the port is taken, the
        server exits early or does not become healthy within ``timeout_s`` seconds.
        """
        pid = self._running_pid()
        if pid is not None:
            self._wait_healthy(pid, timeout_s, proc=None)
            return
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        if _port_in_use(self.host, self.port):
            raise ServiceError(
                f"port {self.port} on {self.host} is already in use by another process (not the "
                f"Prefect server recorded in {self.pid_file}); stop it or set prefect.port in the "
                "config"
            )
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._spawn(self.command(), self.home, self.server_env(), timeout_s)

    def status(self) -> dict[str, Any]:
        """``{"running", "pid", "url", "api_url", "healthy", "log", "home"}``."""
        pid = self._running_pid()
        return {
            "running": pid is not None,
            "pid": pid,
            "url": self.url,
            "api_url": self.api_url,
            "healthy": pid is not None and self.healthy(),
            "log": str(self.log_file),
            "home": str(self.home),
        }


# Runs in the server's child process before it becomes the server: ask the kernel to kill it
# when the command that started it dies, however it dies (kill -9 included), then exec.
_PDEATHSIG_LAUNCHER = """
import ctypes, os, signal, sys
parent = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
    sys.exit("prctl(PR_SET_PDEATHSIG) failed")
if os.getppid() != parent:  # the parent died before prctl: do not start at all
    sys.exit(0)
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


@dataclass
class TemporaryPrefectServer:
    """The Prefect API a single command needs when no Prefect server is configured.

    Prefect starts such a server itself otherwise (``SubprocessASGIServer``), but a command that
    is killed (``kill -9``, OOM) leaves that process running. This one is the same server
    (``uvicorn prefect.server.api.server:create_app`` on a free 127.0.0.1 port, UI off, state in
    the caller's PREFECT_HOME) started so that the kernel kills it when its starter dies
    (``PR_SET_PDEATHSIG``, Linux). `stop` ends it at once; ``with`` stops it on exit.
    Start it from the thread that lives as long as the command (the main thread): the kernel
    ties the signal to the starting thread.
    """

    log_file: Path
    host: str = "127.0.0.1"
    port: int = 0
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def command(self) -> list[str]:
        spec = importlib.util.find_spec("prefect")  # its location, without importing it
        if spec is None or spec.origin is None:
            raise ServiceError("Prefect is not installed in this environment")
        return [
            sys.executable,
            "-c",
            _PDEATHSIG_LAUNCHER,
            str(os.getpid()),
            "-m",
            "uvicorn",
            "--app-dir",
            str(Path(spec.origin).parent.parent),
            "--factory",
            "prefect.server.api.server:create_app",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--log-level",
            "error",
            "--lifespan",
            "on",
        ]

    def start(self, timeout_s: float = 120) -> str:
        """Start the server and wait for ``/api/health``; returns the API URL.
        Raises `ServiceError` (naming the log file) when it exits or does not answer in time."""
        if self._proc is not None:
            return self.api_url
        self.port = self.port or free_port(self.host)
        env = {
            **os.environ,
            # What Prefect's own temporary server runs with.
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        env.pop("PREFECT_API_URL", None)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("a") as log:
            try:
                self._proc = subprocess.Popen(
                    self.command(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    close_fds=True,
                )
            except OSError as exc:
                raise ServiceError(f"could not start a temporary Prefect server: {exc}") from exc
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{self.api_url}/health", timeout=2).status_code == 200:
                    return self.api_url
            except httpx.HTTPError:
                pass
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise ServiceError(
                    f"the temporary Prefect server exited with code {code}; see {self.log_file}:"
                    f"\n{_tail(self.log_file)}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceError(
                    f"the temporary Prefect server did not answer within {timeout_s:.0f} s; "
                    f"see {self.log_file}"
                )
            time.sleep(0.2)

    def stop(self, timeout_s: float = 10) -> None:
        """Terminate the server (SIGKILL after ``timeout_s``); no error when it is not running."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> TemporaryPrefectServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
