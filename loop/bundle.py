"""Deployment bundles: the champion packaged for the line, scored without MLflow.

A bundle is one folder::

    bundle.json       what a consumer needs: class map (id = position), input size and
                      preprocessing, output layout, thresholds, which ONNX file scores
    model.onnx        float32 ONNX: output 0 = the detection head (B, 4 + nc, anchors),
                      output ``embedding`` = (B, d) pooled backbone features
    model.int8.onnx   static int8 quantization of model.onnx (when configured)
    reference.npz     the monitor's reference (`Reference`): features of held-out images of the
                      champion's dataset version, embeddings of its train images
    model_card.json   per-class test AP, dataset version digest and size, training run, and the
    model_card.md     sha256 of every other file (`load_bundle` checks them)

`build_bundle` makes one from weights and image lists (no MLflow); `load_bundle` opens and
verifies one; `Bundle.score` runs it (ONNX Runtime, NMS and class probabilities as the loop
scores); `Bundle.features` turns images into the `loop.drift.FeatureSet` the monitor tests.
`loop.deploy.deploy` does it for a project's champion and registers the bundle in MLflow under
the ``production`` alias (`loop.tracking.Tracker.move_production`).
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from loop.detections import Detections
from loop.drift import (
    IMAGE_STATS,
    FeatureSet,
    image_stats,
    nearest_distance,
    part_normalize,
    part_scales,
    read_gray,
)
from loop.errors import DefectLoopError, DeployError, ImageError
from loop.images import atomic_write_text, sha256_file

if TYPE_CHECKING:
    pass

BUNDLE_FORMAT = "defect-loop-bundle/1"
SPEC_FILE = "bundle.json"
CARD_FILE = "model_card.json"
CARD_MD = "model_card.md"
REFERENCE_FILE = "reference.npz"
FP32_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"

PREPROCESSING = {
    "read": "BGR uint8 (OpenCV), converted to RGB",
    "resize": "letterbox: scale the long side to imgsz keeping the aspect ratio, pad to a square",
    "pad_value": 114,
    "stride": 32,
    "scale": "divide by 255 to float32 in [0, 1]",
    "layout": "NCHW float32, batch dimension dynamic",
}
OUTPUTS = {
    "output0": "(B, 4 + nc, anchors): centre-x, centre-y, width, height in input pixels, then "
    "one sigmoid score per class; class-aware NMS at `iou` outside the graph",
    "embedding": "(B, d): spatially pooled feature maps, concatenated (see embedding_parts)",
}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BundleSpec:
    """The contents of ``bundle.json`` (see the module docstring).

    ``candidate_conf``/``min_candidates``: the candidate boxes scored for uncertainty (as
    ``select.*`` in the loop); ``defect_conf``: a box at or above it is a defect; ``iou``: NMS.
    ``source``: registered model, model version, run id and dataset digest of the weights.
    """

    classes: tuple[str, ...]
    imgsz: int
    candidate_conf: float
    min_candidates: int
    defect_conf: float
    iou: float
    scoring_model: str
    fp32_model: str
    int8_model: str | None
    embedding_dim: int
    embedding_parts: list[dict[str, Any]]
    created_at: str
    source: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        doc = {
            "format": BUNDLE_FORMAT,
            **asdict(self),
            "classes": list(self.classes),
            "class_map": {str(i): c for i, c in enumerate(self.classes)},
            "preprocessing": PREPROCESSING,
            "outputs": OUTPUTS,
            "reference": REFERENCE_FILE,
        }
        return json.dumps(doc, indent=1)

    @staticmethod
    def from_json(text: str, where: Path) -> BundleSpec:
        try:
            doc = json.loads(text)
            if doc.get("format") != BUNDLE_FORMAT:
                raise DeployError(
                    f"{where} is format {doc.get('format')!r}, not {BUNDLE_FORMAT!r}; rebuild "
                    "the bundle with this defect-loop (`defect-loop deploy`)"
                )
            return BundleSpec(
                classes=tuple(str(c) for c in doc["classes"]),
                imgsz=int(doc["imgsz"]),
                candidate_conf=float(doc["candidate_conf"]),
                min_candidates=int(doc["min_candidates"]),
                defect_conf=float(doc["defect_conf"]),
                iou=float(doc["iou"]),
                scoring_model=str(doc["scoring_model"]),
                fp32_model=str(doc["fp32_model"]),
                int8_model=None if doc.get("int8_model") is None else str(doc["int8_model"]),
                embedding_dim=int(doc["embedding_dim"]),
                embedding_parts=[dict(p) for p in doc["embedding_parts"]],
                created_at=str(doc["created_at"]),
                source={str(k): str(v) for k, v in (doc.get("source") or {}).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DeployError(f"{where} is not a valid bundle spec ({exc}); rebuild it") from exc


@dataclass(frozen=True)
class Reference:
    """The monitor's reference. ``features``: held-out labeled images (never trained on), which
    production windows are compared with; ``neighbours`` ``(m, d)``: embeddings of the train
    images, which novelty is measured against; ``parts``: the widths of the embedding's pieces
    (bundle.json ``embedding_parts``).

    Embeddings are compared in `embed_space`: centred on the neighbours' mean (pooled features
    share a large common component) with each piece scaled by its spread over the neighbours,
    so that every piece weighs the same (`loop.drift.part_normalize`). Novelty is the Euclidean
    distance there to the nearest train image; ``nn_distance`` (derived) holds it for every
    reference image: the null distribution of novelty."""

    features: FeatureSet
    neighbours: npt.NDArray[np.float32]
    neighbour_sha256: tuple[str, ...]
    parts: tuple[int, ...]
    nn_distance: npt.NDArray[np.float64] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.neighbours.ndim != 2 or len(self.neighbours) != len(self.neighbour_sha256):
            raise DeployError("reference neighbours and their sha256 keys do not match")
        if sum(self.parts) != self.neighbours.shape[1]:
            raise DeployError(f"embedding parts {self.parts} do not add up to the embedding width")
        object.__setattr__(self, "_scaling", part_scales(self.neighbours, self.parts))
        object.__setattr__(self, "_space", self.embed_space(self.neighbours))
        object.__setattr__(self, "nn_distance", self.novelty_distance(self.features.embedding))

    def embed_space(self, embedding: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """``(n, d)`` embeddings in the comparison space (`loop.drift.part_normalize`)."""
        center, scales = self._scaling  # type: ignore[attr-defined]
        return part_normalize(embedding, center, scales, self.parts)

    def novelty_distance(self, embedding: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Distance from each embedding to its nearest train image in `embed_space`."""
        return nearest_distance(self.embed_space(embedding), self._space)  # type: ignore[attr-defined]

    def save(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        arrays: dict[str, Any] = {
            **self.features.arrays("ref_"),
            "neighbours": self.neighbours,
            "neighbour_sha256": np.array(self.neighbour_sha256, dtype="U64"),
            "parts": np.array(self.parts, dtype=np.int64),
        }
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)

    @staticmethod
    def load(path: Path) -> Reference:
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            return Reference(
                FeatureSet.from_arrays(arrays, "ref_"),
                np.asarray(arrays["neighbours"], dtype=np.float32),
                tuple(str(s) for s in arrays["neighbour_sha256"].tolist()),
                tuple(int(w) for w in arrays["parts"].tolist()),
            )
        except (OSError, ValueError, KeyError, DefectLoopError) as exc:
            raise DeployError(
                f"cannot read the reference {path}: {exc}; rebuild the bundle"
            ) from exc


