"""What changed between two dataset versions (`diff_versions`): images added, removed and
relabeled, boxes per class, and, when the versions hold them, masks and keypoints per class.
The `defect-loop datasets diff` command prints it (`VersionDiff.to_text`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from loop.datasets import SPLITS, DatasetVersion, LabeledImage
from loop.polygons import instance_key


@dataclass(frozen=True)
class VersionDiff:
    """What changed from version ``a`` to version ``b`` (see `diff_versions`).

    Image lists hold sha256s, sorted. Box counts are per class name; a box is "the same" when its
    class and its coordinates rounded to 3 decimals (the digest's form) are equal, so moving a box
    counts as one removed plus one added. ``before``/``after``: boxes per class in ``a``/``b``;
    for every class ``after - before == boxes_added - boxes_removed``.

    Masks (when either version has polygons, ``has_masks``): an instance's mask is "the same" when
    its class, box and rings to 3 decimals are equal, so moving one vertex counts as one mask
    removed plus one added, and its image is listed in ``remasked`` (and in ``relabeled``, which
    holds every image whose boxes or masks changed). ``masks_before``/``masks_after``: instances
    with a polygon per class.

    Keypoints (when either version has some, ``has_keypoints``): a keypoint is "the same" when
    its instance's class and box, its name, position to 3 decimals and visibility are equal, so
    a moved keypoint counts as one removed plus one added, and its image is listed in
    ``rekeyed`` (and in ``relabeled``). ``keypoints_before``/``keypoints_after``: keypoints per
    class of their instance.
    """

    a: str
    b: str
    classes: tuple[str, ...]
    added: tuple[str, ...]
    removed: tuple[str, ...]
    relabeled: tuple[str, ...]
    resplit: tuple[str, ...]
    unchanged: int
    boxes_added: Mapping[str, int]
    boxes_removed: Mapping[str, int]
    before: Mapping[str, int]
    after: Mapping[str, int]
    splits_before: Mapping[str, int]
    splits_after: Mapping[str, int]
    has_masks: bool = False
    remasked: tuple[str, ...] = ()
    masks_added: Mapping[str, int] = field(default_factory=dict)
    masks_removed: Mapping[str, int] = field(default_factory=dict)
    masks_before: Mapping[str, int] = field(default_factory=dict)
    masks_after: Mapping[str, int] = field(default_factory=dict)
    has_keypoints: bool = False
    rekeyed: tuple[str, ...] = ()
    keypoints_added: Mapping[str, int] = field(default_factory=dict)
    keypoints_removed: Mapping[str, int] = field(default_factory=dict)
    keypoints_before: Mapping[str, int] = field(default_factory=dict)
    keypoints_after: Mapping[str, int] = field(default_factory=dict)

    @property
    def identical(self) -> bool:
        return self.a == self.b

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; image lists in full; a ``masks`` part only when ``has_masks``, a
        ``keypoints`` part only when ``has_keypoints``."""
        out: dict[str, Any] = {
            "a": self.a,
            "b": self.b,
            "classes": list(self.classes),
            "images": {
                "added": list(self.added),
                "removed": list(self.removed),
                "relabeled": list(self.relabeled),
                "resplit": list(self.resplit),
                "unchanged": self.unchanged,
            },
            "boxes": {
                c: {
                    "before": self.before[c],
                    "after": self.after[c],
                    "added": self.boxes_added[c],
                    "removed": self.boxes_removed[c],
                }
                for c in self.classes
            },
            "splits": {
                s: {"before": self.splits_before[s], "after": self.splits_after[s]} for s in SPLITS
            },
        }
        if self.has_masks:
            out["masks"] = {
                "changed_images": list(self.remasked),
                "classes": {
                    c: {
                        "before": self.masks_before[c],
                        "after": self.masks_after[c],
                        "added": self.masks_added[c],
                        "removed": self.masks_removed[c],
                    }
                    for c in self.classes
                },
            }
        if self.has_keypoints:
            out["keypoints"] = {
                "changed_images": list(self.rekeyed),
                "classes": {
                    c: {
                        "before": self.keypoints_before[c],
                        "after": self.keypoints_after[c],
                        "added": self.keypoints_added[c],
                        "removed": self.keypoints_removed[c],
                    }
                    for c in self.classes
                },
            }
        return out

    def to_text(self, max_listed: int = 10) -> str:
        """A plain-text report: image counts, splits, a per-class box table, changed images
        (at most ``max_listed`` 12-character sha prefixes per list)."""
        lines = [
            f"dataset diff {self.a[:12]} -> {self.b[:12]}",
            f"images: {len(self.added)} added, {len(self.removed)} removed, "
            f"{len(self.relabeled)} relabeled, {len(self.resplit)} changed split, "
            f"{self.unchanged} unchanged",
            "splits: "
            + ", ".join(f"{s} {self.splits_before[s]} -> {self.splits_after[s]}" for s in SPLITS),
        ]
        width = max([len("class"), len("total"), *(len(c) for c in self.classes)])
        header = f"{'class':<{width}}  {'before':>7}  {'after':>7}  {'+boxes':>7}  {'-boxes':>7}"
        lines += ["", header, "-" * len(header)]
        for c in self.classes:
            lines.append(
                f"{c:<{width}}  {self.before[c]:>7}  {self.after[c]:>7}  "
                f"{self.boxes_added[c]:>7}  {self.boxes_removed[c]:>7}"
            )
        tot = [
            sum(d.values()) for d in (self.before, self.after, self.boxes_added, self.boxes_removed)
        ]
        lines.append(f"{'total':<{width}}  {tot[0]:>7}  {tot[1]:>7}  {tot[2]:>7}  {tot[3]:>7}")
        if self.has_masks:
            header = (
                f"{'masks':<{width}}  {'before':>7}  {'after':>7}  {'+masks':>7}  {'-masks':>7}"
            )
            lines += ["", header, "-" * len(header)]
            for c in self.classes:
                lines.append(
                    f"{c:<{width}}  {self.masks_before[c]:>7}  {self.masks_after[c]:>7}  "
                    f"{self.masks_added[c]:>7}  {self.masks_removed[c]:>7}"
                )
            lines.append(f"images with changed masks: {len(self.remasked)}")
        if self.has_keypoints:
            header = (
                f"{'keypoints':<{width}}  {'before':>7}  {'after':>7}  {'+kpts':>7}  {'-kpts':>7}"
            )
            lines += ["", header, "-" * len(header)]
            for c in self.classes:
                lines.append(
                    f"{c:<{width}}  {self.keypoints_before[c]:>7}  {self.keypoints_after[c]:>7}  "
                    f"{self.keypoints_added[c]:>7}  {self.keypoints_removed[c]:>7}"
                )
            lines.append(f"images with changed keypoints: {len(self.rekeyed)}")
        for title, shas in (
            ("added", self.added),
            ("removed", self.removed),
            ("relabeled", self.relabeled),
            ("changed split", self.resplit),
            *((("masks changed", self.remasked),) if self.has_masks else ()),
            *((("keypoints changed", self.rekeyed),) if self.has_keypoints else ()),
        ):
            if shas:
                shown = " ".join(x[:12] for x in shas[:max_listed])
                more = f" ... and {len(shas) - max_listed} more" if len(shas) > max_listed else ""
                lines.append(f"{title}: {shown}{more}")
        return "\n".join(lines) + "\n"


def _box_counter(r: LabeledImage | None, classes: tuple[str, ...]) -> Counter[tuple[str, str]]:
    """Multiset of (class name, "x1,y1,x2,y2" to 3 decimals) of one image; empty for None."""
    if r is None:
        return Counter()
    return Counter(
        (classes[int(c)], f"{x1:.3f},{y1:.3f},{x2:.3f},{y2:.3f}")
        for (x1, y1, x2, y2), c in zip(
            r.boxes.xyxy.tolist(), r.boxes.class_id.tolist(), strict=True
        )
    )


def _mask_counter(r: LabeledImage | None, classes: tuple[str, ...]) -> Counter[tuple[str, str]]:
    """Multiset of (class name, "<box>=<rings>" to 3 decimals) of one image's polygons."""
    if r is None or not r.polygons:
        return Counter()
    return Counter(
        (classes[int(c)], f"{x1:.3f},{y1:.3f},{x2:.3f},{y2:.3f}={instance_key(rings)}")
        for (x1, y1, x2, y2), c, rings in zip(
            r.boxes.xyxy.tolist(), r.boxes.class_id.tolist(), r.polygons, strict=True
        )
        if rings
    )


def _keypoint_counter(r: LabeledImage | None, classes: tuple[str, ...]) -> Counter[tuple[str, str]]:
    """Multiset of (class name, "<box>#<keypoint>" to 3 decimals) of one image's keypoints."""
    if r is None or not r.keypoints:
        return Counter()
    return Counter(
        (classes[int(c)], f"{x1:.3f},{y1:.3f},{x2:.3f},{y2:.3f}#{kp.key()}")
        for (x1, y1, x2, y2), c, kps in zip(
            r.boxes.xyxy.tolist(), r.boxes.class_id.tolist(), r.keypoints, strict=True
        )
        for kp in kps
    )


def diff_versions(a: DatasetVersion, b: DatasetVersion) -> VersionDiff:
    """Compare two versions image by image and box by box (pure; no I/O).

    Images are matched by sha256: in ``b`` only -> added, in ``a`` only -> removed, in both with a
    different box or mask multiset -> relabeled (masks: also remasked), with a different split -> resplit (can overlap with
    relabeled), otherwise unchanged. Boxes are matched by class name + coordinates to 3 decimals.
    Classes: ``a``'s, then any only ``b`` has.
    """
    classes = tuple(dict.fromkeys((*a.classes, *b.classes)))
    rows_a, rows_b = a.by_sha(), b.by_sha()
    added = tuple(sorted(rows_b.keys() - rows_a.keys()))
    removed = tuple(sorted(rows_a.keys() - rows_b.keys()))
    relabeled: list[str] = []
    resplit: list[str] = []
    unchanged = 0
    plus: Counter[str] = Counter()
    minus: Counter[str] = Counter()
    mask_plus: Counter[str] = Counter()
    mask_minus: Counter[str] = Counter()
    remasked: list[str] = []
    kp_plus: Counter[str] = Counter()
    kp_minus: Counter[str] = Counter()
    rekeyed: list[str] = []
    for sha in sorted(rows_a.keys() | rows_b.keys()):
        ra, rb = rows_a.get(sha), rows_b.get(sha)
        keys_a = _box_counter(ra, a.classes)
        keys_b = _box_counter(rb, b.classes)
        for (cls_name, _), n in (keys_b - keys_a).items():
            plus[cls_name] += n
        for (cls_name, _), n in (keys_a - keys_b).items():
            minus[cls_name] += n
        masks_a = _mask_counter(ra, a.classes)
        masks_b = _mask_counter(rb, b.classes)
        for (cls_name, _), n in (masks_b - masks_a).items():
            mask_plus[cls_name] += n
        for (cls_name, _), n in (masks_a - masks_b).items():
            mask_minus[cls_name] += n
        kps_a = _keypoint_counter(ra, a.classes)
        kps_b = _keypoint_counter(rb, b.classes)
        for (cls_name, _), n in (kps_b - kps_a).items():
            kp_plus[cls_name] += n
        for (cls_name, _), n in (kps_a - kps_b).items():
            kp_minus[cls_name] += n
        if ra is None or rb is None:
            continue
        mask_changed = masks_a != masks_b
        if mask_changed:
            remasked.append(sha)
        kp_changed = kps_a != kps_b
        if kp_changed:
            rekeyed.append(sha)
        changed = keys_a != keys_b or mask_changed or kp_changed
        if changed:
            relabeled.append(sha)
        if ra.split != rb.split:
            resplit.append(sha)
        elif not changed:
            unchanged += 1
    before, after = a.class_counts(), b.class_counts()
    m_before, m_after = a.mask_counts(), b.mask_counts()
    k_before, k_after = a.keypoint_counts(), b.keypoint_counts()
    return VersionDiff(
        a=a.digest,
        b=b.digest,
        classes=classes,
        added=added,
        removed=removed,
        relabeled=tuple(relabeled),
        resplit=tuple(resplit),
        unchanged=unchanged,
        boxes_added={c: plus[c] for c in classes},
        boxes_removed={c: minus[c] for c in classes},
        before={c: before.get(c, 0) for c in classes},
        after={c: after.get(c, 0) for c in classes},
        splits_before=a.split_counts(),
        splits_after=b.split_counts(),
        has_masks=a.has_polygons or b.has_polygons,
        remasked=tuple(remasked),
        masks_added={c: mask_plus[c] for c in classes},
        masks_removed={c: mask_minus[c] for c in classes},
        masks_before={c: m_before.get(c, 0) for c in classes},
        masks_after={c: m_after.get(c, 0) for c in classes},
        has_keypoints=a.has_keypoints or b.has_keypoints,
        rekeyed=tuple(rekeyed),
        keypoints_added={c: kp_plus[c] for c in classes},
        keypoints_removed={c: kp_minus[c] for c in classes},
        keypoints_before={c: k_before.get(c, 0) for c in classes},
        keypoints_after={c: k_after.get(c, 0) for c in classes},
    )
