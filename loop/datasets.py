"""Dataset versions: immutable, content-addressed manifests of labeled images.

A version is a set of `LabeledImage` rows (one per image sha256) plus the class list. Its digest
is the sha256 of a canonical text form (rows sorted by sha256, boxes with 3 decimals), so the same
labels always give the same digest and any change gives a new one. Provenance (who labeled, which
Label Studio task) is stored but not hashed: it describes the labels, it is not the labels.

Stored as ``<datasets_dir>/<digest>/manifest.parquet`` + ``meta.json``; a version is never
overwritten. Splits come from the image hash (`assign_split`), so an image never changes split.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from loop.config import SplitConfig
from loop.detections import Detections
from loop.errors import DatasetError
from loop.formats.yolo import detections_to_yolo_lines

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


def assign_split(sha256: str, ratios: SplitConfig) -> Split:
    """Deterministic split from the image hash: the first 8 hex digits as a fraction of 2**32."""
    u = int(sha256[:8], 16) / 2**32
    if u < ratios.test:
        return "test"
    if u < ratios.test + ratios.val:
        return "val"
    return "train"


@dataclass(frozen=True)
class LabeledImage:
    """One image's labels. ``path`` is relative to the pool's images folder; boxes in pixels."""

    sha256: str
    path: str
    width: int
    height: int
    split: Split
    boxes: Detections
    provenance: Mapping[str, str] = field(default_factory=dict)

    def canonical(self, classes: list[str]) -> str:
        boxes = sorted(
            f"{classes[int(c)]}:{x1:.3f},{y1:.3f},{x2:.3f},{y2:.3f}"
            for (x1, y1, x2, y2), c in zip(self.boxes.xyxy, self.boxes.class_id, strict=True)
        )
        return f"{self.sha256}|{self.width}x{self.height}|{self.split}|{';'.join(boxes)}"


@dataclass(frozen=True)
class DatasetVersion:
    """An immutable labeled set. Build with `DatasetVersion.create`; rows are sorted by sha256."""

    classes: tuple[str, ...]
    rows: tuple[LabeledImage, ...]
    parent: str | None = None
    digest: str = ""
    created_at: str = ""

    @classmethod
    def create(
        cls, classes: Iterable[str], rows: Iterable[LabeledImage], parent: str | None = None
    ) -> DatasetVersion:
        classes_t = tuple(classes)
        by_sha: dict[str, LabeledImage] = {}
        for r in rows:
            if len(r.boxes) and int(r.boxes.class_id.max()) >= len(classes_t):
                raise DatasetError(f"image {r.sha256[:12]} has a class id outside {classes_t}")
            by_sha[r.sha256] = r  # a later row for the same image replaces the earlier one
        ordered = tuple(by_sha[k] for k in sorted(by_sha))
        return cls(
            classes=classes_t,
            rows=ordered,
            parent=parent,
            digest=compute_digest(classes_t, ordered),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def short(self) -> str:
        return self.digest[:12]

    def by_sha(self) -> dict[str, LabeledImage]:
        return {r.sha256: r for r in self.rows}

    def split_counts(self) -> dict[str, int]:
        return {s: sum(1 for r in self.rows if r.split == s) for s in SPLITS}

    def class_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.classes, 0)
        for r in self.rows:
            for c in r.boxes.class_id:
                counts[self.classes[int(c)]] += 1
        return counts

    def with_labels(self, new_rows: Iterable[LabeledImage]) -> DatasetVersion:
        """A child version: this version's rows, replaced or extended by ``new_rows``."""
        merged = {r.sha256: r for r in self.rows}
        for r in new_rows:
            merged[r.sha256] = r
        return DatasetVersion.create(self.classes, merged.values(), parent=self.digest)


def compute_digest(classes: Iterable[str], rows: Iterable[LabeledImage]) -> str:
    classes_l = list(classes)
    h = hashlib.sha256()
    h.update(("classes:" + "\n".join(classes_l) + "\n").encode())
    for line in sorted(r.canonical(classes_l) for r in rows):
        h.update(line.encode())
        h.update(b"\n")
    return h.hexdigest()


