"""The `binloop train` pipeline: sources and splits, resume, calibration, metrics, ONNX (fixed
and dynamic batch), INT8, W&B offline tracking and the CLI, on tiny subsets of data/demo."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import cv2
import numpy as np
import onnx
import pytest
import torch
import typer
from onnx import TensorProto, numpy_helper
from typer.testing import CliRunner

from binloop.datasets import import_image_folder
from binloop.ml.card import ModelCard
from binloop.ml.preprocess import Preprocessor, softmax
from binloop.storage import LocalBlobStore
from binloop.train_command import train_command
from schemas.taxonomy import Taxonomy
from services.trainer import tracking
from services.trainer.calibration import (
    MIN_TEMPERATURE,
    fit_temperature,
    negative_log_likelihood,
    temperature_on_val,
)
from services.trainer.data import LoadedItems, ManifestDataset
from services.trainer.evaluate import evaluate, evaluate_compartments, expected_calibration_error
from services.trainer.export import export_onnx, onnx_logits, onnx_session, parity_max_abs_diff
from services.trainer.mixing import BatchMixer
from services.trainer.nets import build_model, load_weights
from services.trainer.pipeline import PipelineConfig, PipelineError, PipelineResult, run_pipeline
from services.trainer.quantize import quantize_int8
from services.trainer.sources import (
    SplitRule,
    image_folder,
    label_studio_export,
    load_and_split,
    parse_label_studio_export,
    resolve_image,
    snapshot,
)
from services.trainer.tracking import NullTracker, WandbTracker
from services.trainer.train import (
    Augmenter,
    EpochStats,
    TrainConfig,
    _Run,
    _sampler,
    _save_atomically,
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
    # RULE puts 3 of the 48 images in val: enough here to exercise calibration and selection.
    train = dataclasses.replace(QUICK, min_val_items=3, patience=QUICK.epochs)
    config = PipelineConfig(
        out_dir=out, input_size=SIZE, train=train, split=RULE, device="cpu", int8=True
    )
    tracker = WandbTracker("binloop-test", "tiny", config.describe(), out / "wandb")
    try:
        return run_pipeline(image_folder(folder), config, tracker=tracker)
    finally:
        tracker.finish()


def _dataset(folder: Path) -> ManifestDataset:
    data = load_and_split(image_folder(folder), PREPROCESSOR, SplitRule(test_fraction=0.01))
    return ManifestDataset(data.splits["train"], data.classes)


def _random_dataset(items: int = 8) -> ManifestDataset:
    """Two classes of noise at 16x16: for what training does, not what it learns."""
    rng = np.random.default_rng(0)
    loaded = LoadedItems(
        rng.standard_normal((items, 3, 16, 16)).astype(np.float32),
        ["a", "b"] * (items // 2),
        [str(i) for i in range(items)],
    )
    return ManifestDataset(loaded, ["a", "b"])


def _two_classes() -> torch.nn.Module:
    return build_model("compact-cnn", 2)


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


class _Crash(Exception):
    """A training process dying after an epoch's checkpoint was (or was not) written."""


def _crash_at(epoch: int) -> Callable[[EpochStats], None]:
    def crash(stats: EpochStats) -> None:
        if stats.epoch == epoch:
            raise _Crash

    return crash


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
    with pytest.raises(_Crash):
        train_classifier(
            build, data, data, config, checkpoint_path=tmp_path / "b.pt", on_epoch=_crash_at(2)
        )
    resumed = train_classifier(
        build, data, data, config, checkpoint_path=tmp_path / "b.pt", resume=True
    )
    assert resumed.resumed_from_epoch == 2
    assert resumed.history == straight.history  # epoch 3's losses are bit-identical
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_checkpoint_every_n_epochs_resumes_from_the_last_nth_and_saves_the_last(
    folder: Path, tmp_path: Path
) -> None:
    """With checkpoint_every=2, a crash in epoch 3 of 4 resumes after epoch 2 (epoch 3 is
    trained again, identically), and a finished run's checkpoint holds its last epoch even when
    that is not a multiple of 2."""
    data = _dataset(folder)
    config = dataclasses.replace(QUICK, epochs=4, mixup_alpha=0.2, ema_decay=0.9)

    def build() -> torch.nn.Module:
        return build_model("compact-cnn", 3)

    straight = train_classifier(build, data, data, config, checkpoint_every=2)
    with pytest.raises(_Crash):
        train_classifier(
            build,
            data,
            data,
            config,
            checkpoint_path=tmp_path / "b.pt",
            checkpoint_every=2,
            on_epoch=_crash_at(3),
        )
    resumed = train_classifier(
        build, data, data, config, checkpoint_path=tmp_path / "b.pt", resume=True
    )
    assert resumed.resumed_from_epoch == 2
    assert resumed.history == straight.history

    three = dataclasses.replace(config, epochs=3)
    train_classifier(
        build, data, None, three, checkpoint_path=tmp_path / "c.pt", checkpoint_every=2
    )
    saved = torch.load(tmp_path / "c.pt", map_location="cpu", weights_only=False)
    assert len(saved["history"]) == 3
    with pytest.raises(ValueError, match="at least 1"):
        train_classifier(build, data, None, config, checkpoint_every=0)


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


