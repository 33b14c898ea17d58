"""Classification metrics in plain numpy: accuracy, per-class precision/recall/F1, macro F1,
the confusion matrix, expected calibration error, and the same metrics at the level that
matters to the bin (the compartment)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from schemas.events import ModelMetrics
from schemas.taxonomy import Compartment, Taxonomy

IntMatrix = npt.NDArray[np.int64]


@dataclass(frozen=True)
class EvalReport:
    labels: list[str]
    """Row/column order of `confusion`: the given labels, then any other label seen."""
    confusion: IntMatrix
    """confusion[i, j]: items of true label i predicted as label j."""
    accuracy: float
    macro_f1: float
    per_class_f1: dict[str, float]
    compartment_accuracy: float
    per_class_precision: dict[str, float] = field(default_factory=dict)
    per_class_recall: dict[str, float] = field(default_factory=dict)

    @property
    def items(self) -> int:
        return int(self.confusion.sum())

    def to_metrics(self, eval_set_id: str) -> ModelMetrics:
        return ModelMetrics(
            eval_set_id=eval_set_id,
            eval_items=self.items,
            accuracy=self.accuracy,
            macro_f1=self.macro_f1,
            compartment_accuracy=self.compartment_accuracy,
            per_class_f1=self.per_class_f1,
        )


def confusion_matrix(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]
) -> IntMatrix:
    index = {label: i for i, label in enumerate(labels)}
    matrix = np.zeros((len(labels), len(labels)), dtype=np.int64)
    rows = np.fromiter((index[t] for t in y_true), dtype=np.int64, count=len(y_true))
    cols = np.fromiter((index[p] for p in y_pred), dtype=np.int64, count=len(y_pred))
    np.add.at(matrix, (rows, cols), 1)
    return matrix


FloatVector = npt.NDArray[np.float64]


def _ratio(numerator: FloatVector, denominator: FloatVector) -> FloatVector:
    result: FloatVector = np.divide(
        numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0
    )
    return result


def precision_recall_f1(confusion: IntMatrix) -> tuple[FloatVector, FloatVector, FloatVector]:
    """Per class: precision TP / (TP + FP), recall TP / (TP + FN), F1 = 2 TP / (2 TP + FP + FN);
    each 0 where its denominator is 0."""
    true_positives = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    actual = confusion.sum(axis=1).astype(np.float64)
    return (
        _ratio(true_positives, predicted),
        _ratio(true_positives, actual),
        _ratio(2 * true_positives, predicted + actual),
    )


def f1_from_confusion(confusion: IntMatrix) -> FloatVector:
    """Per-class F1 = 2 TP / (2 TP + FP + FN); 0 for a class never seen nor predicted."""
    return precision_recall_f1(confusion)[2]


def expected_calibration_error(
    probabilities: npt.NDArray[np.floating], targets: npt.NDArray[np.integer], bins: int = 15
) -> float:
    """ECE: the confidence (top probability) is binned into `bins` equal-width bins over
    (0, 1]; the result is sum over bins of (items in bin / N) * |accuracy - mean confidence|."""
    if len(probabilities) == 0:
        raise ValueError("cannot compute a calibration error on no predictions")
    confidence = probabilities.max(axis=1).astype(np.float64)
    correct = (probabilities.argmax(axis=1) == targets).astype(np.float64)
    # Bin b holds confidences in (b / bins, (b + 1) / bins]; 0 joins the first bin.
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins).astype(np.float64)
    gap = np.abs(
        np.bincount(index, weights=correct, minlength=bins)
        - np.bincount(index, weights=confidence, minlength=bins)
    )
    # sum_b (n_b / N) |acc_b - conf_b| == sum_b |sum correct - sum confidence| / N
    return float(gap.sum() / counts.sum())


def evaluate(
    y_true: Sequence[str],
    y_pred: Sequence[str],
    taxonomy: Taxonomy,
    labels: Sequence[str] = (),
) -> EvalReport:
    """Scores predictions against the truth.

    Macro F1 averages over the labels that occur in the truth or the predictions (a model
    class absent from both says nothing about this set); per-class F1 lists those same labels.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    if not y_true:
        raise ValueError("cannot evaluate on an empty set")
    true_compartments = [taxonomy.compartment_for(t).value for t in y_true]
    pred_compartments = [taxonomy.compartment_for(p).value for p in y_pred]
    compartment_hits = sum(
        t == p for t, p in zip(true_compartments, pred_compartments, strict=True)
    )
    return _score(y_true, y_pred, labels, compartment_hits / len(y_true))


def evaluate_compartments(
    y_true: Sequence[str], y_pred: Sequence[str], taxonomy: Taxonomy
) -> EvalReport:
    """The same metrics after mapping every label to its bin compartment (an error between two
    labels of one compartment is no error for the bin)."""
    true_compartments = [taxonomy.compartment_for(t).value for t in y_true]
    pred_compartments = [taxonomy.compartment_for(p).value for p in y_pred]
    order = [c.value for c in Compartment]
    return evaluate(true_compartments, pred_compartments, _compartment_identity(), labels=order)


def _compartment_identity() -> Taxonomy:
    """A taxonomy whose labels are the compartments themselves."""
    return Taxonomy(
        version="compartments",
        label_to_compartment={c.value: c for c in Compartment},
    )


def _score(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str], compartment: float
) -> EvalReport:
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    if not y_true:
        raise ValueError("cannot evaluate on an empty set")
    order = list(dict.fromkeys([*labels, *sorted(set(y_true) | set(y_pred))]))
    confusion = confusion_matrix(y_true, y_pred, order)
    precision, recall, f1 = precision_recall_f1(confusion)
    seen = (confusion.sum(axis=0) + confusion.sum(axis=1)) > 0

    def by_label(values: FloatVector) -> dict[str, float]:
        return {label: float(values[i]) for i, label in enumerate(order) if seen[i]}

    return EvalReport(
        labels=order,
        confusion=confusion,
        accuracy=float(np.trace(confusion) / confusion.sum()),
        macro_f1=float(f1[seen].mean()),
        per_class_f1=by_label(f1),
        compartment_accuracy=compartment,
        per_class_precision=by_label(precision),
        per_class_recall=by_label(recall),
    )
