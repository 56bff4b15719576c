"""A local Label Studio server in its own virtual environment.

Label Studio 1.23 pins packages that conflict with the project's own (python-json-logger vs
prefect), so the server lives in a separate venv under ``~/.cache/defect-loop`` and the project
talks to it only over HTTP (see `loop.labelstudio`). The server runs detached (its own process
group) so that it outlives the command that started it; a PID file and a log file in ``data_dir``
let later commands find, check and stop it.

Nothing here runs at import time.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import httpx

from loop.errors import ServiceError
from loop.services.process import DetachedServer, _port_in_use, _tail

LABEL_STUDIO_VERSION = "1.23.2"

CACHE_DIR = Path("~/.cache/defect-loop")

DEFAULT_VENV_DIR = CACHE_DIR / f"ls-venv-{LABEL_STUDIO_VERSION}"

DEFAULT_USERNAME = "admin@defect-loop.local"

PID_FILE_NAME = "label-studio.pid"

LOG_FILE_NAME = "label-studio.log"
_TOKEN_MIN, _TOKEN_MAX = 6, 40
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


@dataclass
class LabelStudioService(DetachedServer):
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
