"""Local service lifecycle: a Label Studio server in its own virtual environment.

Label Studio 1.23 pins packages that conflict with the project's own (python-json-logger vs
prefect), so the server lives in a separate venv under ``~/.cache/defect-loop`` and the project
talks to it only over HTTP (see `loop.labelstudio`). The server runs detached (its own process
group) so that it outlives the command that started it; a PID file and a log file in ``data_dir``
let later commands find, check and stop it.

Nothing here runs at import time and nothing imports prefect.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import httpx

from loop.errors import ServiceError

LABEL_STUDIO_VERSION = "1.23.2"
CACHE_DIR = Path("~/.cache/defect-loop")
DEFAULT_VENV_DIR = CACHE_DIR / f"ls-venv-{LABEL_STUDIO_VERSION}"
DEFAULT_USERNAME = "admin@defect-loop.local"
PID_FILE_NAME = "label-studio.pid"
LOG_FILE_NAME = "label-studio.log"
_TOKEN_MIN, _TOKEN_MAX = 6, 40
_LOG_TAIL_LINES = 25
# Environment variables passed through to the server; everything else is dropped because
# Label Studio reads many un-prefixed names (HOST, PORT, DEBUG, CI, USERNAME, PASSWORD, ...).
_PYTHON_ENV_LEAKS = frozenset({"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"})
_PASSTHROUGH_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "TZ")
# `LabelStudioService(extra_env=WEBHOOK_ENV)`: Label Studio's SSRF protection refuses webhooks to
# loopback and private addresses; a local webhook receiver (`loop.webhooks`) needs it off.
WEBHOOK_ENV = {"SSRF_PROTECTION_ENABLED": "false"}


def _default_venv_dir() -> Path:
    return DEFAULT_VENV_DIR.expanduser()


@dataclass(frozen=True)
class Credentials:
    """Login of the Label Studio admin user. ``api_token`` is a legacy token (6-40 chars)."""

    username: str
    password: str
    api_token: str


def load_or_create_credentials(path: Path, username: str = DEFAULT_USERNAME) -> Credentials:
    """Read the credentials JSON at ``path``, or create it once with a random password and token.

    The file is written with mode 0600 (its folder 0700 when created) so that repeated
    ``services up`` calls reuse the same user and token. Raises `ServiceError` when an existing
    file is unreadable or incomplete.
    """
    path = Path(path).expanduser()
    if path.exists():
        try:
            data = json.loads(path.read_text())
            creds = Credentials(
                username=str(data["username"]),
                password=str(data["password"]),
                api_token=str(data["api_token"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ServiceError(
                f"credentials file {path} is unreadable or incomplete ({exc}); fix it or delete "
                "it together with the Label Studio data folder to start over"
            ) from exc
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
        return creds
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    creds = Credentials(
        username=username,
        password=secrets.token_urlsafe(18),
        api_token=secrets.token_hex(20),  # 40 hex chars: Label Studio's maximum token length
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(
            {"username": creds.username, "password": creds.password, "api_token": creds.api_token},
            fh,
            indent=2,
        )
    return creds


def _tail(path: Path, n: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("r", errors="replace") as fh:
            return "".join(deque(fh, maxlen=n)).rstrip()
    except OSError:
        return "(no log)"


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _pid_alive(pid: int) -> bool:
    """True when ``pid`` runs (zombies count as dead; our own dead children are reaped)."""
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError, IndexError):
        state = stat.read_text().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return False
    return True


def _is_label_studio(pid: int) -> bool:
    """Best effort: does ``pid`` run Label Studio? (Guards against a reused PID.)"""
    cmdline = Path(f"/proc/{pid}/cmdline")
    if not cmdline.parent.exists():
        return True  # no /proc (not Linux): trust the PID file
    try:
        raw = cmdline.read_bytes()
    except OSError:
        return False
    return b"label-studio" in raw or b"label_studio" in raw


def install_label_studio(
    venv_dir: Path | None = None, progress: bool = True, timeout_s: float = 1800
) -> Path:
    """Create the server's venv and ``pip install label-studio==LABEL_STUDIO_VERSION`` if
    ``bin/label-studio`` is missing (about 60 s and 1 GB). Returns the executable's path.

    Raises `ServiceError` naming the pip log when the venv or the install fails.
    """
    venv_dir = _default_venv_dir() if venv_dir is None else Path(venv_dir).expanduser()
    exe = venv_dir / "bin" / "label-studio"
    if exe.exists():
        return exe
    log = venv_dir.with_name(venv_dir.name + "-pip.log")
    venv_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if progress:
        print(
            f"Installing Label Studio {LABEL_STUDIO_VERSION} into {venv_dir} "
            f"(about a minute; log: {log})",
            file=sys.stderr,
            flush=True,
        )
    python = venv_dir / "bin" / "python"
    steps: list[list[str]] = []
    if not python.exists():
        steps.append([sys.executable, "-m", "venv", str(venv_dir)])
    steps.append(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            f"label-studio=={LABEL_STUDIO_VERSION}",
        ]
    )
    # The project's own import paths must not leak into the server's venv (pip would see
    # and check the project's packages); pip's index settings (PIP_*) pass through.
    env = {k: v for k, v in os.environ.items() if k not in _PYTHON_ENV_LEAKS}
    with log.open("a") as fh:
        fh.write(f"\n=== {datetime.now(UTC).isoformat()} install label-studio ===\n")
        for cmd in steps:
            fh.write("$ " + " ".join(cmd) + "\n")
            fh.flush()
            try:
                rc = subprocess.run(
                    cmd,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    timeout=timeout_s,
                    check=False,
                    env=env,
                    cwd=venv_dir.parent,  # `python -m` puts the cwd on sys.path
                ).returncode
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise ServiceError(
                    f"installing Label Studio failed at `{' '.join(cmd)}`: {exc}; see {log}"
                ) from exc
            if rc != 0:
                raise ServiceError(
                    f"installing Label Studio failed (`{' '.join(cmd[:3])} ...` exit {rc}); "
                    f"see {log}. Last lines:\n{_tail(log)}\nFix the cause (network access to "
                    f"the package index, disk space) and run again, or delete {venv_dir}."
                )
    if not exe.exists():
        raise ServiceError(
            f"pip finished but {exe} is missing; see {log} and delete {venv_dir} to retry"
        )
    if progress:
        print(
            f"Label Studio installed in {time.monotonic() - t0:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    return exe


class _DetachedServer:
    """Lifecycle shared by the local servers: a process run detached (its own session, so it
    outlives the command that started it) with a PID file, a log file and a health URL.

    Subclasses provide `pid_file`, `log_file`, `health_url`, `display_name` and `_is_ours`,
    and hold the `Popen` of a server they started in ``_proc``.
    """

    display_name: ClassVar[str] = "server"
    _proc: subprocess.Popen[bytes] | None

    @property
    def pid_file(self) -> Path:
        raise NotImplementedError

    @property
    def log_file(self) -> Path:
        raise NotImplementedError

    @property
    def health_url(self) -> str:
        raise NotImplementedError

    def _is_ours(self, pid: int) -> bool:
        raise NotImplementedError

    def healthy(self, timeout_s: float = 2.0) -> bool:
        """True when the health URL answers 200."""
        try:
            return httpx.get(self.health_url, timeout=timeout_s).status_code == 200
        except httpx.HTTPError:
            return False

    def _running_pid(self) -> int | None:
        """The PID in the PID file when that process is alive and is this kind of server."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        if _pid_alive(pid) and self._is_ours(pid):
            return pid
        return None

    def _spawn(self, cmd: list[str], cwd: Path, env: dict[str, str], timeout_s: float) -> None:
        """Run ``cmd`` detached, record its PID and wait until it is healthy (stop it if not)."""
        with self.log_file.open("a") as log:
            log.write(f"\n=== {datetime.now(UTC).isoformat()} {' '.join(cmd)} ===\n")
            log.flush()
            try:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=cwd,
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                raise ServiceError(f"could not run {' '.join(cmd)}: {exc}") from exc
        self._proc = proc
        self.pid_file.write_text(f"{proc.pid}\n")
        try:
            self._wait_healthy(proc.pid, timeout_s, proc=proc)
        except ServiceError:
            self.stop()
            raise

    def _wait_healthy(
        self, pid: int, timeout_s: float, proc: subprocess.Popen[bytes] | None
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.healthy():
                return
            exited = proc.poll() is not None if proc is not None else not _pid_alive(pid)
            if exited:
                code = f" with code {proc.returncode}" if proc is not None else ""
                raise ServiceError(
                    f"{self.display_name} exited{code} before answering {self.health_url}; see "
                    f"{self.log_file}. Last lines:\n{_tail(self.log_file)}"
                )
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"{self.display_name} did not answer {self.health_url} within "
                    f"{timeout_s:.0f} s; see {self.log_file}. Last lines:\n{_tail(self.log_file)}"
                )
            time.sleep(0.3)

    def stop(self, timeout_s: float = 20) -> bool:
        """SIGTERM the server's process group, SIGKILL after ``timeout_s`` seconds; remove the
        PID file. Returns True when a running server was stopped; no error when none runs."""
        pid = self._running_pid()
        if pid is not None:
            try:
                pgid: int | None = os.getpgid(pid)
            except ProcessLookupError:
                pgid = None
            _signal(pid, pgid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _pid_alive(pid):
                _signal(pid, pgid, signal.SIGKILL)
                deadline = time.monotonic() + 10
                while _pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=1)
            self._proc = None
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        return pid is not None


