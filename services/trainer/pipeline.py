"""The `binloop train` pipeline: a dataset source -> deterministic split -> training (with
checkpoints) -> temperature calibration on val -> evaluation on test (six classes and four
compartments) -> ONNX export (dynamic and fixed batch, parity-checked) -> optional INT8 ->
a self-contained output folder with the model card, and the run tracked in W&B (offline)."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from binloop.ml.card import ModelCard
from binloop.ml.preprocess import FloatArray, Preprocessor, softmax
from schemas.base import Name, fits, utc_now
from schemas.taxonomy import Taxonomy
from services.trainer.calibration import (
    negative_log_likelihood,
    temperature_on_val,
    with_temperature,
)
from services.trainer.data import LoadedItems, ManifestDataset
from services.trainer.evaluate import (
    EvalReport,
    evaluate,
    evaluate_compartments,
    expected_calibration_error,
)
from services.trainer.export import (
    check_parity,
    embedding_parity_max_abs_diff,
    export_onnx,
    onnx_logits,
    onnx_session,
    parity_max_abs_diff,
)
from services.trainer.nets import build_model, count_parameters, load_weights
from services.trainer.quantize import Int8Activations, calibration_sample, quantize_int8
from services.trainer.report import confusion_png, learning_curve_png
from services.trainer.settings import IMAGENET_MEAN, IMAGENET_STD
from services.trainer.sources import SourceImages, SplitData, SplitRule, load_and_split
from services.trainer.tracking import NullTracker, Tracker
from services.trainer.train import (
    BatchCallback,
    EpochCallback,
    EpochStats,
    TrainConfig,
    predict_logits,
    resolve_device,
    train_classifier,
)

log = logging.getLogger(__name__)

PARITY_BATCH = 16
CHECKPOINT = "checkpoint.pt"


class PipelineError(ValueError):
    """The data cannot train or evaluate a model (too few images, classes or test items)."""


@dataclass(frozen=True)
class PipelineConfig:
    out_dir: Path
    model_name: str = "binloop-waste"
    version: int = 1
    architecture: str = "compact-cnn"
    input_size: tuple[int, int] = (64, 64)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    """mean/std normalise every input and are what augmentation un-normalises with: they
    replace train.mean/train.std."""
    pretrained: bool = False
    weights: Path | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    split: SplitRule = field(default_factory=SplitRule)
    device: str = "auto"
    threads: int = 1
    resume: bool = False
    checkpoint_every: int = 1
    """Save OUT/checkpoint.pt after every Nth epoch (and the last)."""
    calibrate: bool = True
    int8: bool = False
    int8_calibration_images: int = 200
    int8_activations: Int8Activations = "uint8"
    """uint8 for x86 (integer kernels), int8 for ARM (services/trainer/quantize.py)."""
    int8_reduce_range: bool = True
    """7-bit weights: the same results on every x86 CPU (services/trainer/quantize.py)."""
    parity_tolerance: float = 1e-3
    taxonomy: Taxonomy = field(default_factory=Taxonomy)

    def describe(self) -> dict[str, Any]:
        """What the tracker logs as the run's config."""
        values = asdict(self)
        values["taxonomy"] = self.taxonomy.version
        return json.loads(json.dumps(values, default=str))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Calibration:
    temperature: float
    val_nll_before: float | None
    val_nll_after: float | None
    test_ece_before: float
    test_ece_after: float


@dataclass(frozen=True)
class Int8Result:
    path: Path
    accuracy: float
    accuracy_delta: float
    """INT8 accuracy minus float accuracy on the test split (negative: INT8 loses)."""
    size_bytes: int
    activations: Int8Activations
    reduce_range: bool


@dataclass(frozen=True)
class PipelineResult:
    out_dir: Path
    card: ModelCard
    report: EvalReport
    compartment_report: EvalReport
    calibration: Calibration
    parity_dynamic: float
    parity_fixed: float
    embedding_parity: float | None
    history: list[EpochStats]
    best_epoch: int
    split_counts: dict[str, int]
    skipped: dict[str, str]
    int8: Int8Result | None
    train_seconds: float
    resumed_from_epoch: int | None