_SCHEMA = pa.schema(
    [
        ("sha256", pa.string()),
        ("path", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("split", pa.string()),
        (
            "boxes",
            pa.list_(
                pa.struct(
                    [
                        ("class_name", pa.string()),
                        ("x1", pa.float64()),
                        ("y1", pa.float64()),
                        ("x2", pa.float64()),
                        ("y2", pa.float64()),
                    ]
                )
            ),
        ),
        ("provenance", pa.map_(pa.string(), pa.string())),
    ]
)


def version_to_table(version: DatasetVersion) -> pa.Table:
    cols: dict[str, list[object]] = {name: [] for name in _SCHEMA.names}
    for r in version.rows:
        cols["sha256"].append(r.sha256)
        cols["path"].append(r.path)
        cols["width"].append(r.width)
        cols["height"].append(r.height)
        cols["split"].append(r.split)
        cols["boxes"].append(
            [
                {
                    "class_name": version.classes[int(c)],
                    "x1": b[0],
                    "y1": b[1],
                    "x2": b[2],
                    "y2": b[3],
                }
                for b, c in zip(r.boxes.xyxy.tolist(), r.boxes.class_id, strict=True)
            ]
        )
        cols["provenance"].append(sorted(r.provenance.items()))
    return pa.table(cols, schema=_SCHEMA)


def table_to_rows(table: pa.Table, classes: list[str]) -> list[LabeledImage]:
    rows = []
    for rec in table.to_pylist():
        boxes = rec["boxes"] or []
        try:
            ids = [classes.index(b["class_name"]) for b in boxes]
        except ValueError:
            raise DatasetError(
                f"manifest row {rec['sha256'][:12]} names a class outside {classes}"
            ) from None
        det = Detections(
            np.array([[b["x1"], b["y1"], b["x2"], b["y2"]] for b in boxes]).reshape(-1, 4),
            np.array(ids, dtype=np.int64),
            (rec["width"], rec["height"]),
        )
        rows.append(
            LabeledImage(
                rec["sha256"],
                rec["path"],
                rec["width"],
                rec["height"],
                rec["split"],
                det,
                dict(rec["provenance"] or []),
            )
        )
    return rows


class DatasetStore:
    """Versions on disk under ``root``: ``<digest>/manifest.parquet`` and ``<digest>/meta.json``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, digest: str) -> Path:
        return self.root / digest

    def save(self, version: DatasetVersion) -> Path:
        """Write ``version`` once. Saving an existing digest is a no-op (same content by definition)."""
        dest = self.path(version.digest)
        if (dest / "meta.json").exists():
            return dest
        tmp = self.root / f".{version.digest}.tmp{os.getpid()}"
        tmp.mkdir(parents=True, exist_ok=True)
        pq.write_table(version_to_table(version), tmp / "manifest.parquet")
        meta = {
            "digest": version.digest,
            "parent": version.parent,
            "classes": list(version.classes),
            "created_at": version.created_at,
            "n_images": len(version),
            "splits": version.split_counts(),
            "class_counts": version.class_counts(),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        os.replace(tmp, dest)  # atomic: a crash never leaves a half-written version
        return dest

    def resolve(self, ref: str) -> str:
        """Full digest for a unique prefix of at least 6 characters."""
        matches = [p.name for p in self.root.glob(f"{ref}*") if (p / "meta.json").exists()]
        if len(ref) < 6 or len(matches) != 1:
            raise DatasetError(
                f"dataset version {ref!r} matches {len(matches)} versions; "
                "give at least 6 characters of a digest from `defect-loop datasets list`"
            )
        return matches[0]

    def load(self, ref: str) -> DatasetVersion:
        digest = self.resolve(ref)
        meta = json.loads((self.path(digest) / "meta.json").read_text())
        table = pq.read_table(self.path(digest) / "manifest.parquet")
        classes = list(meta["classes"])
        rows = table_to_rows(table, classes)
        version = DatasetVersion(
            tuple(classes), tuple(rows), meta["parent"], meta["digest"], meta["created_at"]
        )
        if compute_digest(classes, rows) != digest:
            raise DatasetError(f"dataset version {digest[:12]} on disk does not match its digest")
        return version

    def list(self) -> list[dict[str, object]]:
        metas = [
            json.loads((p / "meta.json").read_text())
            for p in self.root.glob("*")
            if (p / "meta.json").exists()
        ]
        return sorted(metas, key=lambda m: str(m["created_at"]))


def export_yolo(version: DatasetVersion, images_dir: Path, out_dir: Path) -> Path:
    """Write a YOLO folder (``<split>/images``, ``<split>/labels``, ``data.yaml``); returns data.yaml.

    Images are hard-linked from the pool (copied across file systems) and named by sha256.
    Re-exporting the same version gives byte-identical files.
    """
    counts = version.split_counts()
    if counts["train"] == 0 or counts["val"] == 0:
        raise DatasetError(
            f"version {version.short} has {counts['train']} train and {counts['val']} val images; "
            "training needs at least one of each: label more images"
        )
    for r in version.rows:
        src = images_dir / r.path
        img_dir = out_dir / r.split / "images"
        lbl_dir = out_dir / r.split / "labels"
        img_dir.mkdir(parents=True, exist_ok=True)
        lbl_dir.mkdir(parents=True, exist_ok=True)
        dst = img_dir / f"{r.sha256}{Path(r.path).suffix}"
        if not dst.exists():
            try:
                os.link(src, dst)
            except OSError:
                dst.write_bytes(src.read_bytes())
        lines = detections_to_yolo_lines(r.boxes)
        (lbl_dir / f"{r.sha256}.txt").write_text("".join(f"{ln}\n" for ln in lines))
    data_yaml = out_dir / "data.yaml"
    names = "\n".join(f"  {i}: {json.dumps(c)}" for i, c in enumerate(version.classes))
    test_line = f"test: {out_dir / 'test' / 'images'}\n" if counts["test"] else ""
    data_yaml.write_text(
        f"path: {out_dir}\ntrain: {out_dir / 'train' / 'images'}\n"
        f"val: {out_dir / 'val' / 'images'}\n{test_line}names:\n{names}\n"
    )
    return data_yaml
