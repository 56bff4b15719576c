"""Integration fixtures: a real Label Studio server started through `loop.services`."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from loop.errors import ServiceError
from loop.services import (
    WEBHOOK_ENV,
    LabelStudioService,
    free_port,
    load_or_create_credentials,
)


@dataclass(frozen=True)
class LSServer:
    """A running Label Studio for tests. ``document_root``: the folder it may serve files from
    (storages must be SUBfolders of it)."""

    url: str
    token: str
    document_root: Path
    service: LabelStudioService
    first_start_s: float


@pytest.fixture(scope="session")
def ls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LSServer]:
    """Start Label Studio 1.23.2 in a temporary data folder on a free port; stop it at the end.

    The server's venv defaults to ~/.cache/defect-loop/ls-venv-1.23.2 (override with
    DEFECT_LOOP_LS_VENV) and is installed on first use (~60 s, needs the package index).
    Fails (does not skip) when it cannot be installed or started: CI must run these tests.
    """
    base = tmp_path_factory.mktemp("labelstudio")
    creds = load_or_create_credentials(base / "credentials.json")
    kwargs: dict[str, Any] = {}
    if os.environ.get("DEFECT_LOOP_LS_VENV"):
        kwargs["venv_dir"] = Path(os.environ["DEFECT_LOOP_LS_VENV"])
    # Webhook tests need Label Studio to call a loopback receiver: SSRF protection refuses that.
    svc = LabelStudioService.from_credentials(
        creds,
        base / "data",
        base / "root",
        port=free_port(),
        extra_env=dict(WEBHOOK_ENV),
        **kwargs,
    )
    try:
        svc.ensure_installed(progress=True)
    except ServiceError as exc:
        pytest.fail(f"could not install the Label Studio server for integration tests: {exc}")
    t0 = time.monotonic()
    try:
        svc.start(timeout_s=240)
    except ServiceError as exc:
        pytest.fail(f"could not start Label Studio for integration tests: {exc}")
    first_start_s = time.monotonic() - t0
    try:
        yield LSServer(svc.url, creds.api_token, svc.document_root, svc, first_start_s)
    finally:
        svc.stop()
