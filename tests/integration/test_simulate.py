"""Oracle replay: label savings arithmetic, the oracle gateway, and a tiny end-to-end simulation
(synthetic 64 px images, 1-epoch trainings, 2 rounds) through the `simulate` command.

mAP is never asserted (it is ~0 after one epoch from scratch); the protocol is.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from loop.config import SplitConfig, TrainConfig
from loop.datasets import DatasetStore, assign_split
from loop.detections import Detections
from loop.errors import ConfigError, DatasetError, ImageError, ModelError, StrategyError
from loop.replay import ReplaySettings, run_replay
from loop.replay_dataset import initial_set, prepare_dataset
from loop.savings import label_savings, labels_to_reach, mean_curve
from loop.simulate import OracleGateway
from loop.synth import SYNTH_CLASSES, write_dataset

pytestmark = pytest.mark.integration

STRATEGIES = ("random", "entropy", "hybrid")
INITIAL, STEP, ROUNDS = 10, 6, 2
SPLIT = SplitConfig(val=0.2, test=0.25)


# ---------------------------------------------------------------------------- pure parts


def curve(strategy: str, seed: int, points: list[tuple[int, float]]) -> dict[str, Any]:
    return {
        "strategy": strategy,
        "seed": seed,
        "rounds": [
            {"round": i, "labeled": n, "test_map50": m, "test_map50_95": m / 2}
            for i, (n, m) in enumerate(points)
        ],
    }


def test_labels_to_reach_interpolates_and_extrapolates():
    assert labels_to_reach([100, 200, 300], [0.2, 0.4, 0.6], 0.5, cap=600) == (250.0, True)
    assert labels_to_reach([100, 200], [0.5, 0.6], 0.3, cap=400) == (100.0, True)
    # Not reached, still rising by 0.1 per 100 labels: 0.1 more needs 100 more labels.
    assert labels_to_reach([100, 200, 300], [0.2, 0.3, 0.4], 0.5, cap=600) == (400.0, False)
    assert labels_to_reach([100, 200], [0.3, 0.2], 0.5, cap=400) == (400.0, False)
    assert labels_to_reach([100, 200, 300], [0.0, 0.01, 0.02], 0.9, cap=600) == (600.0, False)
    assert labels_to_reach([], [], 0.5, cap=10) == (10, False)


def test_label_savings_known_answer():
    curves = [
        curve("random", 0, [(100, 0.2), (200, 0.3), (300, 0.4)]),
        curve("entropy", 0, [(100, 0.2), (200, 0.4), (300, 0.5)]),  # 0.4 at 200: saves 1/3
        curve("random", 1, [(100, 0.1), (200, 0.2), (300, 0.3)]),
        curve("entropy", 1, [(100, 0.1), (200, 0.2), (300, 0.3)]),  # same: saves 0
        curve("worse", 0, [(100, 0.1), (200, 0.1), (300, 0.1)]),  # flat: capped at -1
    ]
    out = label_savings(curves)
    ent = out["strategies"]["entropy"]
    assert ent["savings_mean"] == pytest.approx((1 / 3 + 0) / 2)
    assert ent["savings_min"] == pytest.approx(0.0)
    assert [p["seed"] for p in ent["per_seed"]] == [0, 1]
    assert out["strategies"]["worse"]["savings_mean"] == pytest.approx(-1.0)
    # Against each round of random: seed 0 reaches 0.3 at 150 (not 200) and 0.4 at 200 (not
    # 300); seed 1 saves nothing.
    by_round = ent["savings_by_round"]
    assert [r["round"] for r in by_round] == [1, 2]
    assert [r["savings_mean"] for r in by_round] == pytest.approx([0.25 / 2, (1 / 3) / 2])
    assert [r["savings_max"] for r in by_round] == pytest.approx([0.25, 1 / 3])
    assert ent["savings_mean_over_rounds"] == pytest.approx((0.125 + 1 / 6) / 2)
    assert ent["per_seed"][0]["by_round"][0]["labels_needed"] == pytest.approx(150.0)
    assert out["strategies"]["worse"]["per_seed"][0]["reached"] is False
    assert out["strategies"]["random"]["savings_mean"] == pytest.approx(0.0)
    assert out["best_strategy"] == "entropy"
    assert out["best_savings_mean"] == pytest.approx(1 / 6)
    mc = ent["curve"]
    assert [p["labeled"] for p in mc] == [100, 200, 300]
    assert mc[1]["map50_mean"] == pytest.approx(0.3) and mc[1]["map50_min"] == pytest.approx(0.2)
    assert mean_curve([]) == []


def test_initial_set_is_seeded_and_has_train_and_val():
    shas = [f"{i:064x}" for i in range(40)]

    def split_of(s: str) -> Any:
        return "val" if int(s, 16) % 10 == 0 else "train"  # 4 val images of 40

    a = initial_set(shas, split_of, 3, seed=1)
    assert a == initial_set(list(reversed(shas)), split_of, 3, seed=1)  # input order irrelevant
    assert a != initial_set(shas, split_of, 3, seed=2)
    for seed in range(20):
        got = initial_set(shas, split_of, 2, seed)
        assert {split_of(s) for s in got} == {"train", "val"} and len(set(got)) == 2
    with pytest.raises(DatasetError, match="no 'val'"):
        initial_set(shas[1:10], split_of, 3, 0)
    with pytest.raises(DatasetError, match="asked from"):
        initial_set(shas, split_of, 41, 0)


def test_oracle_gateway_answers_each_pushed_task_once():
    from loop.labelstudio import PushItem

    truth = {"a": Detections.empty((8, 8)), "b": Detections.empty((8, 8))}
    gw = OracleGateway(truth)
    item = PushItem(sha256="a", image_url="/x", detections=Detections.empty((8, 8)), priority=1)
    s1 = gw.push(1, [item], "v1", ["c"], progress=False)
    s2 = gw.push(1, [item], "v2", ["c"])
    assert (s1.created, s2.created, s2.skipped) == (1, 0, 1)
    assert s1.task_ids == s2.task_ids == {"a": 1}
    pulled = gw.pull(1, ["c"], since=None)
    assert [lb.sha256 for lb in pulled.labels] == ["a"] and pulled.labels[0].ground_truth
    assert gw.pull(1, ["c"]).labels == []
    stranger = PushItem(
        sha256="zz", image_url="/x", detections=Detections.empty((8, 8)), priority=0
    )
    with pytest.raises(DatasetError, match="no ground truth"):
        gw.push(1, [stranger], "v1", ["c"])


def test_settings_are_checked():
    base = ReplaySettings(dataset=Path("."))
    for bad, match in (
        ({"strategies": ("nope",)}, "unknown strategy"),
        ({"strategies": ()}, "at least one strategy"),
        ({"seeds": (1, 1)}, "distinct seeds"),
        ({"initial": 1}, "initial"),
        ({"step": 0}, "step"),
        ({"max_images": 5, "initial": 10}, "max_images"),
    ):
        kwargs = {**base.__dict__, **bad}
        with pytest.raises((ConfigError, StrategyError), match=match):
            ReplaySettings(**kwargs).check()


# ---------------------------------------------------------------------------- the simulation


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, 40, seed=5, size=64)
    return root


@pytest.fixture(scope="module")
def simulated(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`defect-loop simulate` on 40 synthetic images, 3 strategies x 1 seed x 2 rounds."""
    from loop.cli.sim import simulate

    out = tmp_path_factory.mktemp("replay")
    cfg = out / "project.yaml"
    cfg.write_text(
        "classes: [" + ", ".join(SYNTH_CLASSES) + "]\n"
        "train: {imgsz: 64, epochs: 1, finetune_epochs: 1, batch: 8}\n"
        "split: {val: 0.2, test: 0.25}\n"
    )
    app = typer.Typer()
    app.command("simulate")(simulate)
    app.command("noop")(lambda: None)  # two commands: "simulate" stays a sub-command
    args = [
        "simulate",
        str(synth),
        "--strategies",
        ",".join(STRATEGIES),
        "--initial",
        str(INITIAL),
        "--step",
        str(STEP),
        "--rounds",
        str(ROUNDS),
        "--seeds",
        "0",
        "--out",
        str(out),
        "--mlflow",
        "--keep-work",
        "-c",
        str(cfg),
    ]
    t0 = time.monotonic()
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    return {
        "out": out,
        "doc": json.loads((out / "replay.json").read_text()),
        "seconds": time.monotonic() - t0,
        "output": res.output,
        "args": args,
        "app": app,
    }


