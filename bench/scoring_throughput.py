"""Scoring throughput: what the uncertainty path costs on top of plain prediction, ONNX Runtime
against torch, and memory that stays flat however many images are scored.

Measures, on the same images (NEU-DET, or synthetic 200 px images when it is absent):

- ``ratio_vs_predict``: images/s of the full scoring path (`loop.model.predict` with per-box class
  probabilities and the candidate floor + `loop.uncertainty.score_images`) divided by images/s of
  plain Ultralytics ``YOLO.predict`` on the same arrays, same size and threshold (goal >= 0.95);
- ``onnx_vs_torch``: the same scoring path through ONNX Runtime (`loop.model.predict_onnx`)
  divided by the torch path (goal >= 2), float32 (same scores);
- ``onnx_int8_vs_torch``: the same with the static int8 quantization of that export
  (`loop.model.quantize_onnx`, calibrated on 64 of the training images; ``scoring.backend:
  onnx-int8``), with how far its scores move: ``int8_agreement`` (Spearman correlation of the
  per-image entropy scores against torch, overlap of the top 10 %, largest change of a score);
- ``rss_mb_2k`` / ``rss_mb_20k``: peak RSS (MB) of a fresh process scoring 2,000 and 20,000
  images (the dataset cycled): flat when the path streams.

Every timing reads the images from disk inside the timed loop (every path), after a warm-up. The
three paths run block by block (32 images) in rotating order, so load from other processes hits
them alike; ``--reps`` passes, the median counts. Each ratio is also given from images per
CPU-second of this process (``*_cpu``), which other processes' load cannot inflate.
Trains a small detector on 240 images once and reuses it (``bench/work/scoring_throughput``).
Prints ONE JSON line; writes ``bench/results/scoring_throughput.json`` (``--smoke``: fewer
images, ``*_smoke.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from itertools import cycle, islice
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from loop import model  # noqa: E402
from loop.config import TrainConfig  # noqa: E402
from loop.images import atomic_write_text  # noqa: E402
from loop.uncertainty import score_images  # noqa: E402

CONF = 0.01  # SelectConfig.candidate_conf
MIN_CANDIDATES = 3  # SelectConfig.min_candidates
BATCH = 16


def neu_det_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    env = os.environ.get("DEFECT_LOOP_NEU_DET")
    return Path(env) if env else REPO.parent / "shared" / "datasets" / "neu-det"


def dataset(work: Path, neu: Path) -> tuple[Path, Path, list[str]]:
    """(images dir, labels dir, classes) of a YOLO folder: NEU-DET converted, or synthetic."""
    from loop.replay_dataset import prepare_dataset

    if (neu / "annotations").is_dir():
        ds = prepare_dataset(neu, work / "neu-det")
        return ds.images_dir, ds.labels_dir, ds.classes
    from loop.synth import SYNTH_CLASSES, write_dataset

    synth = work / "synthetic"
    if not (synth / "classes.txt").is_file():
        write_dataset(synth, 1000, seed=11, size=200)
    return synth / "images", synth / "labels", list(SYNTH_CLASSES)


def trained_model(work: Path, images: list[Path], classes: list[str], imgsz: int) -> Path:
    """A small detector (yolov8n, 10 epochs on 200 + 40 images), trained once and reused.

    Trained long enough that its scores spread above the candidate threshold like a real
    model's (an untrained one scores every anchor ~0, which makes NMS look cheaper or dearer
    than it is)."""
    weights = work / f"model-{imgsz}-e10.pt"
    if weights.is_file():
        return weights
    lists = {"train": images[:200], "val": images[200:240]}
    for split, paths in lists.items():
        (work / f"{split}.txt").write_text("".join(f"{p}\n" for p in paths))
    names = "\n".join(f"  {i}: {json.dumps(c)}" for i, c in enumerate(classes))
    data = work / "data.yaml"
    data.write_text(
        f"path: {work}\ntrain: {work / 'train.txt'}\nval: {work / 'val.txt'}\nnames:\n{names}\n"
    )
    cfg = TrainConfig(model="yolov8n.yaml", imgsz=imgsz, epochs=10, batch=16)
    res = model.train(data, work / "runs", cfg, work / "ultralytics", name="throughput")
    weights.write_bytes(Path(res.weights).read_bytes())
    return weights


def _read(paths: list[Path]) -> list[Any]:
    import cv2

    return [cv2.imread(str(p)) for p in paths]


def plain_predict(yolo: Any, paths: list[Path], imgsz: int) -> int:
    """Ultralytics' own predict on arrays read from disk, batch by batch; returns boxes kept."""
    boxes = 0
    for i in range(0, len(paths), BATCH):
        arrays = _read(paths[i : i + BATCH])
        results = yolo.predict(
            arrays, imgsz=imgsz, conf=CONF, batch=BATCH, device="cpu", save=False, verbose=False
        )
        boxes += sum(len(r.boxes) for r in results)
    return boxes


