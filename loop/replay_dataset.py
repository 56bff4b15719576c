"""The dataset of an oracle replay: a fully labeled folder (YOLO or Pascal VOC) prepared once
(`prepare_dataset`: hard-linked images and YOLO labels, seeded subset), and the seeded initial
labeled set of a curve (`initial_set`)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Sequence
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
    ``labels_dir`` (one ``.txt`` per image, same stem) and the class list (id order)."""

    source: Path
    kind: str
    images_dir: Path
    labels_dir: Path
    classes: list[str]
    n_images: int


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