def test_simulation_writes_every_curve_round_and_metric(simulated: dict[str, Any]) -> None:
    doc, out = simulated["doc"], simulated["out"]
    print(f"\ntiny simulation: {simulated['seconds']:.1f}s")
    assert doc["classes"] == list(SYNTH_CLASSES) and doc["n_images"] == 40
    assert doc["strategies"] == sorted(STRATEGIES) and doc["seeds"] == [0]
    assert [c["strategy"] for c in doc["curves"]] == list(STRATEGIES)
    for c in doc["curves"]:
        rounds = c["rounds"]
        assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))
        assert [r["labeled"] for r in rounds] == [INITIAL + STEP * i for i in range(ROUNDS + 1)]
        assert len({r["n_test"] for r in rounds}) == 1 and rounds[0]["n_test"] == c["n_test"] > 0
        for r in rounds:
            assert math.isfinite(r["test_map50"]) and math.isfinite(r["test_map50_95"])
            assert set(r["test_per_class_ap50"]) == set(SYNTH_CLASSES)
            assert set(r["test_per_class_ap50_95"]) == set(SYNTH_CLASSES)
            assert r["wall_seconds"] >= 0 and r["train_seconds"] > 0
        # No checkpoint in the config and init "pretrained": every round starts from the YAML.
        assert [r["init"] for r in rounds] == ["scratch"] * (ROUNDS + 1)
        # Effort: what the oracle labeler did with the pushed pre-annotations, every final box
        # either matched to a suggestion (accepted / adjusted / relabeled) or added.
        assert rounds[0]["effort"] is None
        for prev, r in itertools.pairwise(rounds):
            e = r["effort"]
            new_boxes = sum(r["labeled_boxes"].values()) - sum(prev["labeled_boxes"].values())
            assert e["gt_boxes"] == new_boxes
            assert e["accepted"] + e["adjusted"] + e["relabeled"] + e["added"] == new_boxes
            assert e["actions"] == e["adjusted"] + e["relabeled"] + e["removed"] + e["added"]
            assert r["actions_total"] == prev["actions_total"] + e["actions"]
            assert sum(r["selected_predicted_class"].values()) <= STEP
        assert rounds[0]["actions_total"] == sum(rounds[0]["labeled_boxes"].values())
    # Round 0 depends only on the seed: trained once, reused by the other strategies.
    assert [c["rounds"][0]["round0_cached"] for c in doc["curves"]] == [False, True, True]
    assert len({c["rounds"][0]["dataset_digest"] for c in doc["curves"]}) == 1
    summary = doc["summary"]
    assert set(summary["strategies"]) == set(STRATEGIES)
    # After 1-epoch trainings mAP is usually 0 everywhere: then savings are undefined (None).
    means = {n: v["savings_mean"] for n, v in summary["strategies"].items()}
    if summary["best_strategy"] is None:
        assert means["entropy"] is None and means["hybrid"] is None
    else:
        assert summary["best_strategy"] in {"entropy", "hybrid"}
    assert set(summary["effort"]) == set(STRATEGIES)
    assert all("actions_savings_mean" in v for v in summary["strategies"].values())
    assert (out / "replay.png").stat().st_size > 1000
    assert "label savings vs random" in simulated["output"]