def image_features(
    det: Detections, embedding: np.ndarray, stats: np.ndarray, defect_conf: float, n_classes: int
) -> tuple[float, float, int, np.ndarray]:
    """``(max_conf, uncertainty, top_class, class_counts)`` of one image's candidate boxes, as
    `loop.drift.FeatureSet` defines them (``embedding`` and ``stats`` pass through)."""
    from loop.uncertainty import box_entropy

    if len(det) == 0 or det.confidence is None:
        return 0.0, 0.0, -1, np.zeros(n_classes, dtype=np.int64)
    max_conf = float(det.confidence.max())
    unc = float(box_entropy(det.class_probs).max()) if det.class_probs is not None else 0.0
    defects = det.confidence >= defect_conf
    counts = np.bincount(det.class_id[defects], minlength=n_classes).astype(np.int64)
    if defects.any():
        best = int(np.flatnonzero(defects)[np.argmax(det.confidence[defects])])
        top = int(det.class_id[best])
    else:
        top = -1
    return max_conf, unc, top, counts[:n_classes]


class Bundle:
    """An opened bundle folder (see the module docstring); needs no MLflow."""

    def __init__(self, root: Path, spec: BundleSpec, card: dict[str, Any]) -> None:
        self.root = Path(root)
        self.spec = spec
        self.card = card
        self._reference: Reference | None = None

    @property
    def digest(self) -> str:
        """sha256 over the file list of the model card: identifies the bundle's content."""
        files = self.card.get("files", {})
        canon = json.dumps({k: v["sha256"] for k, v in sorted(files.items())}, sort_keys=True)
        return hashlib.sha256(canon.encode()).hexdigest()

    @property
    def classes(self) -> list[str]:
        return list(self.spec.classes)

    @property
    def scoring_path(self) -> Path:
        return self.root / self.spec.scoring_model

    def score(
        self, images: Sequence[Path], yolo_config_dir: Path, batch: int = 16, threads: int = 2
    ) -> Iterator[tuple[Detections, np.ndarray]]:
        """Per image, in order: candidate `Detections` (pixel ``xyxy``, confidences, per-class
        sigmoid scores; boxes >= ``candidate_conf``, at least ``min_candidates``) and the
        ``(d,)`` embedding. ``yolo_config_dir``: a writable folder for Ultralytics' settings
        (it runs offline)."""
        from loop import model

        return model.predict_onnx_embedded(
            self.scoring_path,
            images,
            self.spec.imgsz,
            self.spec.candidate_conf,
            yolo_config_dir,
            len(self.spec.classes),
            batch=batch,
            iou=self.spec.iou,
            threads=threads,
            min_candidates=self.spec.min_candidates,
        )

    def features(
        self,
        images: Sequence[Path],
        sha256: Sequence[str],
        yolo_config_dir: Path,
        threads: int = 2,
        on_image: Callable[[int], None] | None = None,
    ) -> FeatureSet:
        """Score ``images`` (keyed by ``sha256``, same order) into a `FeatureSet`.
        ``on_image(i)`` is called after each image (progress)."""
        if len(images) != len(sha256):
            raise DeployError(f"{len(images)} images but {len(sha256)} sha256 keys")
        nc = len(self.spec.classes)
        n = len(images)
        emb = np.zeros((n, self.spec.embedding_dim), dtype=np.float32)
        stats = np.zeros((n, len(IMAGE_STATS)))
        max_conf, unc = np.zeros(n), np.zeros(n)
        top = np.full(n, -1, dtype=np.int64)
        counts = np.zeros((n, nc), dtype=np.int64)
        for i, (det, vec) in enumerate(self.score(images, yolo_config_dir, threads=threads)):
            if vec.shape != (self.spec.embedding_dim,):
                raise DeployError(
                    f"the bundle's embedding has {vec.shape[0]} values, bundle.json says "
                    f"{self.spec.embedding_dim}; rebuild the bundle"
                )
            try:
                stats[i] = image_stats(read_gray(Path(images[i])))
            except OSError as exc:
                raise ImageError(f"cannot read image {images[i]}: {exc}") from exc
            emb[i] = vec
            max_conf[i], unc[i], top[i], counts[i] = image_features(
                det, vec, stats[i], self.spec.defect_conf, nc
            )
            if on_image is not None:
                on_image(i)
        return FeatureSet(tuple(sha256), emb, stats, max_conf, unc, top, counts)

    def reference(self) -> Reference:
        if self._reference is None:
            self._reference = Reference.load(self.root / REFERENCE_FILE)
        return self._reference


