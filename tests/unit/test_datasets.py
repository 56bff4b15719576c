import hashlib
import random
from pathlib import Path

import numpy as np
import pytest

from loop.config import SplitConfig
from loop.datasets import DatasetStore, DatasetVersion, LabeledImage, assign_split, export_yolo
from loop.detections import Detections
from loop.errors import DatasetError

CLASSES = ("scratch", "pit")


def sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def row(i: int, boxes=((1, 2, 10, 12, 0),), split=None) -> LabeledImage:
    arr = np.array([b[:4] for b in boxes], dtype=float).reshape(-1, 4)
    ids = np.array([b[4] for b in boxes], dtype=int)
    s = sha(i)
    return LabeledImage(
        s,
        f"{s[:2]}/{s}.png",
        32,
        32,
        split or assign_split(s, SplitConfig()),
        Detections(arr, ids, (32, 32)),
        {"source": "test"},
    )


def test_digest_ignores_row_order_and_provenance():
    rows = [row(i) for i in range(20)]
    a = DatasetVersion.create(CLASSES, rows)
    shuffled = rows[:]
    random.Random(4).shuffle(shuffled)
    b = DatasetVersion.create(CLASSES, shuffled)
    r0 = rows[0]
    c = DatasetVersion.create(
        CLASSES,
        [
            LabeledImage(r0.sha256, r0.path, 32, 32, r0.split, r0.boxes, {"source": "other"}),
            *rows[1:],
        ],
    )
    assert a.digest == b.digest == c.digest


@pytest.mark.parametrize(
    "change",
    [
        lambda: row(3, boxes=((1, 2, 10, 12.01, 0),)),  # one box moved by 0.01 px
        lambda: row(3, boxes=((1, 2, 10, 12, 1),)),  # relabeled
        lambda: row(3, boxes=()),  # now defect-free
        lambda: row(3, boxes=((1, 2, 10, 12, 0), (0, 0, 1, 1, 1))),  # one box added
    ],
)
def test_digest_changes_with_any_label_change(change):
    rows = [row(i) for i in range(6)]
    base = DatasetVersion.create(CLASSES, rows)
    changed = base.with_labels([change()])
    assert changed.digest != base.digest
    assert changed.parent == base.digest


def test_digest_changes_with_class_list():
    rows = [row(i) for i in range(3)]
    assert (
        DatasetVersion.create(CLASSES, rows).digest
        != DatasetVersion.create(("pit", "scratch"), rows).digest
    )


def test_split_is_deterministic_and_stable_when_images_arrive():
    ratios = SplitConfig(val=0.2, test=0.2)
    first = {sha(i): assign_split(sha(i), ratios) for i in range(500)}
    again = {sha(i): assign_split(sha(i), ratios) for i in range(1000)}
    assert all(again[k] == v for k, v in first.items())
    frac = {s: sum(v == s for v in again.values()) / 1000 for s in ("train", "val", "test")}
    assert frac["test"] == pytest.approx(0.2, abs=0.05)
    assert frac["val"] == pytest.approx(0.2, abs=0.05)


def test_save_load_round_trip_and_no_overwrite(tmp_path: Path):
    store = DatasetStore(tmp_path / "ds")
    v = DatasetVersion.create(CLASSES, [row(i) for i in range(10)])
    p = store.save(v)
    mtime = (p / "manifest.parquet").stat().st_mtime_ns
    assert store.save(v) == p
    assert (p / "manifest.parquet").stat().st_mtime_ns == mtime
    back = store.load(v.digest[:8])
    assert back.digest == v.digest
    assert [r.sha256 for r in back.rows] == [r.sha256 for r in v.rows]
    assert all(a.boxes.same_boxes(b.boxes) for a, b in zip(back.rows, v.rows, strict=True))
    assert back.rows[0].provenance == {"source": "test"}
    assert [m["digest"] for m in store.list()] == [v.digest]


def test_load_detects_tampering(tmp_path: Path):
    import pyarrow.parquet as pq

    store = DatasetStore(tmp_path / "ds")
    v = DatasetVersion.create(CLASSES, [row(i) for i in range(4)])
    p = store.save(v)
    table = pq.read_table(p / "manifest.parquet")
    pq.write_table(table.slice(0, 3), p / "manifest.parquet")
    with pytest.raises(DatasetError, match="does not match"):
        store.load(v.digest)


def test_resolve_needs_unique_prefix(tmp_path: Path):
    store = DatasetStore(tmp_path / "ds")
    with pytest.raises(DatasetError, match="matches 0"):
        store.load("abcdef")


def _pool(tmp_path: Path, rows: list[LabeledImage]) -> Path:
    images = tmp_path / "images"
    for r in rows:
        (images / r.path).parent.mkdir(parents=True, exist_ok=True)
        (images / r.path).write_bytes(r.sha256.encode())
    return images


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_export_is_byte_identical_and_complete(tmp_path: Path):
    rows = [row(i, split=("train", "val", "test")[i % 3]) for i in range(9)]
    rows.append(row(99, boxes=(), split="train"))
    v = DatasetVersion.create(CLASSES, rows)
    images = _pool(tmp_path, rows)
    y1 = export_yolo(v, images, tmp_path / "e1")
    y2 = export_yolo(v, images, tmp_path / "e2")
    t1, t2 = _tree(tmp_path / "e1"), _tree(tmp_path / "e2")
    t1.pop("data.yaml"), t2.pop("data.yaml")  # absolute paths differ by design
    assert t1 == t2
    assert y1.read_text().replace("e1", "e2") == y2.read_text()
    assert (tmp_path / "e1" / "train" / "labels" / f"{sha(99)}.txt").read_text() == ""
    assert len(list((tmp_path / "e1" / "test" / "images").iterdir())) == 3
    assert 'names:\n  0: "scratch"\n  1: "pit"' in y1.read_text()


def test_export_refuses_without_val(tmp_path: Path):
    rows = [row(i, split="train") for i in range(3)]
    v = DatasetVersion.create(CLASSES, rows)
    with pytest.raises(DatasetError, match="val"):
        export_yolo(v, _pool(tmp_path, rows), tmp_path / "e")