def test_simulation_never_selects_the_test_split(simulated: dict[str, Any]) -> None:
    out = simulated["out"]
    for strategy in STRATEGIES:
        store = DatasetStore(out / "replay-work" / f"{strategy}-s0" / "datasets")
        by_digest = {m["digest"]: store.load(m["digest"]) for m in store.list()}
        assert len(by_digest) == ROUNDS + 1
        # Follow the parent chain (creation times have 1 s resolution: they cannot order).
        versions = [next(v for v in by_digest.values() if v.parent is None)]
        while child := [v for v in by_digest.values() if v.parent == versions[-1].digest]:
            versions.append(child[0])
        assert len(versions) == ROUNDS + 1
        test_digests = {v.split_digest("test") for v in versions}
        assert len(test_digests) == 1  # the same test images and labels in every round
        first_test = {r.sha256 for r in versions[0].rows if r.split == "test"}
        for v in versions:
            assert {r.sha256 for r in v.rows if r.split == "test"} == first_test
            assert all(assign_split(r.sha256, SPLIT) == r.split for r in v.rows)
        # Every image added after round 0 came from the oracle through Project.pull.
        added = {r.sha256 for r in versions[-1].rows} - {r.sha256 for r in versions[0].rows}
        prov = {r.sha256: r.provenance for r in versions[-1].rows}
        assert len(added) == STEP * ROUNDS
        assert all(prov[s]["source"] == "labelstudio" for s in added)
        assert all(prov[s]["annotator"] == "oracle" for s in added)


