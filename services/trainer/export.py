"""ONNX export with a dynamic batch axis, and the check that onnxruntime computes what torch
computed: a model whose exported graph disagrees is never shipped."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from binloop.errors import PermanentError
from binloop.ml.preprocess import FloatArray

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 17


class ParityError(PermanentError):
    """The exported graph's outputs differ from torch's by more than the tolerance."""


def export_onnx(model: nn.Module, input_size: tuple[int, int]) -> bytes:
    """The model (eval mode, CPU) as ONNX bytes: input N x 3 x H x W float32, output N x C."""
    model = model.cpu().eval()
    height, width = input_size
    example = torch.zeros(1, 3, height, width)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        path = Path(folder) / "model.onnx"
        # The TorchScript exporter is chosen on purpose (small static CNN, no onnxscript
        # needed, byte-stable output); its deprecation notice is not news to us.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            path,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
        )
        return path.read_bytes()


def onnx_session(onnx_bytes: bytes, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


def onnx_logits(
    session: ort.InferenceSession, inputs: FloatArray, batch_size: int = 256
) -> FloatArray:
    chunks = [
        session.run([OUTPUT_NAME], {INPUT_NAME: inputs[i : i + batch_size]})[0]
        for i in range(0, len(inputs), batch_size)
    ]
    stacked: FloatArray = np.concatenate(chunks).astype(np.float32)
    return stacked


def parity_max_abs_diff(
    model: nn.Module, session: ort.InferenceSession, batch: FloatArray
) -> float:
    """Largest |onnxruntime - torch| over the logits of `batch` (at least two items, so the
    dynamic batch axis is exercised)."""
    if len(batch) < 2:
        raise ValueError("parity needs a batch of at least two inputs")
    with torch.no_grad():
        expected = model.cpu().eval()(torch.from_numpy(batch)).numpy()
    actual = onnx_logits(session, batch)
    return float(np.abs(actual - expected).max())


def check_parity(diff: float, tolerance: float) -> None:
    if not diff <= tolerance:  # also catches NaN
        raise ParityError(
            f"onnxruntime and torch disagree by {diff:.3g} (tolerance {tolerance:.3g}); "
            "the export is not trustworthy"
        )
