"""Tests of the seeded synthetic defect generator `loop.synth`."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loop.formats.yolo import yolo_lines_to_detections
from loop.synth import SYNTH_CLASSES, SynthSample, _mask_box, generate, write_dataset


def _digests(paths: list[Path]) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


@pytest.fixture(scope="module")
def samples_200() -> list[SynthSample]:
    return list(generate(200, seed=7))


def test_sample_shape_dtype_channels_and_names() -> None:
    samples = list(generate(3, seed=11, size=64))
    assert [s.name for s in samples] == ["synth_11_00000", "synth_11_00001", "synth_11_00002"]
    for s in samples:
        assert s.image.shape == (64, 64, 3)
        assert s.image.dtype == np.uint8
        assert np.array_equal(s.image[..., 0], s.image[..., 1])
        assert np.array_equal(s.image[..., 0], s.image[..., 2])
        assert s.labels.image_wh == (64, 64)
        assert s.labels.confidence is None


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    a = write_dataset(tmp_path / "a", 12, seed=3)
    b = write_dataset(tmp_path / "b", 12, seed=3)
    assert [p.name for p in a] == [p.name for p in b]
    assert _digests(a) == _digests(b)
    labels_a = sorted((tmp_path / "a" / "labels").iterdir())
    labels_b = sorted((tmp_path / "b" / "labels").iterdir())
    assert [p.read_bytes() for p in labels_a] == [p.read_bytes() for p in labels_b]


def test_different_seed_gives_different_images(tmp_path: Path) -> None:
    a = _digests(write_dataset(tmp_path / "a", 5, seed=1))
    b = _digests(write_dataset(tmp_path / "b", 5, seed=2))
    assert all(x != y for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("k", "n"), [(0, 5), (1, 5), (5, 17), (17, 17)])
def test_prefix_stability(k: int, n: int) -> None:
    short = list(generate(k, seed=5))
    long = list(generate(n, seed=5))[:k]
    assert len(short) == k
    for s, t in zip(short, long, strict=True):
        assert s.name == t.name
        assert np.array_equal(s.image, t.image)
        assert s.labels.same_boxes(t.labels, atol=0)


@pytest.mark.parametrize("size", [32, 64, 128, 200])
def test_boxes_inside_image_and_not_degenerate(size: int) -> None:
    for s in generate(60, seed=9, size=size, defect_free_fraction=0.0):
        xyxy = s.labels.xyxy
        assert len(s.labels) >= 1
        assert np.all(xyxy >= 0) and np.all(xyxy[:, [0, 2]] <= size) and np.all(xyxy[:, 3] <= size)
        assert np.all(xyxy[:, 2] - xyxy[:, 0] >= 2) and np.all(xyxy[:, 3] - xyxy[:, 1] >= 2)
        assert np.all(s.labels.class_id < len(SYNTH_CLASSES))


def test_every_class_appears(samples_200: list[SynthSample]) -> None:
    ids = np.concatenate([s.labels.class_id for s in samples_200])
    counts = np.bincount(ids, minlength=len(SYNTH_CLASSES))
    assert counts.shape == (len(SYNTH_CLASSES),)
    # Classes are drawn uniformly, so each should get a fair share, not just one instance.
    assert np.all(counts >= 0.1 * counts.sum()), counts


@pytest.mark.parametrize("fraction", [0.0, 0.15, 0.5, 1.0])
def test_defect_free_fraction(fraction: float) -> None:
    samples = list(generate(400, seed=21, size=64, defect_free_fraction=fraction))
    empty = np.mean([len(s.labels) == 0 for s in samples])
    assert abs(empty - fraction) <= 0.08


@pytest.mark.parametrize("max_defects", [1, 3])
def test_defect_count_bounded(max_defects: int) -> None:
    counts = [len(s.labels) for s in generate(100, seed=4, size=64, max_defects=max_defects)]
    assert max(counts) == max_defects


def test_yolo_labels_round_trip(tmp_path: Path) -> None:
    size = 96
    paths = write_dataset(tmp_path, 30, seed=13, size=size)
    samples = list(generate(30, seed=13, size=size))
    assert (tmp_path / "classes.txt").read_text().splitlines() == list(SYNTH_CLASSES)
    assert [p.stem for p in paths] == [s.name for s in samples]
    for path, sample in zip(paths, samples, strict=True):
        assert path == tmp_path / "images" / f"{sample.name}.png"
        text = (tmp_path / "labels" / f"{sample.name}.txt").read_text()
        if len(sample.labels) == 0:
            assert text == ""
        parsed = yolo_lines_to_detections(text, (size, size), len(SYNTH_CLASSES))
        # 6 decimals of a normalised coordinate are ~1e-4 px at this size.
        assert parsed.same_boxes(sample.labels, atol=1e-3)


def test_png_is_lossless_rgb_without_metadata(tmp_path: Path) -> None:
    (path,) = write_dataset(tmp_path, 1, seed=0)
    (sample,) = generate(1, seed=0)
    with Image.open(path) as im:
        assert im.mode == "RGB"
        assert np.array_equal(np.asarray(im), sample.image)
    data = path.read_bytes()
    chunks = []
    pos = 8
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        chunks.append(data[pos + 4 : pos + 8])
        pos += 12 + length
    assert set(chunks) == {b"IHDR", b"IDAT", b"IEND"}


def _inside_around(gray: np.ndarray, box: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Grey levels inside ``box`` and in the ``pad``-pixel ring around it (clipped to the image)."""
    x1, y1, x2, y2 = (int(v) for v in box)
    h, w = gray.shape
    outer = np.zeros_like(gray, dtype=bool)
    outer[max(0, y1 - pad) : min(h, y2 + pad), max(0, x1 - pad) : min(w, x2 + pad)] = True
    inner = np.zeros_like(outer)
    inner[y1:y2, x1:x2] = True
    return gray[inner], gray[outer & ~inner]


