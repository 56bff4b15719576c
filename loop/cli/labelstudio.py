"""`defect-loop labelstudio ...`: set up the labelers' project and serve the webhook trigger.

Registered on the main app in `loop.cli.main` by ``app.add_typer(ls_app, name="labelstudio")``.

Commands:

- ``setup``: get or create the project from the config (classes, colours, instructions, the
  "most valuable first" view, local storage) and print its id and URL. Idempotent.
- ``webhook-serve``: listen for Label Studio annotation webhooks and run a pull (``--action
  pull``) or a whole cycle (``--action cycle``, the default) each time
  ``labelstudio.webhook_threshold`` new annotations arrived. The Label Studio SERVER must run
  with ``SSRF_PROTECTION_ENABLED=false`` to call a loopback URL. Polling (``defect-loop pull``,
  the count trigger of ``defect-loop serve``) stays the default way to notice new labels.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import typer

from loop.cli.common import ConfigOpt, console, run
from loop.config import DEFAULT_CONFIG_NAME, ProjectConfig, load_config

ls_app = typer.Typer(
    help="The Label Studio workbench: project set-up and the webhook trigger.",
    no_args_is_help=True,
)


@ls_app.command("setup")
def setup(config: ConfigOpt = Path(DEFAULT_CONFIG_NAME)) -> None:
    """Get or create the Label Studio project from the config (safe to repeat)."""
    from loop.project import Project

    def go() -> None:
        project = Project(load_config(config))
        with project.gateway() as gw:
            pid = project.ensure_ls_project(gw)
            info = gw.project_info(pid)
        console.print(
            f"Label Studio project {pid} {info['title']!r}: classes {info['classes']}, "
            f"polygons {'on' if info['polygons'] else 'off'}, "
            f"brush {'on' if info.get('brush') else 'off'}, "
            f"keypoints {'on' if info.get('keypoints') else 'off'}; "
            f"{project.cfg.labelstudio.url.rstrip('/')}/projects/{pid}"
        )

    run(go)


def make_callback(cfg_path: Path, action: Literal["cycle", "pull"]) -> Callable[[list[int]], None]:
    """What the webhook receiver runs when the threshold is reached (in its worker thread)."""
    lock = threading.Lock()

    def on_threshold(annotation_ids: list[int]) -> None:
        with lock:  # one at a time; the receiver queues the next batch meanwhile
            console.print(f"{len(annotation_ids)} new annotations: running {action}")
            if action == "pull":
                from loop.project import Project

                project = Project(load_config(cfg_path))
                with project.gateway() as gw:
                    out = project.pull(gw)
                console.print(
                    f"pull: {out.labeled} labels, {len(out.unlabeled)} dropped, "
                    f"new version {out.new_version or 'none'}"
                )
            else:
                # Prefect reads these when it is imported (as `defect-loop cycle` sets them).
                cfg = load_config(cfg_path)
                os.environ.setdefault("PREFECT_HOME", str(cfg.paths.prefect_home))
                for key in ("DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY"):
                    os.environ.setdefault(key, "true")
                os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
                from flows.cycle import cycle_flow

                cycle_flow(str(cfg_path), pull=True)

    return on_threshold


def webhook_url(cfg: ProjectConfig, port: int) -> str:
    """The URL Label Studio calls: ``labelstudio.webhook_url`` or the receiver's own."""
    ls = cfg.labelstudio
    return ls.webhook_url or f"http://{ls.webhook_host}:{port}/webhook"


@ls_app.command("webhook-serve")
def webhook_serve(
    config: ConfigOpt = Path(DEFAULT_CONFIG_NAME),
    action: Annotated[
        str, typer.Option(help="what a full batch of annotations runs: cycle or pull")
    ] = "cycle",
    threshold: Annotated[
        int | None, typer.Option(help="override labelstudio.webhook_threshold")
    ] = None,
    keep_webhook: Annotated[
        bool, typer.Option(help="leave the webhook registered in Label Studio on exit")
    ] = False,
) -> None:
    """Serve the webhook trigger until Ctrl-C (needs SSRF_PROTECTION_ENABLED=false on the
    Label Studio server for a loopback URL)."""
    from loop.project import Project
    from loop.webhooks import SECRET_HEADER, WebhookReceiver

    if action not in ("cycle", "pull"):
        console.print("[bold red]error:[/] --action must be 'cycle' or 'pull'")
        raise typer.Exit(2)
    mode: Literal["cycle", "pull"] = "pull" if action == "pull" else "cycle"

    def go() -> None:
        cfg = load_config(config)
        ls = cfg.labelstudio
        project = Project(cfg)
        secret = secrets.token_hex(16)
        with project.gateway() as gw:
            pid = project.ensure_ls_project(gw)
            receiver = WebhookReceiver(
                threshold or ls.webhook_threshold,
                make_callback(config, mode),
                host=ls.webhook_host,
                port=ls.webhook_port,
                project_id=pid,
                secret=secret,
            ).start()
            url = webhook_url(cfg, receiver.port)
            hook = gw.ensure_webhook(pid, url, headers={SECRET_HEADER: secret})
            console.print(
                f"listening on {receiver.url} (Label Studio calls {url}); running {mode} every "
                f"{receiver.counter.threshold} annotations of project {pid}; Ctrl-C to stop"
            )
            try:
                receiver.serve_forever()
            finally:
                if not keep_webhook:
                    gw.delete_webhook(hook)

    run(go)