def test_simulation_logs_to_mlflow(simulated: dict[str, Any]) -> None:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{simulated['out'] / 'mlflow.db'}")
    exp = client.get_experiment_by_name("defect-loop-replay")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    kinds = [r.data.tags.get("defect_loop.kind") for r in runs]
    assert kinds.count("train") == len(STRATEGIES) * (ROUNDS + 1)
    assert kinds.count("replay") == len(STRATEGIES)
    replay = next(r for r in runs if r.info.run_name == "replay-hybrid-s0")
    labeled = client.get_metric_history(replay.info.run_id, "labeled")
    assert [m.value for m in sorted(labeled, key=lambda m: m.step)] == [10, 16, 22]


def test_simulation_resumes_and_refuses_other_settings(simulated: dict[str, Any]) -> None:
    out = simulated["out"]
    before = (out / "replay.json").read_text()
    res = CliRunner().invoke(simulated["app"], simulated["args"])
    assert res.exit_code == 0, res.output
    assert res.output.count("already done") == len(STRATEGIES)
    assert json.loads((out / "replay.json").read_text())["curves"] == json.loads(before)["curves"]
    other = [*simulated["args"]]
    other[other.index("--step") + 1] = "5"
    res = CliRunner().invoke(simulated["app"], other)
    assert res.exit_code == 2 and "other settings" in res.output


def test_tta_and_onnx_paths_on_the_replay_model(simulated: dict[str, Any], synth: Path) -> None:
    """`predict_tta` views map back onto the image; ONNX Runtime gives the same Detections."""
    from loop import model
    from loop.model.prediction import _candidate_floor

    weights = next((simulated["out"] / "replay-work" / "round0").glob("*/best.pt"))
    ycd = simulated["out"] / "replay-work" / "ultralytics"
    images = sorted((synth / "images").glob("*.png"))[:6]
    nc = len(SYNTH_CLASSES)
    ref = list(model.predict(weights, images, 64, 0.01, ycd, nc, min_candidates=3))
    # The candidate floor equals NMS over every anchor (threshold 0) followed by the floor.
    everything = model.predict(weights, images, 64, 0.0, ycd, nc, min_candidates=0)
    for got, full in zip(ref, everything, strict=True):
        want = _candidate_floor(full, 0.01, 3)
        assert got.same_boxes(want) and np.allclose(got.class_probs, want.class_probs)
        assert len(got) >= 3
    views = list(model.predict_tta(weights, images, 64, 0.01, ycd, nc, ["hflip", "scale:1.5"]))
    assert len(views) == len(images) and all(len(v) == 2 for v in views)
    for d, vs in zip(ref, views, strict=True):
        for v in vs:
            assert v.image_wh == d.image_wh and v.class_probs is not None
            assert np.all(v.xyxy[:, [0, 2]] <= d.image_wh[0] + 1e-6)
            assert v.meta["path"] == d.meta["path"]
    assert [v.meta["augmentation"] for v in views[0]] == ["hflip", "scale:1.5"]
    pytest.importorskip("onnxruntime", reason="the ONNX path needs onnxruntime installed")
    onnx_path = model.export_onnx(weights, 64, ycd, simulated["out"] / "m.onnx")
    onnx = list(model.predict_onnx(onnx_path, images, 64, 0.01, ycd, nc, batch=4, min_candidates=3))
    for a, b in zip(ref, onnx, strict=True):
        assert len(a) == len(b) and a.image_wh == b.image_wh
        assert np.allclose(a.xyxy, b.xyxy, atol=0.05)
        assert np.allclose(a.class_probs, b.class_probs, atol=1e-3)
    # Batches are read ahead in a thread: an unreadable image still fails when its batch is
    # reached, after the batches before it were delivered.
    broken = simulated["out"] / "broken.png"
    broken.write_bytes(b"not an image")
    stream = model.predict_onnx(onnx_path, [*images[:4], broken], 64, 0.01, ycd, nc, batch=4)
    assert [d.meta["path"] for d in islice(stream, 4)] == [str(p) for p in images[:4]]
    with pytest.raises(ImageError, match=r"broken\.png"):
        next(stream)


