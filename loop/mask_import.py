"""Which mask belongs to which image, which class a mask's regions have, and reading a mask file.

The layout (magnetic-tile's): an image ``<stem>.<ext>`` (not ``.png``) has its mask ``<stem>.png``
beside it in the same folder, same size, 8-bit grayscale (defect where the value is at least the
threshold, `loop.formats.masks`). Every region of a mask has one class: the class of the image's
top folder below the source (``MT_Crack/Imgs/a.jpg`` -> ``MT_Crack``), through an explicit
``FOLDER=CLASS`` map, else the class of the same name (case-insensitive). The conversion of a
mask to polygons is pure and lives in `loop.formats.masks`; this module only touches paths and
files.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from loop.errors import ConfigError, ConversionError
from loop.images import IMAGE_SUFFIXES, Rejected

MASK_SUFFIX = ".png"


@dataclass(frozen=True)
class MaskPairs:
    """``images``: every input that is not a mask (what the pool ingests, non-images included
    so that ingest reports them); ``masks``: image -> its mask; ``problems``: masks that could
    not be paired (two images claim one mask)."""

    images: list[Path]
    masks: dict[Path, Path]
    problems: list[Rejected] = field(default_factory=list)


def pair_mask_files(files: Iterable[Path]) -> MaskPairs:
    """Split ``files`` into images and their masks: ``<stem>.png`` is the mask of the one image
    ``<stem>.<other image suffix>`` in the same folder. A ``.png`` with no such image is an
    image itself; one with two (``a.jpg`` and ``a.bmp``) pairs with neither, is not ingested and is
    reported."""
    groups: dict[tuple[Path, str], list[Path]] = {}
    for f in files:
        groups.setdefault((f.parent, f.stem), []).append(f)
    images: list[Path] = []
    masks: dict[Path, Path] = {}
    problems: list[Rejected] = []
    for (_, _), group in sorted(groups.items()):
        pngs = [f for f in group if f.suffix.lower() == MASK_SUFFIX]
        others = [
            f
            for f in group
            if f.suffix.lower() != MASK_SUFFIX and f.suffix.lower() in IMAGE_SUFFIXES
        ]
        rest = [f for f in group if f not in pngs and f not in others]
        images.extend(rest)
        if len(pngs) == 1 and len(others) == 1:
            masks[others[0]] = pngs[0]
            images.append(others[0])
        elif pngs and len(others) > 1:
            images.extend(others)
            names = ", ".join(o.name for o in others)
            problems.extend(
                Rejected(str(p), f"mask claimed by {len(others)} images ({names}); rename one")
                for p in pngs
            )
        else:
            images.extend(pngs + others)
    return MaskPairs(sorted(images), masks, problems)


def parse_folder_classes(pairs: Sequence[str], classes: Sequence[str]) -> dict[str, str]:
    """``["FOLDER=CLASS", ...]`` -> a folder -> class map; every class must be one of
    ``classes``. Raises `ConfigError` for a malformed pair, an unknown class or a folder given
    twice."""
    out: dict[str, str] = {}
    for raw in pairs:
        folder, sep, cls = raw.partition("=")
        folder, cls = folder.strip(), cls.strip()
        if not sep or not folder or not cls:
            raise ConfigError(f"--folder-class {raw!r}: write FOLDER=CLASS, e.g. MT_Crack=crack")
        if cls not in classes:
            raise ConfigError(
                f"--folder-class {raw!r}: {cls!r} is not one of the project's classes "
                f"{list(classes)}"
            )
        if folder in out and out[folder] != cls:
            raise ConfigError(f"--folder-class names folder {folder!r} twice")
        out[folder] = cls
    return out


def class_of_image(
    image: Path, source: Path, folder_classes: Mapping[str, str], classes: Sequence[str]
) -> str | None:
    """The class of ``image``'s regions: its top folder below ``source`` looked up in
    ``folder_classes``, else the class of that name (case-insensitive); None when neither."""
    parts = image.relative_to(source).parts if image != source else ()
    if len(parts) < 2:
        return None
    folder = parts[0]
    if folder in folder_classes:
        return folder_classes[folder]
    lowered = {c.lower(): c for c in classes}
    return lowered.get(folder.lower())


def read_mask(path: Path, image_wh: tuple[int, int]) -> npt.NDArray[np.uint8]:
    """The mask at ``path`` as ``(height, width)`` uint8 (colour is converted to gray).

    Raises `ConversionError` when it cannot be read or its size differs from the image's.
    """
    import cv2  # a project dependency; imported where it is needed

    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ConversionError(f"mask {path.name} could not be read as an image")
    h, w = mask.shape
    if (w, h) != tuple(image_wh):
        raise ConversionError(
            f"mask {path.name} is {w}x{h} px but its image is {image_wh[0]}x{image_wh[1]} px"
        )
    return np.asarray(mask, dtype=np.uint8)