def _file_table(root: Path) -> dict[str, dict[str, Any]]:
    return {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(root.iterdir())
        if p.is_file() and p.name not in (CARD_FILE, CARD_MD) and not p.name.startswith(".")
    }


def load_bundle(path: Path, verify: bool = True) -> Bundle:
    """Open the bundle folder ``path``. With ``verify``, every file listed in the model card
    must exist with its sha256, and no file may be unlisted; raises `DeployError` otherwise."""
    root = Path(path)
    spec_path, card_path = root / SPEC_FILE, root / CARD_FILE
    if not spec_path.is_file() or not card_path.is_file():
        raise DeployError(
            f"{root} is not a deployment bundle (no {SPEC_FILE} / {CARD_FILE}); build one with "
            "`defect-loop deploy`"
        )
    spec = BundleSpec.from_json(spec_path.read_text(), spec_path)
    try:
        card = json.loads(card_path.read_text())
    except ValueError as exc:
        raise DeployError(f"{card_path} is not valid JSON: {exc}") from exc
    if verify:
        listed = card.get("files")
        if not isinstance(listed, dict):
            raise DeployError(f"{card_path} lists no files; rebuild the bundle")
        actual = _file_table(root)
        missing = sorted(set(listed) - set(actual))
        extra = sorted(set(actual) - set(listed))
        changed = sorted(
            k for k in set(listed) & set(actual) if listed[k].get("sha256") != actual[k]["sha256"]
        )
        if missing or extra or changed:
            raise DeployError(
                f"bundle {root} does not match its model card: missing {missing}, unlisted "
                f"{extra}, changed {changed}; download or build it again"
            )
    return Bundle(root, spec, card)


