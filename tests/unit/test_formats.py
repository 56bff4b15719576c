import numpy as np
import pytest

from loop.detections import Detections
from loop.errors import ConversionError, UnknownLabelError
from loop.formats.labelstudio import detections_to_ls_results, ls_results_to_detections
from loop.formats.yolo import detections_to_yolo_lines, yolo_lines_to_detections

CLASSES = ["scratch", "pit", "crack"]


def sample(wh=(200, 100)):
    return Detections(
        np.array([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 200.0, 100.0], [120.5, 33.25, 121.5, 40.0]]),
        np.array([0, 2, 1]),
        wh,
        confidence=np.array([0.9, 0.4, 0.1]),
    )


def test_ls_percent_known_answer():
    r = detections_to_ls_results(sample(), CLASSES)[0]
    assert r["value"]["x"] == pytest.approx(5.0)
    assert r["value"]["y"] == pytest.approx(20.0)
    assert r["value"]["width"] == pytest.approx(20.0)
    assert r["value"]["height"] == pytest.approx(40.0)
    assert r["value"]["rectanglelabels"] == ["scratch"]
    assert r["score"] == pytest.approx(0.9)
    assert (r["original_width"], r["original_height"]) == (200, 100)


def test_yolo_known_answer():
    line = detections_to_yolo_lines(sample())[0]
    assert line == "0 0.150000 0.400000 0.200000 0.400000"


@pytest.mark.parametrize("wh", [(200, 100), (640, 480), (37, 1001)])
def test_round_trip_pixel_ls_yolo_pixel(wh):
    d = sample(wh=(200, 100))
    scale = np.array([wh[0] / 200, wh[1] / 100] * 2)
    d = Detections(d.xyxy * scale, d.class_id, wh)
    via_ls = ls_results_to_detections(detections_to_ls_results(d, CLASSES), CLASSES)
    assert via_ls.same_boxes(d, atol=1e-6)
    via_yolo = yolo_lines_to_detections(detections_to_yolo_lines(via_ls), wh, len(CLASSES))
    # 6 decimals of a normalised coordinate: error <= 1e-6 * side
    assert via_yolo.same_boxes(d, atol=1e-6 * max(wh) * 2)


def test_empty_annotation_needs_size_and_gives_zero_boxes():
    d = ls_results_to_detections([], CLASSES, image_wh=(64, 32))
    assert len(d) == 0 and d.image_wh == (64, 32)
    with pytest.raises(ConversionError, match="image size"):
        ls_results_to_detections([], CLASSES)


def rect(**value):
    base = {"x": 10, "y": 10, "width": 20, "height": 20, "rotation": 0, "rectanglelabels": ["pit"]}
    base.update(value)
    return {
        "id": "r1",
        "type": "rectanglelabels",
        "original_width": 100,
        "original_height": 100,
        "value": base,
    }


@pytest.mark.parametrize(
    ("result", "error", "match"),
    [
        (rect(rectanglelabels=["dent"]), UnknownLabelError, "dent"),
        (rect(rotation=15), ConversionError, "rotated"),
        (rect(x=95), ConversionError, "outside"),
        (rect(y=-3), ConversionError, "outside"),
        (rect(rectanglelabels=[]), ConversionError, "exactly one label"),
    ],
)
def test_ls_refusals(result, error, match):
    with pytest.raises(error, match=match):
        ls_results_to_detections([result], CLASSES)


def test_non_rectangle_results_are_ignored():
    d = ls_results_to_detections(
        [rect(), {"type": "choices", "value": {"choices": ["defect-free"]}}], CLASSES
    )
    assert d.class_id.tolist() == [1]
    assert d.xyxy.tolist() == [[10.0, 10.0, 30.0, 30.0]]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("7 0.5 0.5 0.1 0.1", UnknownLabelError),
        ("0 0.5 0.5 0.1", ConversionError),
        ("0 0.5 1.5 0.1 0.1", ConversionError),
        ("x 0.5 0.5 0.1 0.1", ConversionError),
    ],
)
def test_yolo_refusals(text, error):
    with pytest.raises(error):
        yolo_lines_to_detections(text, (10, 10), 3)
