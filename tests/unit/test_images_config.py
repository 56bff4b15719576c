from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loop.config import IngestConfig, load_config
from loop.errors import ConfigError, ImageError, UnknownLabelError
from loop.images import ImagePool


def png(path: Path, size=(32, 24), value=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3), value, dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    png(src / "a.png", value=10)
    png(src / "copy_of_a.png", value=10)
    png(src / "b.png", value=200)
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(src / "c.jpg", quality=90)
    (src / "empty.png").write_bytes(b"")
    (src / "notes.txt").write_text("not an image")
    full = (src / "b.png").read_bytes()
    (src / "truncated.png").write_bytes(full[: len(full) // 2])
    (src / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00garbage" * 10)
    png(src / "huge.png", size=(300, 300))
    png(src / "tiny.png", size=(4, 4))
    return src


def test_ingest_skips_bad_files_with_reasons_and_dedups(messy: Path, tmp_path: Path):
    pool = ImagePool(tmp_path / "ws" / "images", tmp_path / "ws" / "pool.json")
    limits = IngestConfig(max_pixels=250 * 250, min_side=8)
    files = sorted(p for p in messy.iterdir())
    report = pool.ingest(files, limits)
    assert len(report.added) == 3  # a, b, c
    assert report.duplicates == [str(messy / "copy_of_a.png")]
    assert report.accepted[str(messy / "copy_of_a.png")] == report.accepted[str(messy / "a.png")]
    reasons = {Path(r.source).name: r.reason for r in report.rejected}
    assert set(reasons) == {
        "empty.png",
        "notes.txt",
        "truncated.png",
        "corrupt.jpg",
        "huge.png",
        "tiny.png",
    }
    assert "0 bytes" in reasons["empty.png"]
    assert "not an image" in reasons["notes.txt"]
    assert "too large" in reasons["huge.png"]
    assert "too small" in reasons["tiny.png"]
    for p in pool:
        assert pool.abs_path(p.sha256).exists()
        assert p.path.startswith(p.sha256[:2] + "/")
    again = ImagePool(tmp_path / "ws" / "images", tmp_path / "ws" / "pool.json")
    assert len(again) == 3 and len(again.rejected) == 6
    second = again.ingest(files, limits)
    assert len(second.added) == 0 and len(second.duplicates) == 4


def write_cfg(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "defect-loop.yaml"
    p.write_text(text)
    return p


def test_config_loads_resolves_workspace_and_env_overrides(tmp_path, monkeypatch):
    p = write_cfg(tmp_path, "classes: [scratch, pit]\ntrain:\n  epochs: 3\n")
    monkeypatch.setenv("DEFECT_LOOP_TRAIN__EPOCHS", "7")
    monkeypatch.setenv("DEFECT_LOOP_LABELSTUDIO__API_TOKEN", "secret-token")
    cfg = load_config(p)
    assert cfg.train.epochs == 7
    assert cfg.workspace == (tmp_path / ".defect-loop").resolve()
    assert cfg.labelstudio.api_token.get_secret_value() == "secret-token"
    assert "secret-token" not in repr(cfg)
    assert cfg.class_index("pit") == 1
    with pytest.raises(UnknownLabelError, match="dent"):
        cfg.class_index("dent")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("classes: [a]\nlabelstudio:\n  api_token: abc\n", "secrets must not live"),
        ("classes: []\n", "at least one"),
        ("classes: [a, a]\n", "unique"),
        ("classes: [a]\nbogus: 1\n", "bogus"),
        ("classes: [a\n", "not valid YAML"),
        ("- a\n", "mapping"),
    ],
)
def test_config_errors(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write_cfg(tmp_path, text))


def test_missing_config_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="defect-loop init"):
        load_config(tmp_path / "nope.yaml")


def test_ingest_rejects_non_images_after_ultralytics_patched_pil(tmp_path: Path):
    # `import ultralytics` replaces PIL.Image.open with a version that loads pi-heif whenever
    # Pillow cannot identify a file; ingest must still report a plain "not an image".
    import importlib

    from loop.images import check_image
    from loop.offline import configure_ultralytics

    configure_ultralytics(tmp_path / "yolo")
    importlib.import_module("ultralytics.utils.patches")
    note = tmp_path / "notes.txt"
    note.write_text("not an image")
    with pytest.raises(ImageError, match="not an image"):
        check_image(note, IngestConfig())