def _card_markdown(card: dict[str, Any]) -> str:
    src = card["model"]
    ds = card["dataset"]
    test = card.get("test_metrics") or {}
    lines = [
        f"# Model card: {src.get('registered_model', '?')} v{src.get('model_version', '?')}",
        "",
        f"- Built {card['created_at']} by {card.get('created_by', '?')}",
        f"- Training run: `{src.get('run_id', '?')}`",
        f"- Dataset version: `{ds.get('digest', '?')}` ({ds.get('n_images', '?')} images: "
        + ", ".join(f"{k} {v}" for k, v in (ds.get("splits") or {}).items())
        + ")",
        f"- Classes (id: name): {', '.join(f'{i}: {c}' for i, c in enumerate(card['classes']))}",
        f"- Input: {card['imgsz']} px letterbox; a box >= {card['defect_conf']} is a defect",
        f"- Scoring model: `{card['scoring_model']}`",
        "",
        "## Test metrics (frozen test split)",
        "",
    ]
    if test:
        lines.append(
            f"mAP50 {test.get('map50', float('nan')):.4f}, "
            f"mAP50-95 {test.get('map50_95', float('nan')):.4f}"
        )
        lines += ["", "| class | AP50 | AP50-95 |", "| --- | --- | --- |"]
        for c, v in (test.get("per_class") or {}).items():
            lines.append(
                f"| {c} | {v.get('ap50', float('nan')):.4f} | {v.get('ap50_95', float('nan')):.4f} |"
            )
    else:
        lines.append("No test metrics were logged for this model (no labeled test images).")
    ref = card.get("reference") or {}
    lines += [
        "",
        "## Monitoring reference",
        "",
        f"{ref.get('images', '?')} held-out images ({', '.join(ref.get('splits', []))}) and "
        f"{ref.get('neighbours', '?')} train images of the dataset version.",
        "",
        "## Files (sha256)",
        "",
    ]
    lines += [f"- `{k}` {v['bytes']} bytes `{v['sha256']}`" for k, v in card["files"].items()]
    return "\n".join(lines) + "\n"


