"""One training run, start to finish: dataset manifest -> trained, evaluated, exported and
parity-checked model -> artifacts in the object store. No bus here."""

from __future__ import annotations

import io
import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime

import numpy as np
import torch

from binloop.datasets import DatasetManifest, latest_version, parse_manifest, read_manifest
from binloop.errors import PermanentError
from binloop.ml.card import ModelCard
from binloop.ml.preprocess import FloatArray, Preprocessor
from binloop.storage import BlobExistsError, BlobStore, dataset_key, model_key
from binloop.storage.blobstore import check_digest
from schemas.base import BlobRef, utc_now
from schemas.events import DatasetSnapshot, ModelMetrics, TrainingCompleted, TrainingRequested
from schemas.taxonomy import Taxonomy
from services.trainer.calibration import temperature_on_val, with_temperature
from services.trainer.data import (
    LoadedItems,
    ManifestDataset,
    ensure_eval_set,
    items_in,
    load_items,
    model_classes,
)
from services.trainer.evaluate import EvalReport, evaluate
from services.trainer.export import (
    EMBEDDING_NAME,
    check_parity,
    embedding_parity_max_abs_diff,
    export_onnx,
    onnx_logits,
    onnx_session,
    parity_max_abs_diff,
)
from services.trainer.nets import build_model, count_parameters
from services.trainer.report import confusion_png
from services.trainer.settings import TrainerSettings
from services.trainer.train import (
    TrainConfig,
    TrainResult,
    predict_logits,
    resolve_device,
    train_classifier,
)

log = logging.getLogger(__name__)

PARITY_BATCH = 32


class InsufficientDataError(PermanentError):
    """The snapshot cannot train a useful classifier (too few items or classes)."""


@dataclass(frozen=True)
class EvalSet:
    """The fixed evaluation set, decoded once per process."""

    manifest: DatasetManifest
    loaded: LoadedItems

    @property
    def eval_set_id(self) -> str:
        return self.manifest.content_id()


@dataclass(frozen=True)
class TrainingOutcome:
    model_name: str
    version: int
    parent_version: int | None
    dataset_name: str
    dataset_version: int
    card: ModelCard
    artifact: BlobRef
    card_ref: BlobRef
    confusion_ref: BlobRef
    metrics: ModelMetrics
    report: EvalReport
    parity_max_abs_diff: float
    train_seconds: float
    skipped: dict[str, str]
    embedding_parity_max_abs_diff: float | None = None
    """Same check on the "embedding" output; None when the network exports none."""

    def completed_event(self, producer: str) -> TrainingCompleted:
        return TrainingCompleted(
            producer=producer,
            model_name=self.model_name,
            model_version=self.version,
            parent_version=self.parent_version,
            dataset_name=self.dataset_name,
            dataset_version=self.dataset_version,
            artifact=self.artifact,
            card=self.card_ref,
            metrics=self.metrics,
            onnx_parity_max_abs_diff=self.parity_max_abs_diff,
            train_seconds=self.train_seconds,
        )


def taxonomy_for(settings: TrainerSettings) -> Taxonomy:
    return Taxonomy.from_yaml(settings.taxonomy_path) if settings.taxonomy_path else Taxonomy()


def preprocessor_for(settings: TrainerSettings) -> Preprocessor:
    """Built from the same three values the card records, so the edge reproduces it exactly."""
    return Preprocessor(settings.input_size, settings.mean, settings.std)


def train_config(settings: TrainerSettings) -> TrainConfig:
    return TrainConfig(
        epochs=settings.epochs,
        patience=settings.patience,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        seed=settings.seed,
        min_val_items=settings.min_val_items,
        mean=settings.mean,
        std=settings.std,
        balance=settings.balance,
        mixed_precision=settings.mixed_precision,
    )


def load_eval_set(
    store: BlobStore, settings: TrainerSettings, preprocessor: Preprocessor | None = None
) -> EvalSet:
    """The fixed evaluation set, decoded for a model whose card asks for `preprocessor`
    (default: the trainer's own); the eval_set_id depends only on the items and labels."""
    manifest = ensure_eval_set(
        store,
        settings.eval_dir,
        settings.eval_dataset_name,
        taxonomy_version=taxonomy_for(settings).version,
    )
    loaded = load_items(store, manifest.items, preprocessor or preprocessor_for(settings))
    if loaded.skipped:
        # Its id names every item: scoring a model on fewer would compare it with the
        # champion on a different set under the same id.
        examples = "; ".join(f"{key} ({why})" for key, why in list(loaded.skipped.items())[:3])
        raise PermanentError(
            f"the evaluation set {manifest.name} v{manifest.version} ({settings.eval_dir}) has "
            f"{len(loaded.skipped)} unreadable items, e.g. {examples}: fix or remove them "
            "(the changed folder is imported as a new version)"
        )
    return EvalSet(manifest=manifest, loaded=loaded)


