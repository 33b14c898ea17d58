"""INT8 twin of a trained ONNX classifier, for latency work on the edge.

    .venv/bin/python tools/quantize_onnx.py binloop/ml/shipped_model runs/shipped \
        --calibration ../shared/datasets/trashnet

Copies `model.onnx` and `card.json` from the source folder into the output folder and writes
`model.int8.onnx` beside them with the trainer's own static quantizer
(services/trainer/quantize.py: QDQ, per-channel int8 weights, uint8 activations unless
`--activations int8`, min/max ranges), calibrated on a seeded sample of the images under
`--calibration`, preprocessed exactly as the card says. The output folder is what
`tools/bench_edge.py --model` reads.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from rich.progress import track

from binloop.ml.card import ModelCard
from binloop.ml.preprocess import Preprocessor
from services.edge_inferencer.models import card_path_for
from services.trainer.quantize import ACTIVATION_TYPES, calibration_sample, quantize_int8

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("source", type=Path, help="folder with model.onnx and its card.json")
    parser.add_argument("out", type=Path, help="folder to write the copy and model.int8.onnx to")
    parser.add_argument("--calibration", type=Path, required=True, help="folder of images")
    parser.add_argument("--images", type=int, default=128, help="calibration images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--activations",
        choices=sorted(ACTIVATION_TYPES),
        default="uint8",
        help="uint8: integer kernels on x86; int8: for ARM CPUs",
    )
    parser.add_argument(
        "--reduce-range", action="store_true", help="7-bit weights, for x86 CPUs without VNNI"
    )
    args = parser.parse_args(argv)

    onnx = args.source / "model.onnx"
    card = ModelCard.read(card_path_for(onnx))
    paths = sorted(p for p in args.calibration.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"no images under {args.calibration}")
    chosen = [paths[i] for i in np.random.default_rng(args.seed).permutation(len(paths))]
    preprocess = Preprocessor.from_card(card)
    calibration = track(chosen[: args.images], "calibrating")
    inputs = np.stack([preprocess.load(p.read_bytes()) for p in calibration])
    args.out.mkdir(parents=True, exist_ok=True)
    if args.out.resolve() != args.source.resolve():
        shutil.copy2(onnx, args.out / "model.onnx")
        source_card = card_path_for(onnx)
        shutil.copy2(source_card, args.out / source_card.name)
    sample = calibration_sample(inputs, args.images, args.seed)
    int8 = quantize_int8(
        onnx.read_bytes(), sample, activations=args.activations, reduce_range=args.reduce_range
    )
    (args.out / "model.int8.onnx").write_bytes(int8)
    print(
        f"wrote {args.out / 'model.int8.onnx'} ({len(sample)} calibration images, "
        f"{args.activations} activations{', 7-bit weights' if args.reduce_range else ''})"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