def build_bundle(
    weights: Path,
    out_dir: Path,
    classes: Sequence[str],
    imgsz: int,
    yolo_config_dir: Path,
    reference: Sequence[tuple[str, Path]],
    neighbours: Sequence[tuple[str, Path]],
    *,
    candidate_conf: float,
    min_candidates: int,
    defect_conf: float,
    iou: float = 0.7,
    int8: bool = False,
    calibration: Sequence[Path] = (),
    calibration_images: int = 64,
    source: dict[str, str] | None = None,
    card: dict[str, Any] | None = None,
    threads: int = 2,
    progress: Progress | None = None,
) -> Bundle:
    """Build a bundle for the detection ``weights`` (``.pt``) into the new folder ``out_dir``.

    ``reference``/``neighbours``: ``(sha256, image path)`` of the held-out and train images
    the monitor's `Reference` is computed from, through the bundle's own scoring model (so an
    int8 bundle's reference has int8 scores). ``int8``: also quantize, calibrated on
    ``calibration`` (up to ``calibration_images``), and score with the int8 model.
    ``source`` (registered model, version, run id, dataset digest) goes to bundle.json and
    the card; ``card``: more model-card fields (``test_metrics``, ``dataset``). The folder is
    written under a temporary name and renamed when complete. Raises `DeployError`.
    """
    from loop import model

    out = Path(out_dir)
    if out.exists():
        raise DeployError(f"{out} already exists; remove it or choose another folder")
    if imgsz % 32:
        raise DeployError(
            f"the ONNX bundle needs an input size that is a multiple of 32, got {imgsz}"
        )
    if not reference or not neighbours:
        raise DeployError(
            f"the monitor's reference needs held-out and train images, got {len(reference)} "
            f"and {len(neighbours)}"
        )
    if int8 and not calibration:
        raise DeployError("an int8 bundle needs calibration images (labeled train images)")
    say = progress or (lambda _m: None)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        say("exporting the model to ONNX")
        # Ultralytics exports beside the weights: work on a private copy of them.
        private = tmp / ".weights.pt"
        shutil.copyfile(weights, private)
        plain = model.export_onnx(private, imgsz, yolo_config_dir, tmp / ".plain.onnx", threads)
        parts = model.add_embedding_output(plain, tmp / FP32_FILE)
        plain.unlink(missing_ok=True)
        private.unlink(missing_ok=True)
        if int8:
            say(
                f"quantizing to int8 (calibrated on {min(len(calibration), calibration_images)} images)"
            )
            model.quantize_onnx(
                tmp / FP32_FILE,
                list(calibration),
                imgsz,
                yolo_config_dir,
                tmp / INT8_FILE,
                max_images=calibration_images,
                threads=threads,
            )
        scoring = INT8_FILE if int8 else FP32_FILE
        # The embedding width: one image through the model.
        probe = next(
            model.predict_onnx_embedded(
                tmp / scoring,
                [Path(reference[0][1])],
                imgsz,
                candidate_conf,
                yolo_config_dir,
                len(classes),
                batch=1,
                threads=threads,
            )
        )[1]
        if probe.shape[0] != sum(p.channels for p in parts):
            raise DeployError(
                f"the embedding output has {probe.shape[0]} values, its parts "
                f"{[asdict(p) for p in parts]} say {sum(p.channels for p in parts)}"
            )
        spec = BundleSpec(
            classes=tuple(classes),
            imgsz=imgsz,
            candidate_conf=candidate_conf,
            min_candidates=min_candidates,
            defect_conf=defect_conf,
            iou=iou,
            scoring_model=scoring,
            fp32_model=FP32_FILE,
            int8_model=INT8_FILE if int8 else None,
            embedding_dim=int(probe.shape[0]),
            embedding_parts=[asdict(p) for p in parts],
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            source=dict(source or {}),
        )
        atomic_write_text(tmp / SPEC_FILE, spec.to_json())
        bundle = Bundle(tmp, spec, {})
        say(f"reference: scoring {len(reference)} held-out images")
        ref = bundle.features(
            [Path(p) for _, p in reference], [s for s, _ in reference], yolo_config_dir, threads
        )
        say(f"reference: embedding {len(neighbours)} train images")
        nb = bundle.features(
            [Path(p) for _, p in neighbours], [s for s, _ in neighbours], yolo_config_dir, threads
        )
        Reference(ref, nb.embedding, nb.sha256, tuple(p.channels for p in parts)).save(
            tmp / REFERENCE_FILE
        )
        files = _file_table(tmp)
        doc: dict[str, Any] = {
            "format": BUNDLE_FORMAT,
            "created_at": spec.created_at,
            "created_by": current_user(),
            "model": dict(spec.source),
            "classes": list(classes),
            "imgsz": imgsz,
            "defect_conf": defect_conf,
            "scoring_model": scoring,
            "test_metrics": None,
            "dataset": {},
            **(card or {}),
            "reference": {
                "images": len(reference),
                "neighbours": len(neighbours),
                **((card or {}).get("reference") or {}),
            },
            "files": files,
        }
        atomic_write_text(tmp / CARD_FILE, json.dumps(doc, indent=1))
        atomic_write_text(tmp / CARD_MD, _card_markdown(doc))
        os.replace(tmp, out)
    except DefectLoopError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DeployError(f"building the bundle failed: {type(exc).__name__}: {exc}") from exc
    return load_bundle(out)


def current_user() -> str:
    """``user@host`` of this process: who built a bundle or moved production by default."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"
