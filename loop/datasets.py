"""Dataset versions: immutable, content-addressed manifests of labeled images.

A version is a set of `LabeledImage` rows (one per image sha256) plus the ordered class list. Its
digest (64 hex) is the sha256 of a canonical text form, so the same labels always give the same
digest and any change to a box, a class, a split or the class list gives a new one:

- first ``"classes:" + "\n".join(classes) + "\n"`` (order matters: it fixes the class ids),
- then one line per image, the lines sorted (byte order), each followed by ``"\n"``::

      <sha256>|<width>x<height>|<split>|<box>;<box>;...

  where each box is ``<class name>:<x1>,<y1>,<x2>,<y2>`` in pixels formatted with ``"{:.3f}"``
  (Python's round-half-even of the binary float; ``-0.000`` stays as written) and the boxes of an
  image are sorted as strings. A defect-free image has an empty box list (line ends in ``|``).

  An image with polygons (`loop.polygons`; a ``segment`` project) adds one field to its line,
  ``|<instance>;<instance>;...``, each instance written ``<box>=<ring>/<ring>`` (its box as
  above, then its rings as ``x,y x,y ...`` with ``"{:.3f}"``, vertices in stored order, the rings
  of an instance and the instances sorted as strings); a box without a polygon is not listed.
  Lines without polygons are exactly the box-only lines above, so a detect project's digests are
  what they were before polygons existed, and a moved vertex gives a new digest.

  An image with keypoints (`loop.keypoints`) then adds ``|keypoints=<instance>;<instance>;...``,
  each instance written ``<box>#<keypoint>+<keypoint>...`` and each keypoint
  ``<name>@<x>,<y>,<visibility>`` (pixels, ``"{:.3f}"``; keypoints sorted by name, instances
  sorted as strings); an instance without keypoints is not listed. Lines without keypoints are
  unchanged, so versions written before keypoints existed keep their digests, and a moved
  keypoint gives a new digest.

So row order in the manifest, box order within an image and sub-millipixel float noise do not
change the digest. Provenance (who labeled, which Label Studio task) is stored but not hashed: it
describes the labels, it is not the labels.

Stored as ``<datasets_dir>/<digest>/manifest.parquet`` + ``meta.json``; a version is never
overwritten. Splits come from the image hash (`assign_split`), never from the labels, so an image
never changes split and defect-free images land in every split like any other.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from loop.config import SplitConfig, TaskType
from loop.detections import Detections
from loop.errors import ConversionError, DatasetError
from loop.formats.yolo import (
    detections_to_yolo_lines,
    instances_to_yolo_pose_lines,
    polygons_to_yolo_seg_lines,
    pose_slots,
)
from loop.keypoints import (
    InstanceKeypoints,
    Keypoint,
    KeypointNames,
    check_instance_keypoints,
    instance_keypoints_key,
)
from loop.polygons import Rings, as_ring, instance_key, rings_bbox

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
# The files of a stored version, in ``<datasets>/<digest>/``.
MANIFEST_FILE = "manifest.parquet"
META_FILE = "meta.json"


def assign_split(sha256: str, ratios: SplitConfig) -> Split:
    """Deterministic split from the image hash: the first 8 hex digits as a fraction of 2**32.

    Depends on the hash and the ratios only, never on the labels: a defect-free image is split
    like any other, and adding images never moves an existing one.
    """
    u = int(sha256[:8], 16) / 2**32
    if u < ratios.test:
        return "test"
    if u < ratios.test + ratios.val:
        return "val"
    return "train"


@dataclass(frozen=True)
class LabeledImage:
    """One image's labels. ``path`` is relative to the pool's images folder; boxes in pixels.

    ``polygons``: empty (boxes only), or one `loop.polygons.Rings` per box, in the boxes' order;
    an instance with rings has its box equal to their bounding box, one with ``()`` is a box
    without a polygon. Raises `DatasetError` when the two disagree.

    ``keypoints``: empty (none), or one `loop.keypoints.InstanceKeypoints` per box, in the boxes'
    order (``()`` for an instance without keypoints); pixels inside the image, at most one
    keypoint per name and instance, stored sorted by name. Raises `DatasetError` otherwise.
    """

    sha256: str
    path: str
    width: int
    height: int
    split: Split
    boxes: Detections
    provenance: Mapping[str, str] = field(default_factory=dict)
    polygons: tuple[Rings, ...] = ()
    keypoints: tuple[InstanceKeypoints, ...] = ()

    def __post_init__(self) -> None:
        self._check_keypoints()
        if not self.polygons:
            return
        if len(self.polygons) != len(self.boxes):
            raise DatasetError(
                f"image {self.sha256[:12]} has {len(self.boxes)} boxes but "
                f"{len(self.polygons)} polygon instances; give one (possibly empty) per box"
            )
        polys: list[Rings] = []
        for i, rings in enumerate(self.polygons):
            try:
                checked = tuple(as_ring(r) for r in rings)
            except ConversionError as exc:
                raise DatasetError(f"image {self.sha256[:12]} instance {i}: {exc}") from None
            if checked and not np.allclose(rings_bbox(checked), self.boxes.xyxy[i], atol=1e-6):
                raise DatasetError(
                    f"image {self.sha256[:12]} instance {i}: its box "
                    f"{self.boxes.xyxy[i].tolist()} is not its polygon's bounding box "
                    f"{list(rings_bbox(checked))}; derive boxes with polygons_to_detections"
                )
            polys.append(checked)
        # Boxes only, written as polygons: the same labels, so the same (box-only) form.
        object.__setattr__(self, "polygons", tuple(polys) if any(polys) else ())

    def _check_keypoints(self) -> None:
        if not self.keypoints:
            return
        if len(self.keypoints) != len(self.boxes):
            raise DatasetError(
                f"image {self.sha256[:12]} has {len(self.boxes)} boxes but "
                f"{len(self.keypoints)} keypoint instances; give one (possibly empty) per box"
            )
        checked: list[InstanceKeypoints] = []
        for i, points in enumerate(self.keypoints):
            try:
                checked.append(
                    check_instance_keypoints(
                        points, (self.width, self.height), f"image {self.sha256[:12]} instance {i}"
                    )
                )
            except ConversionError as exc:
                raise DatasetError(str(exc)) from None
        # No keypoint at all: the same labels as without keypoints, so the same form.
        object.__setattr__(self, "keypoints", tuple(checked) if any(checked) else ())

    def box_keys(self, classes: Iterable[str]) -> list[str]:
        """Sorted ``"<class>:<x1>,<y1>,<x2>,<y2>"`` strings, pixels with 3 decimals (see module)."""
        names = list(classes)
        return sorted(
            f"{names[int(c)]}:{x1:.3f},{y1:.3f},{x2:.3f},{y2:.3f}"
            for (x1, y1, x2, y2), c in zip(
                self.boxes.xyxy.tolist(), self.boxes.class_id.tolist(), strict=True
            )
        )

    def mask_keys(self, classes: Iterable[str]) -> list[str]:
        """Sorted ``"<box>=<ring>/<ring>"`` strings of the instances with a polygon (see module)."""
        names = list(classes)
        return sorted(
            f"{names[int(c)]}:{x1:.3f},{y1:.3f},{x2:.3f},{y2:.3f}={instance_key(rings)}"
            for (x1, y1, x2, y2), c, rings in zip(
                self.boxes.xyxy.tolist(), self.boxes.class_id.tolist(), self.polygons, strict=True
            )
            if rings
        )

    def keypoint_keys(self, classes: Iterable[str]) -> list[str]:
        """Sorted ``"<box>#<keypoint>+<keypoint>..."`` strings of the instances with keypoints
        (see the module docstring)."""
        names = list(classes)
        return sorted(
            f"{names[int(c)]}:{x1:.3f},{y1:.3f},{x2:.3f},{y2:.3f}#{instance_keypoints_key(kps)}"
            for (x1, y1, x2, y2), c, kps in zip(
                self.boxes.xyxy.tolist(), self.boxes.class_id.tolist(), self.keypoints, strict=True
            )
            if kps
        )

    def canonical(self, classes: list[str]) -> str:
        """This image's line of the digest input: ``sha|WxH|split|box;box;...`` and, with
        polygons, ``|instance;instance;...``, with keypoints ``|keypoints=instance;...``."""
        boxes = self.box_keys(classes)
        line = f"{self.sha256}|{self.width}x{self.height}|{self.split}|{';'.join(boxes)}"
        if self.polygons:
            line += "|" + ";".join(self.mask_keys(classes))
        if self.keypoints:
            line += "|keypoints=" + ";".join(self.keypoint_keys(classes))
        return line


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

    @property
    def has_polygons(self) -> bool:
        """Whether any image holds a polygon (a segmentation version)."""
        return any(r.polygons for r in self.rows)

    def mask_counts(self) -> dict[str, int]:
        """Instances with a polygon, per class name."""
        counts = dict.fromkeys(self.classes, 0)
        for r in self.rows:
            if not r.polygons:
                continue
            for c, rings in zip(r.boxes.class_id.tolist(), r.polygons, strict=True):
                if rings:
                    counts[self.classes[int(c)]] += 1
        return counts

    @property
    def has_keypoints(self) -> bool:
        """Whether any image holds a keypoint."""
        return any(r.keypoints for r in self.rows)

    def keypoint_counts(self) -> dict[str, int]:
        """Keypoints (not instances) per class name."""
        counts = dict.fromkeys(self.classes, 0)
        for r in self.rows:
            if not r.keypoints:
                continue
            for c, kps in zip(r.boxes.class_id.tolist(), r.keypoints, strict=True):
                counts[self.classes[int(c)]] += len(kps)
        return counts

    def with_labels(self, new_rows: Iterable[LabeledImage]) -> DatasetVersion:
        """A child version: this version's rows, replaced or extended by ``new_rows``.

        An image already in this version keeps its split even if ``new_rows`` says otherwise
        (e.g. after the split ratios were edited): the test split is frozen.
        """
        merged = {r.sha256: r for r in self.rows}
        for r in new_rows:
            old = merged.get(r.sha256)
            merged[r.sha256] = (
                r if old is None or old.split == r.split else replace(r, split=old.split)
            )
        return DatasetVersion.create(self.classes, merged.values(), parent=self.digest)

    def split_digest(self, split: Split) -> str:
        """sha256 (64 hex) of the class list and the canonical lines of ``split``'s rows only.

        Two versions with the same test-split digest evaluate models on the same test set.
        """
        return compute_digest(self.classes, (r for r in self.rows if r.split == split))


def compute_digest(classes: Iterable[str], rows: Iterable[LabeledImage]) -> str:
    """sha256 hex of the canonical form described in the module docstring (64 characters)."""
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
# Only in versions with polygons (a box-only manifest keeps `_SCHEMA`): per box, its rings, each
# ring flat pixel ``[x0, y0, x1, y1, ...]``; ``[]`` for a box without a polygon.
_POLYGONS_FIELD = pa.field("polygons", pa.list_(pa.list_(pa.list_(pa.float64()))))
# Only in versions with keypoints: per box, its keypoints (pixels); ``[]`` for none.
_KEYPOINTS_FIELD = pa.field(
    "keypoints",
    pa.list_(
        pa.list_(
            pa.struct(
                [
                    ("name", pa.string()),
                    ("x", pa.float64()),
                    ("y", pa.float64()),
                    ("visibility", pa.int8()),
                ]
            )
        )
    ),
)


def version_to_table(version: DatasetVersion) -> pa.Table:
    """The manifest: one row per image in digest order; boxes as float64 pixels, class by name;
    a ``polygons`` column (parallel to ``boxes``) only when the version has polygons, a
    ``keypoints`` column (also parallel) only when it has keypoints."""
    schema = _SCHEMA.append(_POLYGONS_FIELD) if version.has_polygons else _SCHEMA
    if version.has_keypoints:
        schema = schema.append(_KEYPOINTS_FIELD)
    cols: dict[str, list[object]] = {name: [] for name in schema.names}
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
        if version.has_polygons:
            polys = r.polygons or tuple(() for _ in range(len(r.boxes)))
            cols["polygons"].append(
                [[ring.reshape(-1).tolist() for ring in rings] for rings in polys]
            )
        if version.has_keypoints:
            kps = r.keypoints or tuple(() for _ in range(len(r.boxes)))
            cols["keypoints"].append(
                [
                    [
                        {"name": k.name, "x": k.x, "y": k.y, "visibility": k.visibility}
                        for k in points
                    ]
                    for points in kps
                ]
            )
    return pa.table(cols, schema=schema)


def table_to_rows(table: pa.Table, classes: list[str]) -> list[LabeledImage]:
    """Parse manifest rows (schema of `version_to_table`); class names must be in ``classes``."""
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
        polygons = tuple(
            tuple(np.array(flat, dtype=np.float64).reshape(-1, 2) for flat in rings)
            for rings in rec.get("polygons") or []
        )
        keypoints = tuple(
            tuple(
                Keypoint(str(k["name"]), float(k["x"]), float(k["y"]), int(k["visibility"]))
                for k in points
            )
            for points in rec.get("keypoints") or []
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
                polygons,
                keypoints,
            )
        )
    return rows


def version_meta(version: DatasetVersion) -> dict[str, Any]:
    """The ``meta.json`` content of ``version`` (JSON-ready); ``mask_counts`` only with polygons."""
    meta: dict[str, Any] = {
        "digest": version.digest,
        "parent": version.parent,
        "classes": list(version.classes),
        "created_at": version.created_at,
        "n_images": len(version),
        "splits": version.split_counts(),
        "class_counts": version.class_counts(),
    }
    if version.has_polygons:
        meta["mask_counts"] = version.mask_counts()
    if version.has_keypoints:
        meta["keypoint_counts"] = version.keypoint_counts()
    return meta


def write_version_dir(version: DatasetVersion, dest: Path) -> Path:
    """Write ``manifest.parquet`` and ``meta.json`` of ``version`` into ``dest`` (created)."""
    dest.mkdir(parents=True, exist_ok=True)
    pq.write_table(version_to_table(version), dest / MANIFEST_FILE)
    (dest / META_FILE).write_text(json.dumps(version_meta(version), indent=1))
    return dest


def read_version_dir(folder: Path, expected: str | None = None) -> DatasetVersion:
    """Read a folder holding ``manifest.parquet`` + ``meta.json`` and verify its digest.

    ``expected``: the digest the caller wants (e.g. from a run tag); raises `DatasetError` when the
    files are missing, the content does not hash to the recorded digest, or it is not ``expected``.
    """
    meta_path, manifest = folder / META_FILE, folder / MANIFEST_FILE
    if not meta_path.is_file() or not manifest.is_file():
        raise DatasetError(
            f"{folder} holds no dataset version (needs manifest.parquet and meta.json); "
            "pass a folder written by `DatasetStore.save` or a run's `dataset` artifact"
        )
    meta = json.loads(meta_path.read_text())
    classes = list(meta["classes"])
    rows = table_to_rows(pq.read_table(manifest), classes)
    digest = compute_digest(classes, rows)
    recorded = str(meta["digest"])
    if digest != recorded:
        raise DatasetError(
            f"dataset version {recorded[:12]} in {folder} does not match its digest "
            f"(content hashes to {digest[:12]}): the files were edited; restore them from a copy"
        )
    if expected is not None and digest != expected:
        raise DatasetError(
            f"{folder} holds dataset version {digest[:12]}, not the expected {expected[:12]}"
        )
    return DatasetVersion(
        tuple(classes), tuple(rows), meta.get("parent"), recorded, str(meta.get("created_at", ""))
    )


class DatasetStore:
    """Versions on disk under ``root``: ``<digest>/manifest.parquet`` and ``<digest>/meta.json``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, digest: str) -> Path:
        return self.root / digest

    def save(self, version: DatasetVersion) -> Path:
        """Write ``version`` once. Saving an existing digest is a no-op (same content by definition).

        Written into a hidden temporary folder and renamed: a crash or a concurrent save never
        leaves a half-written version.
        """
        if not version.digest:
            raise DatasetError("version has no digest; build it with DatasetVersion.create")
        dest = self.path(version.digest)
        if (dest / META_FILE).exists():
            return dest
        tmp = self.root / f".{version.digest}.tmp{os.getpid()}"
        write_version_dir(version, tmp)
        try:
            os.replace(tmp, dest)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (dest / META_FILE).exists():  # not a lost race with an identical save
                raise
        return dest

    def resolve(self, ref: str) -> str:
        """Full digest for a unique prefix of at least 6 characters."""
        ref = ref.strip().lower()
        ok = len(ref) >= 6 and all(ch in "0123456789abcdef" for ch in ref)
        matches = (
            [p.name for p in self.root.glob(f"{ref}*") if (p / META_FILE).exists()] if ok else []
        )
        if len(matches) != 1:
            raise DatasetError(
                f"dataset version {ref!r} matches {len(matches)} versions; "
                "give at least 6 hex characters of a digest from `defect-loop datasets list`"
            )
        return matches[0]

    def load(self, ref: str) -> DatasetVersion:
        """The version whose digest starts with ``ref``, verified against its digest."""
        digest = self.resolve(ref)
        return read_version_dir(self.path(digest), digest)

    def list(self) -> list[dict[str, Any]]:
        """``meta.json`` of every version, oldest first (ties by digest)."""
        if not self.root.is_dir():
            return []
        metas = [
            json.loads((p / META_FILE).read_text())
            for p in self.root.iterdir()
            if not p.name.startswith(".") and (p / META_FILE).exists()
        ]
        return sorted(metas, key=lambda m: (str(m["created_at"]), str(m["digest"])))


