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


# ------------------------------------------------------------------ canonical form (documented)


def test_digest_follows_the_documented_canonical_form():
    r1 = row(1, boxes=((5, 6, 7, 8.0004, 1), (1, 2, 10, 12, 0)))
    r2 = row(2, boxes=())
    v = DatasetVersion.create(CLASSES, [r2, r1])
    lines = sorted(
        [
            f"{r1.sha256}|32x32|{r1.split}|pit:5.000,6.000,7.000,8.000;scratch:1.000,2.000,10.000,12.000",
            f"{r2.sha256}|32x32|{r2.split}|",
        ]
    )
    text = "classes:scratch\npit\n" + "".join(line + "\n" for line in lines)
    assert v.digest == hashlib.sha256(text.encode()).hexdigest()
    assert [r.sha256 for r in v.rows] == sorted([r1.sha256, r2.sha256])


def test_sub_millipixel_noise_and_box_order_keep_the_digest():
    a = DatasetVersion.create(CLASSES, [row(1, boxes=((1, 2, 10, 12, 0), (3, 3, 9, 9, 1)))])
    b = DatasetVersion.create(CLASSES, [row(1, boxes=((3, 3, 9, 9.0004, 1), (1, 2, 10, 12, 0)))])
    assert a.digest == b.digest


def test_with_labels_keeps_the_split_of_known_images():
    base = DatasetVersion.create(CLASSES, [row(i) for i in range(4)])
    old = base.rows[0]
    other = next(s for s in ("train", "val", "test") if s != old.split)
    moved = LabeledImage(old.sha256, old.path, 32, 32, other, old.boxes, {})
    child = base.with_labels([moved, row(50, split=other)])
    assert child.by_sha()[old.sha256].split == old.split  # frozen
    assert child.by_sha()[sha(50)].split == other  # new images take what they are given
    assert child.split_digest("test") == DatasetVersion.create(
        CLASSES, [*base.rows, row(50, split=other)]
    ).split_digest("test")


def test_split_digest_covers_only_that_split():
    rows = [row(i, split=("train", "val", "test")[i % 3]) for i in range(9)]
    base = DatasetVersion.create(CLASSES, rows)
    more_train = base.with_labels([row(100, split="train")])
    relabel_test = base.with_labels([row(2, boxes=(), split="test")])
    assert more_train.split_digest("test") == base.split_digest("test")
    assert more_train.split_digest("train") != base.split_digest("train")
    assert relabel_test.split_digest("test") != base.split_digest("test")


# ------------------------------------------------------------------ defect-free images


def test_split_comes_from_the_hash_not_the_boxes():
    ratios = SplitConfig(val=0.3, test=0.3)
    for i in range(200):
        with_boxes = row(i)
        empty = row(i, boxes=())
        assert with_boxes.split == empty.split == assign_split(sha(i), SplitConfig())
    # the function takes only the hash: defect-free images spread over all three splits
    free = {assign_split(sha(i), ratios) for i in range(200)}
    assert free == {"train", "val", "test"}


def test_export_writes_empty_label_files_for_defect_free_images_in_every_split(tmp_path: Path):
    ratios = SplitConfig(val=0.3, test=0.3)
    rows = []
    for i in range(30):
        s = sha(i)
        boxes = () if i % 2 else ((1, 2, 10, 12, i % 2),)
        rows.append(row(i, boxes=boxes, split=assign_split(s, ratios)))
    v = DatasetVersion.create(CLASSES, rows)
    export_yolo(v, _pool(tmp_path, rows), tmp_path / "e")
    seen = set()
    for r in rows:
        label = tmp_path / "e" / r.split / "labels" / f"{r.sha256}.txt"
        assert (tmp_path / "e" / r.split / "images" / f"{r.sha256}.png").is_file()
        if len(r.boxes) == 0:
            assert label.read_bytes() == b""
            seen.add(r.split)
        else:
            assert label.read_text().count("\n") == 1
    assert seen == {"train", "val", "test"}


# ------------------------------------------------------------------ store details


def test_read_version_dir_checks_the_expected_digest(tmp_path: Path):
    from loop.datasets import read_version_dir

    store = DatasetStore(tmp_path / "ds")
    v = DatasetVersion.create(CLASSES, [row(i) for i in range(3)])
    p = store.save(v)
    assert read_version_dir(p, v.digest).digest == v.digest
    with pytest.raises(DatasetError, match="not the expected"):
        read_version_dir(p, "0" * 64)
    with pytest.raises(DatasetError, match="no dataset version"):
        read_version_dir(tmp_path, None)