def test_int8_onnx_keeps_scores_and_decodes_in_float(
    simulated: dict[str, Any], synth: Path
) -> None:
    """Static int8 quantization: the convolutions run on int8, the head's decoding stays float,
    and the scores stay close to the float model's."""
    pytest.importorskip("onnxruntime", reason="the ONNX path needs onnxruntime installed")
    import onnx

    from loop import model

    weights = next((simulated["out"] / "replay-work" / "round0").glob("*/best.pt"))
    ycd = simulated["out"] / "replay-work" / "ultralytics"
    images = sorted((synth / "images").glob("*.png"))
    nc = len(SYNTH_CLASSES)
    fp32 = model.export_onnx(weights, 64, ycd, simulated["out"] / "q" / "m.onnx")
    int8 = model.quantize_onnx(fp32, images[:16], 64, ycd)
    assert int8 == fp32.with_suffix(".int8.onnx")
    graph = onnx.load(str(int8)).graph
    quantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    # Every convolution but the box decoding's (DFL, a fixed 0..15 weighted sum) runs on int8.
    assert [n.name for n in convs if n.input[0] not in quantized] == ["/model.22/dfl/conv/Conv"]
    assert len(convs) > 50
    # Nothing past the last convolutions is quantized: the sigmoid scores come out in float.
    sigmoid = next(n for n in graph.node if n.op_type == "Sigmoid" and n.name.count("/") == 2)
    assert not any(i in quantized for i in sigmoid.input)
    a = list(model.predict_onnx(fp32, images[16:], 64, 0.01, ycd, nc, batch=8, min_candidates=3))
    b = list(model.predict_onnx(int8, images[16:], 64, 0.01, ycd, nc, batch=8, min_candidates=3))
    assert len(a) == len(b) == len(images) - 16
    for x, y in zip(a, b, strict=True):
        assert len(y) >= 3 and y.class_probs is not None
        assert np.allclose(y.class_probs[np.arange(len(y)), y.class_id], y.confidence)
        assert abs(float(x.confidence.max()) - float(y.confidence.max())) < 0.05
    # Calibration needs images; a size the export cannot take is refused before any work.
    with pytest.raises(ModelError, match="calibration images"):
        model.quantize_onnx(fp32, [], 64, ycd, simulated["out"] / "q" / "none.onnx")
    with pytest.raises(ModelError, match="multiple of 32"):
        model.quantize_onnx(fp32, images[:4], 70, ycd)