def _targets(items: LoadedItems, classes: list[str]) -> np.ndarray[Any, np.dtype[np.int64]]:
    index = {name: i for i, name in enumerate(classes)}
    return np.array([index[label] for label in items.labels], dtype=np.int64)


def _check_data(data: SplitData) -> None:
    train, test = data.splits["train"], data.splits["test"]
    if len(set(train.labels)) < 2:
        raise PipelineError(
            f"the train split has images of {len(set(train.labels))} class(es); need 2"
        )
    if len(test) == 0:
        raise PipelineError(
            f"the test split is empty ({data.rule.describe()}); "
            "use more images or a larger --test-fraction"
        )


def checkpoint_fingerprint(config: PipelineConfig, data: SplitData) -> dict[str, Any]:
    """What a checkpoint was trained on besides its TrainConfig; `--resume` refuses a checkpoint
    whose fingerprint differs (a changed split rule or dataset could put images it was trained
    on into the test split)."""
    return {
        "split": data.rule.describe(),
        "train_split_id": data.content_id("train"),
        "val_split_id": data.content_id("val"),
        "test_split_id": data.content_id("test"),
        "input_size": list(config.input_size),
        "mean": list(config.mean),
        "std": list(config.std),
        "architecture": config.architecture,
        "classes": data.classes,
    }


def _parity_batch(*arrays: FloatArray) -> FloatArray:
    batch: FloatArray = np.concatenate([a[:PARITY_BATCH] for a in arrays])[:PARITY_BATCH]
    return batch


