"""The monitor (`loop.monitor`) and the review queue (`loop.review_queue`), on real image files
scored by a small stand-in for a bundle (no YOLO): window tests, alerts, the queue, the pool,
restarts, and the push order they produce. The real bundle is tested in
tests/integration/test_deploy_monitor.py."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from PIL import Image

from loop.bundle import Reference, image_features
from loop.config import MonitorConfig, ProjectConfig
from loop.detections import Detections
from loop.drift import IMAGE_STATS, FeatureSet, image_stats, read_gray
from loop.images import sha256_file
from loop.labeling import PushSummary
from loop.monitor import Monitor, monitor_status, read_windows
from loop.project import Project, ScoredImage
from loop.review_queue import QueueEntry, ReviewQueue
from loop.scheduling import CycleLock
from loop.windows import TESTS, evaluate_window, select_for_queue

CLASSES = ["scratch", "pit"]


# ------------------------------------------------------------------------------ a stand-in bundle
def write_images(
    folder: Path, n: int, seed: int, shift: float = 0.0, stripes: bool = False
) -> list[Path]:
    """``n`` 48 x 48 textures (mean 100-140, noise); ``shift`` brightens them (a camera change),
    ``stripes`` draws a pattern the reference never shows (a new defect)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        base = rng.uniform(100, 140)
        g = base + rng.normal(0, 12, (48, 48)) + np.linspace(0, rng.uniform(0, 20), 48)[None, :]
        if stripes:
            g = g + 50 * np.sin(np.arange(48) / 3.0 + rng.uniform(0, 6))[:, None]
        p = folder / f"img-{seed}-{i:03d}.png"
        Image.fromarray(np.clip(g + shift, 0, 255).astype(np.uint8)).save(p)
        out.append(p)
    return out


def fake_detections(gray: np.ndarray) -> Detections:
    """One box whose confidence follows the image's brightness (a model that fires on light)."""
    p = float(np.clip(gray.mean() / 255.0, 0.01, 0.99))
    probs = np.array([[p, 1 - p]])
    return Detections(
        np.array([[4.0, 4.0, 20.0, 20.0]]), np.array([0]), (48, 48), np.array([p]), probs
    )


def embed(gray: np.ndarray) -> np.ndarray:
    """An 'embedding' of texture, not brightness: contrast and the spread of the row and
    column means (stripes across rows stand out)."""
    rows, cols = gray.mean(axis=1).std(), gray.mean(axis=0).std()
    return np.array([1.0, gray.std() / 50, rows / 10, cols / 10], dtype=np.float32)


@dataclass
class FakeBundle:
    reference_set: Reference | None = None
    classes: list[str] = field(default_factory=lambda: list(CLASSES))
    spec: Any = field(default_factory=lambda: SimpleNamespace(defect_conf=0.45))
    digest: str = "f" * 64

    def score(
        self, images: Sequence[Path], yolo_config_dir: Path, threads: int = 2
    ) -> Iterator[tuple[Detections, np.ndarray]]:
        for p in images:
            g = read_gray(Path(p))
            yield fake_detections(g), embed(g)

    def features(
        self,
        images: Sequence[Path],
        sha256: Sequence[str],
        yolo_config_dir: Path,
        threads: int = 2,
        on_image: Any = None,
    ) -> FeatureSet:
        rows = []
        for p, (det, emb) in zip(images, self.score(images, yolo_config_dir), strict=True):
            stats = image_stats(read_gray(Path(p)))
            rows.append((emb, stats, *image_features(det, emb, stats, 0.45, len(CLASSES))))
        return FeatureSet(
            tuple(sha256),
            np.stack([r[0] for r in rows]),
            np.stack([r[1] for r in rows]),
            np.array([r[2] for r in rows]),
            np.array([r[3] for r in rows]),
            np.array([r[4] for r in rows], dtype=np.int64),
            np.stack([r[5] for r in rows]),
        )

    def reference(self) -> Reference:
        assert self.reference_set is not None
        return self.reference_set