def test_a_checkpoint_is_on_disk_before_it_replaces_the_last_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a power cut right after the rename, checkpoint.pt is the new one whole or the old
    one: the file and its folder entry are fsynced."""
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "run" / "checkpoint.pt"

    _save_atomically({"epoch": 1, "weights": torch.ones(3)}, path)

    assert path.stat().st_ino in synced
    assert path.parent.stat().st_ino in synced
    assert torch.load(path, weights_only=True)["epoch"] == 1


@pytest.mark.filterwarnings("ignore:for .* copying from a non-meta parameter:UserWarning")
def test_resume_restores_the_random_generators_from_cpu_tensors_whatever_the_training_device(
    tmp_path: Path,
) -> None:
    """torch.set_rng_state and Generator.set_state take CPU tensors only: a checkpoint is loaded
    onto the CPU and restored onto the run's device (loaded onto the GPU, `--resume` on CUDA
    failed). With no GPU here, "meta" stands in for the training device; copying weights into
    meta tensors is a no-op torch warns about."""
    config = TrainConfig(epochs=2, batch_size=4, ema_decay=0.9, mixup_alpha=0.2)
    train_classifier(_two_classes, _random_dataset(), None, config, checkpoint_path=tmp_path / "c")
    state = torch.load(tmp_path / "c", map_location="cpu", weights_only=False)
    with torch.random.fork_rng(devices=[]):
        run = _Run(_two_classes, _random_dataset(), config, "meta")
        run.load_state_dict(state)
        assert torch.equal(torch.get_rng_state(), state["rng"]["torch"])
    assert torch.equal(run.shuffle.get_state(), state["rng"]["shuffle"])
    assert torch.equal(run.augment.generator.get_state(), state["rng"]["augment"])
    assert run.mix.state_dict() == state["rng"]["mix"]
    assert run.epoch == 2
    # Weights, optimizer moments and the weight average are on the training device.
    assert {p.device.type for p in run.model.parameters()} == {"meta"}
    moments = [s["exp_avg"] for s in run.optimizer.state.values()]
    assert moments
    assert {m.device.type for m in moments} == {"meta"}
    assert run.average is not None
    assert {t.device.type for t in run.average.state.values()} == {"meta"}


def test_resume_refuses_a_checkpoint_trained_on_another_split(folder: Path, tmp_path: Path) -> None:
    """Another split rule (or dataset) can move images the checkpoint was trained on into the
    test split: the test metrics would be on trained-on images. The checkpoint records the
    split, its content ids, input, mean/std, network and classes, and names what differs."""
    first_rule = SplitRule("content", val_fraction=0.0, test_fraction=0.2)
    second_rule = SplitRule("content", val_fraction=0.0, test_fraction=0.5)
    first = load_and_split(image_folder(folder), PREPROCESSOR, first_rule)
    second = load_and_split(image_folder(folder), PREPROCESSOR, second_rule)
    assert set(first.splits["train"].keys) & set(second.splits["test"].keys)
    base = PipelineConfig(
        out_dir=tmp_path, input_size=SIZE, train=dataclasses.replace(QUICK, epochs=1), device="cpu"
    )
    run_pipeline(image_folder(folder), dataclasses.replace(base, split=first_rule))
    with pytest.raises(
        ValueError, match=r"other settings: \['split', 'test_split_id', 'train_split_id'\]"
    ):
        run_pipeline(
            image_folder(folder), dataclasses.replace(base, split=second_rule, resume=True)
        )


def test_the_pipelines_mean_and_std_are_the_ones_augmentation_unnormalises_with(
    folder: Path, tmp_path: Path
) -> None:
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    config = PipelineConfig(
        out_dir=tmp_path,
        input_size=SIZE,
        mean=mean,
        std=std,
        train=dataclasses.replace(QUICK, epochs=1),
        split=RULE,
        device="cpu",
    )
    run_pipeline(image_folder(folder), config)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert (checkpoint["config"]["mean"], checkpoint["config"]["std"]) == (mean, std)


def test_weighted_sampler_draws_the_rare_class_as_often_as_the_common_one() -> None:
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


def test_augmentation_and_mixing_run_on_the_batchs_device_with_cpu_random_numbers() -> None:
    """On a GPU the batch is augmented where it lies: every tensor the augmentation combines
    with it must follow it there. The "meta" device (shapes only) stands in for CUDA here: a
    constant or random tensor left on the CPU raises. The random numbers come from the CPU
    generator whatever the device, so a checkpoint's generator state resumes on any device."""
    config = TrainConfig(
        rotation_degrees=30,
        scale=(0.6, 1.2),
        blur_probability=0.5,
        saturation=0.5,
        brightness=0.2,
        contrast=0.2,
    )
    on_cpu = Augmenter(config, torch.Generator().manual_seed(3))
    elsewhere = Augmenter(config, torch.Generator().manual_seed(3))
    on_cpu(torch.randn(6, 3, 16, 20))
    out = elsewhere(torch.zeros(6, 3, 16, 20, device="meta"))
    assert out.device.type == "meta"
    assert out.shape == (6, 3, 16, 20)
    assert torch.equal(on_cpu.generator.get_state(), elsewhere.generator.get_state())
    mixer = BatchMixer(mixup_alpha=0.2, cutmix_alpha=1.0, seed=0)
    for _ in range(4):  # both kinds of mixing come up
        mixed = mixer(out, torch.tensor([0, 1, 2, 0, 1, 2]))
        assert mixed.inputs.device.type == "meta"