def run_pipeline(
    source: SourceImages,
    config: PipelineConfig,
    *,
    tracker: Tracker | None = None,
    on_epoch: EpochCallback | None = None,
    on_batch: BatchCallback | None = None,
) -> PipelineResult:
    started = time.perf_counter()
    tracker = tracker or NullTracker()
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    preprocessor = Preprocessor(config.input_size, config.mean, config.std)
    data = load_and_split(source, preprocessor, config.split)
    _check_data(data)
    classes = data.classes
    train, val, test = (data.splits[s] for s in ("train", "val", "test"))
    device = resolve_device(config.device)
    torch.set_num_threads(config.threads)

    def fresh_model() -> torch.nn.Module:
        model = build_model(config.architecture, len(classes), pretrained=config.pretrained)
        if config.weights is not None:
            load_weights(model, config.weights)
        return model

    def epoch_done(stats: EpochStats) -> None:
        tracker.log_epoch(stats)
        if on_epoch is not None:
            on_epoch(stats)

    train_config = dataclasses.replace(config.train, mean=config.mean, std=config.std)
    result = train_classifier(
        fresh_model,
        ManifestDataset(train, classes),
        ManifestDataset(val, classes) if len(val) else None,
        train_config,
        device=device,
        checkpoint_path=out / CHECKPOINT,
        checkpoint_every=config.checkpoint_every,
        resume=config.resume,
        fingerprint=checkpoint_fingerprint(config, data),
        on_epoch=epoch_done,
        on_batch=on_batch,
    )
    model = result.model
    torch.save(model.state_dict(), out / "model.pt")

    test_targets = _targets(test, classes)
    test_logits = predict_logits(model, torch.from_numpy(test.inputs)).numpy()
    temperature, nll_before, nll_after = 1.0, None, None
    if config.calibrate:
        val_logits = predict_logits(model, torch.from_numpy(val.inputs)).numpy()
        val_targets = _targets(val, classes)
        fitted = temperature_on_val(val_logits, val_targets, train_config.min_val_items)
        if fitted is not None:
            temperature = fitted
            nll_before = negative_log_likelihood(val_logits, val_targets)
            nll_after = negative_log_likelihood(val_logits, val_targets, temperature)
    calibration = Calibration(
        temperature=temperature,
        val_nll_before=nll_before,
        val_nll_after=nll_after,
        test_ece_before=expected_calibration_error(softmax(test_logits), test_targets),
        test_ece_after=expected_calibration_error(
            softmax((test_logits / temperature).astype(np.float32)), test_targets
        ),
    )

    # The shipped graph carries the temperature: its logits are calibrated as they are.
    shipped = with_temperature(model, temperature).eval()
    dynamic_bytes = export_onnx(shipped, config.input_size)
    fixed_bytes = export_onnx(shipped, config.input_size, fixed_batch=1)
    dynamic = onnx_session(dynamic_bytes, config.threads)
    fixed = onnx_session(fixed_bytes, config.threads)
    batch = _parity_batch(test.inputs, train.inputs)
    parity_dynamic = parity_max_abs_diff(shipped, dynamic, batch)
    check_parity(parity_dynamic, config.parity_tolerance)
    parity_fixed = max(parity_max_abs_diff_single(shipped, fixed, item) for item in batch[:4])
    check_parity(parity_fixed, config.parity_tolerance)
    embedding_parity = embedding_parity_max_abs_diff(shipped, dynamic, batch)
    if embedding_parity is not None:
        check_parity(embedding_parity, config.parity_tolerance, "embedding")

    # The reported metrics are those of the exported graph, exactly what the edge runs.
    onnx_test_logits = onnx_logits(dynamic, test.inputs)
    predicted = [classes[i] for i in onnx_test_logits.argmax(axis=1)]
    report = evaluate(test.labels, predicted, config.taxonomy, classes)
    compartments = evaluate_compartments(test.labels, predicted, config.taxonomy)

    int8 = None
    if config.int8:
        int8 = _quantize(dynamic_bytes, train, test, classes, report.accuracy, config, out)

    (out / "model.onnx").write_bytes(dynamic_bytes)
    (out / "model.fixed-batch1.onnx").write_bytes(fixed_bytes)
    (out / "confusion.png").write_bytes(
        confusion_png(report, f"{config.model_name} v{config.version}: test split")
    )
    (out / "confusion_compartments.png").write_bytes(
        confusion_png(compartments, f"{config.model_name} v{config.version}: compartments")
    )
    (out / "learning_curve.png").write_bytes(
        learning_curve_png(
            result.history, result.best_epoch, f"{config.model_name} v{config.version}"
        )
    )
    card = ModelCard(
        name=config.model_name,
        version=config.version,
        architecture=config.architecture,
        classes=classes,
        input_size=config.input_size,
        mean=config.mean,
        std=config.std,
        output="logits",
        parameters=count_parameters(model),
        dataset_name=_dataset_name(source),
        dataset_version=source.dataset_version,
        metrics=report.to_metrics(data.content_id("test")),
        onnx_parity_max_abs_diff=max(parity_dynamic, parity_fixed),
        created_at=utc_now(),
        notes=_card_notes(source, data, calibration, result.best_epoch, len(result.history)),
    )
    card.write(out / "card.json")
    train_seconds = time.perf_counter() - started
    outcome = PipelineResult(
        out_dir=out,
        card=card,
        report=report,
        compartment_report=compartments,
        calibration=calibration,
        parity_dynamic=parity_dynamic,
        parity_fixed=parity_fixed,
        embedding_parity=embedding_parity,
        history=result.history,
        best_epoch=result.best_epoch,
        split_counts=data.counts(),
        skipped=data.skipped,
        int8=int8,
        train_seconds=train_seconds,
        resumed_from_epoch=result.resumed_from_epoch,
    )
    (out / "metrics.json").write_text(json.dumps(metrics_document(outcome, data), indent=1) + "\n")
    tracker.log_summary(summary_values(outcome))
    tracker.log_image("confusion_matrix", out / "confusion.png")
    tracker.log_image("confusion_matrix_compartments", out / "confusion_compartments.png")
    tracker.log_model(config.model_name, [out / "model.onnx", out / "card.json"])
    return outcome


def parity_max_abs_diff_single(model: torch.nn.Module, session: Any, item: FloatArray) -> float:
    """Parity of a fixed batch-1 graph on one input."""
    with torch.no_grad():
        expected = model(torch.from_numpy(item[None])).numpy()
    actual = onnx_logits(session, item[None])
    return float(np.abs(actual - expected).max())


