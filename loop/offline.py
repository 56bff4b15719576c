"""Offline guards: configure Ultralytics to never touch the network, and refuse sockets that would.

Two entry points:

- `configure_ultralytics` sets the ``YOLO_*`` environment variables, writes Ultralytics' settings
  file (``<config_dir>/Ultralytics/settings.json``: sync, telemetry and every logger integration
  off) and puts a local TTF where Ultralytics looks for ``Arial.ttf`` so dataset checks do not
  try to download it. Call it before the first ``import ultralytics``; it also patches a process
  that has already imported Ultralytics, but that process keeps the settings *file* it found at
  import time (see the function's docstring).
- `deny_network` is a context manager that makes every socket connect to a non-loopback address
  raise `OfflineViolationError` and records the attempt.

Importing this module has no side effects.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import json
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loop.errors import ConfigError, OfflineViolationError

# Ultralytics' settings schema of 8.4.x (``SettingsManager.defaults``, version 0.0.8). Written in
# full so the first import finds a valid file and does not "migrate" it (which only warns).
_SETTINGS_VERSION = "0.0.8"
_FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")  # check_font() looks these up by name
_ASSET_FONT = Path(__file__).parent / "assets" / "DejaVuSans.ttf"


def _desired_settings(config_dir: Path) -> dict[str, Any]:
    """Settings that keep Ultralytics offline and quiet; MLflow logging is ours, not theirs."""
    return {
        "datasets_dir": str(config_dir / "datasets"),
        "weights_dir": str(config_dir / "weights"),
        "runs_dir": str(config_dir / "runs"),
        "sync": False,  # anonymous usage events + Sentry crash reports
        "api_key": "",  # Ultralytics Platform (formerly HUB) streaming
        "openai_api_key": "",
        "clearml": False,
        "comet": False,
        "dvc": False,
        "mlflow": False,
        "raytune": False,
        "tensorboard": False,
        "wandb": False,
        "vscode_msg": False,
        "openvino_msg": False,
    }


def _font_source() -> Path:
    """The DejaVuSans.ttf shipped in ``loop/assets``, else the copy inside matplotlib."""
    if _ASSET_FONT.is_file():
        return _ASSET_FONT
    spec = importlib.util.find_spec("matplotlib")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(root) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if candidate.is_file():
            return candidate
    raise OfflineViolationError(
        "no local TTF font found (loop/assets/DejaVuSans.ttf and matplotlib's DejaVuSans.ttf are "
        "both missing); Ultralytics would try to download Arial.ttf. Reinstall defect-loop or "
        "matplotlib"
    )


def _atomic_write_bytes(dest: Path, data: bytes) -> None:
    # Parallel workers may configure the same directory: never expose a half-written file.
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


def _install_fonts(ultralytics_dir: Path) -> None:
    src = _font_source()
    size = src.stat().st_size
    data: bytes | None = None
    for name in _FONT_NAMES:
        dest = ultralytics_dir / name
        if dest.is_file() and dest.stat().st_size == size:
            continue
        if data is None:
            data = src.read_bytes()
        _atomic_write_bytes(dest, data)


def _write_settings_file(ultralytics_dir: Path, desired: dict[str, Any]) -> None:
    path = ultralytics_dir / "settings.json"
    current: dict[str, Any] = {}
    if path.is_file():
        with contextlib.suppress(ValueError, OSError):
            loaded = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                current = loaded
    merged = {
        "settings_version": _SETTINGS_VERSION,
        "uuid": "",  # only read by telemetry, which is off
        **current,
        **desired,
    }
    if merged != current:
        _atomic_write_bytes(path, json.dumps(merged, indent=2).encode("utf-8"))


def _patch_imported_ultralytics(desired: dict[str, Any], threads: int) -> None:
    """Apply the offline switches to an Ultralytics that was imported before we configured it."""
    utils = sys.modules["ultralytics.utils"]
    changed = {k: v for k, v in desired.items() if utils.SETTINGS.get(k) != v}
    if changed:
        utils.SETTINGS.update(changed)  # persists to the settings file chosen at import time
    # Module constants read from the environment at import time; each importer holds its own copy.
    for mod_name in ("ultralytics.utils", "ultralytics.utils.checks", "ultralytics.utils.events"):
        mod = sys.modules.get(mod_name)
        if mod is None:
            continue
        for name in ("ONLINE", "AUTOINSTALL"):
            if hasattr(mod, name):
                setattr(mod, name, False)
    events = sys.modules.get("ultralytics.utils.events")
    if events is not None and hasattr(events, "events"):
        events.events.enabled = False
    torch_utils = sys.modules.get("ultralytics.utils.torch_utils")
    if torch_utils is not None:
        # select_device() resets torch threads to this (cpu_count - 1, i.e. 1 on 2 cores).
        setattr(torch_utils, "NUM_THREADS", threads)  # noqa: B010
    # check_font() looks in the config dir bound at import time; give it the font there too.
    _install_fonts(Path(utils.USER_CONFIG_DIR))
    import logging

    logging.getLogger("ultralytics").setLevel(logging.ERROR)  # as YOLO_VERBOSE=false would


def configure_ultralytics(config_dir: Path, threads: int = 2) -> None:
    """Make Ultralytics offline, quiet and self-contained under ``config_dir``. Idempotent.

    Sets ``YOLO_OFFLINE=1``, ``YOLO_AUTOINSTALL=false``, ``YOLO_VERBOSE=false``,
    ``YOLO_CONFIG_DIR=config_dir``, ``OMP_NUM_THREADS=threads`` (``import ultralytics`` would
    set it to 1) and, unless already set, ``OMP_WAIT_POLICY=PASSIVE`` (only effective before torch
    is first imported), calls ``torch.set_num_threads(threads)``, writes
    ``<config_dir>/Ultralytics/settings.json`` (sync, Platform key, MLflow and every other logger
    integration off; datasets/weights/runs dirs under ``config_dir``) and copies DejaVuSans.ttf to
    ``<config_dir>/Ultralytics/Arial.ttf`` and ``Arial.Unicode.ttf``.

    Ultralytics binds its config dir and settings file at first import. If it is already imported,
    the same settings are applied to ``ultralytics.utils.SETTINGS`` in memory (which persists them
    to the file chosen at import time), its ``ONLINE``/``AUTOINSTALL`` constants are switched off
    and the font is also copied to the import-time config dir.
    """
    if threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}; fix train.threads in the config")
    config_dir = Path(config_dir).expanduser().resolve()
    ultralytics_dir = config_dir / "Ultralytics"  # get_user_config_dir() appends this
    ultralytics_dir.mkdir(parents=True, exist_ok=True)

    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "false"
    os.environ["YOLO_VERBOSE"] = "false"
    os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    # Spinning OpenMP workers collapse when any other process wants a core (measured on 2 cores:
    # 2 threads at 4-7 img/s vs 28-50 img/s passive). Read once, when torch is first imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Platform streaming also reads its key from the environment, not only from settings.
    os.environ.pop("ULTRALYTICS_API_KEY", None)

    desired = _desired_settings(config_dir)
    _install_fonts(ultralytics_dir)
    _write_settings_file(ultralytics_dir, desired)
    if "ultralytics.utils" in sys.modules:
        _patch_imported_ultralytics(desired, threads)

    import torch

    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# deny_network
# --------------------------------------------------------------------------------------------

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})


@dataclass(frozen=True)
class ConnectAttempt:
    """One refused connect: the API that was called and the address it was given."""

    api: str
    address: str


def _is_loopback(family: int, address: Any) -> bool:
    if family == getattr(socket, "AF_UNIX", object()):
        return True
    if isinstance(address, (str, bytes)):  # a Unix socket path handed to an AF_UNIX-less check
        return family not in (socket.AF_INET, socket.AF_INET6)
    if not isinstance(address, tuple) or not address:
        return False
    host = address[0]
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    host = host.strip("[]").split("%", 1)[0].lower()  # drop IPv6 brackets and zone ids
    if host in _LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        # A host name would need DNS (itself network access) to tell; refuse it.
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class _Guard:
    """Process-wide socket patches, installed while at least one `deny_network` is active."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.recorders: list[list[ConnectAttempt]] = []
        self.originals: dict[str, Callable[..., Any]] = {}

    def violation(self, api: str, address: Any) -> OfflineViolationError:
        attempt = ConnectAttempt(api=api, address=repr(address))
        with self.lock:
            for rec in self.recorders:
                rec.append(attempt)
        return OfflineViolationError(
            f"{api} to {address!r} refused: defect-loop runs offline (deny_network is active); "
            "only loopback and Unix sockets are allowed"
        )

    def install(self) -> None:
        orig_connect = socket.socket.connect
        orig_connect_ex = socket.socket.connect_ex
        orig_create = socket.create_connection
        self.originals = {
            "connect": orig_connect,
            "connect_ex": orig_connect_ex,
            "create_connection": orig_create,
        }
        guard = self

        def connect(sock: socket.socket, address: Any) -> None:
            if not _is_loopback(sock.family, address):
                raise guard.violation("socket.connect", address)
            orig_connect(sock, address)

        def connect_ex(sock: socket.socket, address: Any) -> int:
            if not _is_loopback(sock.family, address):
                raise guard.violation("socket.connect_ex", address)
            return orig_connect_ex(sock, address)

        def create_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
            # Checked before DNS so a remote host name is refused without a lookup.
            if not _is_loopback(socket.AF_INET, tuple(address)):
                raise guard.violation("socket.create_connection", address)
            return orig_create(address, *args, **kwargs)

        socket.socket.connect = connect  # type: ignore[method-assign,assignment]
        socket.socket.connect_ex = connect_ex  # type: ignore[method-assign,assignment]
        socket.create_connection = create_connection

    def uninstall(self) -> None:
        socket.socket.connect = self.originals["connect"]  # type: ignore[method-assign]
        socket.socket.connect_ex = self.originals["connect_ex"]  # type: ignore[method-assign]
        socket.create_connection = self.originals["create_connection"]
        self.originals = {}


_GUARD = _Guard()


@contextlib.contextmanager
def deny_network() -> Iterator[list[ConnectAttempt]]:
    """Refuse socket connects to non-loopback addresses while active; yield the attempts list.

    Patches ``socket.socket.connect``, ``socket.socket.connect_ex`` and
    ``socket.create_connection`` process-wide (all threads). Allowed: AF_UNIX, 127.0.0.0/8,
    ``::1`` (also IPv4-mapped) and the name ``localhost``; every other address, including any other
    host name, raises `OfflineViolationError` and appends a `ConnectAttempt` to the yielded list,
    even when the caller swallows the exception. Nesting is supported. DNS lookups and UDP
    ``sendto`` are not intercepted.
    """
    attempts: list[ConnectAttempt] = []
    with _GUARD.lock:
        if not _GUARD.recorders:
            _GUARD.install()
        _GUARD.recorders.append(attempts)
    try:
        yield attempts
    finally:
        with _GUARD.lock:
            # By identity: two empty lists compare equal.
            _GUARD.recorders[:] = [r for r in _GUARD.recorders if r is not attempts]
            if not _GUARD.recorders:
                _GUARD.uninstall()
