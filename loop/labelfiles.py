"""Which YOLO label file belongs to which image, by path (never by file stem alone).

A label file belongs to the image at the same relative path: ``<source>/lineA/img1.png`` reads
``<labels>/lineA/img1.txt``. When that file does not exist, a label at the top of the labels
folder with the image's stem (``<labels>/img1.txt``, a flat labels folder beside nested images)
is used, but only when exactly one image claims it: ``lineA/img1.png`` and ``lineB/img1.png``
(different images) both claiming ``img1.txt`` is an ambiguity, reported with both names, and
neither gets it. Label files that no image claims are reported too. Nothing here parses labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from loop.images import PoolImage, Rejected

LABEL_SUFFIX = ".txt"
# Files a YOLO labels folder may hold besides one label file per image.
_NOT_LABELS = {"classes.txt"}


@dataclass
class LabelMatch:
    """``labels``: image file -> its label file. ``problems``: ambiguous or orphan label files
    (``source`` = the label file, ``reason`` = why it was not used)."""

    labels: dict[Path, Path] = field(default_factory=dict)
    problems: list[Rejected] = field(default_factory=list)


def _relative(image: Path, source: Path) -> Path:
    if source.is_file() or image == source:
        return Path(image.name)
    return image.relative_to(source)


def label_files(labels_dir: Path) -> list[Path]:
    """Every ``*.txt`` below ``labels_dir`` that may be a label file (not hidden, not
    ``classes.txt`` at its top), sorted."""
    out = []
    for p in sorted(labels_dir.rglob(f"*{LABEL_SUFFIX}")):
        rel = p.relative_to(labels_dir)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if len(rel.parts) == 1 and rel.name in _NOT_LABELS:
            continue
        out.append(p)
    return out


def match_label_files(
    source: Path, images: Iterable[Path], labels_dir: Path, accepted: Mapping[str, PoolImage]
) -> LabelMatch:
    """Pair every image of ``images`` (files below ``source``) with its label file in
    ``labels_dir`` (see the module docstring). ``accepted``: str(image path) -> pool entry of the
    images that were ingested; the others (skipped as bad files) get no label, and two names of
    one image (same sha256) claiming one flat label file are no ambiguity."""
    out = LabelMatch()
    flat_claims: dict[Path, list[Path]] = {}
    claimed: set[Path] = set()
    for image in images:
        rel = _relative(image, source)
        exact = labels_dir / rel.with_suffix(LABEL_SUFFIX)
        if exact.is_file():
            claimed.add(exact)
            if str(image) in accepted:
                out.labels[image] = exact
            continue
        flat = labels_dir / (rel.stem + LABEL_SUFFIX)
        if len(rel.parts) > 1 and flat.is_file():
            claimed.add(flat)
            if str(image) in accepted:
                flat_claims.setdefault(flat, []).append(image)
    for label, claimants in flat_claims.items():
        shas = {accepted[str(i)].sha256 for i in claimants}
        if len(shas) == 1:
            for image in claimants:
                out.labels[image] = label
            continue
        names = " and ".join(str(i) for i in claimants[:2])
        more = f" (and {len(claimants) - 2} more)" if len(claimants) > 2 else ""
        out.problems.append(
            Rejected(
                str(label),
                f"ambiguous label file: different images {names}{more} have its name; none "
                "was labeled. Put each label beside its image's relative path "
                "(<labels>/<subfolder>/<name>.txt) or rename the images",
            )
        )
    for label in label_files(labels_dir):
        if label not in claimed:
            rel = label.relative_to(labels_dir).with_suffix("")
            out.problems.append(
                Rejected(
                    str(label),
                    f"label file without an image: no image {rel}.<ext> below {source}; "
                    "it was not used",
                )
            )
    return out
