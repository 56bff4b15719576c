"""Benchmark: the gateway's push and pull against one raw bulk call of the same payload.

Starts its own Label Studio 1.23.2 (temporary data folder, free port; the server venv of
`loop.services`), then:

- push: `LabelStudioGateway.push` of N tasks with B-box predictions into a new project, versus one
  raw ``POST /api/projects/<id>/import`` of the same JSON into another new project;
- pull: N tasks imported with their annotations (B boxes each), then `LabelStudioGateway.pull`
  (full: every annotated task) versus one raw ``GET /api/projects/<id>/export?exportType=JSON``
  (response parsed as JSON); each timed ``--repeat`` times, alternating, best time kept;
- pull_incremental_noop_s: a pull with the cursor of the previous one and nothing changed.

Prints ONE JSON line: ``{"tasks", "boxes", "push_s", "push_raw_s", "push_ratio", "pull_s",
"pull_raw_s", "pull_ratio", "pull_incremental_noop_s", ...}`` (seconds; ratio = gateway / raw,
goal <= 1.2). Run: ``.venv/bin/python bench/labelstudio_sync.py [--tasks 10000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from loop.detections import Detections
from loop.formats.labelstudio import detections_to_ls_results
from loop.labelstudio import LabelStudioGateway, PushItem
from loop.services import LABEL_STUDIO_VERSION, LabelStudioService, free_port

CLASSES = ["scratch", "pit", "crack", "patch"]
WH = (640, 480)


def make_items(n: int, boxes: int, seed: int = 0) -> list[PushItem]:
    """N images with ``boxes`` random pixel boxes each (with confidences), most valuable first."""
    rng = np.random.default_rng(seed)
    w, h = WH
    x1 = rng.uniform(0, w * 0.7, (n, boxes))
    y1 = rng.uniform(0, h * 0.7, (n, boxes))
    x2 = np.minimum(x1 + rng.uniform(5, w * 0.3, (n, boxes)), w)
    y2 = np.minimum(y1 + rng.uniform(5, h * 0.3, (n, boxes)), h)
    cls = rng.integers(0, len(CLASSES), (n, boxes))
    conf = rng.uniform(0.25, 0.95, (n, boxes))
    prio = np.sort(rng.uniform(0, 5, n))[::-1]
    return [
        PushItem(
            f"{i:064x}",
            f"/data/local-files/?d=images/{i:06d}.png",
            Detections(np.stack([x1[i], y1[i], x2[i], y2[i]], 1), cls[i], WH, confidence=conf[i]),
            float(prio[i]),
        )
        for i in range(n)
    ]


def annotated_payload(items: list[PushItem], model_version: str) -> list[dict[str, Any]]:
    """Tasks with a prediction and a submitted annotation (the labeler moved every box 1 px)."""
    out = []
    for k, it in enumerate(items):
        task = LabelStudioGateway._task_payload(it, model_version, CLASSES)
        final = Detections(
            np.clip(it.detections.xyxy + 1.0, 0, [WH[0], WH[1], WH[0], WH[1]]),
            it.detections.class_id,
            WH,
        )
        task["annotations"] = [
            {"result": detections_to_ls_results(final, CLASSES), "lead_time": 5.0 + k % 30}
        ]
        out.append(task)
    return out


def raw_import(url: str, token: str, project_id: int, payload: list[dict[str, Any]]) -> float:
    headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}
    t0 = time.perf_counter()
    r = httpx.post(
        f"{url}/api/projects/{project_id}/import",
        params={"return_task_ids": "true"},
        content=json.dumps(payload).encode(),
        headers=headers,
        timeout=1800,
    )
    r.raise_for_status()
    dt = time.perf_counter() - t0
    if len(r.json()["task_ids"]) != len(payload):
        raise SystemExit("raw import created a different number of tasks")
    return dt


def raw_export(url: str, token: str, project_id: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = httpx.get(
        f"{url}/api/projects/{project_id}/export",
        params={"exportType": "JSON"},
        headers={"Authorization": f"Token {token}"},
        timeout=1800,
    )
    r.raise_for_status()
    n = len(json.loads(r.content))
    return time.perf_counter() - t0, n


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--boxes", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=500, help="tasks per import call (push)")
    ap.add_argument("--repeat", type=int, default=2, help="timings of each pull variant")
    ap.add_argument("--keep", action="store_true", help="keep the temporary data folder")
    args = ap.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="defect-loop-bench-ls-"))
    venv = os.environ.get("DEFECT_LOOP_LS_VENV")
    token = os.urandom(16).hex()
    svc = LabelStudioService(
        base / "data",
        base / "root",
        "bench@defect-loop.local",
        os.urandom(12).hex(),
        token,
        port=free_port(),
        **({"venv_dir": Path(venv)} if venv else {}),
    )
    svc.ensure_installed(progress=True)
    t0 = time.perf_counter()
    svc.start(timeout_s=300)
    start_s = time.perf_counter() - t0
    result: dict[str, Any] = {}
    try:
        items = make_items(args.tasks, args.boxes)
        with LabelStudioGateway(svc.url, token, timeout_s=60) as gw:
            # --- push: gateway vs one raw import of the same payload ----------------------
            pid = gw.ensure_project("bench push", CLASSES, "bench")
            t0 = time.perf_counter()
            summary = gw.push(
                pid, items, "bench-1", CLASSES, batch_size=args.batch_size, progress=False
            )
            push_s = time.perf_counter() - t0
            if summary.created != args.tasks:
                raise SystemExit(f"push created {summary.created} of {args.tasks} tasks")
            raw_pid = gw.ensure_project("bench push raw", CLASSES, "bench")
            payload = [gw._task_payload(it, "bench-1", CLASSES) for it in items]
            push_raw_s = raw_import(svc.url, token, raw_pid, payload)

            # --- pull: gateway (full) vs one raw export --------------------------------------
            pull_pid = gw.ensure_project("bench pull", CLASSES, "bench")
            raw_import(svc.url, token, pull_pid, annotated_payload(items, "bench-1"))
            pulls, raws = [], []
            cursor = None
            n_labels = 0
            for _ in range(max(1, args.repeat)):
                dt, n_raw = raw_export(svc.url, token, pull_pid)
                raws.append(dt)
                t0 = time.perf_counter()
                res = gw.pull(pull_pid, CLASSES)
                pulls.append(time.perf_counter() - t0)
                n_labels, cursor = len(res.labels), res.cursor
                if n_labels != args.tasks or n_raw != args.tasks or res.rejected:
                    raise SystemExit(
                        f"pull gave {n_labels} labels, {len(res.rejected)} rejected; "
                        f"raw export {n_raw} tasks"
                    )
            t0 = time.perf_counter()
            noop = gw.pull(pull_pid, CLASSES, since=cursor)
            noop_s = time.perf_counter() - t0
            if noop.labels:
                raise SystemExit("an incremental pull with nothing changed returned labels")
        result = {
            "bench": "labelstudio_sync",
            "tasks": args.tasks,
            "boxes": args.boxes,
            "batch_size": args.batch_size,
            "push_s": round(push_s, 2),
            "push_raw_s": round(push_raw_s, 2),
            "push_ratio": round(push_s / push_raw_s, 3),
            "pull_s": round(min(pulls), 2),
            "pull_raw_s": round(min(raws), 2),
            "pull_ratio": round(min(pulls) / min(raws), 3),
            "pull_runs_s": [round(x, 2) for x in pulls],
            "pull_raw_runs_s": [round(x, 2) for x in raws],
            "pull_incremental_noop_s": round(noop_s, 3),
            "server_start_s": round(start_s, 1),
            "label_studio": LABEL_STUDIO_VERSION,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        }
    finally:
        svc.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
