"""tools/bench_edge.py: the issue-3 verdicts for each graph measured, and the models' labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from binloop.ml.card import ModelCard
from tools.bench_edge import (
    EDGE_PATH,
    INT8_EDGE_PATH,
    INT8_RAW,
    ONNX_RAW,
    TORCH_EAGER,
    BenchModel,
    Measurement,
    distinct_labels,
    verdicts,
)

SHIPPED = Path(__file__).resolve().parents[1] / "binloop" / "ml" / "shipped_model"


def _measure(variant: str, threads: int, milliseconds: float) -> Measurement:
    samples = np.full(100, int(milliseconds * 1e6), dtype=np.int64)
    return Measurement("net", threads, variant, samples)


def test_targets_are_judged_for_the_float_and_the_int8_graph() -> None:
    times = {ONNX_RAW: 6.0, EDGE_PATH: 7.5, TORCH_EAGER: 10.0, INT8_RAW: 2.0, INT8_EDGE_PATH: 4.0}
    measured = [_measure(v, t, ms / t) for t in (1, 2) for v, ms in times.items()]

    found = {v.target: (v.measured, v.holds) for v in verdicts(measured)}

    assert found["edge path fp32 p50 <= 1.3x onnx fp32 session.run p50 (1 thr)"] == (
        "7.50 / 6.00 ms = 1.25x",
        True,
    )
    assert found["edge path int8 p50 <= 1.3x onnx int8 session.run p50 (2 thr)"] == (
        "2.00 / 1.00 ms = 2.00x",
        False,
    )
    assert found["torch eager p50 >= 2x onnx fp32 p50 (1 thr)"][1] is False  # 1.67x
    assert found["torch eager p50 >= 2x onnx int8 p50 (1 thr)"] == ("10.00 / 2.00 ms = 5.00x", True)
    assert found["edge path int8 p99 < 15 ms (1 thr)"] == ("4.00 ms", True)
    assert len(found) == 2 * (2 + 2 + 2)  # two graphs: path ratio and eager x 2 threads, p99 x 2


def test_a_model_without_an_int8_twin_is_judged_on_its_float_graph_only() -> None:
    measured = [_measure(v, 1, 5.0) for v in (ONNX_RAW, EDGE_PATH, TORCH_EAGER)]

    targets = [v.target for v in verdicts(measured)]

    assert len(targets) == 4
    assert not any("int8" in target for target in targets)


def test_two_folders_with_the_same_network_get_their_folder_names(tmp_path: Path) -> None:
    card = ModelCard.read(SHIPPED / "card.json")
    first, second = (
        BenchModel(tmp_path / name, card, tmp_path / name / "model.onnx", None, None)
        for name in ("shipped", "shipped-s8s8")
    )
    small = card.model_copy(update={"input_size": [64, 64]})
    other = BenchModel(tmp_path / "cnn", small, tmp_path / "cnn" / "model.onnx", None, None)

    labels = [m.label for m in distinct_labels([first, second, other])]

    assert labels == [
        "compact-resnet-deep@96x128 (shipped)",
        "compact-resnet-deep@96x128 (shipped-s8s8)",
        "compact-resnet-deep@64x64",
    ]
    same_name = BenchModel(tmp_path / "b" / "shipped", card, first.onnx, None, None)
    tagged = distinct_labels([first, same_name])
    assert [m.label for m in tagged] == [
        f"compact-resnet-deep@96x128 ({tmp_path / 'shipped'})",
        f"compact-resnet-deep@96x128 ({tmp_path / 'b' / 'shipped'})",
    ]
    assert not tagged[0].slug.endswith("_")