def make_reference(bundle: FakeBundle, root: Path) -> Reference:
    ref_files = write_images(root / "ref", 200, seed=1)
    nb_files = write_images(root / "train", 80, seed=2)
    ref = bundle.features(ref_files, [sha256_file(p) for p in ref_files], root)
    nb = bundle.features(nb_files, [sha256_file(p) for p in nb_files], root)
    return Reference(ref, nb.embedding, nb.sha256, (4,))


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Project, FakeBundle]:
    cfg = ProjectConfig(
        classes=CLASSES,
        workspace=tmp_path / "ws",
        monitor=MonitorConfig(window_size=20, permutations=1000, queue_per_window=4),
    )
    bundle = FakeBundle()
    bundle.reference_set = make_reference(bundle, tmp_path / "data")
    return Project(cfg), bundle


# ------------------------------------------------------------------------------ the window test
def test_clean_windows_do_not_alert_and_a_camera_change_does(setup, tmp_path: Path):
    project, bundle = setup
    mon = Monitor(project, bundle, "1")  # type: ignore[arg-type]
    write_images(tmp_path / "line" / "day1", 40, seed=3)
    out = mon.run(tmp_path / "line")
    assert out.scan is not None and out.scan.new == 40
    assert [w.index for w in out.windows] == [0, 1] and not out.alerts
    assert all(set(w.p_values()) == set(TESTS) for w in out.windows)

    write_images(tmp_path / "line" / "day2", 20, seed=4, shift=60.0)  # brighter camera
    out = mon.run(tmp_path / "line")
    assert out.scan is not None and out.scan.new == 20 and out.scan.duplicates == 0
    (w,) = out.windows
    assert w.index == 2 and w.alert and "brightness_ks" in w.fired
    assert "brightness" in w.message and "window 2" in w.message
    assert w.metrics["alert"] == 1.0 and w.metrics["brightness_mean"] > 150


def test_evaluate_window_is_deterministic_per_window_index():
    ref = synthetic_reference()
    r = np.random.default_rng(3)
    win = FeatureSet(
        tuple(f"w{i:063d}" for i in range(40)),
        (r.normal(size=(40, 8)) + 5.0).astype(np.float32),
        r.normal(100, 5, (40, len(IMAGE_STATS))),
        r.random(40),
        r.random(40) * 0.5,
        r.integers(-1, 2, 40),
        r.integers(0, 2, (40, 2)),
    )
    cfg = MonitorConfig(permutations=1000)
    a = evaluate_window(ref, win, cfg, 5, CLASSES).p_values()
    assert a == evaluate_window(ref, win, cfg, 5, CLASSES).p_values()
    b = evaluate_window(ref, win, cfg, 6, CLASSES).p_values()
    assert 0 < a["embedding_mmd"] < 1 and a["embedding_mmd"] != b["embedding_mmd"]
    assert a["brightness_ks"] == b["brightness_ks"]  # not random


