"""The training and selection sections of the config: the starting checkpoint (named, verified,
never downloaded), the per-round init policy, the small-set iteration floor, and strategy names
refused when the config is loaded."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from loop.config import (
    KNOWN_CHECKPOINTS,
    SelectConfig,
    TrainConfig,
    load_config,
    write_default_config,
)
from loop.errors import ConfigError


def _yaml(tmp_path: Path, train: dict | None = None, select: dict | None = None) -> Path:
    doc: dict = {"classes": ["scratch", "pit"]}
    if train is not None:
        doc["train"] = train
    if select is not None:
        doc["select"] = select
    path = tmp_path / "defect-loop.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def ckpt(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "models" / "start.pt"
    path.parent.mkdir()
    path.write_bytes(b"not really a checkpoint, but bytes with a hash")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_weights_resolve_against_the_yaml_and_are_verified(tmp_path, ckpt):
    path, sha = ckpt
    cfg = load_config(_yaml(tmp_path, {"weights": "models/start.pt", "weights_sha256": sha}))
    assert cfg.train.weights == path.resolve()
    start = cfg.train.start_checkpoint()
    assert start is not None and (start.path, start.sha256) == (path.resolve(), sha)


def test_a_changed_checkpoint_is_refused_with_both_hashes(tmp_path, ckpt):
    path, sha = ckpt
    cfg_path = _yaml(tmp_path, {"weights": "models/start.pt", "weights_sha256": sha})
    path.write_bytes(b"someone replaced the file")
    with pytest.raises(ConfigError, match=r"pins train\.weights_sha256") as err:
        load_config(cfg_path)
    assert sha in str(err.value)


def test_a_bare_release_name_that_is_not_on_disk_says_where_to_put_it(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(_yaml(tmp_path, {"weights": "yolov8n.pt"}))
    msg = str(err.value)
    assert str((tmp_path / "yolov8n.pt").resolve()) in msg
    assert "never downloads" in msg and KNOWN_CHECKPOINTS["yolov8n.pt"] in msg


@pytest.mark.parametrize(
    ("train", "match"),
    [
        ({"model": "yolov8n.pt"}, "set train.weights"),
        ({"weights": "model.onnx"}, "must be a PyTorch .pt"),
        ({"weights_sha256": "abc"}, "64 hex digits"),
        ({"init": "scratch"}, "init"),
        ({"init": "champion", "warm_start": True}, "not both"),
        ({"min_iterations": -1}, "min_iterations"),
    ],
)
def test_train_section_errors(tmp_path, train, match):
    with pytest.raises(ConfigError, match=match):
        load_config(_yaml(tmp_path, train))


@pytest.mark.parametrize(("warm", "init"), [(True, "champion"), (False, "pretrained")])
def test_warm_start_still_reads_as_the_init_policy(warm, init):
    assert TrainConfig(warm_start=warm).init == init


@pytest.mark.parametrize(
    ("n_train", "champion", "expected"),
    [
        (85, False, 50),  # 6 steps an epoch: 50 epochs reach 300 steps
        (340, False, 15),  # 22 steps an epoch: 15 epochs already give 330
        (0, False, 15),
        (85, True, 50),  # the floor applies to fine-tunes too
        (5000, True, 5),
    ],
)
def test_epochs_for_applies_the_iteration_floor(n_train, champion, expected):
    t = TrainConfig(epochs=15, finetune_epochs=5, batch=16, min_iterations=300)
    assert t.epochs_for(n_train, champion) == expected
    assert TrainConfig(epochs=15).epochs_for(n_train) == 15  # no floor: exactly `epochs`


@pytest.mark.parametrize(
    ("select", "match"),
    [
        ({"strategy": "entrpy"}, "unknown strategy 'entrpy'"),
        ({"strategy": "hybrid", "base_strategy": "diversity"}, "base_strategy"),
        ({"reduction": "median"}, "reduction"),
        ({"tta": ["rotate"]}, "select.tta"),
        ({"tta": ["scale:9"]}, "select.tta"),
        ({"hybrid_base": "margin", "base_strategy": "entropy"}, "not also"),
    ],
)
def test_select_section_refuses_unknown_names_at_load(tmp_path, select, match):
    with pytest.raises(ConfigError, match=match):
        load_config(_yaml(tmp_path, select=select))


def test_hybrid_base_still_names_the_base_strategy():
    assert SelectConfig(strategy="hybrid", hybrid_base="margin").base_strategy == "margin"


def test_init_pins_the_checkpoint_it_names(tmp_path, ckpt):
    path, sha = ckpt
    cfg_path = tmp_path / "proj" / "defect-loop.yaml"
    cfg_path.parent.mkdir()
    train = write_default_config(cfg_path, ["scratch"], weights=path)
    assert train.weights_sha256 == sha and train.init == "champion"
    assert (train.epochs, train.finetune_epochs) == (20, 10)
    assert load_config(cfg_path).select.strategy == "class_diversity"
    cfg = load_config(cfg_path)
    assert cfg.train.weights == path.resolve() and cfg.train.weights_sha256 == sha
    with pytest.raises(ConfigError, match="no checkpoint at"):
        write_default_config(tmp_path / "other.yaml", ["scratch"], weights=tmp_path / "nope.pt")
    assert not (tmp_path / "other.yaml").exists()
