"""The dataset of an oracle replay: a fully labeled folder (YOLO or Pascal VOC) prepared once
(`prepare_dataset`: hard-linked images and YOLO labels, seeded subset), a mask-PNG folder such as
magnetic-tile prepared once through the product's own mask import (`prepare_mask_dataset`), and
the seeded initial labeled set of a curve (`initial_set`)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loop.datasets import Split
from loop.errors import DatasetError
from loop.images import IMAGE_SUFFIXES, atomic_write_text

_INIT_STREAM = 7919  # second seed word of the initial-set draw (independent of selection's rng)


@dataclass(frozen=True)
class PreparedDataset:
    """A labeled dataset as a YOLO folder: ``images_dir`` (symlinks to the originals),
    ``labels_dir`` (one ``.txt`` per image, same stem) and the class list (id order).

    ``truth_file`` (kind ``masks``): the ground truth as `loop.simulate.truth_to_json` text, keyed
    by sha256, with pixel polygon rings; ``labels_dir`` is then unused. ``n_defect_free``: images
    without any instance (masks only; None otherwise)."""

    source: Path
    kind: str
    images_dir: Path
    labels_dir: Path
    classes: list[str]
    n_images: int
    truth_file: Path | None = None
    n_defect_free: int | None = None


def _subset(stems: list[str], max_images: int | None, seed: int = 0) -> list[str]:
    if max_images is None or max_images >= len(stems):
        return stems
    rng = np.random.default_rng(seed)
    return sorted(stems[i] for i in rng.choice(len(stems), size=max_images, replace=False))


def prepare_dataset(source: Path, dest: Path, max_images: int | None = None) -> PreparedDataset:
    """Turn a YOLO folder (``images/``, ``labels/``, ``classes.txt``) or a Pascal VOC folder
    (``annotations/`` + ``images/``, see `loop.formats.voc`) into a YOLO folder under ``dest``.

    Only images with labels are kept (the oracle must be able to answer for every image).
    Reuses ``dest`` when it was prepared from the same source and subset.
    """
    from loop.formats.voc import ANNOTATION_DIRS, read_voc_folder, write_yolo_folder

    source = Path(source).resolve()
    if not source.is_dir():
        raise DatasetError(f"dataset {source} is not a folder; pass a YOLO or Pascal VOC folder")
    marker = dest / "prepared.json"
    key = {"source": str(source), "max_images": max_images}
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("key") == key:
            return PreparedDataset(
                source,
                info["kind"],
                dest / "images",
                dest / "labels",
                list(info["classes"]),
                int(info["n_images"]),
            )
    if dest.exists():
        shutil.rmtree(dest)
    if any((source / d).is_dir() for d in ANNOTATION_DIRS):
        folder = read_voc_folder(source)
        if not folder.items:
            raise DatasetError(f"{source} holds no annotation that matches an image")
        keep = set(_subset(sorted(it.image.stem for it in folder.items), max_images))
        sub = dataclasses.replace(
            folder, items=[it for it in folder.items if it.image.stem in keep]
        )
        write_yolo_folder(sub, dest, folder.classes)
        kind, classes, n = "voc", list(folder.classes), len(sub.items)
    else:
        images, labels = source / "images", source / "labels"
        classes_txt = source / "classes.txt"
        if not images.is_dir() or not labels.is_dir() or not classes_txt.is_file():
            raise DatasetError(
                f"{source} is neither a Pascal VOC folder (annotations/ + images/) nor a YOLO "
                "folder (images/, labels/ and classes.txt)"
            )
        classes = [ln.strip() for ln in classes_txt.read_text().splitlines() if ln.strip()]
        files = {
            p.stem: p
            for p in sorted(images.iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES and (labels / f"{p.stem}.txt").is_file()
        }
        if not files:
            raise DatasetError(f"{source}/images has no image with a label file in labels/")
        (dest / "images").mkdir(parents=True)
        (dest / "labels").mkdir(parents=True)
        stems = _subset(sorted(files), max_images)
        for stem in stems:
            os.symlink(files[stem].resolve(), dest / "images" / files[stem].name)
            shutil.copyfile(labels / f"{stem}.txt", dest / "labels" / f"{stem}.txt")
        (dest / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
        kind, n = "yolo", len(stems)
    info = {"key": key, "kind": kind, "classes": classes, "n_images": n}
    atomic_write_text(marker, json.dumps(info, indent=1))
    return PreparedDataset(source, kind, dest / "images", dest / "labels", classes, n)


def prepare_mask_dataset(
    source: Path,
    dest: Path,
    folder_classes: Mapping[str, str],
    max_images: int | None = None,
    threshold: float = 128,
    min_area: int = 4,
) -> PreparedDataset:
    """Prepare a mask-PNG folder (`loop.mask_import`'s layout: ``<Folder>/.../<stem>.jpg`` with its
    mask ``<stem>.png`` beside it) under ``dest`` with the product's own mask import
    (`loop.project.Project.ingest_masks` in a throw-away ``segment`` workspace): each region is one
    polygon instance of its folder's class (``folder_classes``: folder -> class; the classes, in
    id order, are its values in first-seen order), an all-zero mask an image without instances
    (defect-free: kept, the oracle answers it with no instance). ``max_images``: a seeded random
    subset of the images that have a mask, chosen before the import. Images the import leaves
    unlabeled (unreadable, a mask of another size, ...) are left out: the oracle must answer for
    every image. Writes ``images/`` (symlinks, named ``<folder>__<stem><ext>``), ``truth.json``
    and ``import-report.json`` (what the import dropped or refused). Reuses ``dest`` when it was
    prepared from the same source and options.
    """
    from loop.config import ProjectConfig
    from loop.detections import Detections
    from loop.mask_import import pair_mask_files
    from loop.project import Project
    from loop.simulate import truth_to_json

    source, dest = Path(source).resolve(), Path(dest).resolve()
    if not source.is_dir():
        raise DatasetError(f"dataset {source} is not a folder; pass a folder of images and masks")
    if not folder_classes:
        raise DatasetError(
            "a mask dataset needs its folder -> class map (e.g. MT_Crack=crack); none given"
        )
    classes = list(dict.fromkeys(folder_classes.values()))
    marker = dest / "prepared.json"
    key = {
        "source": str(source),
        "max_images": max_images,
        "folder_classes": dict(sorted(folder_classes.items())),
        "threshold": threshold,
        "min_area": min_area,
    }
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("key") == key:
            return PreparedDataset(
                source,
                "masks",
                dest / "images",
                dest / "labels",
                list(info["classes"]),
                int(info["n_images"]),
                dest / "truth.json",
                int(info["n_defect_free"]),
            )
    if dest.exists():
        shutil.rmtree(dest)
    from loop.images import iter_image_files

    pairs = pair_mask_files(iter_image_files(source))
    if not pairs.masks:
        raise DatasetError(f"{source} holds no image with a mask <stem>.png beside it")
    by_name = {str(img.relative_to(source)): img for img in pairs.masks}
    chosen = _subset(sorted(by_name), max_images)
    # The subset as a folder of links in the source's layout, so that the import sees each
    # image's folder (its class) exactly as in the source.
    staged = dest / "staged"
    for name in chosen:
        img = by_name[name]
        for f in (img, pairs.masks[img]):
            link = staged / f.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(f, link)
    cfg = ProjectConfig(
        name="replay-mask-import",
        classes=classes,
        workspace=(dest / "import").resolve(),
        task="segment",
    )
    project = Project(cfg)
    report, version = project.ingest_masks(staged, folder_classes, threshold, min_area)
    if version is None:
        raise DatasetError(f"the mask import of {source} labeled no image; see its report")
    rows = {r.sha256: r for r in version.rows}
    (dest / "images").mkdir(parents=True)
    truth: dict[str, Detections] = {}
    sources: dict[str, str] = {}
    for name, entry in sorted(report.accepted.items()):
        row = rows.get(entry.sha256)
        if row is None or entry.sha256 in sources:
            continue  # unlabeled (listed in the report) or the same image under another name
        rel = Path(name).relative_to(staged)
        original = source / rel
        link = dest / "images" / f"{rel.parts[0]}__{rel.stem}{rel.suffix}"
        if link.exists():
            raise DatasetError(f"two images of {source} would both be staged as {link.name}")
        os.symlink(original, link)
        sources[entry.sha256] = str(rel)
        truth[entry.sha256] = dataclasses.replace(
            row.boxes,
            polygons=tuple(row.polygons) if row.polygons else tuple(() for _ in row.boxes.class_id),
        )
    n_free = sum(1 for det in truth.values() if len(det) == 0)
    atomic_write_text(dest / "truth.json", truth_to_json(truth))
    atomic_write_text(
        dest / "import-report.json",
        json.dumps(
            {
                "label_problems": [dataclasses.asdict(r) for r in report.label_problems],
                "dropped_regions": [dataclasses.asdict(r) for r in report.dropped_regions],
                "rejected_images": [dataclasses.asdict(r) for r in report.rejected],
                "sources": sources,
            },
            indent=1,
        ),
    )
    shutil.rmtree(dest / "import", ignore_errors=True)
    shutil.rmtree(staged, ignore_errors=True)
    info = {
        "key": key,
        "kind": "masks",
        "classes": classes,
        "n_images": len(truth),
        "n_defect_free": n_free,
    }
    atomic_write_text(marker, json.dumps(info, indent=1))
    return PreparedDataset(
        source,
        "masks",
        dest / "images",
        dest / "labels",
        classes,
        len(truth),
        dest / "truth.json",
        n_free,
    )


def initial_set(
    shas: Sequence[str], split_of: Callable[[str], Split], n: int, seed: int
) -> list[str]:
    """A seeded random ``n`` of ``shas`` (sorted first, so the input order does not matter) with
    at least one ``train`` and one ``val`` image: the last draws are swapped for the first train
    / val image of the same permutation when the draw lacks one."""
    pool = sorted(shas)
    if n > len(pool):
        raise DatasetError(f"initial set of {n} images asked from {len(pool)} non-test images")
    order = [pool[i] for i in np.random.default_rng([seed, _INIT_STREAM]).permutation(len(pool))]
    chosen = order[:n]
    for need, other in (("val", "train"), ("train", "val")):
        if any(split_of(s) == need for s in chosen):
            continue
        extra = next((s for s in order[n:] if split_of(s) == need), None)
        if extra is None:
            raise DatasetError(
                f"the dataset has no '{need}' image outside the test split; use more images"
            )
        n_other = sum(split_of(s) == other for s in chosen)
        # Replace the last draw that the other requirement can spare (n >= 2: one always exists).
        for i in range(len(chosen) - 1, -1, -1):
            if split_of(chosen[i]) != other or n_other > 1:
                chosen[i] = extra
                break
    return chosen
