"""Benchmark: does the loop lose or forge labels under random, hostile operations and restarts?

Starts its own Label Studio 1.23.2 (temporary data folder, free port; the server venv of
`loop.services`), makes a defect-loop workspace below its document root with synthetic images
(the test split labeled by an explicit import, as the frozen test set), pushes the others in
chunks with `Project.push`, then plays ``--operations`` random operations straight against the
Label Studio API, as labelers and scripts would:

- normal (about 90 %): create, update and delete annotations, skip a task (a cancelled
  annotation), defect-free submissions, by several annotators; restore a forged task;
- hostile (about 10 %): malformed region values (rotation or size as text, ``value`` a list,
  unknown label, zero area, rotated, outside the image, defect-free with regions), forged task
  data (``data.sha256`` set to a test image's or another image's hash, ``data.image`` swapped),
  and huge region counts (more than ``labelstudio.max_regions``).

Every ``--pull-every`` operations `Project.pull` runs, and Label Studio is stopped and started
again ``--restarts`` times in the middle (each restart is followed by a push of fresh images).
After each pull the current dataset version is compared with an expectation computed here, from
the operations alone: per task, the latest submitted annotation decides when it is valid and
the task data is intact: with one annotator it is the label; with several, each annotator's
latest usable annotation goes through the consensus rule (`loop.consensus.decide`, defaults:
agreement >= 0.7 merges by box fusion, below sends the task to the review queue and the image
has no label); when the latest annotation is hostile or the task is forged the task must be
reported as rejected and its image keep the label it had; with no submitted annotation left
the image has no label; test-split labels never change.

Prints ONE JSON line: ``operations``, ``hostile``, ``pulls``, ``pushes``, ``restarts``, ``lost``
(expected labels that are missing, summed over pulls), ``wrong`` (labels that differ, or that
should not be there), ``crashes`` (pulls or pushes that raised), ``rejected`` (tasks that had
to be reported as rejected, summed over pulls), ``rejected_reported`` (those of them listed by
`Project.rejections`), ``rejected_unexpected`` (listed but not expected), plus timings. Goal:
``lost == wrong == crashes == 0`` and ``rejected_reported == rejected``. The same dict is
written to ``<results>/reliability.json`` (``reliability_smoke.json`` with ``--smoke``).

Run: ``nice .venv/bin/python bench/reliability.py`` (1,000 operations, 2 restarts; meant to take
about 10 minutes on 2 cores) or with ``--smoke`` (100 operations, 1 restart, 40 images: about
2.5 minutes with the server start).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from loop.annotation_log import AnnotationRecord
from loop.config import load_config
from loop.consensus import decide
from loop.datasets import assign_split
from loop.detections import Detections
from loop.project import Project, ScoredImage
from loop.services import LABEL_STUDIO_VERSION, LabelStudioService, free_port
from loop.synth import SYNTH_CLASSES, write_dataset

CLASSES = list(SYNTH_CLASSES)
SIZE = 64
MAX_REGIONS = 1000
REPO = Path(__file__).resolve().parents[1]
# Generous: the first start migrates a database, and a busy 2-core machine can take minutes.
START_TIMEOUT_S = 900

Box = tuple[int, float, float, float, float]  # class id, x1, y1, x2, y2 (pixels)

HOSTILE_VALUES = (
    "rotation_text",
    "value_list",
    "original_width_text",
    "x_text",
    "unknown_label",
    "zero_area",
    "rotated",
    "outside",
    "defect_free_with_regions",
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- Label Studio results, written here (not with the loop's converters) ----------------------
def region(box: Box, rid: str) -> dict[str, Any]:
    c, x1, y1, x2, y2 = box
    return {
        "id": rid,
        "type": "rectanglelabels",
        "from_name": "label",
        "to_name": "image",
        "original_width": SIZE,
        "original_height": SIZE,
        "image_rotation": 0,
        "value": {
            "x": x1 / SIZE * 100,
            "y": y1 / SIZE * 100,
            "width": (x2 - x1) / SIZE * 100,
            "height": (y2 - y1) / SIZE * 100,
            "rotation": 0,
            "rectanglelabels": [CLASSES[c]],
        },
    }


def random_boxes(rng: random.Random) -> list[Box]:
    if rng.random() < 0.15:
        return []  # a defect-free image
    out = []
    for _ in range(rng.randint(1, 4)):
        x1, y1 = rng.randint(0, SIZE - 8), rng.randint(0, SIZE - 8)
        x2, y2 = rng.randint(x1 + 2, SIZE), rng.randint(y1 + 2, SIZE)
        out.append((rng.randrange(len(CLASSES)), float(x1), float(y1), float(x2), float(y2)))
    return out


def valid_result(boxes: list[Box], rng: random.Random) -> list[dict[str, Any]]:
    return [region(b, f"r{rng.getrandbits(40):x}") for b in boxes]


def hostile_result(kind: str, rng: random.Random) -> list[dict[str, Any]]:
    r = region((0, 8.0, 8.0, 24.0, 24.0), f"h{rng.getrandbits(40):x}")
    v = r["value"]
    if kind == "huge":
        n = rng.randint(MAX_REGIONS + 1, MAX_REGIONS + 400)
        return [region((i % len(CLASSES), 1.0, 1.0, 3.0, 3.0), f"h{i}") for i in range(n)]
    if kind == "rotation_text":
        v["rotation"] = "abc"
    elif kind == "value_list":
        r["value"] = [v["x"], v["y"]]
    elif kind == "original_width_text":
        r["original_width"] = "abc"
    elif kind == "x_text":
        v["x"] = "abc"
    elif kind == "unknown_label":
        v["rectanglelabels"] = ["dent"]
    elif kind == "zero_area":
        v["width"] = 0
    elif kind == "rotated":
        v["rotation"] = 15
    elif kind == "outside":
        v["x"], v["width"] = 95.0, 20.0
    elif kind == "defect_free_with_regions":
        verdict = {
            "type": "choices",
            "from_name": "verdict",
            "to_name": "image",
            "value": {"choices": ["defect-free"]},
        }
        return [verdict, r]
    return [r]


# --- the expectation --------------------------------------------------------------------------
@dataclass
class Ann:
    id: int
    result: list[dict[str, Any]]
    boxes: list[Box] | None  # None: hostile (unusable)
    cancelled: bool
    seq: int  # order of the last successful change (Label Studio's updated_at order)
    user: int  # completed_by


@dataclass
class TaskModel:
    task_id: int
    sha: str
    data: dict[str, Any]  # as pushed
    anns: dict[int, Ann] = field(default_factory=dict)
    forged: bool = False
    holds: list[Box] | None = None  # what the dataset must hold for ``sha`` (None: no label)

    def judge(self) -> bool:
        """Apply one pull to ``holds``; True when the task must be reported as rejected."""
        live = [a for a in self.anns.values() if not a.cancelled]
        if not live:
            self.holds = None
            return False
        chosen = max(live, key=lambda a: a.seq)
        if self.forged or chosen.boxes is None:
            return True  # rejected: the image keeps what it had
        # Each annotator's latest annotation, in the order the pull meets the annotators.
        latest: dict[int, Ann] = {}
        for a in sorted(live, key=lambda a: a.seq):
            latest[a.user] = a
        wh = (SIZE, SIZE)
        records = [
            AnnotationRecord(str(u), a.id, _detections(a.boxes, wh))
            for u, a in latest.items()
            if a.boxes is not None  # another annotator's hostile annotation: left out
        ]
        decision = decide(records)
        ref = decision.reference
        self.holds = None if ref is None else _boxes(ref)
        return False


def _detections(boxes: list[Box], wh: tuple[int, int]) -> Detections:
    arr = np.asarray([b[1:] for b in boxes], dtype=np.float64).reshape(-1, 4)
    return Detections(arr, np.asarray([b[0] for b in boxes], dtype=np.int64), wh)


def _boxes(det: Detections) -> list[Box]:
    return [
        (int(c), *(float(v) for v in xyxy))  # type: ignore[misc]
        for xyxy, c in zip(det.xyxy.tolist(), det.class_id.tolist(), strict=True)
    ]


def same(boxes: list[Box], det: Detections) -> bool:
    got = sorted(
        (int(c), *(float(v) for v in xyxy))
        for xyxy, c in zip(det.xyxy.tolist(), det.class_id.tolist(), strict=True)
    )
    want = sorted(boxes)
    return len(got) == len(want) and all(
        g[0] == w[0] and np.allclose(g[1:], w[1:], atol=1e-3)
        for g, w in zip(got, want, strict=True)
    )


class Bench:
    def __init__(self, args: argparse.Namespace, svc: LabelStudioService, token: str, root: Path):
        self.args = args
        self.svc = svc
        self.rng = random.Random(args.seed)
        self.http = httpx.Client(
            base_url=svc.url, headers={"Authorization": f"Token {token}"}, timeout=120
        )
        self.root = root
        self.tasks: dict[int, TaskModel] = {}
        self.seq = 0
        self.stats: dict[str, Any] = {
            "operations": 0,
            "hostile": 0,
            "by_kind": {},
            "ls_errors": 0,
            "pulls": 0,
            "pushes": 0,
            "restarts": 0,
            "lost": 0,
            "wrong": 0,
            "crashes": 0,
            "rejected": 0,
            "rejected_reported": 0,
            "rejected_unexpected": 0,
            "crash_messages": [],
            "mismatches": [],
        }

    # --- set-up -----------------------------------------------------------------------------
    def setup(self) -> None:
        cfg_path = self.root / "project" / "defect-loop.yaml"
        cfg_path.parent.mkdir(parents=True)
        cfg_path.write_text(
            yaml.safe_dump(
                {
                    "name": "reliability",
                    "classes": CLASSES,
                    "workspace": "ws",
                    "labelstudio": {
                        "url": self.svc.url,
                        "document_root": str(self.svc.document_root),
                        "progress": False,
                        "max_regions": MAX_REGIONS,
                        "timeout_s": 60,
                    },
                    "select": {"batch_size": 10_000},
                }
            )
        )
        self.project = Project(load_config(cfg_path))
        data = self.root / "synth"
        write_dataset(data, self.args.images, seed=self.args.seed, size=SIZE)
        report, _ = self.project.ingest(data / "images")
        split = self.project.cfg.split
        shas = {str(p): e.sha256 for p, e in report.accepted.items()}
        # The frozen test set: an explicit import of the test images' labels only.
        test_labels = self.root / "test-labels"
        test_labels.mkdir()
        for img, sha in shas.items():
            if assign_split(sha, split) == "test":
                name = Path(img).stem + ".txt"
                shutil.copy(data / "labels" / name, test_labels / name)
        _, version = self.project.ingest(data / "images", test_labels)
        self.test_rows = {} if version is None else dict(version.by_sha())
        self.test_shas = sorted(self.test_rows)
        self.unpushed = sorted(s for s in set(shas.values()) if s not in self.test_rows)
        self.rng.shuffle(self.unpushed)
        users = [int(self.http.get("/api/current-user/whoami").json()["id"])]
        for i in range(self.args.annotators - 1):
            r = self.http.post(
                "/api/users",
                json={"email": f"labeler{i}@defect-loop.local", "username": f"labeler{i}"},
            )
            r.raise_for_status()
            users.append(int(r.json()["id"]))
        self.users = users
        log(
            f"{len(shas)} images ({len(self.test_shas)} test, labeled by import), "
            f"{len(users)} annotators"
        )

    def push(self, n: int) -> None:
        chunk, self.unpushed = self.unpushed[:n], self.unpushed[n:]
        self.stats["pushes"] += 1
        ranked = [
            ScoredImage(s, float(len(chunk) - i), Detections.empty((SIZE, SIZE)))
            for i, s in enumerate(chunk)
        ]
        try:
            with self.project.gateway() as gw:
                summary = self.project.push(gw, ranked, f"m{self.stats['pushes']}")
        except Exception as exc:  # a crash is what this benchmark counts
            self.crash("push", exc)
            return
        for sha in chunk:
            tid = summary.task_ids.get(sha)
            if tid is None:
                self.crash("push", RuntimeError(f"image {sha[:12]} got no task"))
                continue
            data = self.http.get(f"/api/tasks/{tid}").json()["data"]
            self.tasks[tid] = TaskModel(tid, sha, data)

    def crash(self, what: str, exc: BaseException) -> None:
        self.stats["crashes"] += 1
        self.stats["crash_messages"].append(f"{what}: {type(exc).__name__}: {exc}"[:300])
        log(f"CRASH {what}: {type(exc).__name__}: {exc}")

    # --- operations ------------------------------------------------------------------------
    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def _reconcile(self, t: TaskModel, attempt: list[dict[str, Any]] | None, boxes: Any) -> None:
        """After an error answer: read what Label Studio actually stored for the task."""
        self.stats["ls_errors"] += 1
        stored = self.http.get(f"/api/tasks/{t.task_id}").json().get("annotations") or []
        seen = set()
        for a in stored:
            aid = int(a["id"])
            seen.add(aid)
            old = t.anns.get(aid)
            if old is None:  # created although the answer was an error
                by = a.get("completed_by")
                user = int(by["id"] if isinstance(by, dict) else by)
                t.anns[aid] = Ann(
                    aid, a["result"], boxes, bool(a["was_cancelled"]), self._next(), user
                )
            elif attempt is not None and a["result"] == attempt and old.result != attempt:
                t.anns[aid] = Ann(aid, attempt, boxes, old.cancelled, self._next(), old.user)
        for aid in [a for a in t.anns if a not in seen]:
            del t.anns[aid]

    def create(self, t: TaskModel, result: list[dict[str, Any]], boxes: Any, cancel: bool) -> None:
        body = {
            "result": result,
            "was_cancelled": cancel,
            "completed_by": (user := self.rng.choice(self.users)),
            "lead_time": round(self.rng.uniform(1, 60), 2),
        }
        try:
            r = self.http.post(f"/api/tasks/{t.task_id}/annotations", json=body)
        except httpx.HTTPError:
            self._reconcile(t, result, boxes)
            return
        if r.status_code >= 400:
            self._reconcile(t, result, boxes)
            return
        aid = int(r.json()["id"])
        t.anns[aid] = Ann(aid, result, boxes, cancel, self._next(), user)

    def update(self, t: TaskModel, result: list[dict[str, Any]], boxes: Any) -> None:
        aid = self.rng.choice(sorted(t.anns))
        try:
            r = self.http.patch(f"/api/annotations/{aid}", json={"result": result})
        except httpx.HTTPError:
            self._reconcile(t, result, boxes)
            return
        if r.status_code >= 400:
            self._reconcile(t, result, boxes)
            return
        old = t.anns[aid]
        t.anns[aid] = Ann(aid, result, boxes, old.cancelled, self._next(), old.user)

    def delete(self, t: TaskModel) -> None:
        aid = self.rng.choice(sorted(t.anns))
        r = self.http.delete(f"/api/annotations/{aid}")
        if r.status_code >= 400 and r.status_code != 404:
            self._reconcile(t, None, None)
            return
        del t.anns[aid]

    def set_data(self, t: TaskModel, data: dict[str, Any], forged: bool) -> None:
        r = self.http.patch(f"/api/tasks/{t.task_id}", json={"data": data})
        if r.status_code >= 400:
            self.stats["ls_errors"] += 1
            return
        t.forged = forged

    def operation(self) -> str:
        rng = self.rng
        t = self.tasks[rng.choice(sorted(self.tasks))]
        hostile = rng.random() < self.args.hostile
        if hostile:
            kind = rng.choices(["value", "forge", "huge"], weights=[6, 3, 1])[0]
            if kind == "forge":
                others = [x for x in self.tasks.values() if x.sha != t.sha]
                how = rng.choice(["test_sha", "other_sha", "image"])
                if how == "test_sha" and self.test_shas:
                    data = {**t.data, "sha256": rng.choice(self.test_shas)}
                elif how == "other_sha" and others:
                    data = {**t.data, "sha256": rng.choice(others).sha}
                elif others:
                    data = {**t.data, "image": rng.choice(others).data["image"]}
                else:
                    data = {**t.data, "sha256": "0" * 64}
                self.set_data(t, data, forged=True)
                return f"forge_{how}"
            name = "huge" if kind == "huge" else rng.choice(HOSTILE_VALUES)
            result = hostile_result(name, rng)
            if t.anns and rng.random() < 0.4:
                self.update(t, result, None)
            else:
                self.create(t, result, None, cancel=False)
            return f"hostile_{name}"
        if t.forged and rng.random() < 0.5:
            self.set_data(t, dict(t.data), forged=False)
            return "restore"
        roll = rng.random()
        if roll < 0.45 or not t.anns:
            boxes = random_boxes(rng)
            skip = rng.random() < 0.12
            self.create(t, [] if skip else valid_result(boxes, rng), None if skip else boxes, skip)
            return "skip" if skip else "create"
        if roll < 0.8:
            boxes = random_boxes(rng)
            self.update(t, valid_result(boxes, rng), boxes)
            return "update"
        self.delete(t)
        return "delete"

    # --- pulls and the comparison ------------------------------------------------------------
    def pull_and_check(self) -> None:
        self.stats["pulls"] += 1
        try:
            with self.project.gateway() as gw:
                self.project.pull(gw)
        except Exception as exc:  # a crash is what this benchmark counts
            self.crash("pull", exc)
            return
        must_reject = {tid for tid, t in self.tasks.items() if t.judge()}
        version = self.project.current_version()
        rows = {} if version is None else version.by_sha()
        lost = wrong = 0
        for t in self.tasks.values():
            row = rows.get(t.sha)
            if t.holds is None:
                if row is not None:
                    wrong += 1
                    self.note(f"task {t.task_id}: image has a label, expected none")
            elif row is None:
                lost += 1
                self.note(f"task {t.task_id}: label missing")
            elif not same(t.holds, row.boxes):
                wrong += 1
                self.note(f"task {t.task_id}: label differs")
        for sha, want in self.test_rows.items():
            row = rows.get(sha)
            if row is None:
                lost += 1
                self.note(f"test image {sha[:12]}: label missing")
            elif row.box_keys(CLASSES) != want.box_keys(CLASSES) or row.split != "test":
                wrong += 1
                self.note(f"test image {sha[:12]}: label changed")
        reported = {r.task_id for r in self.project.rejections()}
        for tid in sorted(must_reject - reported):
            t = self.tasks[tid]
            live = sorted((a for a in t.anns.values() if not a.cancelled), key=lambda a: a.seq)
            self.note(
                f"task {tid}: rejection not reported (forged {t.forged}, chosen annotation "
                f"{'hostile' if live[-1].boxes is None else 'valid'})"
            )
        for tid in sorted(reported - must_reject):
            self.note(f"task {tid}: reported as rejected, but usable")
        self.stats["lost"] += lost
        self.stats["wrong"] += wrong
        self.stats["rejected"] += len(must_reject)
        self.stats["rejected_reported"] += len(must_reject & reported)
        self.stats["rejected_unexpected"] += len(reported - must_reject)
        log(
            f"pull {self.stats['pulls']} after {self.stats['operations']} operations: "
            f"{len(rows)} labels, {len(must_reject)} rejected ({len(must_reject & reported)} "
            f"reported, {len(reported - must_reject)} unexpected), lost {lost}, wrong {wrong}"
        )

    def note(self, text: str) -> None:
        if len(self.stats["mismatches"]) < 20:
            self.stats["mismatches"].append(f"pull {self.stats['pulls']}: {text}")

    def restart(self) -> None:
        t0 = time.perf_counter()
        self.svc.stop()
        self.svc.start(timeout_s=START_TIMEOUT_S)
        self.stats["restarts"] += 1
        self.stats.setdefault("restart_s", []).append(round(time.perf_counter() - t0, 1))
        log(f"restart {self.stats['restarts']} took {time.perf_counter() - t0:.1f} s")

    def run(self) -> None:
        a = self.args
        per_push = max(1, len(self.unpushed) // (a.restarts + 2))
        self.push(per_push)
        restart_at = {a.operations * (k + 1) // (a.restarts + 1) for k in range(a.restarts)}
        for i in range(1, a.operations + 1):
            kind = self.operation()
            self.stats["operations"] += 1
            self.stats["by_kind"][kind] = self.stats["by_kind"].get(kind, 0) + 1
            if kind.startswith(("hostile_", "forge_")):
                self.stats["hostile"] += 1
            if i % a.pull_every == 0:
                self.pull_and_check()
            if i in restart_at:
                self.restart()
                self.push(per_push)
        self.pull_and_check()
        self.stats["tasks"] = len(self.tasks)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="100 operations, 1 restart, 40 images")
    ap.add_argument("--operations", type=int, default=None, help="default 1000 (smoke 100)")
    ap.add_argument("--restarts", type=int, default=None, help="default 2 (smoke 1)")
    ap.add_argument("--pull-every", type=int, default=None, help="default 25 (smoke 10)")
    ap.add_argument("--images", type=int, default=None, help="default 160 (smoke 40)")
    ap.add_argument("--annotators", type=int, default=3)
    ap.add_argument("--hostile", type=float, default=0.1, help="share of hostile operations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--keep", action="store_true", help="keep the temporary data folder")
    args = ap.parse_args(argv)
    smoke = args.smoke
    for name, full, small in (
        ("operations", 1000, 100),
        ("restarts", 2, 1),
        ("pull_every", 25, 10),
        ("images", 160, 40),
    ):
        if getattr(args, name) is None:
            setattr(args, name, small if smoke else full)

    base = Path(tempfile.mkdtemp(prefix="defect-loop-bench-reliability-"))
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
    os.environ["DEFECT_LOOP_LABELSTUDIO__API_TOKEN"] = token
    svc.ensure_installed(progress=True)
    t_start = time.perf_counter()
    svc.start(timeout_s=START_TIMEOUT_S)
    server_start_s = time.perf_counter() - t_start
    try:
        bench = Bench(args, svc, token, Path(svc.document_root))
        bench.setup()
        t0 = time.perf_counter()
        bench.run()
        stats = bench.stats
        result: dict[str, Any] = {
            "bench": "reliability",
            "smoke": smoke,
            "operations": stats["operations"],
            "hostile": stats["hostile"],
            "pulls": stats["pulls"],
            "pushes": stats["pushes"],
            "restarts": stats["restarts"],
            "lost": stats["lost"],
            "wrong": stats["wrong"],
            "crashes": stats["crashes"],
            "rejected": stats["rejected"],
            "rejected_reported": stats["rejected_reported"],
            "rejected_unexpected": stats["rejected_unexpected"],
            "ok": stats["lost"] == stats["wrong"] == stats["crashes"] == 0
            and stats["rejected_reported"] == stats["rejected"],
            "tasks": stats["tasks"],
            "images": args.images,
            "annotators": args.annotators,
            "max_regions": MAX_REGIONS,
            "ls_error_answers": stats["ls_errors"],
            "by_kind": dict(sorted(stats["by_kind"].items())),
            "mismatches": stats["mismatches"],
            "crash_messages": stats["crash_messages"][:10],
            "elapsed_s": round(time.perf_counter() - t0, 1),
            "server_start_s": round(server_start_s, 1),
            "restart_s": stats.get("restart_s", []),
            "seed": args.seed,
            "label_studio": LABEL_STUDIO_VERSION,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        }
        bench.http.close()
    finally:
        svc.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    args.results.mkdir(parents=True, exist_ok=True)
    name = "reliability_smoke.json" if smoke else "reliability.json"
    (args.results / name).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