def synthetic_reference(n_ref: int = 200, n_nb: int = 300, d: int = 8) -> Reference:
    r = np.random.default_rng(0)

    def fs(n: int, tag: str, emb: np.ndarray) -> FeatureSet:
        return FeatureSet(
            tuple(f"{tag}{i:063d}" for i in range(n)),
            emb.astype(np.float32),
            r.normal(100, 5, (n, len(IMAGE_STATS))),
            r.random(n),
            r.random(n) * 0.5,
            r.integers(-1, 2, n),
            r.integers(0, 2, (n, 2)),
        )

    ref = fs(n_ref, "r", r.normal(size=(n_ref, d)) + 5.0)
    nb = r.normal(size=(n_nb, d)) + 5.0
    return Reference(
        ref, nb.astype(np.float32), tuple(f"n{i:063d}" for i in range(n_nb)), (d // 2, d - d // 2)
    )


def test_novel_images_fire_novelty_and_lead_the_queue():
    ref = synthetic_reference()
    r = np.random.default_rng(1)
    n, k = 100, 15
    emb = r.normal(size=(n, 8)) + 5.0
    emb[:k] = r.normal(size=(k, 8)) * 3 - 5.0  # far from every training image
    win = FeatureSet(
        tuple(f"w{i:063d}" for i in range(n)),
        emb.astype(np.float32),
        r.normal(100, 5, (n, len(IMAGE_STATS))),
        r.random(n),
        r.random(n) * 0.5,
        r.integers(-1, 2, n),
        r.integers(0, 2, (n, 2)),
    )
    cfg = MonitorConfig(permutations=1000, queue_per_window=10)
    res = evaluate_window(ref, win, cfg, 0, CLASSES, "3")
    assert "novelty" in res.fired and res.metrics["novelty_rate"] >= k / n
    assert {c.sha256 for c in res.candidates} <= set(win.sha256[:k])
    assert len(res.candidates) == 10 and all(c.reason == "novel" for c in res.candidates)
    priorities = [c.priority for c in res.candidates]
    assert priorities == sorted(priorities, reverse=True) and min(priorities) > 1
    # Ineligible images (labeled, in the test split ...) are never queued.
    eligible = np.ones(n, dtype=bool)
    eligible[:5] = False
    nn = ref.novelty_distance(win.embedding)
    picked = select_for_queue(win, nn, ref, cfg, eligible)
    assert {c.sha256 for c in picked} <= set(win.sha256[5:k])


def test_a_clean_window_queues_only_images_beyond_the_thresholds():
    ref = synthetic_reference()
    win = ref.features.subset(np.arange(50))
    nn = ref.novelty_distance(win.embedding)
    picked = select_for_queue(win, nn, ref, MonitorConfig(queue_per_window=50))
    assert all(c.priority > 1 for c in picked) and len(picked) <= 3  # ~1 % above each threshold
    assert select_for_queue(win, nn, ref, MonitorConfig(queue_per_window=0)) == []


# ------------------------------------------------------------------------------ persistence
def test_windows_alerts_and_queue_survive_a_restart_and_nothing_is_queued_twice(
    setup, tmp_path: Path
):
    project, bundle = setup
    line = tmp_path / "line"
    write_images(line / "a", 20, seed=3)
    write_images(line / "b", 20, seed=5, stripes=True)
    first = Monitor(project, bundle, "1").run(line)  # type: ignore[arg-type]
    assert len(first.windows) == 2 and len(first.alerts) == 1
    queued = ReviewQueue(project.cfg.paths.monitor).entries()
    assert first.queued == len(queued) > 0
    assert len({e.sha256 for e in queued}) == len(queued)

    # A restart: new objects, same workspace.
    project2 = Project(project.cfg)
    again = Monitor(project2, bundle, "1")  # type: ignore[arg-type]
    windows = read_windows(project.cfg.paths.monitor)
    assert [w.index for w in windows] == [0, 1] and [w.alert for w in windows] == [False, True]
    assert windows[1].message == first.windows[1].message
    out = again.run(line)
    assert out.scan is not None and out.scan.new == 0 and out.windows == []
    # The same pictures under new names are the same images: not checked, not queued again.
    for p in sorted((line / "b").iterdir())[:5]:
        (line / "c").mkdir(exist_ok=True)
        (line / "c" / f"copy-{p.name}").write_bytes(p.read_bytes())
    out = again.run(line)
    assert out.scan is not None and (out.scan.new, out.scan.duplicates) == (0, 5)
    # Committing a window again (a crash between commit and bookkeeping) changes nothing.
    pending = [again.pending()]  # empty: nothing is waiting
    assert pending == [[]]
    windows_before = read_windows(project.cfg.paths.monitor)
    assert again.commit(windows_before[1], []) == []
    assert len(read_windows(project.cfg.paths.monitor)) == 2
    assert [e.sha256 for e in ReviewQueue(project.cfg.paths.monitor).entries()] == [
        e.sha256 for e in queued
    ]
    status = monitor_status(project.cfg.paths.monitor)
    assert status["windows"] == 2 and status["alerts"] == 1 and status["images"] == {"done": 40}


def test_queued_images_join_the_pool_when_the_workspace_is_free(setup, tmp_path: Path):
    project, bundle = setup
    write_images(tmp_path / "line", 20, seed=6, stripes=True)
    lock = CycleLock(project.cfg.workspace)
    assert lock.acquire("skip", 1, "cycle flow run busy-one")
    try:
        out = Monitor(project, bundle, "1").run(tmp_path / "line")  # type: ignore[arg-type]
    finally:
        lock.release()
    entries = ReviewQueue(project.cfg.paths.monitor).entries()
    assert out.queued == len(entries) > 0
    # A cycle held the workspace: the images wait as private copies, outside the pool.
    assert all(not e.in_pool and e.held and Path(e.held).is_file() for e in entries)
    assert all(e.sha256 not in Project(project.cfg).pool for e in entries)
    added = Monitor(Project(project.cfg), bundle, "1").ingest_queued()  # type: ignore[arg-type]
    assert added == len(entries)
    pool = Project(project.cfg).pool
    after = ReviewQueue(project.cfg.paths.monitor).entries()
    assert all(e.in_pool and e.held is None for e in after)
    assert all(e.sha256 in pool for e in after)
    assert not any((project.cfg.paths.monitor / "held").iterdir())


def test_a_partial_window_waits_unless_flushed_and_vanished_files_are_dropped(
    setup, tmp_path: Path
):
    project, bundle = setup
    files = write_images(tmp_path / "line", 15, seed=7)
    mon = Monitor(project, bundle, "1")  # type: ignore[arg-type]
    out = mon.run(tmp_path / "line")
    assert out.windows == [] and out.pending == 15
    files[0].unlink()
    out = mon.run(None, flush=True)
    assert [w.n_images for w in out.windows] == [14] and out.pending == 0
    assert monitor_status(project.cfg.paths.monitor)["images"] == {"done": 14, "missing": 1}


def test_non_images_are_rejected_once(setup, tmp_path: Path):
    project, bundle = setup
    (tmp_path / "line").mkdir()
    (tmp_path / "line" / "notes.txt").write_text("not an image")
    (tmp_path / "line" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    mon = Monitor(project, bundle, "1")  # type: ignore[arg-type]
    scan = mon.scan(tmp_path / "line")
    assert scan.new == 0 and sorted(Path(p).name for p, _ in scan.rejected) == [
        "broken.png",
        "notes.txt",
    ]
    assert mon.scan(tmp_path / "line").rejected == []  # unchanged files are not retried


# ------------------------------------------------------------------------------ queue and push
def entry(sha: str, priority: float, window: int = 0) -> QueueEntry:
    return QueueEntry(sha, priority, "novel", priority, 0.5, window, "1", "src", 8, 8)


def test_review_queue_orders_dedupes_and_persists(tmp_path: Path):
    q = ReviewQueue(tmp_path / "monitor")
    assert q.entries() == [] and not (tmp_path / "monitor").exists()  # reading creates nothing
    added = q.add([entry("a" * 64, 1.5), entry("b" * 64, 3.0), entry("c" * 64, 1.5, window=-1)])
    assert len(added) == 3
    assert q.add([entry("a" * 64, 9.0)]) == []  # queued once, ever
    again = ReviewQueue(tmp_path / "monitor")
    assert [e.sha256[0] for e in again.entries()] == ["b", "c", "a"]
    assert again.entries()[2].priority == 1.5 and len(again) == 3
    done = again.mark_pushed({"a" * 64: 17, "z" * 64: 3})
    assert [(e.sha256[0], e.task_id) for e in done] == [("a", 17)]
    assert [e.sha256[0] for e in ReviewQueue(tmp_path / "monitor").entries("queued")] == ["b", "c"]


def scored(sha: str, score: float) -> ScoredImage:
    return ScoredImage(sha, score, Detections(np.zeros((0, 4)), np.zeros(0), (8, 8)))


def test_first_moves_queued_images_to_the_front_above_every_score(tmp_path: Path):
    q = ReviewQueue(tmp_path)
    q.add([entry("q1" + "0" * 62, 5.0), entry("q2" + "0" * 62, 2.0), entry("gone" + "0" * 60, 9)])
    ranked = [scored("x" * 64, 0.9), scored("q2" + "0" * 62, 0.1), scored("y" * 64, 0.5)]
    ranked.append(scored("q1" + "0" * 62, 0.05))
    out = q.first(ranked)
    assert [s.sha256[:2] for s in out] == ["q1", "q2", "xx", "yy"]
    assert [s.score for s in out] == [0.9 + 2, 0.9 + 1, 0.9, 0.5]


@dataclass
class FakeGateway:
    pushed: list[Any] = field(default_factory=list)

    def ensure_project(self, *args: Any, **kwargs: Any) -> int:
        return 1

    def ensure_local_storage(self, pid: int, folder: Path) -> None:
        pass

    def push(self, pid: int, items: list[Any], **kwargs: Any) -> PushSummary:
        self.pushed = items
        return PushSummary(
            created=len(items), task_ids={it.sha256: 100 + i for i, it in enumerate(items)}
        )


def test_push_serves_the_queued_images_first_and_marks_them_pushed(tmp_path: Path):
    cfg = ProjectConfig(classes=CLASSES, workspace=tmp_path / "ws", select={"batch_size": 3})
    files = write_images(tmp_path / "imgs", 6, seed=8)
    project = Project(cfg)
    project.ingest(tmp_path / "imgs")
    shas = [sha256_file(p) for p in files]
    ReviewQueue(cfg.paths.monitor).add([entry(shas[5], 2.0), entry(shas[4], 7.0)])
    ranked = [scored(s, 1.0 - i / 10) for i, s in enumerate(shas)]
    gw = FakeGateway()
    project.push(gw, ranked, "m-v1")
    assert [it.sha256 for it in gw.pushed] == [shas[4], shas[5], shas[0]]
    assert gw.pushed[0].priority > gw.pushed[1].priority > gw.pushed[2].priority == 1.0
    q = ReviewQueue(cfg.paths.monitor).entries()
    assert {(e.sha256, e.status, e.task_id) for e in q} == {
        (shas[4], "pushed", 100),
        (shas[5], "pushed", 101),
    }
    # The next push has nothing queued: plain ranked order again.
    gw2 = FakeGateway()
    project.push(gw2, ranked, "m-v1")
    assert [it.sha256 for it in gw2.pushed][:2] == [shas[1], shas[2]]


def test_the_report_reads_the_monitor_records(setup, tmp_path: Path):
    from loop.report import collect_production

    project, bundle = setup
    assert collect_production(project) is None  # never monitored: "no production data yet"
    write_images(tmp_path / "line" / "a", 20, seed=3)
    write_images(tmp_path / "line" / "b", 20, seed=5, stripes=True)
    Monitor(project, bundle, "1").run(tmp_path / "line")  # type: ignore[arg-type]
    data = collect_production(Project(project.cfg))
    assert data is not None and [w.alert for w in data.windows] == [False, True]
    assert data.images == 40 and data.queued == len(
        ReviewQueue(project.cfg.paths.monitor).entries()
    )
    assert data.novel and all(
        n.image_path is not None and n.image_path.is_file() for n in data.novel
    )
    assert data.novel[0].window == 1  # the striped images lead the queue
    assert all(n.reason in ("novel", "uncertain") and n.priority > 1 for n in data.novel)
    assert set(data.windows[1].p_values) == set(TESTS)


def test_too_few_permutations_for_alpha_are_refused(setup):
    from loop.errors import ConfigError

    project, bundle = setup
    ref = synthetic_reference()
    # 10 tests at alpha 0.01: a permutation p-value must reach below 0.001, i.e. >= 1000 draws.
    with pytest.raises(ConfigError, match="at least 1000"):
        evaluate_window(ref, ref.features, MonitorConfig(permutations=999), 0, CLASSES)
    evaluate_window(
        ref, ref.features.subset(np.arange(20)), MonitorConfig(permutations=1000), 0, CLASSES
    )
    low = project.cfg.model_copy(update={"monitor": MonitorConfig(alpha=0.001, permutations=5000)})
    with pytest.raises(ConfigError, match="at least 10000"):
        Monitor(Project(low), bundle, "1")  # type: ignore[arg-type]
