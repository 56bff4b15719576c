"""Processes that outlive the command which started them: a detached server with a PID file
and a log file (`DetachedServer`), and the checks around it (ports, PIDs, log tails).

Nothing here runs at import time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import httpx

from loop.errors import ServiceError

_LOG_TAIL_LINES = 25


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


def _signal(pid: int, pgid: int | None, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if pgid is not None and pgid == pid:
            os.killpg(pgid, sig)
        else:
            os.kill(pid, sig)


class DetachedServer:
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