def _single_defects(class_name: str) -> list[SynthSample]:
    cls = SYNTH_CLASSES.index(class_name)
    samples = generate(80, seed=17, defect_free_fraction=0.0, max_defects=1)
    found = [s for s in samples if s.labels.class_id[0] == cls]
    assert len(found) >= 5
    return found


def test_pit_box_covers_darker_pixels() -> None:
    """Known answer: pits are drawn dark, so a box on the drawn pit is darker than its ring."""
    for s in _single_defects("pit"):
        x1, y1, x2, y2 = s.labels.xyxy[0]
        assert x2 - x1 <= 24 and y2 - y1 <= 24  # pits are 3..10 px, up to 3 clustered
        inside, around = _inside_around(s.image[..., 0].astype(np.float64), s.labels.xyxy[0], 4)
        assert inside.mean() < around.mean() - 5.0, (s.name, inside.mean(), around.mean())
        assert inside.min() < around.mean() - 30.0


def test_crack_box_covers_dark_line() -> None:
    """A crack is a thin line in a large box, so compare dark tails, not means."""
    for s in _single_defects("crack"):
        inside, around = _inside_around(s.image[..., 0].astype(np.float64), s.labels.xyxy[0], 4)
        assert np.percentile(inside, 5) < np.percentile(around, 5) - 15.0, s.name


@pytest.mark.parametrize(
    ("cells", "expected"),
    [
        ([(10, 3), (10, 7), (11, 5)], [3, 10, 8, 12]),  # (row, col): pixel edges, x2 = col + 1
        ([(5, 5)], [4.5, 4.5, 6.5, 6.5]),  # one pixel grows to 2 px about its centre
        ([(0, 0)], [0, 0, 2, 2]),  # ...but not out of the image
        ([(15, 15)], [14, 14, 16, 16]),
    ],
)
def test_mask_box_known_answers(cells: list[tuple[int, int]], expected: list[float]) -> None:
    mask = np.zeros((16, 16), dtype=bool)
    for r, c in cells:
        mask[r, c] = True
    assert _mask_box(mask).tolist() == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": -1},
        {"size": 31},
        {"defect_free_fraction": -0.01},
        {"defect_free_fraction": 1.5},
        {"max_defects": 0},
        {"seed": -3},
    ],
)
def test_invalid_arguments_raise_at_call_time(kwargs: dict[str, float]) -> None:
    args: dict[str, float] = {"n": 2, "seed": 0, **kwargs}
    with pytest.raises(ValueError):
        generate(**args)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        write_dataset(Path("/nonexistent/never/created"), **args)  # type: ignore[arg-type]


def test_non_integer_count_is_rejected() -> None:
    with pytest.raises(TypeError):
        generate(2.5, seed=0)  # type: ignore[arg-type]
