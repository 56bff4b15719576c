"""Growing the test split from labeled images the loop never touched.

A small test split cannot tell a real improvement from noise (see `loop.evaluation`). The hash
split puts about ``split.test`` of the LABELED images into it, and the loop never selects test
images, so it only grows when labeled images are imported. `add_test_images` imports labeled
images straight into the test split, whatever their hash says.

Rules that keep the test split honest (each refusal is reported with its reason):

- an image already labeled in the train or val split is refused: a model may have learned it;
- an image waiting in Label Studio is refused: the loop's selection chose it, so it is not a
  random sample of the line's images;
- an image already in the test split gets its labels replaced (it stays a test image);
- an image without a label file is refused (an EMPTY label file is a defect-free image).

Every model is then evaluated on the grown split at its next training; the champion is
evaluated again on the same images by the paired gate, so comparisons stay fair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from loop.datasets import DatasetVersion, LabeledImage
from loop.errors import ConversionError, DatasetError, ImageError, UnknownLabelError
from loop.formats.yolo import yolo_lines_to_detections
from loop.images import iter_image_files

if TYPE_CHECKING:
    from loop.project import Project


@dataclass(frozen=True)
class AddTestReport:
    """``added``: new test images; ``updated``: test images whose labels were replaced;
    ``skipped``: ``(file, reason)``; ``version``: the new dataset version (None: unchanged)."""

    added: int
    updated: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    version: DatasetVersion | None = None
    rejected_files: int = 0

    @property
    def summary(self) -> str:
        return (
            f"{self.added} test images added, {self.updated} updated, "
            f"{len(self.skipped)} skipped, {self.rejected_files} unreadable files"
        )


def add_test_images(
    project: Project,
    source: Path,
    labels_dir: Path,
    limit: int | None = None,
    seed: int = 0,
    on_progress: Callable[[Path], None] | None = None,
) -> AddTestReport:
    """Import the images below ``source`` with their YOLO labels (``labels_dir/<stem>.txt``)
    into the TEST split of a new dataset version (see the module docstring for the rules).

    ``limit``: import a seeded random ``limit`` of the eligible images. The images join the pool
    (bad files are skipped and listed by `defect-loop status`, as for ``ingest``).
    """
    if not source.exists():
        raise ImageError(f"{source} does not exist; pass a folder of images")
    if not labels_dir.is_dir():
        raise DatasetError(f"{labels_dir} is not a folder of YOLO label files")
    if limit is not None and limit < 1:
        raise DatasetError(f"--limit must be >= 1, got {limit}")
    cfg = project.cfg
    report = project.pool.ingest(list(iter_image_files(source)), cfg.ingest, on_progress)
    current = project.current_version()
    labeled = {} if current is None else current.by_sha()
    skipped: list[tuple[str, str]] = []
    rows: list[LabeledImage] = []
    seen: set[str] = set()
    for src, entry in sorted(report.accepted.items()):
        txt = labels_dir / f"{Path(src).stem}.txt"
        old = labeled.get(entry.sha256)
        if entry.sha256 in seen:
            skipped.append((src, "the same image appears twice in the source; imported once"))
            continue
        if old is not None and old.split != "test":
            skipped.append(
                (src, f"already labeled in the {old.split} split: a model may have learned it")
            )
            continue
        if entry.sha256 in project.state.pending:
            skipped.append(
                (src, "waiting in Label Studio: chosen by the loop's selection, not at random")
            )
            continue
        if not txt.is_file():
            skipped.append((src, f"no label file {txt.name} (an empty file means defect-free)"))
            continue
        try:
            det = yolo_lines_to_detections(
                txt.read_text(), (entry.width, entry.height), len(cfg.classes)
            )
        except (ConversionError, UnknownLabelError, ValueError) as exc:
            skipped.append((src, f"label file {txt.name}: {exc}"))
            continue
        seen.add(entry.sha256)
        rows.append(
            LabeledImage(
                entry.sha256,
                entry.path,
                entry.width,
                entry.height,
                "test",
                det,
                {"source": "import-test", "file": str(txt)},
            )
        )
    if limit is not None and limit < len(rows):
        keep = np.random.default_rng(seed).choice(len(rows), size=limit, replace=False)
        rows = [rows[i] for i in sorted(keep.tolist())]
    updated = sum(1 for r in rows if r.sha256 in labeled)
    added = len(rows) - updated
    if not rows:
        return AddTestReport(0, 0, skipped, None, len(report.rejected))
    if current is None:
        version = DatasetVersion.create(cfg.classes, rows)
    else:
        version = current.with_labels(rows)
    if current is not None and version.digest == current.digest:
        return AddTestReport(0, 0, skipped, None, len(report.rejected))
    project.store.save(version)
    project.state.current_version = version.digest
    project.save_state()
    return AddTestReport(added, updated, skipped, version, len(report.rejected))
