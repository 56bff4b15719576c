"""Pascal VOC XML annotations <-> `Detections`, and VOC folders -> YOLO folders.

A VOC ``<bndbox>`` holds 1-based, inclusive pixel indices: ``xmin=1, xmax=200`` covers all 200
columns of a 200 px wide image. `Detections` hold pixel-EDGE coordinates with a top-left origin,
so a box becomes ``x1 = xmin - 1, x2 = xmax`` (and likewise for y), clipped to the image.

Folder layout: an annotations folder (``annotations/`` or ``Annotations/``) and an images folder
(``images/`` or ``JPEGImages/``). An annotation belongs to the image with the same file STEM: the
``<filename>`` element is not trusted (NEU-DET gives it without the extension in 174 files), and
the class comes from each object's ``<name>``, never from the file name. ``<difficult>1`` boxes
are kept (and counted). The image size is read from the image file itself: the XML may be wrong.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from loop.detections import Detections
from loop.errors import ConversionError, UnknownLabelError
from loop.formats.yolo import detections_to_yolo_lines
from loop.images import IMAGE_SUFFIXES

ANNOTATION_DIRS = ("annotations", "Annotations")
IMAGE_DIRS = ("images", "JPEGImages")


@dataclass(frozen=True)
class VocObject:
    """One ``<object>``: class name, VOC ``(xmin, ymin, xmax, ymax)`` (1-based, inclusive)."""

    name: str
    bndbox: tuple[float, float, float, float]
    difficult: bool = False
    truncated: bool = False


@dataclass(frozen=True)
class VocAnnotation:
    """One XML file. ``size`` is ``(width, height)`` as the XML states it, or None."""

    filename: str | None
    size: tuple[int, int] | None
    objects: tuple[VocObject, ...]


def _text(el: ET.Element | None, tag: str) -> str | None:
    if el is None:
        return None
    child = el.find(tag)
    if child is None or child.text is None:
        return None
    return child.text.strip()


def _number(el: ET.Element, tag: str, where: str) -> float:
    raw = _text(el, tag)
    if raw is None:
        raise ConversionError(f"{where}: <bndbox> has no <{tag}>")
    try:
        value = float(raw)
    except ValueError:
        raise ConversionError(f"{where}: <{tag}> is not a number: {raw!r}") from None
    if not np.isfinite(value):
        raise ConversionError(f"{where}: <{tag}> is not finite: {raw!r}")
    return value


def _flag(el: ET.Element, tag: str) -> bool:
    raw = _text(el, tag)
    return raw is not None and raw not in ("0", "", "false", "False")


def parse_voc_xml(text: str | bytes, source: str = "<xml>") -> VocAnnotation:
    """Parse one VOC annotation document. Raises `ConversionError` for malformed XML/boxes."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise ConversionError(f"{source}: not valid XML: {exc}") from None
    if root.tag != "annotation":
        raise ConversionError(f"{source}: root element is <{root.tag}>, not <annotation>")
    size_el = root.find("size")
    size: tuple[int, int] | None = None
    w_txt, h_txt = _text(size_el, "width"), _text(size_el, "height")
    if w_txt and h_txt:
        try:
            size = (int(float(w_txt)), int(float(h_txt)))
        except ValueError:
            size = None
    objects = []
    for i, obj in enumerate(root.findall("object")):
        where = f"{source}: object {i + 1}"
        name = _text(obj, "name")
        if not name:
            raise ConversionError(f"{where} has no <name>")
        box_el = obj.find("bndbox")
        if box_el is None:
            raise ConversionError(f"{where} ({name}) has no <bndbox>")
        xmin, ymin, xmax, ymax = (
            _number(box_el, t, where) for t in ("xmin", "ymin", "xmax", "ymax")
        )
        if xmax < xmin or ymax < ymin:
            raise ConversionError(
                f"{where} ({name}): box ({xmin}, {ymin}, {xmax}, {ymax}) has max < min"
            )
        objects.append(
            VocObject(
                name, (xmin, ymin, xmax, ymax), _flag(obj, "difficult"), _flag(obj, "truncated")
            )
        )
    return VocAnnotation(_text(root, "filename"), size, tuple(objects))


def voc_to_detections(
    ann: VocAnnotation, image_wh: tuple[int, int], classes: Sequence[str], source: str = "<xml>"
) -> Detections:
    """Pixel-edge boxes of ``ann`` in an image of ``image_wh``; class ids index ``classes``.

    Raises `UnknownLabelError` for a ``<name>`` not in ``classes`` and `ConversionError` for a
    box that lies entirely outside the image.
    """
    w, h = image_wh
    boxes: list[list[float]] = []
    ids: list[int] = []
    for obj in ann.objects:
        try:
            cid = list(classes).index(obj.name)
        except ValueError:
            raise UnknownLabelError(
                f"{source}: class {obj.name!r} is not in {list(classes)}; "
                "add it to the project's classes or pass the full class list"
            ) from None
        xmin, ymin, xmax, ymax = obj.bndbox
        x1, y1 = min(max(xmin - 1.0, 0.0), w), min(max(ymin - 1.0, 0.0), h)
        x2, y2 = min(max(xmax, 0.0), float(w)), min(max(ymax, 0.0), float(h))
        if x2 <= x1 or y2 <= y1:
            raise ConversionError(
                f"{source}: {obj.name} box {obj.bndbox} lies outside the {w}x{h} image"
            )
        boxes.append([x1, y1, x2, y2])
        ids.append(cid)
    return Detections(np.array(boxes).reshape(-1, 4), np.array(ids, dtype=np.int64), (w, h))