def manifest_for_snapshot(store: BlobStore, snapshot: DatasetSnapshot) -> DatasetManifest:
    data = check_digest(
        store.get(snapshot.manifest.key), snapshot.manifest.sha256, snapshot.manifest.key
    )
    manifest = parse_manifest(data, snapshot.manifest.key)
    if (manifest.name, manifest.version) != (snapshot.name, snapshot.version):
        raise PermanentError(
            f"snapshot {snapshot.name} v{snapshot.version} points at the manifest of "
            f"{manifest.name} v{manifest.version}"
        )
    return manifest


def manifest_for_request(store: BlobStore, request: TrainingRequested) -> DatasetManifest:
    version = request.dataset_version or latest_version(store, request.dataset_name)
    if version == 0:
        raise PermanentError(f"dataset {request.dataset_name!r} has no snapshot in the store")
    return read_manifest(store, dataset_key(request.dataset_name, version))


def next_model_version(store: BlobStore, model_name: str) -> int:
    """One more than the highest version in the store, claimed or complete. Only a guess: a
    writer takes its version with claim_model_version."""
    pattern = re.compile(rf"^models/{re.escape(model_name)}/v(\d+)/")
    versions = [
        int(m.group(1)) for key in store.list(f"models/{model_name}/") if (m := pattern.match(key))
    ]
    return max(versions, default=0) + 1


CLAIM_FILE = "claim.json"
TRAINER_CLAIMANT = "trainer"


class UnclaimedVersionError(PermanentError):
    """store_model was asked to write a version whose claim is not the caller's."""


@dataclass(frozen=True)
class ModelVersionClaim:
    """A model version taken by one writer: models/<name>/vNNNNN/claim.json, written
    create-only before anything else of that version."""

    model_name: str
    version: int
    claim_id: str
    claimant: str

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode()


def claim_model_version(store: BlobStore, model_name: str, claimant: str) -> ModelVersionClaim:
    """Takes the next free version of `model_name` for `claimant` (the trainer, an import).
    Two writers that list the store at the same time guess the same number; the store lets
    only one create the claim, and the other takes the next number. A writer that dies after
    its claim leaves that number unused: versions may have gaps, never two artifacts."""
    version = next_model_version(store, model_name)
    while True:
        claim = ModelVersionClaim(model_name, version, uuid.uuid4().hex, claimant)
        try:
            store.put_new(model_key(model_name, version, CLAIM_FILE), claim.to_json())
        except BlobExistsError:
            log.info(
                "%s v%d was claimed by another writer; trying v%d", model_name, version, version + 1
            )
            version += 1
            continue
        return claim


def _check_enough(
    settings: TrainerSettings, manifest: DatasetManifest, usable: int, classes: int
) -> None:
    where = f"dataset {manifest.name} v{manifest.version}"
    if usable < settings.min_items:
        raise InsufficientDataError(
            f"{where} has {usable} usable labeled train/val items; "
            f"training needs at least {settings.min_items}"
        )
    if classes < 2:
        raise InsufficientDataError(f"{where} has training items of {classes} class(es); need 2")


def _parity_batch(eval_set: EvalSet, train: LoadedItems) -> FloatArray:
    return np.concatenate([eval_set.loaded.inputs[:PARITY_BATCH], train.inputs[:PARITY_BATCH]])[
        :PARITY_BATCH
    ]


