"""Labels that come with an ingest, turned into dataset rows: YOLO label files and mask PNGs.

`Project.ingest` and `Project.ingest_masks` pool the images first; the functions here read the
labels of the accepted images into `LabeledImage` rows (one per sha256) and list every label file
that could not be used, with the reason (those never stop the others). Which file belongs to
which image: `loop.labelfiles` (YOLO) and `loop.mask_import` (masks); the conversions are pure
and live in `loop.formats`. Making a dataset version from the rows is the project's step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loop.config import SplitConfig, TaskType
from loop.datasets import LabeledImage, assign_split
from loop.detections import Detections
from loop.errors import ConversionError, UnknownLabelError
from loop.formats.masks import mask_to_polygons
from loop.formats.yolo import (
    yolo_lines_to_detections,
    yolo_lines_to_instances,
    yolo_pose_lines_to_instances,
)
from loop.images import IngestReport, PoolImage, Rejected
from loop.keypoints import InstanceKeypoints
from loop.labelfiles import match_label_files
from loop.mask_import import class_of_image, read_mask
from loop.polygons import Rings, polygons_to_detections


@dataclass
class LabelRows:
    """What one ingest's labels gave: ``rows`` (one per sha256, sorted by sha256 for YOLO files,
    by mask path for masks), ``problems`` (label files not imported, with the reason) and, for
    masks, ``dropped`` (regions left out of an imported mask, with size, place and reason)."""

    rows: list[LabeledImage]
    problems: list[Rejected]
    dropped: list[Rejected] = field(default_factory=list)


def _row(
    entry: PoolImage,
    split: SplitConfig,
    det: Detections,
    provenance: dict[str, str],
    polygons: tuple[Rings, ...] = (),
    keypoints: tuple[InstanceKeypoints, ...] = (),
) -> LabeledImage:
    """The dataset row of a pooled image: its identity and size from the pool, its split from
    its sha256 (`assign_split`), and the labels read for it."""
    return LabeledImage(
        entry.sha256,
        entry.path,
        entry.width,
        entry.height,
        assign_split(entry.sha256, split),
        det,
        provenance,
        polygons,
        keypoints,
    )


def yolo_label_rows(
    source: Path,
    files: list[Path],
    labels_dir: Path,
    report: IngestReport,
    classes: Sequence[str],
    task: TaskType,
    split: SplitConfig,
    slots: tuple[tuple[str, ...], ...] = (),
) -> LabelRows:
    """The labeled rows of the images ``report`` accepted from ``files`` (below ``source``),
    read from their YOLO label files in ``labels_dir``: detection lines, segmentation lines in a
    ``segment`` project, or pose lines in the keypoint ``slots`` order when ``slots`` is given
    (`loop.formats.yolo`). An image under two names whose label files differ gets neither."""
    match = match_label_files(source, files, labels_dir, report.accepted)
    problems = list(match.problems)
    found: dict[str, list[tuple[Path, Path, LabeledImage]]] = {}
    for image, txt in sorted(match.labels.items()):
        entry = report.accepted[str(image)]
        polys: tuple[Rings, ...] = ()
        kps: tuple[InstanceKeypoints, ...] = ()
        size = (entry.width, entry.height)
        try:
            if slots:
                det, kps = yolo_pose_lines_to_instances(txt.read_text(), size, slots)
            elif task == "segment":
                det, polys = yolo_lines_to_instances(txt.read_text(), size, len(classes))
            else:
                det = yolo_lines_to_detections(txt.read_text(), size, len(classes))
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Rejected(str(txt), f"unreadable label file: {exc}"))
            continue
        except (ConversionError, UnknownLabelError) as exc:
            problems.append(
                Rejected(str(txt), f"{exc}; its image {image} was ingested without labels")
            )
            continue
        row = _row(entry, split, det, {"source": "import", "file": str(txt)}, polys, kps)
        found.setdefault(entry.sha256, []).append((image, txt, row))
    labeled: list[LabeledImage] = []
    names = list(classes)
    for sha, rows in sorted(found.items()):
        first = rows[0]
        other = next((r for r in rows if r[2].canonical(names) != first[2].canonical(names)), None)
        if other is None:
            labeled.append(first[2])
            continue
        problems.append(
            Rejected(
                str(first[1]),
                f"conflicting labels for one image ({sha[:12]}, under two names): "
                f"{first[1]} (for {first[0]}) and {other[1]} (for {other[0]}) differ; "
                "neither was imported. Make them agree or remove one",
            )
        )
    return LabelRows(labeled, problems)


def mask_label_rows(
    source: Path,
    masks: Mapping[Path, Path],
    report: IngestReport,
    classes: Sequence[str],
    folder_classes: Mapping[str, str],
    threshold: float,
    min_area: int,
    task: TaskType,
    split: SplitConfig,
) -> LabelRows:
    """The labeled rows of the images ``report`` accepted, read from their mask PNGs
    (``masks``: image -> mask, `loop.mask_import.pair_mask_files`).

    Each 8-connected region of at least ``min_area`` pixels (value >= ``threshold``) becomes one
    instance of the image folder's class (`loop.mask_import.class_of_image` with
    ``folder_classes``): polygon and box in a ``segment`` project, its box only otherwise. An
    all-zero mask labels the image defect-free. Regions dropped as too small are listed in
    ``dropped`` and in the row's provenance (``dropped_regions``). A mask that cannot be used
    (unreadable, another size, no class for its folder, values only below the threshold) leaves
    its image unlabeled; an image under two names whose masks differ gets neither.
    """
    names = list(classes)
    problems: list[Rejected] = []
    dropped: list[Rejected] = []
    labeled: dict[str, LabeledImage] = {}
    conflicted: set[str] = set()
    for image, mask_path in sorted(masks.items()):
        entry = report.accepted.get(str(image))
        if entry is None:
            continue  # the image itself was rejected (and is listed as such)
        try:
            mask = read_mask(mask_path, (entry.width, entry.height))
        except ConversionError as exc:
            problems.append(Rejected(str(mask_path), f"{exc}; {image.name} unlabeled"))
            continue
        found = mask_to_polygons(mask, threshold, min_area)
        cls = class_of_image(image, source, folder_classes, names)
        if cls is None and (found.instances or found.dropped):
            problems.append(
                Rejected(
                    str(mask_path),
                    f"its folder {image.relative_to(source).parts[0]!r} names no class "
                    f"of {names}; pass --folder-class FOLDER=CLASS. {image.name} unlabeled",
                )
            )
            continue
        if not found.instances and not found.dropped and mask.any():
            problems.append(
                Rejected(
                    str(mask_path),
                    f"values up to {int(mask.max())}, all below the threshold "
                    f"{threshold:g}; pass a lower --mask-threshold. {image.name} unlabeled",
                )
            )
            continue
        cid = names.index(cls) if cls is not None else 0
        det, polys = polygons_to_detections(
            [(cid, rings) for rings in found.instances], (entry.width, entry.height)
        )
        prov = {"source": "import-masks", "file": str(mask_path)}
        if found.dropped:
            prov["dropped_regions"] = "; ".join(
                f"{d.area_px} px at {d.bbox}: {d.reason}" for d in found.dropped
            )
            dropped.extend(
                Rejected(str(mask_path), f"region of {d.area_px} px at {d.bbox}: {d.reason}")
                for d in found.dropped
            )
        row = _row(entry, split, det, prov, polys if task == "segment" else ())
        earlier = labeled.get(entry.sha256)
        if earlier is not None and earlier.canonical(names) != row.canonical(names):
            conflicted.add(entry.sha256)
            problems.append(
                Rejected(
                    str(mask_path),
                    f"conflicting masks for one image ({entry.sha256[:12]}, under two "
                    f"names): {earlier.provenance['file']} differs; neither was imported",
                )
            )
        labeled.setdefault(entry.sha256, row)
    for sha in conflicted:
        del labeled[sha]
    return LabelRows(list(labeled.values()), problems, dropped)