def export_yolo(
    version: DatasetVersion,
    images_dir: Path,
    out_dir: Path,
    task: TaskType = "detect",
    *,
    pose: KeypointNames | None = None,
) -> Path:
    """Write a YOLO folder (``<split>/images``, ``<split>/labels``, ``data.yaml``); returns data.yaml.

    Images are hard-linked from the pool (copied across file systems) and named by sha256.
    Re-exporting the same version gives byte-identical files. ``task``: ``detect`` writes box
    lines; ``segment`` writes Ultralytics segmentation lines (`polygons_to_yolo_seg_lines`: a box
    without a polygon as its rectangle). ``pose`` (the config's keypoint names per class) writes
    Ultralytics pose lines instead (`instances_to_yolo_pose_lines`: boxes and keypoints, a
    keypoint that is not labeled at visibility 0) and ``kpt_shape``/``kpt_names`` in data.yaml;
    raises `DatasetError` naming a class without keypoints or a keypoint outside the config.
    """
    slots: tuple[tuple[str, ...], ...] = ()
    if pose is not None:
        try:
            slots = pose_slots(version.classes, pose)
        except ConversionError as exc:
            raise DatasetError(f"pose export of {version.short}: {exc}") from None
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
        if slots:
            try:
                lines = instances_to_yolo_pose_lines(r.boxes, r.keypoints, slots)
            except ConversionError as exc:
                raise DatasetError(f"pose export, image {r.sha256[:12]}: {exc}") from None
        elif task == "segment":
            lines = polygons_to_yolo_seg_lines(r.boxes, r.polygons)
        else:
            lines = detections_to_yolo_lines(r.boxes)
        (lbl_dir / f"{r.sha256}.txt").write_text("".join(f"{ln}\n" for ln in lines))
    data_yaml = out_dir / "data.yaml"
    names = "\n".join(f"  {i}: {json.dumps(c)}" for i, c in enumerate(version.classes))
    test_line = f"test: {out_dir / 'test' / 'images'}\n" if counts["test"] else ""
    pose_lines = ""
    if slots:
        k = max(len(s) for s in slots)
        # A class with fewer keypoints than K leaves its last slots unused (visibility 0).
        padded = [[*s, *(f"unused_{j}" for j in range(len(s), k))] for s in slots]
        kpt_names = "\n".join(
            f"  {i}: [{', '.join(json.dumps(n) for n in p)}]" for i, p in enumerate(padded)
        )
        pose_lines = f"kpt_shape: [{k}, 3]\nkpt_names:\n{kpt_names}\n"
    data_yaml.write_text(
        f"path: {out_dir}\ntrain: {out_dir / 'train' / 'images'}\n"
        f"val: {out_dir / 'val' / 'images'}\n{test_line}names:\n{names}\n{pose_lines}"
    )
    return data_yaml
