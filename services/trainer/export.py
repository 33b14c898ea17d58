"""ONNX export with a dynamic batch axis, and the check that onnxruntime computes what torch
computed: a model whose exported graph disagrees is never shipped.

A network that exposes its pooled features (services.trainer.nets.ExposesEmbedding) is exported
with a second output, "embedding", so the edge gets probabilities and the feature vector the
sampler's diversity strategy needs from one pass."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from binloop.errors import PermanentError
from binloop.ml.backend import EMBEDDING_OUTPUT
from binloop.ml.preprocess import FloatArray
from services.trainer.nets import ExposesEmbedding, WithEmbedding

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
EMBEDDING_NAME = EMBEDDING_OUTPUT
OPSET = 17


class ParityError(PermanentError):
    """The exported graph's outputs differ from torch's by more than the tolerance."""


def export_onnx(
    model: nn.Module, input_size: tuple[int, int], *, fixed_batch: int | None = None
) -> bytes:
    """The model (eval mode, CPU) as ONNX bytes: input N x 3 x H x W float32, outputs N x C
    logits and, when the network exposes one, its N x D embedding. N is a dynamic axis, or
    exactly `fixed_batch` (what TensorRT and some NPUs build their fastest engines from)."""
    model = model.cpu().eval()
    traced: nn.Module = model
    output_names = [OUTPUT_NAME]
    if isinstance(model, ExposesEmbedding):
        traced = WithEmbedding(model).eval()
        output_names.append(EMBEDDING_NAME)
    height, width = input_size
    example = torch.zeros(fixed_batch or 1, 3, height, width)
    dynamic_axes = (
        None
        if fixed_batch is not None
        else {name: {0: "batch"} for name in (INPUT_NAME, *output_names)}
    )
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        path = Path(folder) / "model.onnx"
        # The TorchScript exporter is chosen on purpose (small static CNN, no onnxscript
        # needed, byte-stable output); its deprecation notice is not news to us.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            traced,
            (example,),
            path,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
        )
        return path.read_bytes()


def onnx_session(
    onnx_bytes: bytes, threads: int = 1, *, optimized: bool = True
) -> ort.InferenceSession:
    """`optimized=False` turns onnxruntime's graph optimisations off: a quantized (QDQ) graph
    is then computed in float exactly as written, not in the fused integer kernels of this
    CPU."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])


def _onnx_output(
    session: ort.InferenceSession, output: str, inputs: FloatArray, batch_size: int
) -> FloatArray:
    chunks = [
        session.run([output], {INPUT_NAME: inputs[i : i + batch_size]})[0]
        for i in range(0, len(inputs), batch_size)
    ]
    stacked: FloatArray = np.concatenate(chunks).astype(np.float32)
    return stacked


def onnx_logits(
    session: ort.InferenceSession, inputs: FloatArray, batch_size: int = 256
) -> FloatArray:
    return _onnx_output(session, OUTPUT_NAME, inputs, batch_size)


def has_embedding(session: ort.InferenceSession) -> bool:
    return any(output.name == EMBEDDING_NAME for output in session.get_outputs())


def onnx_embeddings(
    session: ort.InferenceSession, inputs: FloatArray, batch_size: int = 256
) -> FloatArray | None:
    """N x D embeddings, or None when the graph has no embedding output."""
    if not has_embedding(session):
        return None
    return _onnx_output(session, EMBEDDING_NAME, inputs, batch_size)


def _parity_inputs(batch: FloatArray) -> torch.Tensor:
    if len(batch) < 2:
        raise ValueError("parity needs a batch of at least two inputs")
    return torch.from_numpy(batch)


def parity_max_abs_diff(
    model: nn.Module, session: ort.InferenceSession, batch: FloatArray
) -> float:
    """Largest |onnxruntime - torch| over the logits of `batch` (at least two items, so the
    dynamic batch axis is exercised)."""
    inputs = _parity_inputs(batch)
    with torch.no_grad():
        expected = model.cpu().eval()(inputs).numpy()
    actual = onnx_logits(session, batch)
    return float(np.abs(actual - expected).max())


def embedding_parity_max_abs_diff(
    model: nn.Module, session: ort.InferenceSession, batch: FloatArray
) -> float | None:
    """Largest |onnxruntime - torch| over the embeddings of `batch`; None when the model or the
    graph has none. A graph that lost the embedding a model exposes is a parity failure."""
    if not isinstance(model, ExposesEmbedding):
        return None
    actual = onnx_embeddings(session, batch)
    if actual is None:
        raise ParityError(
            f"the model exposes an embedding, the ONNX graph has no {EMBEDDING_NAME!r}"
        )
    inputs = _parity_inputs(batch)
    model.cpu().eval()
    with torch.no_grad():
        _, expected = model.logits_and_embedding(inputs)
    return float(np.abs(actual - expected.numpy()).max())


def check_parity(diff: float, tolerance: float, output: str = OUTPUT_NAME) -> None:
    if not diff <= tolerance:  # also catches NaN
        raise ParityError(
            f"onnxruntime and torch disagree by {diff:.3g} on the {output} "
            f"(tolerance {tolerance:.3g}); the export is not trustworthy"
        )
