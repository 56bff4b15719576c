"""Production monitoring on NEU-DET: false alarms without drift, detection and delay of camera
changes and of a defect class the model never saw, and what the review queue puts first.

Protocol (`FULL`; every step is the product's code: `loop.bundle.build_bundle`,
`loop.bundle.Bundle.features`, `loop.windows.evaluate_window`, `loop.review_queue.ReviewQueue`):

1. One NEU-DET class (``--novel-class``, default ``scratches``) is held out: every image with a
   box of that class. The 5-class images are split at random (seeded): ``train`` + ``val`` to
   fine-tune the COCO-pretrained ``yolov8n.pt`` (``--weights``) briefly, ``reference`` (the
   monitor's held-out reference; the train + val images are its novelty neighbours) and
   ``production`` (never seen by training or the reference).
2. The bundle scores the production images as they are, under graded camera changes (Gaussian
   blur, brightness shift, contrast scaling, Gaussian noise; written as lossless PNG), and the
   held-out class images. Per-image features are cached (``--work``), so a rerun resumes.
3. Windows of ``window`` images are drawn from those features:
   - no drift: ``no_drift_windows`` windows of clean production images (drawn without replacement
     within a window; windows overlap, as the pool holds fewer images than they need in all);
     the false-alarm rate is the share that alert (goal <= 2 %);
   - drift: for each camera change and strength, and for the held-out class mixed in at
     ``novel_shares`` of a window, ``sequences`` sequences of drifted windows, checked until the
     first alert (at most ``max_windows``); delay = drifted windows before the alerting one
     (0: the first drifted window alerts; "within 2 windows" is delay <= 1). The detection rate
     is the share of sequences that alert; ``first_window_rate`` the share that alert at once;
   - queue: for each novel share, ``sequences`` streams of ``queue_windows`` windows (no image
     twice), every window's candidates go into a fresh `ReviewQueue`; the share of held-out-class
     images among the top ``queue_top`` queued images is reported (goal >= 60 % at 10 %).

Prints ONE JSON line; writes ``bench/results/monitoring.json`` (``--smoke``: a tiny
configuration, ``monitoring_smoke.json``) with repository-relative paths.
Dataset: ``--dataset``, else ``$DEFECT_LOOP_NEU_DET``, else ``../shared/datasets/neu-det``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from loop.bundle import Bundle, build_bundle, load_bundle  # noqa: E402
from loop.config import MonitorConfig, TrainConfig  # noqa: E402
from loop.drift import FeatureSet  # noqa: E402
from loop.images import atomic_write_text, sha256_file  # noqa: E402
from loop.review_queue import QueueEntry, ReviewQueue  # noqa: E402
from loop.windows import evaluate_window  # noqa: E402

FULL: dict[str, Any] = {
    "imgsz": 160,
    "epochs": 10,
    "batch": 16,
    "train": 500,
    "val": 100,
    "reference": 300,
    "window": 200,
    "no_drift_windows": 200,
    "sequences": 20,
    "max_windows": 5,
    "queue_windows": 3,
    "queue_top": 50,
    "permutations": 2000,
    "novel_shares": "0.05,0.1,0.15,0.25",
    "blur": "0.6,1.2,2.4",
    "brightness": "6,12,24",
    "contrast": "0.9,0.8,0.6",
    "noise": "2,4,8",
    "max_images": None,
}
SMOKE: dict[str, Any] = {
    "imgsz": 64,
    "epochs": 1,
    "batch": 8,
    "train": 40,
    "val": 12,
    "reference": 40,
    "window": 30,
    "no_drift_windows": 6,
    "sequences": 2,
    "max_windows": 2,
    "queue_windows": 2,
    "queue_top": 10,
    "permutations": 1000,
    "novel_shares": "0.2",
    "blur": "2.4",
    "brightness": "24",
    "contrast": "0.6",
    "noise": "8",
    "max_images": 300,
}
CHANGES = ("blur", "brightness", "contrast", "noise")
SEED = 0
NOVELTY_GOAL_SHARE = 0.1


def neu_det_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    env = os.environ.get("DEFECT_LOOP_NEU_DET")
    return Path(env) if env else REPO.parent / "shared" / "datasets" / "neu-det"


def rel(p: Path) -> str:
    """``p`` relative to the repository (the result file never holds absolute paths)."""
    return os.path.relpath(Path(p).resolve(), REPO)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", help="NEU-DET (Pascal VOC folder)")
    p.add_argument("--weights", type=Path, default=None, help="COCO-pretrained yolov8n.pt")
    p.add_argument("--novel-class", default="scratches", help="the class held out of training")
    p.add_argument("--smoke", action="store_true", help="tiny configuration, *_smoke outputs")
    for key in FULL:
        p.add_argument(f"--{key.replace('_', '-')}", default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fresh", action="store_true", help="discard cached model and features")
    p.add_argument("--work", type=Path, default=None, help="state folder (default bench/work/...)")
    p.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    return p.parse_args(argv)


def floats(text: Any) -> list[float]:
    return [float(v) for v in str(text).split(",") if v.strip()]


# ------------------------------------------------------------------------------ data and model


def prepare(dataset: Path, work: Path, novel: str, s: dict[str, Any]) -> dict[str, Any]:
    """Roles of the images (cached in ``split.json``): train, val, reference, production (5
    classes) and novel (every image with a box of the held-out class)."""
    from loop.replay_dataset import prepare_dataset

    split_file = work / "split.json"
    if split_file.is_file():
        return dict(json.loads(split_file.read_text()))
    max_images = None if s["max_images"] in (None, "None") else int(s["max_images"])
    ds = prepare_dataset(dataset, work / "neu-det", max_images=max_images)
    if novel not in ds.classes:
        raise SystemExit(f"--novel-class {novel!r} is not one of {ds.classes}")
    k = ds.classes.index(novel)
    known, held = [], []
    for img in sorted(ds.images_dir.iterdir()):
        lines = (ds.labels_dir / f"{img.stem}.txt").read_text().split()
        ids = {int(lines[i]) for i in range(0, len(lines), 5)}
        (held if k in ids else known).append(img.name)
    rng = np.random.default_rng(SEED)
    order = [known[i] for i in rng.permutation(len(known))]
    n_tr, n_val, n_ref = int(s["train"]), int(s["val"]), int(s["reference"])
    if n_tr + n_val + n_ref >= len(order):
        raise SystemExit(f"only {len(order)} known-class images for {n_tr}+{n_val}+{n_ref}")
    roles = {
        "classes": ds.classes,
        "novel_class": novel,
        "images_dir": str(ds.images_dir),
        "labels_dir": str(ds.labels_dir),
        "train": order[:n_tr],
        "val": order[n_tr : n_tr + n_val],
        "reference": order[n_tr + n_val : n_tr + n_val + n_ref],
        "production": order[n_tr + n_val + n_ref :],
        "novel": held,
    }
    atomic_write_text(split_file, json.dumps(roles, indent=1))
    return roles


def train_model(
    work: Path, roles: dict[str, Any], s: dict[str, Any], weights: Path, threads: int
) -> dict[str, Any]:
    """Fine-tune the pretrained weights on the 5 known classes (labels remapped); cached."""
    from loop import model

    info_file = work / "model.json"
    if info_file.is_file() and (work / "model.pt").is_file():
        return dict(json.loads(info_file.read_text()))
    classes: list[str] = roles["classes"]
    k = classes.index(roles["novel_class"])
    known = [c for c in classes if c != roles["novel_class"]]
    data = work / "data5"
    shutil.rmtree(data, ignore_errors=True)
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir(parents=True)
    src_img, src_lab = Path(roles["images_dir"]), Path(roles["labels_dir"])
    for name in roles["train"] + roles["val"]:
        os.symlink((src_img / name).resolve(), data / "images" / name)
        out = []
        for ln in (src_lab / f"{Path(name).stem}.txt").read_text().splitlines():
            parts = ln.split()
            if parts:
                c = int(parts[0])
                out.append(" ".join([str(c - (c > k)), *parts[1:]]))
        (data / "labels" / f"{Path(name).stem}.txt").write_text("".join(f"{x}\n" for x in out))
    for split in ("train", "val"):
        (data / f"{split}.txt").write_text(
            "".join(f"{data / 'images' / n}\n" for n in roles[split])
        )
    names = "\n".join(f"  {i}: {json.dumps(c)}" for i, c in enumerate(known))
    (data / "data.yaml").write_text(
        f"path: {data}\ntrain: {data / 'train.txt'}\nval: {data / 'val.txt'}\nnames:\n{names}\n"
    )
    cfg = TrainConfig(
        model="yolov8n.yaml",
        imgsz=int(s["imgsz"]),
        epochs=int(s["epochs"]),
        batch=int(s["batch"]),
        seed=SEED,
        threads=threads,
    )
    res = model.train(
        data / "data.yaml",
        work / "runs",
        cfg,
        work / "ultralytics",
        init_weights=weights,
        name="fit",
    )
    shutil.copyfile(res.weights, work / "model.pt")
    info = {
        "classes": known,
        "val_map50": round(res.val.map50, 4),
        "val_map50_95": round(res.val.map50_95, 4),
        "val_ap50": {c: round(v, 4) for c, v in res.val.per_class_ap50.items()},
        "train_seconds": round(res.seconds, 1),
    }
    atomic_write_text(info_file, json.dumps(info, indent=1))
    return info


def bundle_for(
    work: Path, roles: dict[str, Any], info: dict[str, Any], s: dict[str, Any], threads: int
) -> Bundle:
    out = work / "bundle"
    if (out / "bundle.json").is_file():
        return load_bundle(out)
    img = Path(roles["images_dir"])

    def pairs(names: list[str]) -> list[tuple[str, Path]]:
        return [(sha256_file(img / n), img / n) for n in names]

    return build_bundle(
        work / "model.pt",
        out,
        info["classes"],
        int(s["imgsz"]),
        work / "ultralytics",
        pairs(roles["reference"]),
        pairs(roles["train"] + roles["val"]),
        candidate_conf=0.01,
        min_candidates=3,
        defect_conf=0.25,
        source={"bench": "monitoring"},
        threads=threads,
    )


def change(gray: np.ndarray, kind: str, strength: float, rng: np.random.Generator) -> np.ndarray:
    """A camera change applied to a uint8 image (H, W, 3)."""
    import cv2

    x = gray.astype(np.float64)
    if kind == "blur":
        x = cv2.GaussianBlur(x, (0, 0), sigmaX=strength)
    elif kind == "brightness":
        x = x + strength
    elif kind == "contrast":
        x = (x - x.mean()) * strength + x.mean()
    elif kind == "noise":
        x = x + rng.normal(0.0, strength, size=x.shape[:2])[..., None]
    else:
        raise ValueError(kind)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def variant_files(work: Path, roles: dict[str, Any], kind: str, strength: float) -> list[Path]:
    """The production images under one camera change, written once as PNG."""
    import cv2

    out = work / "variants" / f"{kind}-{strength:g}"
    names = roles["production"]
    files = [out / f"{Path(n).stem}.png" for n in names]
    if out.is_dir() and all(f.is_file() for f in files):
        return files
    out.mkdir(parents=True, exist_ok=True)
    src = Path(roles["images_dir"])
    for i, (n, f) in enumerate(zip(names, files, strict=True)):
        im = cv2.imread(str(src / n))
        changed = change(im, kind, strength, np.random.default_rng([SEED, i]))
        tmp = f.with_name(f.stem + ".part.png")
        cv2.imwrite(str(tmp), changed)
        tmp.replace(f)
    return files


def features(
    work: Path,
    bundle: Bundle,
    name: str,
    files: list[Path],
    threads: int,
    log: Callable[[str], None],
) -> FeatureSet:
    cache = work / "features" / f"{name}.npz"
    if cache.is_file():
        with np.load(cache) as z:
            return FeatureSet.from_arrays({k: z[k] for k in z.files})
    t0 = time.monotonic()
    fs = bundle.features(files, [sha256_file(f) for f in files], work / "ultralytics", threads)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.stem + ".part.npz")
    np.savez_compressed(tmp, **fs.arrays())
    tmp.replace(cache)
    log(f"features {name}: {len(files)} images in {time.monotonic() - t0:.1f}s")
    return fs


# ------------------------------------------------------------------------------ simulation


class Windows:
    """Evaluates simulated windows with the monitor's own test; every window gets its own
    index (the permutation tests are seeded by it)."""

    def __init__(self, bundle: Bundle, cfg: MonitorConfig) -> None:
        self.reference = bundle.reference()
        self.classes = bundle.classes
        self.cfg = cfg
        self.count = 0
        self.seconds = 0.0

    def __call__(self, window: FeatureSet) -> Any:
        t0 = time.perf_counter()
        r = evaluate_window(self.reference, window, self.cfg, self.count, self.classes, "bench")
        self.seconds += time.perf_counter() - t0
        self.count += 1
        return r


def mixed(
    clean: FeatureSet, other: FeatureSet, n: int, n_other: int, rng: np.random.Generator
) -> FeatureSet:
    parts = [clean.subset(rng.choice(len(clean), n - n_other, replace=False))]
    if n_other:
        parts.append(other.subset(rng.choice(len(other), n_other, replace=False)))
    return FeatureSet.concat(parts)


def detection(
    run: Windows, make: Callable[[np.random.Generator], FeatureSet], s: dict[str, Any], tag: int
) -> dict[str, Any]:
    delays: list[int | None] = []
    fired: dict[str, int] = {}
    for r in range(int(s["sequences"])):
        rng = np.random.default_rng([SEED, tag, r])
        delay = None
        for k in range(int(s["max_windows"])):
            res = run(make(rng))
            if res.alert:
                delay = k
                for t in res.fired:
                    fired[t] = fired.get(t, 0) + 1
                break
        delays.append(delay)
    found = [d for d in delays if d is not None]
    return {
        "detection_rate": round(len(found) / len(delays), 4),
        "first_window_rate": round(sum(d == 0 for d in found) / len(delays), 4),
        "within_2_windows_rate": round(sum(d <= 1 for d in found) / len(delays), 4),
        "median_delay_windows": float(np.median(found)) if found else None,
        "mean_delay_windows": round(float(np.mean(found)), 3) if found else None,
        "delays": delays,
        "tests_fired": dict(sorted(fired.items())),
    }


def queue_share(
    run: Windows, clean: FeatureSet, novel: FeatureSet, share: float, s: dict[str, Any], tag: int
) -> dict[str, Any]:
    w, q = int(s["window"]), int(s["queue_windows"])
    n_new = round(share * w)
    novel_sha = set(novel.sha256)
    shares, queued_counts = [], []
    for r in range(int(s["sequences"])):
        rng = np.random.default_rng([SEED, tag, r])
        c_idx = rng.permutation(len(clean))
        n_idx = rng.permutation(len(novel))
        if len(c_idx) < q * (w - n_new) or len(n_idx) < q * n_new:
            raise SystemExit("too few production images for the queue stream; lower queue_windows")
        with tempfile.TemporaryDirectory(prefix="bench-queue-") as d:
            queue = ReviewQueue(Path(d))
            for k in range(q):
                win = FeatureSet.concat(
                    [
                        clean.subset(c_idx[k * (w - n_new) : (k + 1) * (w - n_new)]),
                        novel.subset(n_idx[k * n_new : (k + 1) * n_new]),
                    ]
                )
                res = run(win)
                queue.add(
                    QueueEntry(
                        c.sha256,
                        c.priority,
                        c.reason,
                        c.novelty,
                        c.uncertainty,
                        k,
                        "bench",
                        "",
                        0,
                        0,
                    )
                    for c in res.candidates
                )
            top = queue.entries("queued")[: int(s["queue_top"])]
        queued_counts.append(len(top))
        shares.append(sum(e.sha256 in novel_sha for e in top) / max(1, len(top)))
    return {
        "novel_share_of_top": round(float(np.mean(shares)), 4),
        "novel_share_of_top_min": round(float(np.min(shares)), 4),
        "top_size_mean": round(float(np.mean(queued_counts)), 1),
        "novel_share_of_stream": round(n_new / w, 4),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    base = SMOKE if args.smoke else FULL
    s = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    suffix = "_smoke" if args.smoke else ""
    results = args.results.resolve() / f"monitoring{suffix}.json"
    work = (args.work or REPO / "bench" / "work" / f"monitoring{suffix}").resolve()
    dataset = neu_det_path(args.dataset)
    weights = args.weights or REPO.parent / "shared" / "models" / "yolov8n.pt"
    if not (dataset / "annotations").is_dir() or not Path(weights).is_file():
        print(
            json.dumps(
                {
                    "bench": "monitoring",
                    "error": f"need NEU-DET at {dataset} and weights at {weights}",
                }
            )
        )
        return 2
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    with contextlib.redirect_stdout(sys.stderr):
        roles = prepare(dataset, work, args.novel_class, s)
        log(
            "roles: "
            + ", ".join(
                f"{k} {len(roles[k])}" for k in ("train", "val", "reference", "production", "novel")
            )
        )
        info = train_model(work, roles, s, Path(weights), args.threads)
        log(f"model: val mAP50 {info['val_map50']} ({info['train_seconds']} s)")
        bundle = bundle_for(work, roles, info, s, args.threads)
        img = Path(roles["images_dir"])
        clean = features(
            work, bundle, "clean", [img / n for n in roles["production"]], args.threads, log
        )
        novel = features(
            work, bundle, "novel", [img / n for n in roles["novel"]], args.threads, log
        )
        variants: dict[str, FeatureSet] = {}
        for kind in CHANGES:
            for strength in floats(s[kind]):
                name = f"{kind}-{strength:g}"
                files = variant_files(work, roles, kind, strength)
                variants[name] = features(work, bundle, name, files, args.threads, log)

        cfg = MonitorConfig(window_size=int(s["window"]), permutations=int(s["permutations"]))
        run = Windows(bundle, cfg)
        w = int(s["window"])
        nd_rng = np.random.default_rng([SEED, 1])
        alarms, fired = 0, {}
        for _ in range(int(s["no_drift_windows"])):
            res = run(clean.subset(nd_rng.choice(len(clean), w, replace=False)))
            alarms += res.alert
            for t in res.fired:
                fired[t] = fired.get(t, 0) + 1
        n_nd = int(s["no_drift_windows"])
        log(f"no drift: {alarms}/{n_nd} windows alerted")
        drift: dict[str, Any] = {}
        tag = 10
        for name, fs in variants.items():
            tag += 1
            drift[name] = detection(
                run, lambda rng, fs=fs: fs.subset(rng.choice(len(fs), w, replace=False)), s, tag
            )
            log(
                f"{name}: detection {drift[name]['detection_rate']}, delays {drift[name]['delays']}"
            )
        queue: dict[str, Any] = {}
        for share in floats(s["novel_shares"]):
            tag += 1
            n_new = round(share * w)
            name = f"novel_class-{share:g}"
            drift[name] = detection(
                run, lambda rng, n_new=n_new: mixed(clean, novel, w, n_new, rng), s, tag
            )
            log(
                f"{name}: detection {drift[name]['detection_rate']}, delays {drift[name]['delays']}"
            )
            tag += 1
            queue[f"{share:g}"] = queue_share(run, clean, novel, share, s, tag)
            log(f"queue at {share:g}: {queue[f'{share:g}']}")

    novel_goal = drift.get(f"novel_class-{NOVELTY_GOAL_SHARE:g}")
    queue_goal = queue.get(f"{NOVELTY_GOAL_SHARE:g}")
    far = alarms / n_nd
    doc: dict[str, Any] = {
        "bench": "monitoring",
        "dataset": rel(dataset),
        "weights": rel(Path(weights)),
        "smoke": bool(args.smoke),
        "settings": s,
        "novel_class": roles["novel_class"],
        "images": {k: len(roles[k]) for k in ("train", "val", "reference", "production", "novel")},
        "model": info,
        "bundle": {"digest": bundle.digest, "scoring_model": bundle.spec.scoring_model},
        "monitor": cfg.model_dump(mode="json"),
        "false_alarm_rate": round(far, 4),
        "false_alarms": alarms,
        "no_drift_windows": n_nd,
        "false_alarm_tests": dict(sorted(fired.items())),
        "drift": drift,
        "queue": queue,
        "goals": {
            "false_alarm_rate_le_2pct": far <= 0.02,
            "novel_class_within_2_windows_at_10pct": None
            if novel_goal is None
            else novel_goal["within_2_windows_rate"] >= 0.95,
            "novel_share_of_top50_ge_60pct_at_10pct": None
            if queue_goal is None
            else queue_goal["novel_share_of_top"] >= 0.6,
        },
        "windows_evaluated": run.count,
        "seconds_per_window": round(run.seconds / max(1, run.count), 4),
        "elapsed_s_this_run": round(time.monotonic() - started, 1),
    }
    atomic_write_text(results, json.dumps(doc, indent=1))
    line = {
        k: doc[k]
        for k in (
            "bench",
            "dataset",
            "smoke",
            "novel_class",
            "false_alarm_rate",
            "goals",
            "windows_evaluated",
            "elapsed_s_this_run",
        )
    }
    line["detection_rate"] = {k: v["detection_rate"] for k, v in drift.items()}
    line["median_delay_windows"] = {k: v["median_delay_windows"] for k, v in drift.items()}
    line["queue_novel_share_of_top"] = {k: v["novel_share_of_top"] for k, v in queue.items()}
    line["result_file"] = rel(results)
    print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
