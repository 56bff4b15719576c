"""Pascal VOC import: XML parsing, stem matching, classes from <name>, NEU-DET quirks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from loop.errors import ConversionError, UnknownLabelError
from loop.formats.voc import parse_voc_xml, read_voc_folder, voc_to_detections, write_yolo_folder
from loop.formats.yolo import yolo_lines_to_detections

REPO = Path(__file__).resolve().parents[2]


def neu_det_dir() -> Path | None:
    """NEU-DET from DEFECT_LOOP_NEU_DET, else ../shared/datasets/neu-det beside the repo."""
    env = os.environ.get("DEFECT_LOOP_NEU_DET")
    path = Path(env) if env else REPO.parent / "shared" / "datasets" / "neu-det"
    return path if (path / "annotations").is_dir() and (path / "images").is_dir() else None


def voc_xml(filename: str, objects: list[tuple[str, tuple[int, int, int, int], int]]) -> str:
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin>"
        f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b, d in objects
    )
    return (
        f"<annotation><filename>{filename}</filename><size><width>40</width>"
        f"<height>30</height><depth>1</depth></size>{objs}</annotation>"
    )


def test_parse_converts_one_based_inclusive_boxes_to_pixel_edges():
    ann = parse_voc_xml(voc_xml("a.jpg", [("dent", (1, 1, 40, 30), 0), ("pit", (5, 6, 7, 8), 1)]))
    assert ann.filename == "a.jpg" and ann.size == (40, 30)
    assert [o.name for o in ann.objects] == ["dent", "pit"]
    assert [o.difficult for o in ann.objects] == [False, True]
    det = voc_to_detections(ann, (40, 30), ["pit", "dent"])
    # xmin=1..xmax=40 covers every column of a 40 px image: edges 0 and 40.
    assert det.xyxy.tolist() == [[0, 0, 40, 30], [4, 5, 7, 8]]
    assert det.class_id.tolist() == [1, 0]
    assert det.confidence is None


def test_boxes_are_clipped_to_the_real_image_and_empty_files_are_defect_free():
    ann = parse_voc_xml(voc_xml("a", [("dent", (0, 0, 45, 31), 0)]))
    assert voc_to_detections(ann, (40, 30), ["dent"]).xyxy.tolist() == [[0, 0, 40, 30]]
    empty = parse_voc_xml(voc_xml("b", []))
    assert len(voc_to_detections(empty, (40, 30), ["dent"])) == 0


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("<annotation><object>", "not valid XML"),
        ("<root/>", "not <annotation>"),
        ("<annotation><object><bndbox/></object></annotation>", "no <name>"),
        ("<annotation><object><name>a</name></object></annotation>", "no <bndbox>"),
        (voc_xml("a", [("a", (5, 5, 2, 9), 0)]), "max < min"),
        (voc_xml("a", [("a", (1, 1, 2, 2), 0)]).replace("<xmin>1", "<xmin>x"), "not a number"),
    ],
)
def test_malformed_annotations_raise_named_errors(text, match):
    with pytest.raises(ConversionError, match=match):
        parse_voc_xml(text)


def test_unknown_class_and_box_outside_the_image_are_named_errors():
    ann = parse_voc_xml(voc_xml("a", [("rust", (1, 1, 5, 5), 0)]))
    with pytest.raises(UnknownLabelError, match="rust"):
        voc_to_detections(ann, (40, 30), ["dent"])
    far = parse_voc_xml(voc_xml("a", [("dent", (50, 50, 60, 60), 0)]))
    with pytest.raises(ConversionError, match="outside"):
        voc_to_detections(far, (40, 30), ["dent"])


def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "voc"
    if root.exists():
        return root
    (root / "annotations").mkdir(parents=True)
    (root / "images").mkdir()
    for grey, stem in enumerate(("scratches_1", "dent_2", "lonely")):
        # Distinct pixels: the pool keys images by content, identical files would merge.
        img = np.full((30, 40, 3), 60 + 50 * grey, np.uint8)
        Image.fromarray(img).save(root / "images" / f"{stem}.jpg")
    # Filename without extension, and a "scratches_" file whose boxes are dents.
    (root / "annotations" / "scratches_1.xml").write_text(
        voc_xml("scratches_1", [("dent", (2, 2, 10, 10), 0), ("dent", (20, 3, 30, 9), 1)])
    )
    (root / "annotations" / "dent_2.xml").write_text(
        voc_xml("WRONG_NAME.jpg", [("scratch", (1, 1, 4, 4), 0)])
    )
    (root / "annotations" / "orphan.xml").write_text(voc_xml("orphan.jpg", []))
    return root


def test_folder_matches_by_stem_and_takes_classes_from_name(tmp_path):
    folder = read_voc_folder(_folder(tmp_path))
    assert folder.classes == ["dent", "scratch"]
    assert {it.image.stem for it in folder.items} == {"scratches_1", "dent_2"}
    assert [p.name for p in folder.missing_image] == ["orphan.xml"]
    assert [p.name for p in folder.unannotated] == ["lonely.jpg"]
    assert folder.boxes_per_class() == {"dent": 2, "scratch": 1}
    assert folder.n_difficult == 1
    dets = {p.stem: d for p, d in folder.detections().items()}
    assert dets["scratches_1"].class_id.tolist() == [0, 0]  # dents, whatever the file name says


def test_write_yolo_folder_round_trips(tmp_path):
    folder = read_voc_folder(_folder(tmp_path))
    out = write_yolo_folder(folder, tmp_path / "yolo", ["scratch", "dent"])
    assert (out / "classes.txt").read_text() == "scratch\ndent\n"
    assert (out / "images" / "dent_2.jpg").resolve() == folder.images_dir / "dent_2.jpg"
    back = yolo_lines_to_detections((out / "labels" / "scratches_1.txt").read_text(), (40, 30), 2)
    assert np.allclose(back.xyxy, [[1, 1, 10, 10], [19, 2, 30, 9]], atol=1e-4)
    assert back.class_id.tolist() == [1, 1]
    assert not (out / "labels" / "lonely.txt").exists()


def test_missing_folders_are_explained(tmp_path):
    with pytest.raises(ConversionError, match="annotations"):
        read_voc_folder(tmp_path)


def test_cli_import_voc_writes_yolo(tmp_path):
    import typer

    from loop.cli.sim import import_app

    app = typer.Typer()
    app.add_typer(import_app, name="import")
    res = CliRunner().invoke(
        app, ["import", "voc", str(_folder(tmp_path)), "--out", str(tmp_path / "y")]
    )
    assert res.exit_code == 0, res.output
    assert "2 annotated images, 3 boxes (1 difficult, kept)" in res.output
    assert "1 annotations without an image" in res.output
    assert (tmp_path / "y" / "labels" / "dent_2.txt").is_file()


def test_cli_import_voc_into_a_project(tmp_path):
    import typer

    from loop.cli.sim import import_app
    from loop.config import load_config, write_default_config
    from loop.project import Project

    cfg_path = tmp_path / "defect-loop.yaml"
    write_default_config(cfg_path, ["scratch", "dent"])
    app = typer.Typer()
    app.add_typer(import_app, name="import")
    res = CliRunner().invoke(app, ["import", "voc", str(_folder(tmp_path)), "-c", str(cfg_path)])
    assert res.exit_code == 0, res.output
    version = Project(load_config(cfg_path)).current_version()
    assert version is not None and len(version) == 2
    assert version.class_counts() == {"scratch": 1, "dent": 2}
    bad_cfg = tmp_path / "other.yaml"
    write_default_config(bad_cfg, ["scratch"])
    res = CliRunner().invoke(app, ["import", "voc", str(_folder(tmp_path)), "-c", str(bad_cfg)])
    assert res.exit_code == 2 and "dent" in res.output


NEU = neu_det_dir()
needs_neu = pytest.mark.skipif(
    NEU is None,
    reason="NEU-DET not found: set DEFECT_LOOP_NEU_DET or provide ../shared/datasets/neu-det",
)


@needs_neu
def test_neu_det_quirks_on_a_few_real_files(tmp_path):
    assert NEU is not None
    root = tmp_path / "neu"
    (root / "annotations").mkdir(parents=True)
    (root / "images").mkdir()
    # patches_104: <filename> without .jpg; inclusion_136: a difficult box;
    # scratches_108: a "scratches" file that also holds inclusion boxes.
    stems = ["patches_104", "inclusion_136", "scratches_108", "crazing_1"]
    for stem in stems:
        os.symlink(NEU / "annotations" / f"{stem}.xml", root / "annotations" / f"{stem}.xml")
        os.symlink(NEU / "images" / f"{stem}.jpg", root / "images" / f"{stem}.jpg")
    folder = read_voc_folder(root)
    assert sorted(it.image.stem for it in folder.items) == sorted(stems)
    assert not folder.missing_image and not folder.size_mismatch
    by = {it.image.stem: it for it in folder.items}
    assert by["patches_104"].voc.filename == "patches_104"
    assert all(it.image_wh == (200, 200) for it in folder.items)
    assert [o.difficult for o in by["inclusion_136"].voc.objects] == [True, False]
    names = {o.name for o in by["scratches_108"].voc.objects}
    assert names == {"scratches", "inclusion"}
    classes = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
    dets = {p.stem: d for p, d in folder.detections(classes).items()}
    # VOC 1..200 inclusive -> pixel edges 0..200.
    assert dets["patches_104"].xyxy[0].tolist() == [0, 87, 41, 200]
    assert len(dets["inclusion_136"]) == 2  # the difficult box is kept
    assert set(dets["scratches_108"].class_id.tolist()) == {1, 5}
