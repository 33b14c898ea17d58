"""INT8 twin of a trained ONNX classifier, for latency work on the edge.

    .venv/bin/python tools/quantize_onnx.py binloop/ml/shipped_model runs/shipped \
        --image-folder ../shared/datasets/trashnet

Copies `model.onnx` and `card.json` from the source folder into the output folder and writes
`model.int8.onnx` beside them with the trainer's own static quantizer
(services/trainer/quantize.py: QDQ, per-channel 7-bit weights unless `--no-reduce-range`,
uint8 activations unless `--activations int8`, min/max ranges). The image folder
(<folder>/<class>/<image>) is split as `binloop train` splits it by default (sha256 of the
content; test 0.15, val 0.15; the table says whether that is the card's test split): a seeded
sample of its train split calibrates, and its test split scores the float32 graph, the INT8
graph in this CPU's integer kernels and the INT8 graph as written (onnxruntime's optimisations
off, in float), all preprocessed exactly as the card says. The output folder is what
`tools/bench_edge.py --model` reads.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from binloop.ml.card import ModelCard
from binloop.ml.preprocess import FloatArray, Preprocessor
from services.edge_inferencer.models import card_path_for
from services.trainer.export import onnx_logits, onnx_session
from services.trainer.quantize import ACTIVATION_TYPES, calibration_sample, quantize_int8
from services.trainer.sources import SplitData, SplitRule, image_folder, load_and_split


def score_on_test_split(
    card: ModelCard, data: SplitData, sessions: dict[str, ort.InferenceSession]
) -> tuple[Table, dict[str, FloatArray]]:
    """Accuracy of each session on the test split, how often it agrees with the first, and
    every session's logits."""
    test = data.splits["test"]
    same_split = card.metrics is not None and card.metrics.eval_set_id == data.content_id("test")
    table = Table(
        title=f"Test split: {len(test)} images "
        f"({'the card' if same_split else 'NOT the card'}'s test split)"
    )
    for column in ("graph", "accuracy", "correct", "same class as the first"):
        table.add_column(column, justify="left" if column == "graph" else "right")
    labels = np.array([card.classes.index(label) for label in test.labels])
    logits = {name: onnx_logits(session, test.inputs) for name, session in sessions.items()}
    first = next(iter(logits.values())).argmax(axis=1)
    for name, scores in logits.items():
        predicted = scores.argmax(axis=1)
        hits = int(np.sum(predicted == labels))
        agree = float(np.mean(predicted == first))
        table.add_row(name, f"{hits / len(test):.3f}", f"{hits}/{len(test)}", f"{agree:.1%}")
    return table, logits


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("source", type=Path, help="folder with model.onnx and its card.json")
    parser.add_argument("out", type=Path, help="folder to write the copy and model.int8.onnx to")
    parser.add_argument(
        "--image-folder",
        type=Path,
        required=True,
        help="<folder>/<class>/<image>: its train split calibrates, its test split scores",
    )
    parser.add_argument("--images", type=int, default=128, help="calibration images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--activations",
        choices=sorted(ACTIVATION_TYPES),
        default="uint8",
        help="uint8: integer kernels on x86; int8: for ARM CPUs",
    )
    parser.add_argument(
        "--reduce-range",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="7-bit weights, exact on every x86 CPU (8-bit ones saturate without VNNI)",
    )
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime threads to score")
    args = parser.parse_args(argv)

    onnx = args.source / "model.onnx"
    card = ModelCard.read(card_path_for(onnx))
    preprocess = Preprocessor.from_card(card)
    console = Console()
    try:
        with console.status(f"reading and preprocessing {args.image_folder}"):
            data = load_and_split(image_folder(args.image_folder), preprocess, SplitRule())
    except FileNotFoundError as exc:
        raise SystemExit(str(exc)) from exc
    train = data.splits["train"]
    if not sum(data.counts().values()):
        raise SystemExit(f"no readable images in class folders under {args.image_folder}")
    if len(train) == 0:
        raise SystemExit(f"no train-split images under {args.image_folder}")
    labels = {label for split in data.splits.values() for label in split.labels}
    unknown = sorted(labels - set(card.classes))
    if unknown:
        raise SystemExit(f"classes the model does not have: {', '.join(unknown)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.out.resolve() != args.source.resolve():
        shutil.copy2(onnx, args.out / "model.onnx")
        source_card = card_path_for(onnx)
        shutil.copy2(source_card, args.out / source_card.name)
    sample = calibration_sample(train.inputs, args.images, args.seed)
    float_graph = onnx.read_bytes()
    with console.status(f"quantizing, calibrated on {len(sample)} images"):
        int8 = quantize_int8(
            float_graph, sample, activations=args.activations, reduce_range=args.reduce_range
        )
    (args.out / "model.int8.onnx").write_bytes(int8)
    print(
        f"wrote {args.out / 'model.int8.onnx'} ({len(sample)} train-split calibration images, "
        f"{args.activations} activations, {7 if args.reduce_range else 8}-bit weights)"
    )
    if not len(data.splits["test"]):
        print("no test-split images: nothing scored")
        return
    fused, written = "INT8 on this CPU", "INT8 as written"
    sessions = {
        "float32": onnx_session(float_graph, args.threads),
        fused: onnx_session(int8, args.threads),
        written: onnx_session(int8, args.threads, optimized=False),
    }
    with console.status("scoring the test split"):
        table, logits = score_on_test_split(card, data, sessions)
    console.print(table)
    gap = float(np.abs(logits[fused] - logits[written]).max())
    same = float(np.mean(logits[fused].argmax(axis=1) == logits[written].argmax(axis=1)))
    why = (
        " (with uint8 activations, 7-bit weights keep them within one quantization step on any "
        "x86 CPU; 8-bit ones clip on CPUs without VNNI)"
        if args.activations == "uint8"
        else ""
    )
    console.print(
        f"INT8 on this CPU against the graph as written: largest logit difference {gap:.3f}, "
        f"same class for {same:.1%} of the test images{why}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
