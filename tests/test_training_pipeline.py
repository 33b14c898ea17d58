"""The `binloop train` pipeline: sources and splits, resume, calibration, metrics, ONNX (fixed
and dynamic batch), INT8, W&B offline tracking and the CLI, on tiny subsets of data/demo."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import typer
from typer.testing import CliRunner

from binloop.datasets import import_image_folder
from binloop.ml.card import ModelCard
from binloop.ml.preprocess import Preprocessor, softmax
from binloop.storage import LocalBlobStore
from binloop.train_command import train_command
from schemas.taxonomy import Taxonomy
from services.trainer.calibration import fit_temperature, negative_log_likelihood
from services.trainer.data import ManifestDataset
from services.trainer.evaluate import evaluate, evaluate_compartments, expected_calibration_error
from services.trainer.export import export_onnx, onnx_logits, onnx_session, parity_max_abs_diff
from services.trainer.nets import build_model, load_weights
from services.trainer.pipeline import PipelineConfig, PipelineResult, run_pipeline
from services.trainer.sources import (
    SplitRule,
    image_folder,
    label_studio_export,
    load_and_split,
    parse_label_studio_export,
    snapshot,
)
from services.trainer.tracking import WandbTracker
from services.trainer.train import (
    Augmenter,
    EpochStats,
    TrainConfig,
    _Run,
    _sampler,
    predict_logits,
    train_classifier,
)

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
CLASSES = ("cardboard", "glass", "metal")
SIZE = (32, 32)
PREPROCESSOR = Preprocessor(SIZE, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
RULE = SplitRule("content", val_fraction=0.2, test_fraction=0.25)
QUICK = TrainConfig(epochs=12, batch_size=8, learning_rate=5e-3, min_val_items=1000)


def _tiny_folder(target: Path, per_class: int = 16) -> Path:
    for label in CLASSES:
        (target / label).mkdir(parents=True)
        for image in sorted((DEMO / "stream" / label).glob("*.jpg"))[:per_class]:
            shutil.copy(image, target / label / image.name)
    return target


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_folder(tmp_path_factory.mktemp("tiny") / "images")


@pytest.fixture(scope="module")
def pipeline(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> PipelineResult:
    out = tmp_path_factory.mktemp("run")
    config = PipelineConfig(
        out_dir=out, input_size=SIZE, train=QUICK, split=RULE, device="cpu", int8=True
    )
    tracker = WandbTracker("binloop-test", "tiny", config.describe(), out / "wandb")
    try:
        return run_pipeline(image_folder(folder), config, tracker=tracker)
    finally:
        tracker.finish()


def _dataset(folder: Path) -> ManifestDataset:
    data = load_and_split(image_folder(folder), PREPROCESSOR, SplitRule(test_fraction=0.01))
    return ManifestDataset(data.splits["train"], data.classes)


# --- training ----------------------------------------------------------------------------------


def test_training_on_a_tiny_subset_beats_chance(pipeline: PipelineResult, folder: Path) -> None:
    model = build_model("compact-cnn", 3)
    model.load_state_dict(torch.load(pipeline.out_dir / "model.pt", weights_only=True))
    train = _dataset(folder)
    accuracy = float(
        (predict_logits(model, train.inputs).argmax(1) == train.targets).float().mean()
    )
    assert accuracy > 0.6, f"accuracy {accuracy:.2f} on its training images; chance is 1/3"
    assert pipeline.history[-1].train_loss < pipeline.history[0].train_loss
    assert len(pipeline.history) == QUICK.epochs


def test_resume_reproduces_the_next_epoch_exactly(folder: Path, tmp_path: Path) -> None:
    data = _dataset(folder)
    config = dataclasses.replace(
        QUICK,
        epochs=3,
        rotation_degrees=10,
        scale=(0.8, 1.0),
        blur_probability=0.3,
        mixup_alpha=0.2,
        cutmix_alpha=1.0,
        ema_decay=0.9,
    )

    def build() -> torch.nn.Module:
        return build_model("compact-cnn", 3)

    straight = train_classifier(build, data, data, config, checkpoint_path=tmp_path / "a.pt")

    class Crash(Exception):
        pass

    def crash_after_two(stats: EpochStats) -> None:
        if stats.epoch == 2:
            raise Crash

    with pytest.raises(Crash):
        train_classifier(
            build, data, data, config, checkpoint_path=tmp_path / "b.pt", on_epoch=crash_after_two
        )
    resumed = train_classifier(
        build, data, data, config, checkpoint_path=tmp_path / "b.pt", resume=True
    )
    assert resumed.resumed_from_epoch == 2
    assert resumed.history == straight.history  # epoch 3's losses are bit-identical
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_with_a_weight_average_the_average_is_the_model_kept(folder: Path, tmp_path: Path) -> None:
    data = _dataset(folder)
    config = dataclasses.replace(QUICK, epochs=2, ema_decay=0.9)
    result = train_classifier(
        lambda: build_model("compact-cnn", 3), data, None, config, checkpoint_path=tmp_path / "e"
    )
    checkpoint = torch.load(tmp_path / "e", weights_only=False)
    kept = result.model.state_dict()
    averaged, raw = checkpoint["average"]["state"], checkpoint["model"]
    assert checkpoint["average"]["updates"] == 2 * len(range(0, len(data), config.batch_size))
    assert all(torch.equal(kept[name], averaged[name]) for name in kept)
    assert not all(torch.equal(kept[name], raw[name]) for name in kept)


def test_resume_refuses_a_checkpoint_of_other_settings(folder: Path, tmp_path: Path) -> None:
    data = _dataset(folder)
    config = dataclasses.replace(QUICK, epochs=1)
    train_classifier(
        lambda: build_model("compact-cnn", 3), data, None, config, checkpoint_path=tmp_path / "c"
    )
    with pytest.raises(ValueError, match=r"other settings: \['batch_size'\]"):
        train_classifier(
            lambda: build_model("compact-cnn", 3),
            data,
            None,
            dataclasses.replace(config, batch_size=4),
            checkpoint_path=tmp_path / "c",
            resume=True,
        )


def test_weighted_sampler_draws_the_rare_class_as_often_as_the_common_one() -> None:
    from services.trainer.data import LoadedItems

    labels = ["glass"] * 90 + ["trash"] * 10
    loaded = LoadedItems(np.zeros((100, 3, 2, 2), np.float32), labels, [str(i) for i in range(100)])
    data = ManifestDataset(loaded, ["glass", "trash"])
    sampler = _sampler(data, TrainConfig(balance="sampler"), torch.Generator().manual_seed(0))
    assert sampler is not None
    drawn = [labels[i] for _ in range(20) for i in sampler]
    assert 0.4 < drawn.count("trash") / len(drawn) < 0.6
    assert _sampler(data, TrainConfig(balance="loss"), torch.Generator()) is None


def test_bin_camera_augmentation_keeps_shape_and_pixel_range() -> None:
    config = TrainConfig(
        rotation_degrees=30, scale=(0.6, 1.2), blur_probability=1.0, saturation=0.5
    )
    batch = torch.randn(8, 3, 16, 16)
    out = Augmenter(config, torch.Generator().manual_seed(0))(batch)
    pixels = out * torch.tensor(config.std).view(1, 3, 1, 1) + torch.tensor(config.mean).view(
        1, 3, 1, 1
    )
    assert out.shape == batch.shape
    assert float(pixels.min()) >= -1e-5
    assert float(pixels.max()) <= 1 + 1e-5
    # Blur and resampling on a flat grey frame change nothing but the jitter.
    flat = torch.zeros(2, 3, 16, 16)
    still = TrainConfig(
        flip_probability=0, brightness=0, contrast=0, rotation_degrees=30, blur_probability=1.0
    )
    assert torch.allclose(Augmenter(still, torch.Generator())(flat), flat, atol=1e-5)


def test_local_weights_load_except_a_head_of_another_shape(tmp_path: Path) -> None:
    source = build_model("compact-cnn", 6)
    torch.save({"model": source.state_dict()}, tmp_path / "six.pt")
    target = build_model("compact-cnn", 3)
    left_out = load_weights(target, tmp_path / "six.pt")
    assert left_out == ["head.2.bias", "head.2.weight"]
    assert torch.equal(target.state_dict()["features.0.0.weight"], source.features[0][0].weight)


# --- metrics and calibration -------------------------------------------------------------------


def test_precision_recall_f1_and_compartments_on_hand_made_predictions() -> None:
    truth = ["paper", "paper", "cardboard", "glass", "plastic", "metal", "trash"]
    guess = ["paper", "cardboard", "cardboard", "glass", "metal", "metal", "glass"]
    report = evaluate(truth, guess, Taxonomy())
    # paper: TP 1, FN 1; cardboard: TP 1, FP 1; metal: TP 1, FP 1; glass: TP 1, FP 1.
    assert report.per_class_precision == pytest.approx(
        {"cardboard": 0.5, "glass": 0.5, "metal": 0.5, "paper": 1.0, "plastic": 0.0, "trash": 0.0}
    )
    assert report.per_class_recall == pytest.approx(
        {"cardboard": 1.0, "glass": 1.0, "metal": 1.0, "paper": 0.5, "plastic": 0.0, "trash": 0.0}
    )
    assert report.per_class_f1["paper"] == pytest.approx(2 / 3)
    assert report.accuracy == pytest.approx(4 / 7)
    compartments = evaluate_compartments(truth, guess, Taxonomy())
    assert compartments.labels == ["plastic_metal", "paper_cardboard", "glass", "trash"]
    # Only trash -> glass crosses a compartment.
    assert compartments.confusion.tolist() == [
        [2, 0, 0, 0],
        [0, 3, 0, 0],
        [0, 0, 1, 0],
        [0, 0, 1, 0],
    ]
    assert compartments.accuracy == pytest.approx(6 / 7) == report.compartment_accuracy
    assert compartments.per_class_recall["trash"] == 0.0
    assert compartments.per_class_precision["glass"] == pytest.approx(0.5)


def test_expected_calibration_error_on_hand_made_confidences() -> None:
    probabilities = np.array([[0.95, 0.05], [0.35, 0.65], [0.85, 0.15], [0.55, 0.45]])
    targets = np.array([0, 0, 0, 0])  # right, wrong, right, right; one per bin
    expected = (0.05 + 0.65 + 0.15 + 0.45) / 4
    assert expected_calibration_error(probabilities, targets, bins=10) == pytest.approx(expected)
    # Two in one bin: their accuracy (1/2) is compared with their mean confidence (0.94).
    shared = np.array([[0.92, 0.08], [0.96, 0.04]])
    assert expected_calibration_error(shared, np.array([0, 1]), bins=10) == pytest.approx(0.44)
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, np.array([0, 1])) == 0.0


def test_temperature_scaling_fixes_an_overconfident_model() -> None:
    rng = np.random.default_rng(0)
    calibrated = rng.normal(size=(3000, 4)) * 1.5
    # Labels drawn from softmax(calibrated): those logits are calibrated by construction.
    cumulative = softmax(calibrated.astype(np.float32)).cumsum(axis=1)
    targets = (rng.random((3000, 1)) > cumulative).sum(axis=1)
    overconfident = calibrated * 4
    temperature = fit_temperature(overconfident, targets)
    assert temperature == pytest.approx(4, rel=0.1)
    before = negative_log_likelihood(overconfident, targets)
    after = negative_log_likelihood(overconfident, targets, temperature)
    assert after < before - 0.5
    ece_before = expected_calibration_error(softmax(overconfident.astype(np.float32)), targets)
    ece_after = expected_calibration_error(
        softmax((overconfident / temperature).astype(np.float32)), targets
    )
    assert ece_after < ece_before / 3


def test_pipeline_calibration_is_in_the_exported_graph(pipeline: PipelineResult) -> None:
    temperature = pipeline.calibration.temperature
    assert temperature != 1.0
    assert pipeline.calibration.val_nll_after is not None
    assert pipeline.calibration.val_nll_before is not None
    assert pipeline.calibration.val_nll_after <= pipeline.calibration.val_nll_before
    model = build_model("compact-cnn", 3)
    model.load_state_dict(torch.load(pipeline.out_dir / "model.pt", weights_only=True))
    session = onnx_session((pipeline.out_dir / "model.onnx").read_bytes())
    inputs = torch.randn(4, 3, *SIZE)
    with torch.no_grad():
        raw = model.eval()(inputs).numpy()
    np.testing.assert_allclose(onnx_logits(session, inputs.numpy()), raw / temperature, atol=1e-4)
    card = ModelCard.read(pipeline.out_dir / "card.json")
    assert f"T={temperature:.4f}" in card.notes


# --- export ------------------------------------------------------------------------------------


def test_exported_onnx_matches_torch_with_fixed_and_dynamic_batch(
    pipeline: PipelineResult,
) -> None:
    assert pipeline.parity_dynamic <= 1e-4
    assert pipeline.parity_fixed <= 1e-4
    assert pipeline.embedding_parity is not None
    assert pipeline.embedding_parity <= 1e-4
    dynamic = onnx.load(str(pipeline.out_dir / "model.onnx")).graph.input[0]
    fixed = onnx.load(str(pipeline.out_dir / "model.fixed-batch1.onnx")).graph.input[0]
    assert dynamic.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert fixed.type.tensor_type.shape.dim[0].dim_value == 1
    session = onnx_session((pipeline.out_dir / "model.fixed-batch1.onnx").read_bytes())
    assert onnx_logits(session, np.zeros((1, 3, *SIZE), np.float32)).shape == (1, 3)


def test_a_torchvision_network_exports_with_parity() -> None:
    model = build_model("mobilenet_v3_small", 6).eval()
    inputs = torch.randn(3, 3, *SIZE).numpy()
    for fixed in (None, 3):
        session = onnx_session(export_onnx(model, SIZE, fixed_batch=fixed))
        assert [o.name for o in session.get_outputs()] == ["logits", "embedding"]
        assert parity_max_abs_diff(model, session, inputs) <= 1e-4


@pytest.mark.parametrize("architecture", ["compact-resnet", "compact-resnet-deep"])
def test_residual_networks_train_and_export_with_parity(architecture: str) -> None:
    model = build_model(architecture, 6)
    logits = model(torch.randn(4, 3, *SIZE))
    logits.sum().backward()  # gradients reach the stem through every shortcut
    stem = next(model.parameters())
    assert stem.grad is not None
    assert float(stem.grad.abs().sum()) > 0
    model.eval()
    inputs = torch.randn(3, 3, *SIZE).numpy()
    session = onnx_session(export_onnx(model, SIZE))
    assert [o.name for o in session.get_outputs()] == ["logits", "embedding"]
    assert parity_max_abs_diff(model, session, inputs) <= 1e-4


def test_label_smoothing_penalises_overconfident_logits() -> None:
    from services.trainer.data import LoadedItems

    loaded = LoadedItems(np.zeros((4, 3, *SIZE), np.float32), ["glass", "trash"] * 2, list("abcd"))
    data = ManifestDataset(loaded, ["glass", "trash"])
    confident = torch.tensor([[20.0, -20.0]])
    target = torch.tensor([0])

    def loss(smoothing: float) -> float:
        config = dataclasses.replace(QUICK, label_smoothing=smoothing, balance="none")
        run = _Run(lambda: build_model("compact-cnn", 2), data, config, "cpu")
        return float(run.criterion(confident, target))

    assert loss(0.0) < 1e-6
    # Smoothing 0.2 spreads 0.1 of the target mass on the wrong class: about 0.1 * 40 nats.
    assert loss(0.2) == pytest.approx(0.1 * 40, rel=0.01)


def test_int8_export_runs_and_reports_its_accuracy_change(
    pipeline: PipelineResult, folder: Path
) -> None:
    int8 = pipeline.int8
    assert int8 is not None
    graph = onnx.load(str(int8.path)).graph
    assert any(node.op_type == "QuantizeLinear" for node in graph.node)
    assert int8.size_bytes < (pipeline.out_dir / "model.onnx").stat().st_size
    test = load_and_split(image_folder(folder), PREPROCESSOR, RULE).splits["test"]
    classes = pipeline.card.classes
    predicted = onnx_logits(onnx_session(int8.path.read_bytes()), test.inputs).argmax(1)
    accuracy = np.mean([classes[i] == t for i, t in zip(predicted, test.labels, strict=True)])
    assert int8.accuracy == pytest.approx(accuracy)
    assert int8.accuracy_delta == pytest.approx(accuracy - pipeline.report.accuracy)
    metrics = json.loads((pipeline.out_dir / "metrics.json").read_text())
    assert metrics["int8"]["accuracy_delta"] == pytest.approx(int8.accuracy_delta)


# --- data sources ------------------------------------------------------------------------------


def test_split_is_deterministic_and_recorded_in_the_card(
    pipeline: PipelineResult, folder: Path
) -> None:
    first = load_and_split(image_folder(folder), PREPROCESSOR, RULE)
    again = load_and_split(image_folder(folder), PREPROCESSOR, RULE)
    assert first.splits["test"].keys == again.splits["test"].keys
    assert sum(first.counts().values()) == 48
    assert all(first.counts()[s] > 0 for s in ("train", "val", "test"))
    by_name = load_and_split(
        image_folder(folder), PREPROCESSOR, dataclasses.replace(RULE, split_by="name")
    )
    assert by_name.splits["test"].keys != first.splits["test"].keys
    card = ModelCard.read(pipeline.out_dir / "card.json")
    assert "split by sha256 of the image content" in card.notes
    assert first.content_id("test") in card.notes
    assert card.metrics is not None
    assert card.metrics.eval_set_id == first.content_id("test")
    assert card.metrics.eval_items == first.counts()["test"]


def test_corrupt_images_are_skipped_with_a_warning_and_counted(
    folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = tmp_path / "images"
    shutil.copytree(folder, broken)
    (broken / "glass" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (broken / "metal" / "empty.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        data = load_and_split(image_folder(broken), PREPROCESSOR, RULE)
    assert set(data.skipped) == {"glass/truncated.jpg", "metal/empty.jpg"}
    assert "CorruptFrameError" in data.skipped["metal/empty.jpg"]
    assert sum(data.counts().values()) == 48
    assert "skipped 2 of 50 entries" in caplog.text


def test_label_studio_export_parsing() -> None:
    def choice(label: str, control: str = "material") -> dict[str, object]:
        return {"type": "choices", "from_name": control, "value": {"choices": [label]}}

    export = [
        {
            "id": 1,
            "data": {"image": "/data/local-files/?d=bins%2Fa.jpg"},
            "annotations": [{"id": 10, "result": [choice("Glass")]}],
        },
        {
            "id": 2,
            "data": {"image": "file:///frames/b.jpg"},
            "annotations": [
                {"id": 20, "updated_at": "2026-01-01T00:00:00", "result": [choice("paper")]},
                {"id": 21, "updated_at": "2026-02-01T00:00:00", "result": [choice("cardboard")]},
                {
                    "id": 22,
                    "updated_at": "2026-03-01T00:00:00",
                    "was_cancelled": True,
                    "result": [choice("trash")],
                },
            ],
        },
        {
            "id": 3,
            "data": {"image": "c.jpg"},
            "annotations": [{"result": [choice("dirty", "condition"), choice("metal", "label")]}],
        },
        {"id": 4, "data": {"image": "d.jpg"}, "annotations": []},
        {
            "id": 5,
            "data": {"image": "e.jpg"},
            "annotations": [
                {
                    "result": [
                        {
                            "type": "choices",
                            "from_name": "material",
                            "value": {"choices": ["glass", "metal"]},
                        }
                    ]
                }
            ],
        },
        {"id": 6, "data": {}, "annotations": [{"result": [choice("glass")]}]},
    ]
    tasks, skipped = parse_label_studio_export(export)
    assert [(t.task_id, t.image, t.label) for t in tasks] == [
        ("1", "/data/local-files/?d=bins%2Fa.jpg", "glass"),
        ("2", "file:///frames/b.jpg", "cardboard"),
        # No "material" control: the first single-choice control is taken.
        ("3", "c.jpg", "dirty"),
    ]
    assert skipped == {
        "task 4": "no annotation with exactly one choice",
        "task 5": "no annotation with exactly one choice",
        "task 6": "no data.image",
    }
    with pytest.raises(ValueError, match="list of tasks"):
        parse_label_studio_export({"tasks": []})


def test_label_studio_export_reads_local_images(folder: Path, tmp_path: Path) -> None:
    glass = sorted((folder / "glass").glob("*.jpg"))[:2]
    metal = sorted((folder / "metal").glob("*.jpg"))[0]
    (tmp_path / "root" / "bins").mkdir(parents=True)
    shutil.copy(glass[0], tmp_path / "root" / "bins" / "one.jpg")
    export = [
        {
            "id": 1,
            "data": {"image": "/data/local-files/?d=bins/one.jpg"},
            "annotations": [
                {
                    "result": [
                        {
                            "type": "choices",
                            "from_name": "material",
                            "value": {"choices": ["glass"]},
                        }
                    ]
                }
            ],
        },
        {
            "id": 2,
            "data": {"image": glass[1].as_uri()},
            "annotations": [
                {
                    "result": [
                        {
                            "type": "choices",
                            "from_name": "material",
                            "value": {"choices": ["glass"]},
                        }
                    ]
                }
            ],
        },
        {
            "id": 3,
            "data": {"image": str(metal)},
            "annotations": [
                {
                    "result": [
                        {
                            "type": "choices",
                            "from_name": "material",
                            "value": {"choices": ["metal"]},
                        }
                    ]
                }
            ],
        },
        {
            "id": 4,
            "data": {"image": "https://example.com/x.jpg"},
            "annotations": [
                {
                    "result": [
                        {
                            "type": "choices",
                            "from_name": "material",
                            "value": {"choices": ["metal"]},
                        }
                    ]
                }
            ],
        },
    ]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export))
    source = label_studio_export(path, image_root=tmp_path / "root")
    assert source.skipped == {"task 4": "image https://example.com/x.jpg is not a local file"}
    data = load_and_split(source, PREPROCESSOR, RULE)
    labels = sorted(label for items in data.splits.values() for label in items.labels)
    assert labels == ["glass", "glass", "metal"]
    assert len(data.skipped) == 1


def test_snapshot_source_reads_the_store_and_verifies_checksums(
    folder: Path, tmp_path: Path
) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    manifest, _ = import_image_folder(
        store, folder, "bins", taxonomy_version="t", classes=list(CLASSES)
    )
    source = snapshot(store, "bins")
    assert source.description == f"dataset snapshot bins v{manifest.version}"
    assert sorted(i.label for i in source.images) == sorted(i.label for i in manifest.items)
    # A blob that no longer matches its manifest checksum is skipped, not trained on.
    victim = manifest.items[0]
    (store.root / victim.key).write_bytes(
        (folder / "glass")
        .joinpath(sorted(p.name for p in (folder / "glass").iterdir())[0])
        .read_bytes()
        + b"x"
    )
    data = load_and_split(snapshot(store, "bins"), PREPROCESSOR, RULE)
    assert list(data.skipped) == [victim.key]
    assert "ChecksumMismatchError" in data.skipped[victim.key]
    with pytest.raises(FileNotFoundError, match="no snapshot"):
        snapshot(store, "absent")


# --- tracking and the command ------------------------------------------------------------------


def test_wandb_runs_offline_with_config_epochs_confusion_and_model(
    pipeline: PipelineResult,
) -> None:
    runs = list((pipeline.out_dir / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # Offline, W&B keeps config, history, summary and artifacts in its protobuf log (uploaded
    # later by `wandb sync`); the strings we logged are in it verbatim.
    [log_file] = runs[0].glob("*.wandb")
    record = log_file.read_bytes()
    for logged in (b"compact-cnn", b"balance", b"train_loss", b"val_accuracy", b"test/accuracy"):
        assert logged in record, logged
    assert b"model.onnx" in record  # a file of the logged model artifact
    images = sorted(p.name for p in (runs[0] / "files" / "media" / "images").glob("*.png"))
    assert [name.rsplit("_", 2)[0] for name in images] == [
        "confusion_matrix",
        "confusion_matrix_compartments",
    ]


def test_train_command_writes_a_complete_model_folder(folder: Path, tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(train_command)
    out = tmp_path / "out"
    args = [
        "--out",
        str(out),
        "--image-folder",
        str(folder),
        "--input-size",
        "32",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--balance",
        "sampler",
        "--device",
        "cpu",
        "--tracking",
        "none",
        "--test-fraction",
        "0.25",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    card = ModelCard.read(out / "card.json")
    assert card.classes == list(CLASSES)
    assert card.input_size == SIZE
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 2
    assert set(metrics["test_compartments"]["labels"]) == {
        "plastic_metal",
        "paper_cardboard",
        "glass",
        "trash",
    }
    assert (out / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    # --resume on a finished run trains nothing more and reports the same model.
    again = CliRunner().invoke(app, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "metrics.json").read_text())["resumed_from_epoch"] == 2
    bad = CliRunner().invoke(app, ["--out", str(out)])
    assert bad.exit_code != 0
    assert "exactly one of" in bad.output
