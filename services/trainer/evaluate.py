"""Classification metrics in plain numpy: accuracy, per-class and macro F1, the confusion
matrix, and accuracy at the level that matters to the bin (the compartment)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from schemas.events import ModelMetrics
from schemas.taxonomy import Taxonomy

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


def f1_from_confusion(confusion: IntMatrix) -> npt.NDArray[np.float64]:
    """Per-class F1 = 2 TP / (2 TP + FP + FN); 0 for a class never seen nor predicted."""
    true_positives = np.diag(confusion).astype(np.float64)
    false_positives = confusion.sum(axis=0) - true_positives
    false_negatives = confusion.sum(axis=1) - true_positives
    denominator = 2 * true_positives + false_positives + false_negatives
    f1: npt.NDArray[np.float64] = np.divide(
        2 * true_positives,
        denominator,
        out=np.zeros_like(true_positives),
        where=denominator > 0,
    )
    return f1


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
    order = list(dict.fromkeys([*labels, *sorted(set(y_true) | set(y_pred))]))
    confusion = confusion_matrix(y_true, y_pred, order)
    f1 = f1_from_confusion(confusion)
    seen = (confusion.sum(axis=0) + confusion.sum(axis=1)) > 0
    true_compartments = [taxonomy.compartment_for(t) for t in y_true]
    pred_compartments = [taxonomy.compartment_for(p) for p in y_pred]
    compartment_hits = sum(
        t == p for t, p in zip(true_compartments, pred_compartments, strict=True)
    )
    return EvalReport(
        labels=order,
        confusion=confusion,
        accuracy=float(np.trace(confusion) / confusion.sum()),
        macro_f1=float(f1[seen].mean()),
        per_class_f1={label: float(f1[i]) for i, label in enumerate(order) if seen[i]},
        compartment_accuracy=compartment_hits / len(y_true),
    )