def test_list_ignores_half_written_versions_and_resolve_rejects_non_hex(tmp_path: Path):
    store = DatasetStore(tmp_path / "ds")
    assert store.list() == []
    v = DatasetVersion.create(CLASSES, [row(1)])
    store.save(v)
    tmp = tmp_path / "ds" / f".{v.digest}.tmp999"
    tmp.mkdir()
    (tmp / "meta.json").write_text("{}")
    assert [m["digest"] for m in store.list()] == [v.digest]
    with pytest.raises(DatasetError, match="at least 6 hex"):
        store.resolve("*")


# ------------------------------------------------------------------ diff


def _diff_pair() -> tuple[DatasetVersion, DatasetVersion]:
    scratch = (1, 2, 10, 12, 0)
    a = DatasetVersion.create(
        CLASSES,
        [
            row(1, boxes=(scratch,)),
            row(2, boxes=(scratch,)),
            row(3, boxes=(scratch,)),
            row(4, boxes=(scratch, (5, 5, 9, 9, 1))),
            row(5, boxes=(scratch,)),
            row(6, boxes=()),
        ],
    )
    b = DatasetVersion.create(
        CLASSES,
        [
            row(1, boxes=((1.0001, 2, 10, 12, 0),)),  # float noise: unchanged
            row(2, boxes=((1, 2, 10, 12.5, 0),)),  # moved: -1 +1 scratch
            row(3, boxes=(scratch, (0, 0, 5, 5, 1))),  # +1 pit
            row(4, boxes=((5, 5, 9, 9, 1), scratch)),  # reordered: unchanged
            row(6, boxes=()),  # still defect-free: unchanged
            row(7, boxes=((3, 3, 8, 8, 1), (4, 4, 9, 9, 1))),  # new image: +2 pit
        ],  # image 5 removed: -1 scratch
        parent=a.digest,
    )
    return a, b


def test_diff_known_answer():
    from loop.dataset_diff import diff_versions

    a, b = _diff_pair()
    d = diff_versions(a, b)
    assert d.added == (sha(7),)
    assert d.removed == (sha(5),)
    assert d.relabeled == tuple(sorted([sha(2), sha(3)]))
    assert d.resplit == ()
    assert d.unchanged == 3
    assert dict(d.boxes_added) == {"scratch": 1, "pit": 3}
    assert dict(d.boxes_removed) == {"scratch": 2, "pit": 0}
    assert dict(d.before) == {"scratch": 5, "pit": 1}
    assert dict(d.after) == {"scratch": 4, "pit": 4}
    for c in CLASSES:
        assert d.after[c] - d.before[c] == d.boxes_added[c] - d.boxes_removed[c]
    assert sum(d.splits_before.values()) == 6 and sum(d.splits_after.values()) == 6


def test_diff_text_and_dict():
    import json

    from loop.dataset_diff import diff_versions

    a, b = _diff_pair()
    d = diff_versions(a, b)
    text = d.to_text()
    assert text.startswith(f"dataset diff {a.digest[:12]} -> {b.digest[:12]}\n")
    assert "images: 1 added, 1 removed, 2 relabeled, 0 changed split, 3 unchanged" in text
    assert "class     before    after   +boxes   -boxes" in text
    assert "scratch        5        4        1        2" in text
    assert "pit            1        4        3        0" in text
    assert "total          6        8        4        2" in text
    assert f"added: {sha(7)[:12]}" in text
    assert f"removed: {sha(5)[:12]}" in text
    doc = json.loads(json.dumps(d.to_dict()))
    assert doc["images"]["unchanged"] == 3
    assert doc["images"]["added"] == [sha(7)]
    assert doc["boxes"]["pit"] == {"before": 1, "after": 4, "added": 3, "removed": 0}


def test_diff_of_a_version_with_itself_is_empty_and_split_moves_are_reported():
    from loop.dataset_diff import diff_versions

    a, _ = _diff_pair()
    same = diff_versions(a, a)
    assert same.identical and same.unchanged == len(a)
    assert not (same.added or same.removed or same.relabeled or same.resplit)
    r = a.rows[0]
    other = next(s for s in ("train", "val", "test") if s != r.split)
    moved = DatasetVersion.create(
        CLASSES, [LabeledImage(r.sha256, r.path, 32, 32, other, r.boxes, {}), *a.rows[1:]]
    )
    d = diff_versions(a, moved)
    assert d.resplit == (r.sha256,) and d.relabeled == () and d.unchanged == len(a) - 1
    assert "changed split: " + r.sha256[:12] in d.to_text()


def test_diff_lists_are_capped_in_text():
    from loop.dataset_diff import diff_versions

    a = DatasetVersion.create(CLASSES, [row(0)])
    b = a.with_labels([row(i) for i in range(1, 15)])
    text = diff_versions(a, b).to_text(max_listed=10)
    assert "... and 4 more" in text


