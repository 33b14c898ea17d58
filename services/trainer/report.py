"""Human-readable training outputs: the confusion matrix and the learning curve as PNGs."""

from __future__ import annotations

import io
from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from services.trainer.evaluate import EvalReport
from services.trainer.train import EpochStats


def confusion_png(report: EvalReport, title: str) -> bytes:
    """Rows are the truth, columns the prediction; each cell shows its count."""
    n = len(report.labels)
    # A Figure without pyplot: no global backend state, safe in a worker thread.
    figure = Figure(figsize=(1.2 + 0.7 * n, 1.0 + 0.7 * n), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.imshow(report.confusion, cmap="Blues")
    axes.set_xticks(range(n), report.labels, rotation=45, ha="right")
    axes.set_yticks(range(n), report.labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(f"{title}\naccuracy {report.accuracy:.3f}, macro F1 {report.macro_f1:.3f}")
    threshold = report.confusion.max() / 2
    for i in range(n):
        for j in range(n):
            count = int(report.confusion[i, j])
            colour = "white" if count > threshold else "black"
            axes.text(j, i, str(count), ha="center", va="center", color=colour, fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def learning_curve_png(history: Sequence[EpochStats], best_epoch: int, title: str) -> bytes:
    """Train and val loss (left axis) and val accuracy (right axis) per epoch; the kept epoch
    is marked."""
    epochs = [stats.epoch for stats in history]
    figure = Figure(figsize=(7.0, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes = figure.add_subplot()
    loss_axes.plot(epochs, [s.train_loss for s in history], label="train loss", color="tab:blue")
    val = [
        (s.epoch, s.val_loss, s.val_accuracy)
        for s in history
        if s.val_loss is not None and s.val_accuracy is not None
    ]
    if val:
        loss_axes.plot(
            [e for e, _, _ in val], [v for _, v, _ in val], label="val loss", color="tab:orange"
        )
        accuracy_axes = loss_axes.twinx()
        accuracy_axes.plot(
            [e for e, _, _ in val], [a for _, _, a in val], label="val accuracy", color="tab:green"
        )
        accuracy_axes.set_ylabel("val accuracy")
        accuracy_axes.set_ylim(0, 1)
        accuracy_axes.legend(loc="upper right")
    loss_axes.axvline(best_epoch, color="grey", linestyle="--", linewidth=1)
    loss_axes.set_xlabel(f"epoch (kept: {best_epoch})")
    loss_axes.set_ylabel("loss")
    loss_axes.legend(loc="upper left")
    loss_axes.set_title(title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