@dataclass(frozen=True)
class VocItem:
    """One annotated image: absolute paths, its pixel size and its parsed annotation."""

    image: Path
    annotation: Path
    image_wh: tuple[int, int]
    voc: VocAnnotation


@dataclass
class VocFolder:
    """A VOC folder read by `read_voc_folder`. ``classes``: sorted ``<name>`` values seen.

    ``missing_image``: annotation files with no image of the same stem; ``unannotated``: images
    with no annotation file; ``size_mismatch``: annotations whose ``<size>`` differs from the
    image (the image wins).
    """

    root: Path
    images_dir: Path
    items: list[VocItem]
    classes: list[str]
    missing_image: list[Path] = field(default_factory=list)
    unannotated: list[Path] = field(default_factory=list)
    size_mismatch: list[Path] = field(default_factory=list)

    def boxes_per_class(self) -> dict[str, int]:
        counts: Counter[str] = Counter(o.name for it in self.items for o in it.voc.objects)
        return {c: counts[c] for c in self.classes}

    @property
    def n_boxes(self) -> int:
        return sum(len(it.voc.objects) for it in self.items)

    @property
    def n_difficult(self) -> int:
        return sum(o.difficult for it in self.items for o in it.voc.objects)

    def detections(self, classes: Sequence[str] | None = None) -> dict[Path, Detections]:
        """Image path -> pixel-edge boxes with ids into ``classes`` (default: `classes`)."""
        names = list(classes) if classes is not None else self.classes
        return {
            it.image: voc_to_detections(it.voc, it.image_wh, names, str(it.annotation))
            for it in self.items
        }


def _find_dir(root: Path, names: Iterable[str], what: str) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise ConversionError(
        f"{root} has no {what} folder (looked for {', '.join(names)}); "
        "pass a Pascal VOC folder such as ../shared/datasets/neu-det"
    )


def read_voc_folder(root: Path) -> VocFolder:
    """Read every ``*.xml`` of ``root``'s annotations folder and match images by file stem."""
    root = Path(root)
    ann_dir = _find_dir(root, ANNOTATION_DIRS, "annotations")
    img_dir = _find_dir(root, IMAGE_DIRS, "images")
    images: dict[str, Path] = {}
    for p in sorted(img_dir.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
            if p.stem in images:
                raise ConversionError(
                    f"two images share the stem {p.stem!r} ({images[p.stem].name}, {p.name}); "
                    "annotations are matched by stem, so rename one"
                )
            images[p.stem] = p
    items: list[VocItem] = []
    folder = VocFolder(root, img_dir, items, [])
    annotated: set[str] = set()
    for xml in sorted(ann_dir.glob("*.xml")):
        img = images.get(xml.stem)
        if img is None:
            folder.missing_image.append(xml)
            continue
        voc = parse_voc_xml(xml.read_bytes(), str(xml))
        with Image.open(img) as im:
            wh = (int(im.size[0]), int(im.size[1]))
        if voc.size is not None and voc.size != wh:
            folder.size_mismatch.append(xml)
        items.append(VocItem(img.resolve(), xml.resolve(), wh, voc))
        annotated.add(xml.stem)
    folder.unannotated = [p for s, p in images.items() if s not in annotated]
    folder.classes = sorted({o.name for it in items for o in it.voc.objects})
    return folder


def write_yolo_folder(
    folder: VocFolder, out_dir: Path, classes: Sequence[str] | None = None, link: bool = True
) -> Path:
    """Write ``out_dir/images`` (symlinks to the originals, or copies), ``out_dir/labels/*.txt``
    (one YOLO file per annotated image, empty for defect-free ones) and ``out_dir/classes.txt``.

    ``classes``: the id order (default: the folder's sorted class names). Returns ``out_dir``.
    Existing files of the same names are replaced.
    """
    names = list(classes) if classes is not None else folder.classes
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    dets = folder.detections(names)
    for it in folder.items:
        dst = out_dir / "images" / it.image.name
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        if link:
            os.symlink(it.image, dst)
        else:
            dst.write_bytes(it.image.read_bytes())
        lines = detections_to_yolo_lines(dets[it.image])
        (out_dir / "labels" / f"{it.image.stem}.txt").write_text(
            "".join(f"{ln}\n" for ln in lines), newline="\n"
        )
    (out_dir / "classes.txt").write_text("".join(f"{c}\n" for c in names), newline="\n")
    return out_dir
