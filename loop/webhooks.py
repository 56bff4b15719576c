"""A small webhook receiver for Label Studio annotation events (stdlib `http.server`, no new deps).

Label Studio POSTs ``{"action": ..., "annotation": {...}, "project": {...}}`` for
``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED``, ``{"annotation": [...]}`` for
``ANNOTATIONS_CREATED`` (bulk import) and ``{"annotations": [{"id": ...}, ...]}`` for
``ANNOTATIONS_DELETED``. `AnnotationCounter` counts the distinct annotations submitted (created
or updated; cancelled ones, i.e. skips, do not count) since the last trigger, forgets deleted
ones, and once ``threshold`` is reached hands their ids to a callback and starts again.
`WebhookReceiver` serves that on a local port; the callback (e.g. a pull + cycle) runs in a
worker thread, never in the request, because Label Studio without Redis sends webhooks
synchronously inside the labeler's request and gives up after ``WEBHOOK_TIMEOUT`` (1 s).

Set-up (polling with `defect-loop pull` / the count trigger stays the default):

1. Label Studio refuses webhooks to loopback or private addresses unless the SERVER runs with
   ``SSRF_PROTECTION_ENABLED=false`` (``LabelStudioService(extra_env=...)``, or the environment
   of a server you run yourself).
2. Start the receiver, then register its URL on the project with
   `loop.labelstudio.LabelStudioGateway.ensure_webhook` (the ``webhook-serve`` command in
   `loop.cli.labelstudio` does both).

Nothing here talks to Label Studio and nothing imports Prefect.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from loop.errors import ConfigError, ServiceError

log = logging.getLogger(__name__)

CREATED = ("ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED")
DELETED = ("ANNOTATIONS_DELETED",)
SECRET_HEADER = "X-Defect-Loop-Secret"
_MAX_BODY = 20 * 1024 * 1024  # bytes; a bulk ANNOTATIONS_CREATED payload can be large


def _as_list(value: Any) -> list[Mapping[str, Any]]:
    if isinstance(value, Mapping):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, Mapping)]
    return []


class AnnotationCounter:
    """Counts distinct submitted annotations across webhook payloads (thread-safe, no I/O).

    ``threshold``: annotations that make `handle` return a batch. ``project_id``: ignore events
    of other projects (None: count all).
    """

    def __init__(self, threshold: int, project_id: int | None = None) -> None:
        if threshold < 1:
            raise ConfigError(f"webhook threshold must be >= 1, got {threshold}")
        self.threshold = int(threshold)
        self.project_id = project_id
        self._pending: dict[int, None] = {}  # insertion-ordered set of annotation ids
        self._lock = threading.Lock()
        self.events = 0
        self.triggers = 0

    @property
    def pending(self) -> int:
        """Annotations counted since the last trigger."""
        with self._lock:
            return len(self._pending)

    def _project_of(self, payload: Mapping[str, Any]) -> int | None:
        project = payload.get("project")
        if isinstance(project, Mapping) and project.get("id") is not None:
            return int(project["id"])
        for ann in _as_list(payload.get("annotation")) + _as_list(payload.get("annotations")):
            if ann.get("project") is not None:
                return int(ann["project"])
        return None

    def handle(self, payload: Mapping[str, Any]) -> list[int] | None:
        """Apply one webhook payload. Returns the annotation ids of a full batch (and resets the
        count) when the threshold is reached, else None. Unknown actions are ignored."""
        action = str(payload.get("action") or "")
        if self.project_id is not None:
            pid = self._project_of(payload)
            if pid is not None and pid != self.project_id:
                return None
        with self._lock:
            self.events += 1
            if action in CREATED:
                for ann in _as_list(payload.get("annotation")):
                    if ann.get("id") is None:
                        continue
                    if ann.get("was_cancelled"):
                        self._pending.pop(int(ann["id"]), None)
                    else:
                        self._pending.setdefault(int(ann["id"]), None)
            elif action in DELETED:
                for ann in _as_list(payload.get("annotations")):
                    if ann.get("id") is not None:
                        self._pending.pop(int(ann["id"]), None)
            else:
                return None
            if len(self._pending) < self.threshold:
                return None
            batch = list(self._pending)
            self._pending.clear()
            self.triggers += 1
            return batch


class WebhookReceiver:
    """An HTTP server on ``host:port`` (0: a free port) that feeds `AnnotationCounter` and runs
    ``callback(annotation_ids)`` in a worker thread each time ``threshold`` is reached.

    ``secret``: when set, requests must carry it in the ``X-Defect-Loop-Secret`` header (give
    the same value to `ensure_webhook`'s ``headers``). Use as a context manager or call `start`
    and `stop`. ``errors`` counts callbacks that raised (they are logged, never fatal).
    """

    def __init__(
        self,
        threshold: int,
        callback: Callable[[list[int]], None],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        path: str = "/webhook",
        project_id: int | None = None,
        secret: str | None = None,
    ) -> None:
        self.counter = AnnotationCounter(threshold, project_id)
        self.callback = callback
        self.host = host
        self.port = int(port)
        self.path = "/" + path.strip("/")
        self.secret = secret
        self.errors = 0
        self.calls = 0
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._jobs: queue.Queue[list[int] | None] = queue.Queue()
        self._idle = threading.Event()
        self._idle.set()

    @property
    def url(self) -> str:
        """The URL Label Studio should call, e.g. ``http://127.0.0.1:8765/webhook``."""
        return f"http://{self.host}:{self.port}{self.path}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                log.debug("webhook %s: " + format, self.address_string(), *args)

            def _reply(self, status: HTTPStatus, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.split("?")[0] in ("/health", receiver.path):
                    self._reply(HTTPStatus.OK, {"pending": receiver.counter.pending})
                else:
                    self._reply(HTTPStatus.NOT_FOUND, {"error": "not found"})

            def do_POST(self) -> None:
                if self.path.split("?")[0] != receiver.path:
                    self._reply(HTTPStatus.NOT_FOUND, {"error": "not found"})
                    return
                if receiver.secret is not None and self.headers.get(SECRET_HEADER) != (
                    receiver.secret
                ):
                    self._reply(HTTPStatus.FORBIDDEN, {"error": "bad secret"})
                    return
                length = int(self.headers.get("Content-Length") or 0)
                if length > _MAX_BODY:
                    self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "too large"})
                    return
                try:
                    payload = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    self._reply(HTTPStatus.BAD_REQUEST, {"error": "not JSON"})
                    return
                if not isinstance(payload, dict):
                    self._reply(HTTPStatus.BAD_REQUEST, {"error": "not a JSON object"})
                    return
                batch = receiver.counter.handle(payload)
                if batch is not None:
                    receiver._idle.clear()
                    receiver._jobs.put(batch)
                self._reply(HTTPStatus.OK, {"ok": True, "triggered": batch is not None})

        return Handler

    def _work(self) -> None:
        while True:
            batch = self._jobs.get()
            if batch is None:
                return
            try:
                self.callback(batch)
            except Exception:  # a failing callback must not stop the receiver
                self.errors += 1
                log.exception("webhook callback failed for %d annotations", len(batch))
            finally:
                self.calls += 1
                if self._jobs.empty():
                    self._idle.set()

    def start(self) -> WebhookReceiver:
        """Bind and serve in background threads. Raises `ServiceError` when the port is taken."""
        if self._server is not None:
            return self
        try:
            server = ThreadingHTTPServer((self.host, self.port), self._handler())
        except OSError as exc:
            raise ServiceError(
                f"cannot listen on {self.host}:{self.port} for webhooks ({exc}); choose another "
                "labelstudio.webhook_port"
            ) from exc
        server.daemon_threads = True
        self._server = server
        self.port = int(server.server_address[1])
        self._threads = [
            threading.Thread(target=server.serve_forever, name="webhook-http", daemon=True),
            threading.Thread(target=self._work, name="webhook-callback", daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    def wait_idle(self, timeout_s: float = 30.0) -> bool:
        """Wait until no callback runs or waits; True when idle within ``timeout_s`` seconds."""
        return self._idle.wait(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop serving; a running callback is given ``timeout_s`` seconds to finish."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._jobs.put(None)
        for t in self._threads:
            t.join(timeout_s)
        self._server = None
        self._threads = []

    def serve_forever(self, stop: threading.Event | None = None) -> None:
        """Block until ``stop`` is set (or Ctrl-C), then stop."""
        self.start()
        waiter = stop or threading.Event()
        try:
            while not waiter.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