@pytest.mark.parametrize("backend", ["torch", "onnx", "onnx-int8"])
def test_project_scores_through_the_configured_backend(
    backend: str, simulated: dict[str, Any], synth: Path, tmp_path: Path
) -> None:
    """`Project.predict` runs ``scoring.backend``; ONNX models are made once per weights file."""
    pytest.importorskip("onnxruntime", reason="the ONNX path needs onnxruntime installed")
    from loop.config import ProjectConfig
    from loop.project import Project

    weights = next((simulated["out"] / "replay-work" / "round0").glob("*/best.pt"))
    cfg = ProjectConfig(
        classes=list(SYNTH_CLASSES),
        workspace=tmp_path / "ws",
        train={"imgsz": 64, "threads": 2},
        scoring={"backend": backend, "calibration_images": 8},
    )
    project = Project(cfg)
    project.ingest(synth / "images", labels_dir=synth / "labels", label_limit=12)
    made = project.scoring_model(weights)
    suffix = {"torch": ".pt", "onnx": ".onnx", "onnx-int8": ".int8.onnx"}[backend]
    assert made.name.endswith(suffix)
    if backend != "torch":
        assert made.parent == cfg.paths.scoring_models
        stamp = made.stat().st_mtime_ns
        assert project.scoring_model(weights).stat().st_mtime_ns == stamp  # cached
        assert not list(weights.parent.glob("*.onnx"))  # nothing written beside the weights
    shas = project.candidates()[:6]
    dets = list(project.predict(weights, shas))
    assert [Path(d.meta["path"]) for d in dets] == [project.pool.abs_path(s) for s in shas]
    assert all(len(d) >= cfg.select.min_candidates for d in dets)
    if backend == "onnx":
        ref = list(model_predict_torch(weights, [project.pool.abs_path(s) for s in shas], cfg))
        for x, y in zip(ref, dets, strict=True):
            assert np.allclose(x.class_probs, y.class_probs, atol=1e-3)


def model_predict_torch(weights: Path, paths: list[Path], cfg: Any) -> Any:
    from loop import model

    return model.predict(
        weights,
        paths,
        cfg.train.imgsz,
        cfg.select.candidate_conf,
        cfg.paths.yolo_config,
        len(cfg.classes),
        min_candidates=cfg.select.min_candidates,
    )


def test_onnx_backend_needs_a_size_the_export_takes() -> None:
    from pydantic import ValidationError

    from loop.config import ProjectConfig

    with pytest.raises(ValidationError, match="multiple of 32"):
        ProjectConfig(classes=["a"], train={"imgsz": 100}, scoring={"backend": "onnx-int8"})
    assert ProjectConfig(classes=["a"], train={"imgsz": 100}).scoring.backend == "torch"


def test_prepare_dataset_reads_voc_and_rejects_other_folders(tmp_path: Path) -> None:
    from PIL import Image

    voc = tmp_path / "voc"
    (voc / "annotations").mkdir(parents=True)
    (voc / "images").mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(voc / "images" / f"x{i}.jpg")
        (voc / "annotations" / f"x{i}.xml").write_text(
            "<annotation><object><name>dent</name><bndbox><xmin>1</xmin><ymin>1</ymin>"
            "<xmax>10</xmax><ymax>10</ymax></bndbox></object></annotation>"
        )
    ds = prepare_dataset(voc, tmp_path / "prepared", max_images=2)
    assert ds.kind == "voc" and ds.classes == ["dent"] and ds.n_images == 2
    assert len(list(ds.images_dir.iterdir())) == 2 and len(list(ds.labels_dir.iterdir())) == 2
    assert prepare_dataset(voc, tmp_path / "prepared", max_images=2) == ds  # reused
    with pytest.raises(DatasetError, match="neither"):
        prepare_dataset(tmp_path / "prepared" / "labels", tmp_path / "p2")
    with pytest.raises(DatasetError, match="not a folder"):
        run_replay(
            ReplaySettings(
                dataset=tmp_path / "missing",
                seeds=(0,),
                initial=2,
                train=TrainConfig(imgsz=64, epochs=1),
            ),
            tmp_path / "r.json",
        )


def test_label_savings_is_undefined_when_the_baseline_never_improves():
    curves = [
        curve("random", 0, [(10, 0.0), (20, 0.0)]),
        curve("entropy", 0, [(10, 0.0), (20, 0.1)]),
        curve("random", 1, [(10, 0.1), (20, 0.3)]),
        curve("entropy", 1, [(10, 0.1), (20, 0.3)]),
    ]
    out = label_savings(curves)
    ent = out["strategies"]["entropy"]
    assert (
        ent["per_seed"][0]["savings"] is None and "did not improve" in ent["per_seed"][0]["reason"]
    )
    assert ent["savings_mean"] == pytest.approx(0.0)  # seed 1 only
    only_flat = label_savings(curves[:2])
    assert only_flat["strategies"]["entropy"]["savings_mean"] is None
    assert only_flat["best_strategy"] is None
