"""HTTP transport to a Label Studio server: calls, retries with backoff, errors, paging.

It uses label-studio-sdk 2.x (``from label_studio_sdk import LabelStudio``) for small calls and
its authenticated HTTP client directly for the bulk ones (import, export, task listings). Network
calls are retried with exponential backoff and jitter on connection errors, timeouts and HTTP
5xx, never on 4xx; a failure becomes `ServiceError` (unreachable) or `LabelStudioError`
(refused). The client is constructed in ``__init__``, never at import time.
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

from loop.errors import ConfigError, LabelStudioError, ServiceError

T = TypeVar("T")

PAGE_SIZE = 1000
_RETRIES = 4  # attempts after the first one
_BACKOFF_S = 0.5  # first wait; doubles each time
_JITTER = 0.5  # each wait is multiplied by a random factor in [1 - _JITTER, 1 + _JITTER]
BULK_TIMEOUT_S = 600.0  # bulk import/export calls may take minutes on large projects
# Data Manager query: tasks without a submitted (non-cancelled) annotation.
UNANNOTATED: dict[str, Any] = {
    "filters": {
        "conjunction": "and",
        "items": [
            {
                "filter": "filter:tasks:total_annotations",
                "operator": "equal",
                "type": "Number",
                "value": 0,
            }
        ],
    }
}


def _api_detail(exc: ApiError) -> str:
    body = exc.body
    if isinstance(body, dict):
        parts = [str(body.get("detail") or "")]
        if body.get("validation_errors"):
            parts.append(str(body["validation_errors"]))
        text = " ".join(p for p in parts if p)
        return text or str(body)
    return str(body)[:500]


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):  # connect errors, timeouts, dropped connections
        return True
    if isinstance(exc, ApiError):
        return exc.status_code is None or exc.status_code >= 500
    return False


def _backoff(attempt: int) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): exponential with random jitter."""
    return _BACKOFF_S * 2**attempt * random.uniform(1.0 - _JITTER, 1.0 + _JITTER)


@contextlib.contextmanager
def progress_bar(
    total: int, description: str, enabled: bool | None
) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr; ``enabled=None`` shows it only when stderr is a TTY."""
    show = (sys.stderr.isatty() if enabled is None else enabled) and total > 0
    if not show:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        tid = bar.add_task(description, total=total)
        yield lambda n: bar.advance(tid, n)


class Transport:
    """The connection to one Label Studio server, with retries (see the module docstring).

    ``url``: base URL such as ``http://127.0.0.1:8080``. ``api_token``: a legacy token (sent as
    ``Authorization: Token ...``) or a personal access token (JWT; the SDK refreshes it).
    ``timeout_s``: per-request timeout in seconds (bulk import/export calls get more).
    """

    def __init__(self, url: str, api_token: str, timeout_s: float = 30) -> None:
        if not api_token:
            raise ConfigError(
                "no Label Studio API token: set DEFECT_LOOP_LABELSTUDIO__API_TOKEN (or run "
                "`defect-loop services up`, which creates one)"
            )
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        # The SDK's own retries are off: `_call` retries (also on timeouts, which the SDK does not).
        self._client = LabelStudio(
            base_url=self.url, api_key=api_token, timeout=timeout_s, max_retries=0
        )
        self._users: dict[int, str] | None = None

    def _call(
        self,
        what: str,
        fn: Callable[[], T],
        before_retry: Callable[[], None] | None = None,
    ) -> T:
        """Run ``fn``; retry transient failures with backoff and jitter; turn SDK errors into
        ours (`ServiceError` when unreachable, `LabelStudioError` when refused)."""
        attempt = 0
        while True:
            try:
                return fn()
            except (httpx.TransportError, ApiError) as exc:
                if not (_retryable(exc) and attempt < _RETRIES):
                    raise self._translate(what, exc) from exc
            time.sleep(_backoff(attempt))
            attempt += 1
            if before_retry is not None:
                before_retry()

    def _translate(self, what: str, exc: httpx.TransportError | ApiError) -> Exception:
        if isinstance(exc, httpx.TransportError):
            return ServiceError(
                f"Label Studio at {self.url} is unreachable while trying to {what} "
                f"({type(exc).__name__}: {exc}); start it with `defect-loop services up` "
                "or check labelstudio.url"
            )
        if exc.status_code in (401, 403):
            return LabelStudioError(
                f"Label Studio refused the API token while trying to {what} "
                f"(HTTP {exc.status_code}: {_api_detail(exc)}); check "
                "DEFECT_LOOP_LABELSTUDIO__API_TOKEN and that legacy tokens are enabled"
            )
        return LabelStudioError(
            f"Label Studio refused to {what} (HTTP {exc.status_code}): {_api_detail(exc)}"
        )

    def _raw(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        timeout_s: float | None = None,
    ) -> httpx.Response:
        """One authenticated request through the SDK's HTTP client (no SDK models: fast for bulk
        payloads). Raises ``ApiError`` for HTTP >= 400, httpx errors for transport failures."""
        wrapper = self._client._client_wrapper
        headers = dict(wrapper.get_headers())
        content: bytes | None = None
        if body is not None:
            content = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        resp = wrapper.httpx_client.httpx_client.request(
            method,
            f"{self.url}/{path.lstrip('/')}",
            params=dict(params) if params else None,
            content=content,
            headers=headers,
            timeout=timeout_s or self.timeout_s,
        )
        if resp.status_code >= 400:
            try:
                detail: Any = resp.json()
            except ValueError:
                detail = resp.text
            raise ApiError(status_code=resp.status_code, headers=dict(resp.headers), body=detail)
        return resp

    def _json(
        self,
        what: str,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        body: Any = None,
        timeout_s: float | None = None,
        before_retry: Callable[[], None] | None = None,
    ) -> Any:
        def go() -> Any:
            resp = self._raw(method, path, params=params, body=body, timeout_s=timeout_s)
            if resp.status_code == 204 or not resp.content:
                return None
            try:
                return resp.json()
            except ValueError as exc:
                raise LabelStudioError(
                    f"Label Studio answered {what} with something that is not JSON: {exc}"
                ) from exc

        return self._call(what, go, before_retry=before_retry)

    def close(self) -> None:
        """Close the underlying HTTP connection pool."""
        self._client._client_wrapper.httpx_client.httpx_client.close()

    def _list_tasks_raw(
        self,
        project_id: int,
        include: str,
        *,
        fields: str = "task_only",
        query: dict[str, Any] | None = None,
        page_size: int = PAGE_SIZE,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Tasks of the project as plain dicts holding the ``include`` fields, paged; ``query``
        is a Data Manager ``{"filters", "ordering"}`` document. At most ``limit`` tasks."""
        out: list[dict[str, Any]] = []
        page = 1
        while True:
            params: dict[str, Any] = {
                "project": int(project_id),
                "fields": fields,
                "include": include,
                "page": page,
                "page_size": page_size if limit is None else min(page_size, limit),
            }
            if query:
                params["query"] = json.dumps(query)
            try:
                body = self._json("list tasks", "GET", "api/tasks", params=params)
            except LabelStudioError as exc:
                cause = exc.__cause__
                if page > 1 and isinstance(cause, ApiError) and cause.status_code == 404:
                    break  # past the last page
                raise
            tasks = list((body or {}).get("tasks") or [])
            out.extend(tasks)
            total = int((body or {}).get("total") or 0)
            if not tasks or len(out) >= total or (limit is not None and len(out) >= limit):
                break
            page += 1
        return out if limit is None else out[:limit]
