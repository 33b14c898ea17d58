"""An externally trained model (ONNX + card, e.g. the classifier binloop ships) made a candidate
like the trainer's own: loaded as a bin loads it, scored on the same fixed eval set, stored under
the next version, announced by the same TrainingCompleted. No bus here."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from binloop.errors import ModelLoadError
from binloop.ml.card import ModelCard
from binloop.storage import BlobStore
from schemas.base import BlobRef, Name, fits
from schemas.events import ModelMetrics
from services.edge_inferencer.models import load_model
from services.trainer.core import (
    StoredModel,
    TrainingOutcome,
    claim_model_version,
    load_eval_set,
    next_model_version,
    score_on_eval_set,
    store_model,
    taxonomy_for,
)
from services.trainer.evaluate import EvalReport
from services.trainer.settings import TrainerSettings

IMPORT_CLAIMANT = "model-import"

EXTERNAL_DATASET = "external"
"""The dataset recorded when the card names none (or one no event can carry): binloop never
saw the training data."""


def import_external_model(
    store: BlobStore, settings: TrainerSettings, onnx_path: Path, card_path: Path
) -> TrainingOutcome:
    """Stores the model as the next version of settings.model_name, measured on
    settings.eval_dir exactly as trained candidates are, with its card rewritten to that name,
    version and measurement. Raises ModelLoadError when a bin could not serve it, or when its
    card holds what no training.completed can carry; either before anything is stored.

    The version is claimed in the store as the trainer claims its own (claim_model_version):
    an import while the trainer stores a run takes the next number instead of the same one."""
    onnx_bytes = onnx_path.read_bytes()
    _check_card_keys(card_path)
    model = load_model(onnx_path, card_path, intra_op_threads=settings.torch_threads)
    card = model.card
    eval_set = load_eval_set(store, settings, model.preprocessor)
    report = score_on_eval_set(
        model.backend.predict(eval_set.loaded.inputs),
        card.classes,
        eval_set,
        taxonomy_for(settings),
    )
    metrics = report.to_metrics(eval_set.eval_set_id)
    # The announcement is built and checked before a version is claimed, with stand-ins for
    # what storing gives: one that failed after storing would leave a version nobody
    # announces, one more on every retry of the import.
    unstored = BlobRef(key="unstored", uri="unstored:", sha256="0" * 64, size=0)
    preview = _outcome(
        settings,
        next_model_version(store, settings.model_name),
        card,
        StoredModel(unstored, unstored, unstored),
        metrics,
        report,
    )
    try:
        preview.completed_event(IMPORT_CLAIMANT)
    except ValidationError as exc:
        raise ModelLoadError(
            f"{card_path}: the card cannot be announced as training.completed: {exc}"
        ) from exc
    claim = claim_model_version(store, settings.model_name, IMPORT_CLAIMANT)
    version = claim.version
    origin = (
        f"Imported as {settings.model_name} v{version} from {onnx_path.name} "
        f"(card: {card.name} v{card.version}); measured on eval set "
        f"{eval_set.eval_set_id[:12]} ({metrics.eval_items} items)"
    )
    stored_card = card.model_copy(
        update={
            "name": settings.model_name,
            "version": version,
            "parent_version": None,  # the card's parent is a version of another numbering
            "metrics": metrics,
            "notes": f"{card.notes} {origin}".strip(),
        }
    )
    stored = store_model(store, stored_card, onnx_bytes, report, claim=claim)
    return _outcome(settings, version, stored_card, stored, metrics, report)


def _check_card_keys(card_path: Path) -> None:
    """A card to import is someone's hand-written file, not another release's output: a key
    the card does not know is a typo (`"outputs": "probabilities"` would otherwise import the
    model as one giving logits), so it is refused here, where bins read cards leniently."""
    try:
        ModelCard.model_validate_json(card_path.read_bytes())
    except ValidationError as exc:
        raise ModelLoadError(f"{card_path}: not a valid model card: {exc}") from exc


def announced_dataset(card: ModelCard) -> tuple[str, int]:
    """The dataset name and version training.completed carries for the card: the card's own,
    or EXTERNAL_DATASET v1 when it names none or one no event can carry (`binloop train`
    once recorded its source's full path there, of any length)."""
    if card.dataset_name is None or not fits(Name, card.dataset_name):
        return EXTERNAL_DATASET, 1
    version = card.dataset_version
    return card.dataset_name, version if version is not None and version >= 1 else 1


def _outcome(
    settings: TrainerSettings,
    version: int,
    card: ModelCard,
    stored: StoredModel,
    metrics: ModelMetrics,
    report: EvalReport,
) -> TrainingOutcome:
    dataset_name, dataset_version = announced_dataset(card)
    return TrainingOutcome(
        model_name=settings.model_name,
        version=version,
        parent_version=None,
        dataset_name=dataset_name,
        dataset_version=dataset_version,
        card=card,
        artifact=stored.artifact,
        card_ref=stored.card,
        confusion_ref=stored.confusion,
        metrics=metrics,
        report=report,
        # What its own exporter measured; binloop has no torch module to compare with.
        parity_max_abs_diff=card.onnx_parity_max_abs_diff or 0.0,
        train_seconds=0.0,
        skipped={},
    )