def _weights_bytes(model: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def score_on_eval_set(
    scores: FloatArray, classes: Sequence[str], eval_set: EvalSet, taxonomy: Taxonomy
) -> EvalReport:
    """How every candidate is measured: its top class for each eval item (`scores`: one row of
    class scores per item, in `classes` order) against the item's label."""
    predicted = scores.argmax(axis=1)
    return evaluate(eval_set.loaded.labels, [classes[i] for i in predicted], taxonomy, classes)


@dataclass(frozen=True)
class StoredModel:
    artifact: BlobRef
    card: BlobRef
    confusion: BlobRef


def store_model(
    store: BlobStore,
    card: ModelCard,
    onnx_bytes: bytes,
    report: EvalReport,
    extras: Sequence[tuple[str, bytes, str]] = (),
    *,
    claim: ModelVersionClaim,
) -> StoredModel:
    """Writes model.onnx, the `extras` (name, data, content type), confusion.png and, last,
    card.json under the card's name and version, which `claim` must hold: a version someone
    else claimed is never written over (its artifact's sha256 is what the registry promotes)."""
    claim_key = model_key(card.name, card.version, CLAIM_FILE)
    if (claim.model_name, claim.version) != (card.name, card.version) or store.get(
        claim_key
    ) != claim.to_json():
        raise UnclaimedVersionError(
            f"{card.name} v{card.version} is not claimed by {claim.claimant} "
            f"(claim {claim.claim_id} for {claim.model_name} v{claim.version})"
        )

    def put(name: str, data: bytes, content_type: str) -> BlobRef:
        return store.put(model_key(card.name, card.version, name), data, content_type)

    artifact = put("model.onnx", onnx_bytes, "application/onnx")
    for name, data, content_type in extras:
        put(name, data, content_type)
    confusion = put(
        "confusion.png", confusion_png(report, f"{card.name} v{card.version}"), "image/png"
    )
    # The card goes last: its presence says the version is complete.
    card_ref = put(
        "card.json", (card.model_dump_json(indent=2) + "\n").encode(), "application/json"
    )
    return StoredModel(artifact, card_ref, confusion)


def run_training(
    store: BlobStore,
    manifest: DatasetManifest,
    eval_set: EvalSet,
    settings: TrainerSettings,
    *,
    parent_version: int | None,
    clock: Callable[[], datetime] = utc_now,
) -> TrainingOutcome:
    """Trains on the manifest's train split (val split for model selection), evaluates on the
    fixed eval set with the exported ONNX graph, and stores model.onnx, model.pt,
    confusion.png, training.json and, last, card.json under the next model version."""
    started = time.perf_counter()
    preprocessor = preprocessor_for(settings)
    classes = model_classes(manifest)
    labeled = len(items_in(manifest, ("train", "val")))
    _check_enough(settings, manifest, labeled, len(classes))
    train_items = load_items(store, items_in(manifest, ("train",)), preprocessor)
    val_items = load_items(store, items_in(manifest, ("val",)), preprocessor)
    train_data = ManifestDataset(train_items, classes)
    val_data = ManifestDataset(val_items, classes)
    _check_enough(
        settings,
        manifest,
        len(train_items) + len(val_items),
        int((train_data.class_counts() > 0).sum()),
    )

    torch.set_num_threads(settings.torch_threads)
    result = train_classifier(
        lambda: build_model(settings.architecture, len(classes)),
        train_data,
        val_data if len(val_data) else None,
        train_config(settings),
        device=resolve_device(settings.device),
    )
    temperature = _temperature(result, val_data, settings)
    # The exported graph carries the temperature, so the edge's confidences are calibrated.
    shipped = with_temperature(result.model, temperature).eval()
    onnx_bytes = export_onnx(shipped, settings.input_size)
    session = onnx_session(onnx_bytes, settings.torch_threads)
    parity_batch = _parity_batch(eval_set, train_items)
    parity = parity_max_abs_diff(shipped, session, parity_batch)
    check_parity(parity, settings.parity_tolerance)
    embedding_parity = embedding_parity_max_abs_diff(shipped, session, parity_batch)
    if embedding_parity is not None:
        check_parity(embedding_parity, settings.parity_tolerance, EMBEDDING_NAME)

    report = score_on_eval_set(
        onnx_logits(session, eval_set.loaded.inputs), classes, eval_set, taxonomy_for(settings)
    )
    metrics = report.to_metrics(eval_set.eval_set_id)

    claim = claim_model_version(store, settings.model_name, TRAINER_CLAIMANT)
    version = claim.version
    skipped = {**train_items.skipped, **val_items.skipped}
    card = ModelCard(
        name=settings.model_name,
        version=version,
        architecture=settings.architecture,
        classes=classes,
        input_size=settings.input_size,
        mean=settings.mean,
        std=settings.std,
        parameters=count_parameters(result.model),
        dataset_name=manifest.name,
        dataset_version=manifest.version,
        parent_version=parent_version,
        metrics=metrics,
        onnx_parity_max_abs_diff=parity,
        created_at=clock(),
        notes=_notes(result, len(train_items), len(val_items), len(skipped), temperature),
    )

    stored = store_model(
        store,
        card,
        onnx_bytes,
        report,
        extras=[
            ("model.pt", _weights_bytes(result.model), "application/octet-stream"),
            ("training.json", _training_log(result, skipped), "application/json"),
        ],
        claim=claim,
    )
    return TrainingOutcome(
        model_name=settings.model_name,
        version=version,
        parent_version=parent_version,
        dataset_name=manifest.name,
        dataset_version=manifest.version,
        card=card,
        artifact=stored.artifact,
        card_ref=stored.card,
        confusion_ref=stored.confusion,
        metrics=metrics,
        report=report,
        parity_max_abs_diff=parity,
        train_seconds=time.perf_counter() - started,
        skipped=skipped,
        embedding_parity_max_abs_diff=embedding_parity,
    )


def _temperature(
    result: TrainResult, val_data: ManifestDataset, settings: TrainerSettings
) -> float:
    """Fitted on val when it is big enough to say something; 1 (no scaling) otherwise."""
    if not settings.calibrate:
        return 1.0
    logits = predict_logits(result.model, val_data.inputs).numpy()
    fitted = temperature_on_val(logits, val_data.targets.numpy(), settings.min_val_items)
    return 1.0 if fitted is None else fitted


def _notes(result: TrainResult, train: int, val: int, skipped: int, temperature: float) -> str:
    return (
        f"trained {len(result.history)} epochs (kept epoch {result.best_epoch}) on {train} train "
        f"and {val} val items; {skipped} unreadable items skipped; temperature T="
        f"{temperature:.4f} is built into the ONNX graph (its logits are already divided by T)"
    )


def _training_log(result: TrainResult, skipped: dict[str, str]) -> bytes:
    document = {
        "best_epoch": result.best_epoch,
        "history": [asdict(stats) for stats in result.history],
        "skipped": skipped,
    }
    return (json.dumps(document, indent=1) + "\n").encode()