def _signal(pid: int, pgid: int | None, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if pgid is not None and pgid == pid:
            os.killpg(pgid, sig)
        else:
            os.kill(pid, sig)


@dataclass
class LabelStudioService(_DetachedServer):
    """A local Label Studio server: install, start, check, stop.

    ``data_dir`` holds the SQLite database, media, the PID file and the log file.
    ``document_root`` is the folder under which Label Studio may serve local files; storages
    must point at a SUBfolder of it. ``api_token`` (6-40 chars) becomes the admin's legacy token
    on the first start, used as ``Authorization: Token <api_token>``. ``extra_env`` is added to
    the server's environment last (e.g. `WEBHOOK_ENV` to let it call a loopback webhook).
    """

    data_dir: Path
    document_root: Path
    username: str
    password: str
    api_token: str
    port: int = 8080
    host: str = "127.0.0.1"
    venv_dir: Path = field(default_factory=_default_venv_dir)
    extra_env: dict[str, str] = field(default_factory=dict)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not _TOKEN_MIN <= len(self.api_token) <= _TOKEN_MAX:
            raise ServiceError(
                f"api_token must be {_TOKEN_MIN}-{_TOKEN_MAX} characters, got "
                f"{len(self.api_token)}; use load_or_create_credentials() to generate one"
            )
        if not self.username or not self.password:
            raise ServiceError("username and password must not be empty")
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        self.document_root = Path(self.document_root).expanduser().resolve()
        self.venv_dir = Path(self.venv_dir).expanduser()

    @classmethod
    def from_credentials(
        cls, creds: Credentials, data_dir: Path, document_root: Path, **kwargs: Any
    ) -> LabelStudioService:
        """A service for `Credentials`; ``kwargs`` go to the constructor (port, host, ...)."""
        return cls(
            data_dir=data_dir,
            document_root=document_root,
            username=creds.username,
            password=creds.password,
            api_token=creds.api_token,
            **kwargs,
        )

    # --- paths -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8080`` (no trailing slash)."""
        return f"http://{self.host}:{self.port}"

    @property
    def executable(self) -> Path:
        return self.venv_dir / "bin" / "label-studio"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / PID_FILE_NAME

    @property
    def log_file(self) -> Path:
        return self.data_dir / LOG_FILE_NAME

    @property
    def pip_log_file(self) -> Path:
        return self.venv_dir.with_name(self.venv_dir.name + "-pip.log")

    # --- install -----------------------------------------------------------------------------
    def ensure_installed(self, progress: bool = True, timeout_s: float = 1800) -> Path:
        """Install the server into ``venv_dir`` when missing; see `install_label_studio`."""
        return install_label_studio(self.venv_dir, progress=progress, timeout_s=timeout_s)

    # --- lifecycle ---------------------------------------------------------------------------
    display_name: ClassVar[str] = "Label Studio"

    @property
    def health_url(self) -> str:
        return f"{self.url}/health"

    def _is_ours(self, pid: int) -> bool:
        return _is_label_studio(pid)

    def server_env(self) -> dict[str, str]:
        """The environment the server runs with (a clean one: see ``_PASSTHROUGH_ENV``)."""
        env = {k: os.environ[k] for k in _PASSTHROUGH_ENV if k in os.environ}
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
                "LABEL_STUDIO_USERNAME": self.username,
                "LABEL_STUDIO_PASSWORD": self.password,
                "LABEL_STUDIO_USER_TOKEN": self.api_token,
                # Stored per organisation when it is created: must be on at the FIRST start.
                "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
                "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
                "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(self.document_root),
                # No outbound calls: PyPI version check, usage telemetry, Sentry (backend + UI).
                "LATEST_VERSION_CHECK": "false",
                "COLLECT_ANALYTICS": "false",
                "SENTRY_DSN": "",
                "FRONTEND_SENTRY_DSN": "",
                "FEATURE_FLAGS_OFFLINE": "true",
                # Only the admin created here may log in; nobody can sign up on the open port.
                "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            }
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout_s: float = 180) -> None:
        """Start the server detached and wait until ``/health`` answers 200 (first start with
        database migrations ~30 s, later starts ~3 s). Idempotent: a running healthy server
        (per the PID file) is left alone.

        Raises `ServiceError` naming the log file and its last lines when the server exits early,
        does not become healthy within ``timeout_s`` seconds, the port is taken, or the token is
        refused.
        """
        pid = self._running_pid()
        if pid is not None:
            self._wait_healthy(pid, timeout_s, proc=None)
            self.verify_token()
            return
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        exe = self.executable
        if not exe.exists():
            raise ServiceError(
                f"Label Studio is not installed at {exe}; run `defect-loop services up` or "
                "LabelStudioService.ensure_installed() first"
            )
        if _port_in_use(self.host, self.port):
            raise ServiceError(
                f"port {self.port} on {self.host} is already in use by another process (not the "
                f"Label Studio recorded in {self.pid_file}); stop that process or choose another "
                "port in the config"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.document_root.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(exe),
            "start",
            "--no-browser",
            "--internal-host",
            self.host,
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
        ]
        self._spawn(cmd, self.data_dir, self.server_env(), timeout_s)
        self.verify_token()

    def verify_token(self) -> None:
        """Check that ``Authorization: Token <api_token>`` is accepted; raise `ServiceError`."""
        try:
            r = httpx.get(
                f"{self.url}/api/current-user/whoami",
                headers={"Authorization": f"Token {self.api_token}"},
                timeout=10,
            )
        except httpx.HTTPError as exc:
            raise ServiceError(f"Label Studio at {self.url} is unreachable: {exc}") from exc
        if r.status_code == 200:
            return
        raise ServiceError(
            f"Label Studio at {self.url} refused the API token (HTTP {r.status_code}). Either the "
            f"data folder {self.data_dir} was created with another token (credentials file "
            "replaced?) or legacy tokens were off at its first start. Restore the original "
            "credentials file, or enable legacy tokens in Label Studio (Organization > API Tokens "
            'settings, or POST /api/jwt/settings {"legacy_api_tokens_enabled": true}), or delete '
            "the data folder to start over."
        )

    def status(self) -> dict[str, Any]:
        """``{"running", "pid", "url", "healthy", "log", "data_dir"}`` of this server."""
        pid = self._running_pid()
        return {
            "running": pid is not None,
            "pid": pid,
            "url": self.url,
            "healthy": pid is not None and self.healthy(),
            "log": str(self.log_file),
            "data_dir": str(self.data_dir),
        }


# ============================================================================================
# Prefect server (for the UI, schedules and triggers of `defect-loop serve`)
# ============================================================================================

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
class PrefectService(_DetachedServer):
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


# ============================================================================================
# A command's own temporary Prefect server
# ============================================================================================

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
