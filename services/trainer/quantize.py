"""Optional INT8 post-training quantization with onnxruntime's static quantizer (QDQ format,
per-channel int8 weights), calibrated on training images; the caller measures what it costs in
accuracy before anyone ships it.

Activations are unsigned (U8S8) by default. On x86, onnxruntime fuses a quantized
convolution into one integer QLinearConv only when its activations are uint8: with int8
activations (S8S8) most convolutions of the shipped network stayed float Convs between
DequantizeLinear and QuantizeLinear, so that graph ran slower than the float one on two
threads, while the U8S8 graph is integer throughout and 3.4x faster than float on one thread
(docs/edge-latency.md, INT8). Choose int8 activations for ARM CPUs, where onnxruntime has
S8S8 kernels.

Weights are 7-bit (`reduce_range`) by default. x86 CPUs without VNNI multiply uint8 by int8 in
pairs summed to 16 bits with saturation: with 8-bit weights a pair can overflow, so the same
graph gives other answers there than on a VNNI CPU (the shipped model: 0.909 test accuracy on
an AVX2 machine against 0.930 on an AVX-512 VNNI one). With 7-bit weights no pair can
(2 x 255 x 64 < 32768): every x86 CPU computes the graph exactly as written, and on the AVX2
machine just as fast. `reduce_range=False` is for CPUs known to have VNNI, or ARM.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from binloop.ml.preprocess import FloatArray
from services.trainer.export import INPUT_NAME

Int8Activations = Literal["uint8", "int8"]
ACTIVATION_TYPES: dict[Int8Activations, QuantType] = {
    "uint8": QuantType.QUInt8,
    "int8": QuantType.QInt8,
}


class _Batches(CalibrationDataReader):  # type: ignore[misc]  # untyped onnxruntime base
    """Feeds the calibration images one at a time (works for fixed and dynamic graphs)."""

    def __init__(self, inputs: FloatArray) -> None:
        self._inputs = inputs
        self._next = 0

    def get_next(self) -> dict[str, FloatArray] | None:
        if self._next >= len(self._inputs):
            return None
        item = self._inputs[self._next : self._next + 1]
        self._next += 1
        return {INPUT_NAME: item}

    def rewind(self) -> None:
        self._next = 0


def calibration_sample(inputs: FloatArray, size: int, seed: int) -> FloatArray:
    """A seeded random subset of the training inputs: the activation ranges to fit."""
    if len(inputs) == 0:
        raise ValueError("INT8 calibration needs at least one training image")
    chosen = np.random.default_rng(seed).permutation(len(inputs))[:size]
    sample: FloatArray = inputs[np.sort(chosen)]
    return sample


def quantize_int8(
    onnx_bytes: bytes,
    calibration: FloatArray,
    *,
    activations: Int8Activations = "uint8",
    reduce_range: bool = True,
) -> bytes:
    """Static INT8 quantization of a float32 graph: int8 weights (per channel; 7-bit with
    `reduce_range`, the default) and 8-bit activations of the given type, ranges from the
    calibration inputs by min/max."""
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "model.onnx"
        prepared = Path(folder) / "model.prep.onnx"
        target = Path(folder) / "model.int8.onnx"
        source.write_bytes(onnx_bytes)
        # Shape inference and graph folding first, as onnxruntime recommends for the quantizer.
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(target),
            _Batches(calibration),
            quant_format=QuantFormat.QDQ,
            activation_type=ACTIVATION_TYPES[activations],
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=reduce_range,
            calibrate_method=CalibrationMethod.MinMax,
        )
        return target.read_bytes()