# ------------------------------------------------------------------ CLI


@pytest.fixture
def cli_project(tmp_path: Path):
    """A project folder: config YAML + two saved versions (b is a child of a) + pool files."""
    import yaml

    from loop.config import load_config

    cfg_path = tmp_path / "proj" / "defect-loop.yaml"
    cfg_path.parent.mkdir()
    cfg_path.write_text(yaml.safe_dump({"classes": list(CLASSES), "workspace": "ws"}))
    cfg = load_config(cfg_path)
    a, b = _diff_pair()
    # every split needs an image for export: force a small, known layout
    rows = [
        LabeledImage(r.sha256, r.path, r.width, r.height, s, r.boxes, {"source": "test"})
        for r, s in zip(b.rows, ("train", "val", "test", "train", "val", "test"), strict=True)
    ]
    b = DatasetVersion.create(CLASSES, rows, parent=a.digest)
    store = DatasetStore(cfg.paths.datasets)
    store.save(a)
    store.save(b)
    _pool_at(cfg.paths.images, b.rows)
    return cfg_path, a, b


def _pool_at(images: Path, rows) -> None:
    for r in rows:
        (images / r.path).parent.mkdir(parents=True, exist_ok=True)
        (images / r.path).write_bytes(r.sha256.encode())


def _invoke(*args: str):
    from typer.testing import CliRunner

    from loop.cli.datasets import datasets_app

    return CliRunner().invoke(datasets_app, list(args))


def test_cli_list_and_show(cli_project):
    import json

    cfg, a, b = cli_project
    r = _invoke("list", "-c", str(cfg))
    assert r.exit_code == 0, r.output
    assert a.digest[:12] in r.output and b.digest[:12] in r.output
    line_b = next(ln for ln in r.output.splitlines() if ln[2:14] == b.digest[:12])
    assert f"{a.digest[:12]}" in line_b and "2/2/2" in line_b
    listed = json.loads(_invoke("list", "--json", "-c", str(cfg)).output)
    assert {m["digest"] for m in listed} == {a.digest, b.digest}

    r = _invoke("show", b.digest[:8], "-c", str(cfg))
    assert r.exit_code == 0, r.output
    assert f"digest:      {b.digest}" in r.output
    assert f"parent:      {a.digest}" in r.output
    assert "images:      6 (1 defect-free)" in r.output
    assert "splits:      train 2, val 2, test 2" in r.output
    assert "scratch        4" in r.output and "pit            4" in r.output
    info = json.loads(_invoke("show", b.digest[:8], "--json", "-c", str(cfg)).output)
    assert info["class_counts"] == {"scratch": 4, "pit": 4}


def test_cli_diff(cli_project):
    cfg, a, b = cli_project
    r = _invoke("diff", a.digest[:10], b.digest[:10], "-c", str(cfg))
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"dataset diff {a.digest[:12]} -> {b.digest[:12]}")
    assert "1 added, 1 removed, 2 relabeled" in r.output
    assert "scratch        5        4        1        2" in r.output


def test_cli_export_twice_is_byte_identical(cli_project, tmp_path: Path):
    cfg, _, b = cli_project
    for name in ("x1", "x2"):
        r = _invoke("export", b.digest[:8], str(tmp_path / name), "-c", str(cfg))
        assert r.exit_code == 0, r.output
        assert "train 2, val 2, test 2 images" in r.output
    t1, t2 = _tree(tmp_path / "x1"), _tree(tmp_path / "x2")
    y1, y2 = t1.pop("data.yaml").decode(), t2.pop("data.yaml").decode()
    assert t1 == t2 and len(t1) == 12
    assert y1.replace(str(tmp_path / "x1"), str(tmp_path / "x2")) == y2
    again = _invoke("export", b.digest[:8], str(tmp_path / "x1"), "-c", str(cfg))
    assert again.exit_code == 2 and "not an empty folder" in again.output


def test_cli_errors_say_what_to_do(cli_project, tmp_path: Path):
    cfg, _, _ = cli_project
    r = _invoke("show", "abcdef0", "-c", str(cfg))
    assert r.exit_code == 2 and "defect-loop datasets list" in r.output
    r = _invoke("list", "-c", str(tmp_path / "missing.yaml"))
    assert r.exit_code == 2 and "defect-loop init" in r.output


def test_cli_mounts_as_a_sub_app():
    import typer
    from typer.testing import CliRunner

    from loop.cli.datasets import datasets_app

    app = typer.Typer()
    app.add_typer(datasets_app, name="datasets")
    for args in (["datasets"], *(["datasets", c] for c in ("list", "show", "diff", "export"))):
        r = CliRunner().invoke(app, [*args, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output, r.output