def _quantize(
    onnx_bytes: bytes,
    train: LoadedItems,
    test: LoadedItems,
    classes: list[str],
    float_accuracy: float,
    config: PipelineConfig,
    out: Path,
) -> Int8Result:
    sample = calibration_sample(train.inputs, config.int8_calibration_images, config.train.seed)
    int8_bytes = quantize_int8(
        onnx_bytes,
        sample,
        activations=config.int8_activations,
        reduce_range=config.int8_reduce_range,
    )
    path = out / "model.int8.onnx"
    path.write_bytes(int8_bytes)
    logits = onnx_logits(onnx_session(int8_bytes, config.threads), test.inputs)
    hits = sum(classes[i] == t for i, t in zip(logits.argmax(axis=1), test.labels, strict=True))
    accuracy = hits / len(test)
    return Int8Result(
        path,
        accuracy,
        accuracy - float_accuracy,
        len(int8_bytes),
        config.int8_activations,
        config.int8_reduce_range,
    )


def _dataset_name(source: SourceImages) -> str | None:
    """Short enough for the events that carry it (`binloop import-model` announces the card's
    dataset_name); the source in full is in the notes."""
    name = source.dataset_name
    return name if name is not None and fits(Name, name) else None


def _card_notes(
    source: SourceImages, data: SplitData, calibration: Calibration, best: int, epochs: int
) -> str:
    counts = data.counts()
    return (
        f"Trained on {source.description}; {data.rule.describe()}; "
        f"items train {counts['train']}, val {counts['val']}, test {counts['test']} "
        f"(test split id {data.content_id('test')}); "
        f"{len(data.skipped)} entries skipped (unreadable or without a label). "
        f"Trained {epochs} epochs, kept epoch {best}. " + _temperature_note(calibration)
    )


def _temperature_note(calibration: Calibration) -> str:
    if calibration.val_nll_before is None:
        return (
            "No temperature scaling (T=1: calibration off, or a val split under min_val_items); "
            f"test ECE {calibration.test_ece_before:.4f}."
        )
    return (
        f"Temperature scaling T={calibration.temperature:.4f} (fitted on val) is built into the "
        f"ONNX graph: its logits are already divided by T, so softmax(logits) is calibrated "
        f"(test ECE {calibration.test_ece_before:.4f} -> {calibration.test_ece_after:.4f})."
    )


def summary_values(result: PipelineResult) -> dict[str, float]:
    values = {
        "test/accuracy": result.report.accuracy,
        "test/macro_f1": result.report.macro_f1,
        "test/compartment_accuracy": result.compartment_report.accuracy,
        "test/compartment_macro_f1": result.compartment_report.macro_f1,
        "test/ece_before": result.calibration.test_ece_before,
        "test/ece_after": result.calibration.test_ece_after,
        "temperature": result.calibration.temperature,
        "onnx/parity_dynamic": result.parity_dynamic,
        "onnx/parity_fixed": result.parity_fixed,
    }
    if result.int8 is not None:
        values["int8/accuracy"] = result.int8.accuracy
        values["int8/accuracy_delta"] = result.int8.accuracy_delta
    return values


def _report_document(report: EvalReport) -> dict[str, Any]:
    return {
        "items": report.items,
        "accuracy": report.accuracy,
        "macro_f1": report.macro_f1,
        "labels": report.labels,
        "confusion": report.confusion.tolist(),
        "precision": report.per_class_precision,
        "recall": report.per_class_recall,
        "f1": report.per_class_f1,
    }


def metrics_document(result: PipelineResult, data: SplitData) -> dict[str, Any]:
    return {
        "split": {
            "rule": data.rule.describe(),
            "counts": result.split_counts,
            "test_split_id": data.content_id("test"),
        },
        "classes": result.card.classes,
        "test": _report_document(result.report),
        "test_compartments": _report_document(result.compartment_report),
        "calibration": asdict(result.calibration),
        "onnx": {
            "parity_dynamic_max_abs_diff": result.parity_dynamic,
            "parity_fixed_max_abs_diff": result.parity_fixed,
            "embedding_parity_max_abs_diff": result.embedding_parity,
        },
        "int8": None
        if result.int8 is None
        else {
            "accuracy": result.int8.accuracy,
            "accuracy_delta": result.int8.accuracy_delta,
            "size_bytes": result.int8.size_bytes,
            "activations": result.int8.activations,
            "reduce_range": result.int8.reduce_range,
        },
        "best_epoch": result.best_epoch,
        "resumed_from_epoch": result.resumed_from_epoch,
        "history": [asdict(stats) for stats in result.history],
        "skipped": result.skipped,
        "seconds": result.train_seconds,
    }