def test_local_weights_load_except_a_head_of_another_shape(tmp_path: Path) -> None:
    source = build_model("compact-cnn", 6)
    torch.save({"model": source.state_dict()}, tmp_path / "six.pt")
    target = build_model("compact-cnn", 3)
    left_out = load_weights(target, tmp_path / "six.pt")
    assert left_out == ["head.2.bias", "head.2.weight"]
    assert torch.equal(target.state_dict()["features.0.0.weight"], source.features[0][0].weight)


def test_weights_from_a_checkpoint_are_its_selected_ones_not_the_last_step(tmp_path: Path) -> None:
    """--weights OUT/checkpoint.pt starts from the model that run kept (here the weight
    average), not from the raw weights of its last step."""
    config = TrainConfig(epochs=2, batch_size=4, ema_decay=0.9)
    result = train_classifier(
        _two_classes, _random_dataset(), None, config, checkpoint_path=tmp_path / "c"
    )
    target = _two_classes()
    assert load_weights(target, tmp_path / "c") == []
    kept = result.model.state_dict()
    assert all(torch.equal(target.state_dict()[name], kept[name]) for name in kept)


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


def test_no_temperature_is_fitted_on_a_val_split_under_min_val_items(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On three val items the model gets right, the NLL keeps falling as T shrinks: a fit lands
    on the search bound and would multiply every logit of the shipped model by 20."""
    logits = np.array([[2.0, 0.0], [0.0, 1.5], [1.0, 0.2]])
    targets = np.array([0, 1, 0])
    assert fit_temperature(logits, targets) == pytest.approx(MIN_TEMPERATURE, rel=1e-3)
    with caplog.at_level(logging.INFO):
        assert temperature_on_val(logits, targets, min_items=20) is None
    assert "val split of 3 items is under min_val_items 20" in caplog.text


def test_a_temperature_fitted_on_a_search_bound_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logits = np.tile([[2.0, 0.0], [0.0, 1.5], [1.0, 0.2]], (10, 1))  # 30 items, all right
    targets = np.tile([0, 1, 0], 10)
    with caplog.at_level(logging.WARNING):
        temperature = temperature_on_val(logits, targets, min_items=20)
    assert temperature == pytest.approx(MIN_TEMPERATURE, rel=1e-3)
    assert "at the search bound 0.05" in caplog.text


def test_the_pipeline_builds_in_no_temperature_when_val_is_under_min_val_items(
    folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    train = TrainConfig(epochs=1, batch_size=8)  # min_val_items 20; RULE gives val 3 items
    config = PipelineConfig(
        out_dir=tmp_path, input_size=SIZE, train=train, split=RULE, device="cpu"
    )
    with caplog.at_level(logging.INFO):
        result = run_pipeline(image_folder(folder), config)
    assert result.calibration.temperature == 1.0
    assert result.calibration.val_nll_before is None
    assert "val split of 3 items is under min_val_items 20" in caplog.text
    assert "No temperature scaling (T=1" in result.card.notes
    model = build_model("compact-cnn", 3)
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    inputs = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        raw = model.eval()(inputs).numpy()
    session = onnx_session((tmp_path / "model.onnx").read_bytes())
    np.testing.assert_allclose(onnx_logits(session, inputs.numpy()), raw, atol=1e-4)


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
    assert metrics["int8"]["activations"] == "uint8"
    assert metrics["int8"]["reduce_range"] is True


def _op_counts_after_onnxruntime(model: Path, tmp_path: Path) -> dict[str, int]:
    """The node types of the graph onnxruntime runs after its EXTENDED-level fusions (not the
    NCHWc layout of ALL); which quantized nodes fuse depends on the CPU's platform."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    nodes = onnx.load(options.optimized_model_filepath).graph.node
    counts: dict[str, int] = {}
    for node in nodes:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_int8_model_runs_every_convolution_as_an_integer_kernel(tmp_path: Path) -> None:
    """With uint8 activations (the default) onnxruntime fuses each DequantizeLinear -> Conv ->
    QuantizeLinear into one QLinearConv. The int8 activations used before left 10 of the
    shipped residual network's 16 convolutions as float Convs on x86, slower than the float
    model (docs/edge-latency.md, INT8); this residual network shows the same."""
    torch.manual_seed(0)
    model = build_model("compact-resnet", len(CLASSES))
    float_graph = export_onnx(model, (32, 32))
    convolutions = sum(
        node.op_type == "Conv" for node in onnx.load_from_string(float_graph).graph.node
    )
    calibration = np.random.default_rng(0).normal(size=(8, 3, 32, 32)).astype(np.float32)
    int8 = tmp_path / "model.int8.onnx"
    int8.write_bytes(quantize_int8(float_graph, calibration))
    counts = _op_counts_after_onnxruntime(int8, tmp_path)
    assert convolutions > 0
    assert counts.get("Conv", 0) == 0
    assert counts["QLinearConv"] == convolutions


def test_int8_integer_kernels_compute_the_graph_as_written() -> None:
    """The fused integer kernels (QLinearConv, ...) give the logits the QDQ graph defines, which
    onnxruntime computes in float with its optimisations off, to within one step of the logits'
    quantization. With 7-bit weights (the default) no uint8 x int8 pair sum can saturate, so
    this holds on every x86 CPU; with 8-bit weights, on x86 without VNNI (AVX2), this network's
    logits were 13 steps off (docs/edge-latency.md, INT8)."""
    torch.manual_seed(0)
    float_graph = export_onnx(build_model("compact-resnet", len(CLASSES)), (32, 32))
    rng = np.random.default_rng(0)
    calibration = rng.normal(size=(8, 3, 32, 32)).astype(np.float32)
    inputs = rng.normal(size=(16, 3, 32, 32)).astype(np.float32)
    int8 = quantize_int8(float_graph, calibration)
    initializers = {t.name: t for t in onnx.load_from_string(int8).graph.initializer}
    weights = [
        numpy_helper.to_array(t) for t in initializers.values() if t.data_type == TensorProto.INT8
    ]
    assert weights
    assert max(int(np.abs(w).max()) for w in weights) <= 64  # 7 bits
    step = float(numpy_helper.to_array(initializers["logits_scale"]))
    written = onnx_logits(onnx_session(int8, optimized=False), inputs)
    fused = onnx_logits(onnx_session(int8), inputs)
    assert np.abs(written).max() > 10 * step  # the logits span many steps
    assert np.abs(fused - written).max() <= step * 1.01


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


def test_the_card_names_its_dataset_briefly_and_the_notes_name_it_in_full(
    pipeline: PipelineResult, folder: Path
) -> None:
    """The card's dataset_name travels in events (`binloop import-model` announces it), whose
    names hold at most 128 characters, however long the path of the source."""
    card = ModelCard.read(pipeline.out_dir / "card.json")
    assert card.dataset_name == folder.name
    assert f"Trained on ImageFolder {folder};" in card.notes


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


def test_an_image_folder_labels_each_image_by_the_class_folder_right_under_it(
    folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """torchvision's ImageFolder rule: an image in a sub-folder of a class belongs to that
    class; one directly in the folder (a preview picture) has no class and is skipped and
    counted, not made a class named after the folder. Other files are ignored, as before."""
    root = tmp_path / "trashnet"
    shutil.copytree(folder, root)
    glass = sorted((folder / "glass").glob("*.jpg"))
    (root / "glass" / "bottles").mkdir()
    shutil.copy(glass[0], root / "glass" / "bottles" / "b.jpg")
    shutil.copy(glass[1], root / "preview.jpg")
    (root / "README.md").write_text("TrashNet\n")

    source = image_folder(root)

    labels = {image.name: image.label for image in source.images}
    assert labels["glass/bottles/b.jpg"] == "glass"
    assert sorted(set(labels.values())) == list(CLASSES)
    assert source.skipped == {"preview.jpg": "not in a class folder (<folder>/<class>/<image>)"}
    with caplog.at_level(logging.WARNING):
        data = load_and_split(source, PREPROCESSOR, RULE)
    assert sum(data.counts().values()) == 49
    assert "skipped 1 of 50 entries" in caplog.text


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (bit rot, a hostile upload) claims width x height."""
    ok, encoded = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))
    assert ok
    data = bytearray(encoded.tobytes())
    frame_header = data.find(b"\xff\xc0")
    data[frame_header + 5 : frame_header + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_an_image_whose_header_claims_too_many_pixels_is_skipped_not_fatal(
    folder: Path, tmp_path: Path
) -> None:
    """OpenCV raises (rather than returning nothing) for a header over its pixel limit; that
    image is as corrupt as any other and must not end the run."""
    broken = tmp_path / "images"
    shutil.copytree(folder, broken)
    (broken / "glass" / "bitrot.jpg").write_bytes(_jpeg_claiming(65000, 65000))
    data = load_and_split(image_folder(broken), PREPROCESSOR, RULE)
    assert list(data.skipped) == ["glass/bitrot.jpg"]
    assert "CorruptFrameError" in data.skipped["glass/bitrot.jpg"]
    assert "OpenCV's limit" in data.skipped["glass/bitrot.jpg"]
    assert sum(data.counts().values()) == 48


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


def test_a_label_studio_local_file_reference_is_percent_decoded_once(tmp_path: Path) -> None:
    """Label Studio writes /data/local-files/?d=<quoted path> and serves it decoded once: a
    '%41' that is part of the file's name stays '%41'."""
    relative = "batch 7/can%41.jpg"

    resolved = resolve_image(
        "/data/local-files/?d=" + quote(relative), export_dir=tmp_path, image_root=tmp_path / "root"
    )

    assert resolved == tmp_path / "root" / relative


def test_label_studio_split_by_name_does_not_depend_on_the_image_root(
    folder: Path, tmp_path: Path
) -> None:
    """An image keeps its split across machines: the same export with its images under another
    --image-root (another machine, another mount) splits by the task's image reference, not by
    where it was found; the messages still name the file read."""
    image = sorted((folder / "glass").glob("*.jpg"))[0].read_bytes()
    tasks = 40
    export = [
        {
            "id": task,
            "data": {"image": f"/data/local-files/?d=bins/img{task}.jpg"},
            "annotations": [
                {
                    "result": [
                        {
                            "type": "choices",
                            "from_name": "material",
                            "value": {"choices": ["glass" if task % 2 else "metal"]},
                        }
                    ]
                }
            ],
        }
        for task in range(tasks)
    ]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export))
    rule = SplitRule("name", val_fraction=0.15, test_fraction=0.15)

    def tasks_per_split(root: Path) -> dict[str, list[str]]:
        (root / "bins").mkdir(parents=True)
        for task in range(tasks):
            (root / "bins" / f"img{task}.jpg").write_bytes(image)
        data = load_and_split(label_studio_export(path, image_root=root), PREPROCESSOR, rule)
        keys = [key for items in data.splits.values() for key in items.keys]
        assert all(str(root / "bins") in key for key in keys)
        return {
            split: [k.split(":")[0] for k in items.keys] for split, items in data.splits.items()
        }

    here = tasks_per_split(tmp_path / "machine-a")
    assert all(here[split] for split in ("train", "val", "test"))
    assert tasks_per_split(tmp_path / "machine-b") == here


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