def score_stream(dets: Iterator[Any], n: int) -> np.ndarray:
    """Entropy per image as `Project.score` does it (one image at a time, streaming)."""
    rng = np.random.default_rng(0)
    scores = np.empty(n)
    for i, d in enumerate(dets):
        scores[i] = score_images("entropy", [d], reduction="max", rng=rng)[0]
    return scores


def torch_scoring(weights: Path, paths: Iterator[Path], imgsz: int, nc: int, ycd: Path) -> Any:
    """The production scoring path: a stream of `Detections` (scored by `score_stream`)."""
    return model.predict(
        weights, paths, imgsz, CONF, ycd, nc, batch=BATCH, min_candidates=MIN_CANDIDATES
    )


def onnx_scoring(onnx: Path, paths: Iterator[Path], imgsz: int, nc: int, ycd: Path) -> Any:
    return model.predict_onnx(
        onnx, paths, imgsz, CONF, ycd, nc, batch=BATCH, min_candidates=MIN_CANDIDATES
    )


PATHS = ("plain", "scoring", "onnx", "int8")


def interleaved(
    yolo: Any,
    weights: Path,
    onnx: dict[str, Path],
    paths: list[Path],
    imgsz: int,
    nc: int,
    ycd: Path,
    block: int,
) -> tuple[dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """Wall and CPU seconds each path spends on ``paths``, block by block in rotating order,
    and the entropy score each scoring path gave every image.

    The CPU is shared with other processes whose load drifts; timing the paths on the same
    block back to back (rotating who goes first) pairs their measurements. CPU seconds (this
    process, all threads) measure the work itself, which other processes cannot inflate. The
    scoring paths are single streams (the model is loaded once), consumed a block at a time.
    """
    streams = {
        "scoring": torch_scoring(weights, iter(paths), imgsz, nc, ycd),
        **{k: onnx_scoring(v, iter(paths), imgsz, nc, ycd) for k, v in onnx.items()},
    }
    spent = {n: {"wall": 0.0, "cpu": 0.0} for n in PATHS}
    scores: dict[str, list[np.ndarray]] = {n: [] for n in streams}
    for b, start in enumerate(range(0, len(paths), block)):
        chunk = paths[start : start + block]
        r = b % len(PATHS)
        for name in PATHS[r:] + PATHS[:r]:
            w0, c0 = time.perf_counter(), time.process_time()
            if name == "plain":
                plain_predict(yolo, chunk, imgsz)
            else:
                scores[name].append(score_stream(islice(streams[name], len(chunk)), len(chunk)))
            spent[name]["wall"] += time.perf_counter() - w0
            spent[name]["cpu"] += time.process_time() - c0
    return spent, {k: np.concatenate(v) for k, v in scores.items()}


def agreement(ref: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """How far ``other``'s per-image scores are from ``ref``'s: Spearman rank correlation and
    the share of ``ref``'s top 10 % that ``other`` also puts in its top 10 %."""
    from scipy.stats import spearmanr

    k = max(1, len(ref) // 10)
    top_ref = set(np.argsort(-ref, kind="stable")[:k].tolist())
    top_other = set(np.argsort(-other, kind="stable")[:k].tolist())
    return {
        "spearman": round(float(spearmanr(ref, other)[0]), 4),
        "top10pct_overlap": round(len(top_ref & top_other) / k, 4),
        "max_abs_score_diff": round(float(np.abs(ref - other).max()), 4),
    }


def peak_rss_mb() -> float:
    """Peak resident set of this process in MB.

    ``VmHWM`` of the process's own memory map: ``ru_maxrss`` survives ``execve`` on Linux, so a
    child forked from a big parent would report the parent's peak.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(args: argparse.Namespace) -> int:
    """Score ``--rss-child`` images (the folder cycled) with the torch path; print peak RSS."""
    paths = sorted(Path(args.images_dir).iterdir())
    n = int(args.rss_child)
    stream: Iterator[Path] = islice(cycle(paths), n)
    dets = model.predict(
        Path(args.weights),
        stream,
        args.imgsz,
        CONF,
        Path(args.ycd),
        args.nc,
        batch=BATCH,
        min_candidates=MIN_CANDIDATES,
    )
    t0 = time.perf_counter()
    scores = score_stream(dets, n)
    took = time.perf_counter() - t0
    peak_mb = peak_rss_mb()
    print(
        json.dumps(
            {
                "n": n,
                "peak_rss_mb": round(peak_mb, 1),
                "img_s": n / took,
                "finite": bool(np.isfinite(scores).all()),
            }
        )
    )
    return 0


def measure_rss(n: int, images_dir: Path, weights: Path, imgsz: int, nc: int, ycd: Path) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--rss-child",
        str(n),
        "--images-dir",
        str(images_dir),
        "--weights",
        str(weights),
        "--imgsz",
        str(imgsz),
        "--nc",
        str(nc),
        "--ycd",
        str(ycd),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", help="NEU-DET folder (default: $DEFECT_LOOP_NEU_DET or ../shared)")
    p.add_argument("--smoke", action="store_true", help="200 images, RSS at 200 / 1,000")
    p.add_argument("--images", type=int, default=None, help="images per timing (default 1000)")
    p.add_argument("--rss-counts", default=None, help="two counts (default 2000,20000)")
    p.add_argument("--imgsz", type=int, default=192)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--work", type=Path, default=REPO / "bench" / "work" / "scoring_throughput")
    p.add_argument(
        "--results", type=Path, default=REPO / "bench" / "results", help="folder of the result file"
    )
    # internal: the RSS child process
    p.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--images-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    p.add_argument("--nc", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--ycd", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.rss_child is not None:
        with contextlib.redirect_stdout(sys.stderr):
            model.prepare_ultralytics(Path(args.ycd), args.threads)
        return rss_child(args)
    out = sys.stdout
    n_img = args.images or (200 if args.smoke else 1000)
    rss_counts = [
        int(c) for c in (args.rss_counts or ("200,1000" if args.smoke else "2000,20000")).split(",")
    ]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ycd = work / "ultralytics"
    started = time.monotonic()
    with contextlib.redirect_stdout(sys.stderr):
        model.prepare_ultralytics(ycd, args.threads)
        images_dir, _labels, classes = dataset(work, neu_det_path(args.dataset))
        images = sorted(images_dir.iterdir())
        # Training images are the first 240 of a seeded shuffle; timings use other ones.
        order = [images[i] for i in np.random.default_rng(0).permutation(len(images))]
        weights = trained_model(work, order[:240], classes, args.imgsz)
        paths = list(islice(cycle(order[240:]), n_img))
        nc = len(classes)
        yolo = model.load_model(weights, ycd, args.threads)
        fp32 = model.export_onnx(weights, args.imgsz, ycd, work / f"model-{args.imgsz}.onnx")
        # Calibrated on training images, never on the timed ones (as a project calibrates on
        # its labeled images and scores its pool).
        int8 = model.quantize_onnx(fp32, order[:64], args.imgsz, ycd, threads=args.threads)
        onnx = {"onnx": fp32, "int8": int8}
        # Warm-up: model build, first-batch allocations, ONNX Runtime's first call per shape.
        interleaved(yolo, weights, onnx, paths[:64], args.imgsz, nc, ycd, block=64)
        runs: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in PATHS}
        for _ in range(args.reps):
            spent, scores = interleaved(yolo, weights, onnx, paths, args.imgsz, nc, ycd, block=32)
            for k, sec in spent.items():
                runs[k]["wall"].append(n_img / sec["wall"])
                runs[k]["cpu"].append(n_img / sec["cpu"])
        rss = [measure_rss(c, images_dir, weights, args.imgsz, nc, ycd) for c in rss_counts]
    # Median over repetitions of paired, interleaved runs.
    wall = {k: float(np.median(v["wall"])) for k, v in runs.items()}
    cpu = {k: float(np.median(v["cpu"])) for k, v in runs.items()}
    result = {
        "bench": "scoring_throughput",
        "images": n_img,
        # Relative to the repository: the result file never names the machine that ran it.
        "dataset": os.path.relpath(images_dir.resolve(), REPO),
        "imgsz": args.imgsz,
        "threads": args.threads,
        "batch": BATCH,
        "conf": CONF,
        "min_candidates": MIN_CANDIDATES,
        "predict_img_s": round(wall["plain"], 2),
        "scoring_img_s": round(wall["scoring"], 2),
        "onnx_scoring_img_s": round(wall["onnx"], 2),
        "onnx_int8_scoring_img_s": round(wall["int8"], 2),
        "ratio_vs_predict": round(wall["scoring"] / wall["plain"], 3),
        "onnx_vs_torch": round(wall["onnx"] / wall["scoring"], 3),
        "onnx_int8_vs_torch": round(wall["int8"] / wall["scoring"], 3),
        # The same ratios from images per CPU-second: robust to other processes' load.
        "ratio_vs_predict_cpu": round(cpu["scoring"] / cpu["plain"], 3),
        "onnx_vs_torch_cpu": round(cpu["onnx"] / cpu["scoring"], 3),
        "onnx_int8_vs_torch_cpu": round(cpu["int8"] / cpu["scoring"], 3),
        # Scores of the last repetition, every timed image, against the torch path's.
        "onnx_agreement": agreement(scores["scoring"], scores["onnx"]),
        "int8_agreement": agreement(scores["scoring"], scores["int8"]),
        "img_per_cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "rss_mb_2k": rss[0]["peak_rss_mb"],
        "rss_mb_20k": rss[1]["peak_rss_mb"],
        "rss_images": rss_counts,
        "rss_img_s": [round(r["img_s"], 2) for r in rss],
        "runs_img_s": {k: [round(x, 2) for x in v["wall"]] for k, v in runs.items()},
        "loadavg_1m_5m_15m": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "smoke": bool(args.smoke),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    name = "scoring_throughput_smoke.json" if args.smoke else "scoring_throughput.json"
    atomic_write_text(Path(args.results) / name, json.dumps(result, indent=1))
    print(json.dumps(result), file=out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
