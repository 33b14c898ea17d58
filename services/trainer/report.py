"""Human-readable training outputs: the confusion matrix as a PNG."""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from services.trainer.evaluate import EvalReport


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