def test_a_snapshot_version_is_a_whole_number_from_one(folder: Path, tmp_path: Path) -> None:
    """NAME:0 trained on the latest version, and NAME:x ended in a traceback."""
    store = LocalBlobStore(tmp_path / "blobs")
    import_image_folder(store, folder, "bins", taxonomy_version="t", classes=list(CLASSES))
    with pytest.raises(ValueError, match="versions start at 1, not 0"):
        snapshot(store, "bins", 0)
    app = typer.Typer()
    app.command()(train_command)
    for wrong in ("bins:0", "bins:-1", "bins:x", "bins:"):
        result = CliRunner().invoke(app, ["--out", str(tmp_path / "out"), "--snapshot", wrong])
        assert result.exit_code == 2, result.output
        assert "Invalid value for --snapshot" in result.output, result.output


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


def test_a_failed_training_ends_its_wandb_run_as_failed(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    finished: list[int] = []

    class RecordingTracker(NullTracker):
        def __init__(self, *args: object) -> None:
            pass

        def finish(self, exit_code: int = 0) -> None:
            finished.append(exit_code)

    monkeypatch.setattr(tracking, "WandbTracker", RecordingTracker)
    one_class = tmp_path / "one-class"
    shutil.copytree(folder / "glass", one_class / "glass")
    app = typer.Typer()
    app.command()(train_command)

    result = CliRunner().invoke(
        app, ["--out", str(tmp_path / "out"), "--image-folder", str(one_class), "--device", "cpu"]
    )

    assert isinstance(result.exception, PipelineError), result.output
    assert finished == [1]


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
        "--int8",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "test accuracy" in result.output
    card = ModelCard.read(out / "card.json")
    assert card.classes == list(CLASSES)
    assert card.input_size == SIZE
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 2
    assert metrics["int8"]["activations"] == "uint8"  # the command's defaults
    assert metrics["int8"]["reduce_range"] is True
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


def test_the_sweep_tool_fits_epochs_to_its_budget_and_writes_the_equivalent_command(
    tmp_path: Path,
) -> None:
    """tools/train_sweep.py: a probe times the run, the epochs fit the budget (at least one),
    the run folder is a full pipeline output, and command.txt is the `binloop train` command of
    the same configuration."""
    import json
    import subprocess
    import sys

    tool = DEMO.parents[1] / "tools" / "train_sweep.py"
    out = tmp_path / "sweep"
    subprocess.run(
        [
            sys.executable,
            str(tool),
            "--image-folder",
            str(DEMO / "seed"),
            "--out",
            str(out),
            "--budget-minutes",
            "0.01",
            "--probe-epochs",
            "2",
            "--threads",
            "1",
            "--only",
            "resnet-deep-96-mix",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    row = json.loads((out / "summary.json").read_text())["resnet-deep-96-mix"]
    assert "error" not in row, row.get("error")
    assert row["epochs"] == 1  # a budget shorter than the probe still trains one epoch
    assert row["seconds_per_epoch"] > 0
    assert 0.0 <= row["best_val_accuracy"] <= 1.0
    run = out / "resnet-deep-96-mix"
    assert {"model.onnx", "card.json", "metrics.json"} <= {p.name for p in run.iterdir()}
    command = (run / "command.txt").read_text()
    for part in (
        "binloop train",
        "--architecture compact-resnet-deep --input-size 96 128",
        "--epochs 1 --patience 1",
        "--mixup-alpha 0.2",
        "--cutmix-alpha 1.0",
        "--ema-decay 0.999",
    ):
        assert part in command, part
