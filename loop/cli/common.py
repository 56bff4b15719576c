"""What every `defect-loop` command module shares: the console, the --config option, error
handling, the process environment for Prefect, the local Label Studio service and how a cycle's
outcome is printed. The command modules (`loop.cli.datasets`, `loop.cli.demo`, ...) import it;
it imports none of them.

Failures are clean: `run` turns any exception into one line on the console and a non-zero exit
code, and appends the traceback to the log file (``<workspace>/logs/defect-loop.log``, or
``~/.cache/defect-loop/logs/defect-loop.log`` before a workspace is known or when it cannot be
written). `prepare` checks, before any flow starts, what a command needs: a writable workspace,
Label Studio and MLflow reachable; so that those failures take a second, not minutes of retries.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import click
import typer
from rich.console import Console
from rich.markup import escape

from loop.config import ProjectConfig, load_config
from loop.errors import ConfigError, DefectLoopError, ServiceError, printable
from loop.services import (
    Credentials,
    LabelStudioService,
    PrefectService,
    TemporaryPrefectServer,
    load_or_create_credentials,
)
from loop.workspace import LOG_NAME

T = TypeVar("T")

console = Console(soft_wrap=True)

ConfigOpt = Annotated[
    Path,
    typer.Option("--config", "-c", help="project YAML file", envvar="DEFECT_LOOP_CONFIG"),
]

_log_path: Path | None = None  # the workspace's log file, once a config is loaded
_PREFLIGHT_TIMEOUT_S = 5.0


def safe(text: object) -> str:
    """``text`` from outside (a file name, a label, a reason) as it may be printed on the
    console: control characters (newlines, terminal escapes) shown as ``\\n``, ``\\x1b``, ...,
    and Rich markup (``[red]``) escaped, so it can neither break lines nor restyle the output."""
    return escape(printable(text))


def fallback_log_path() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "defect-loop" / "logs" / LOG_NAME


def log_path() -> Path:
    """Where tracebacks go: the workspace's log file, else the user's cache folder."""
    return _log_path or fallback_log_path()


def _use_workspace_log(cfg: ProjectConfig) -> None:
    global _log_path
    path = cfg.paths.log_file
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a"):
            pass
    except OSError:
        return  # unwritable workspace: keep the fallback (require_writable says so)
    _log_path = path


def _append_log(text: str) -> Path | None:
    for path in dict.fromkeys((log_path(), fallback_log_path())):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                f.write(text)
            return path
        except OSError:
            continue
    return None


def log_exception(exc: BaseException) -> Path | None:
    """Append ``exc`` with its traceback and the command line to the log file; its path."""
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return _append_log(f"\n=== {stamp} pid {os.getpid()}: {' '.join(sys.argv)}\n{tb}")


def load(config: Path) -> ProjectConfig:
    cfg = load_config(config)
    _use_workspace_log(cfg)
    return cfg


def run(fn: Callable[[], T]) -> T:
    """Call ``fn``; any failure becomes ONE line on the console and a non-zero exit code, with
    the traceback in the log file (`log_path`): exit 2 for a `DefectLoopError` (its message
    says what to do), 1 for anything else, 130 when interrupted."""
    try:
        return fn()
    except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
        raise
    except DefectLoopError as exc:
        log_exception(exc)
        console.print(f"[bold red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]")
        raise typer.Exit(130) from None
    except Exception as exc:
        where = log_exception(exc)
        first = (str(exc).strip().splitlines() or [""])[0]
        details = f" (traceback in {where})" if where is not None else ""
        console.print(f"[bold red]error:[/] {type(exc).__name__}: {safe(first)}{details}")
        raise typer.Exit(1) from None


# --------------------------------------------------------------------------------------------
# preflight checks
# --------------------------------------------------------------------------------------------


def require_writable(cfg: ProjectConfig) -> None:
    """Raise `ConfigError` unless the workspace folder can be created and written."""
    ws = cfg.workspace
    probe = ws / f".write-test-{os.getpid()}"
    try:
        ws.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"the workspace {ws} cannot be written ({reason}); fix its permissions or set "
            "`workspace` in the config to a folder you can write"
        ) from exc


def _reachable(url: str) -> str | None:
    """None when ``url`` answers (any HTTP status), else why not."""
    import httpx

    try:
        httpx.get(url, timeout=_PREFLIGHT_TIMEOUT_S)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return None


def check_labelstudio(cfg: ProjectConfig) -> None:
    """Raise `ServiceError` at once when Label Studio does not answer at ``labelstudio.url``."""
    url = cfg.labelstudio.url.rstrip("/")
    why = _reachable(f"{url}/health")
    if why is not None:
        raise ServiceError(
            f"Label Studio at {url} is unreachable ({why}); start it with `defect-loop services "
            "up` or fix labelstudio.url"
        )


def check_mlflow(cfg: ProjectConfig) -> None:
    """Raise `ServiceError` at once when an MLflow tracking server (``http(s)://`` tracking URI)
    does not answer; a local SQLite store needs only the writable workspace."""
    uri = cfg.mlflow_uri
    if not uri.startswith(("http://", "https://")):
        return
    why = _reachable(f"{uri.rstrip('/')}/health")
    if why is not None:
        raise ServiceError(
            f"MLflow at {uri} is unreachable ({why}); start the tracking server or fix "
            "mlflow.tracking_uri"
        )


def prepare(cfg: ProjectConfig, *, labelstudio: bool = False, mlflow: bool = False) -> None:
    """Before a command that writes the workspace runs a flow: check the workspace is writable,
    and the services it needs answer, then set up Prefect (`prefect_env`)."""
    require_writable(cfg)
    if labelstudio:
        check_labelstudio(cfg)
    if mlflow:
        check_mlflow(cfg)
    prefect_env(cfg)


# --------------------------------------------------------------------------------------------
# Prefect
# --------------------------------------------------------------------------------------------


def prefect_service(cfg: ProjectConfig) -> PrefectService:
    """The project's local Prefect server: home ``<workspace>/prefect-server``, ``prefect.port``."""
    return PrefectService(home=cfg.paths.prefect_server, port=cfg.prefect.port)


def local_api_url(cfg: ProjectConfig) -> str | None:
    """The API URL of the project's local Prefect server when it runs and is healthy."""
    svc = prefect_service(cfg)
    status = svc.status()
    return svc.api_url if status["running"] and status["healthy"] else None


_temporary_server: TemporaryPrefectServer | None = None


def prefect_env(cfg: ProjectConfig) -> None:
    """Prefect reads these when it is imported: set them before any flow module loads.

    Runs go to ``PREFECT_API_URL`` when set, else to the project's local Prefect server when it
    runs, else to a temporary server of this command's own that dies with it (even on
    ``kill -9``; see `TemporaryPrefectServer`). Prefect's console output then shows no
    tracebacks: they go to the log file (`log_path`)."""
    global _temporary_server
    os.environ.setdefault("PREFECT_HOME", str(cfg.paths.prefect_home))
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    if "PREFECT_API_URL" not in os.environ:
        url = local_api_url(cfg)
        if url is None and _temporary_server is None:
            home = Path(os.environ["PREFECT_HOME"])
            server = TemporaryPrefectServer(log_file=home / "temporary-server.log")
            url = server.start()
            _temporary_server = server
            atexit.register(server.stop)
            # Its UI is off and it ends with the command: no "View at <url>" links to it.
            os.environ.setdefault("PREFECT_UI_URL", "")
        if url:
            os.environ["PREFECT_API_URL"] = url
    quiet_prefect_console()


class _NoTraceback(logging.Formatter):
    """Formats like ``inner`` but without the traceback (that goes to the log file)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        if not (record.exc_info or record.exc_text or record.stack_info):
            return self.inner.format(record)
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def quiet_prefect_console() -> None:
    """Set up Prefect's logging, then keep tracebacks off its console handler and send every
    record (tracebacks included) to the log file."""
    import prefect.main  # noqa: F401  (configures Prefect's logging on import)

    root = logging.getLogger()
    for handler in root.handlers:
        fmt = handler.formatter
        console_handler = type(handler).__name__ == "PrefectConsoleHandler"
        if console_handler and fmt is not None and not isinstance(fmt, _NoTraceback):
            handler.setFormatter(_NoTraceback(fmt))
    target = str(log_path())
    if not any(getattr(h, "baseFilename", None) == target for h in root.handlers):
        try:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            file_handler = logging.FileHandler(target, encoding="utf-8")
        except OSError:
            return
        file_handler.setLevel(logging.INFO)
        file_handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        root.addHandler(file_handler)


def jsonable(obj: Any) -> Any:
    """Dataclasses, dicts, sequences and paths -> plain JSON-able values."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return {k: jsonable(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# --------------------------------------------------------------------------------------------
# the local Label Studio, and what a cycle printed
# --------------------------------------------------------------------------------------------


def labelstudio_service(cfg: ProjectConfig) -> tuple[LabelStudioService, Credentials]:
    """The local Label Studio server of ``cfg`` (data in ``<workspace>/labelstudio``, the
    workspace as its document root) and its credentials (created on first use). Raises
    `DefectLoopError` when ``labelstudio.url`` is not on this machine."""
    from urllib.parse import urlparse

    url = urlparse(cfg.labelstudio.url)
    if url.hostname not in {"127.0.0.1", "localhost"}:
        raise DefectLoopError(
            f"labelstudio.url {cfg.labelstudio.url} is not local: `services` only manages a "
            "Label Studio on 127.0.0.1; manage a remote one yourself"
        )
    creds = load_or_create_credentials(
        cfg.paths.labelstudio_credentials, username=cfg.labelstudio.username
    )
    return LabelStudioService(
        data_dir=cfg.paths.labelstudio,
        document_root=cfg.workspace,
        port=url.port or 8080,
        username=creds.username,
        password=creds.password,
        api_token=creds.api_token,
    ), creds


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def print_consensus(out: Any) -> None:
    """The consensus lines of a pull (a `loop.sync.PullOutcome`): merged, waiting, the review
    queue with its Label Studio view, and annotations left out."""
    if out.merged:
        console.print(f"consensus: {out.merged} labels merged from agreeing annotators")
    if out.waiting:
        console.print(f"consensus: {out.waiting} overlap tasks wait for more annotators")
    if out.review or out.review_new:
        where = f": {out.review_url}" if out.review_url else ""
        console.print(
            f"review queue: {out.review} tasks whose annotators disagree ({out.review_new} new); "
            f"a lead submits the resolved annotation as ground truth in Label Studio{where}"
        )
    for note in out.notes:
        console.print(f"  [yellow]note[/] {safe(note)}")


def print_cycle(out: Any) -> None:
    """One line per step of a cycle's outcome (a `flows.cycle.CycleOutcome`), or why it was
    skipped."""
    if getattr(out, "skipped", None):
        console.print(f"[yellow]{out.skipped}[/]")
        return
    if out.pull is not None:
        console.print(
            f"pull: {out.pull.labeled} labeled, new version {out.pull.new_version or 'none'}, "
            f"{out.pull.open_rejections} tasks rejected (`defect-loop rejections`)"
        )
        print_consensus(out.pull)
    if out.train is not None:
        t = out.train
        console.print(
            f"train: model v{t.model_version} val mAP50 {t.val_map50:.3f} "
            f"test mAP50 {_fmt(t.test_map50)} mAP50-95 {_fmt(t.test_map50_95)}"
            + (
                f", mask mAP50 {_fmt(t.test_mask_map50)} mAP50-95 {_fmt(t.test_mask_map50_95)}"
                if t.test_mask_map50 is not None
                else ""
            )
            + f"; {'promoted' if t.promoted else 'not promoted'} ({t.reason})"
        )
    s = out.push
    console.print(
        f"push: {s.created} created, {s.refreshed} refreshed, {s.skipped} skipped, "
        f"{s.failed} failed"
    )
    if getattr(out, "report", None):
        console.print(f"report: {out.report[0]}")
    review = getattr(out, "review", None)
    if review is not None:
        if review.push is None:
            console.print(f"review-labels: skipped ({review.skipped})")
        else:
            r = review.push
            console.print(
                f"review-labels: {r.flagged} tasks marked, {r.created} created, {r.failed} "
                'failed (Label Studio view "Label review")'
            )
