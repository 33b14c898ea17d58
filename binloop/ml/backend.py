"""Inference backends: what the edge runs a model with. ONNX Runtime, on CUDA where the installed
build has it and on the CPU otherwise; nothing here loads a TensorRT engine (the engines
edge/tensorrt_engine.py builds are not used by the edge-inferencer, see docs/edge.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from binloop.errors import ModelLoadError
from binloop.ml.card import ModelCard
from binloop.ml.preprocess import FloatArray, softmax

EMBEDDING_OUTPUT = "embedding"
"""An ONNX output with this name, when present, is the model's feature vector."""


class InferenceBackend(Protocol):
    """Runs one model on preprocessed NCHW float32 batches."""

    @property
    def card(self) -> ModelCard: ...

    def predict(self, batch: FloatArray) -> FloatArray:
        """N x 3 x H x W float32 -> N x len(card.classes) probabilities (rows sum to 1)."""
        ...

    def embed(self, batch: FloatArray) -> FloatArray | None:
        """N x D features for diversity sampling, or None when the model exposes none."""
        ...

    def predict_with_embedding(self, batch: FloatArray) -> tuple[FloatArray, FloatArray | None]:
        """`predict` and `embed` from one pass through the model: what the edge calls per frame."""
        ...


def _providers() -> list[str]:
    # CUDA first where this onnxruntime build has it (a GPU node, a Jetson); CPU always last.
    available = set(ort.get_available_providers())
    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in wanted if p in available or p == "CPUExecutionProvider"]


def _static_dim(dim: Any) -> int | None:
    return dim if isinstance(dim, int) else None


class OnnxBackend:
    """An onnxruntime InferenceSession for one ONNX file and its model card."""

    def __init__(self, onnx_path: Path, card: ModelCard, *, intra_op_threads: int = 1) -> None:
        if intra_op_threads < 0:
            raise ValueError(
                f"intra_op_threads must be >= 0 (0: onnxruntime decides), got {intra_op_threads}"
            )
        self._card = card
        self.path = onnx_path
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        # One frame at a time on the edge: parallelism between graph nodes buys nothing.
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(
                str(onnx_path), sess_options=options, providers=_providers()
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise ModelLoadError(f"cannot load ONNX model {onnx_path}: {exc}") from exc
        self.providers: list[str] = list(self._session.get_providers())
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise ModelLoadError(f"{onnx_path}: expected 1 input, the model has {len(inputs)}")
        self._input_name: str = inputs[0].name
        outputs = self._session.get_outputs()
        scores = [o for o in outputs if o.name != EMBEDDING_OUTPUT]
        if not scores:
            raise ModelLoadError(f"{onnx_path}: the model has no output besides the embedding")
        # The class scores are the first other output, wherever the exporter put the embedding.
        self._output_name: str = scores[0].name
        names = {o.name for o in outputs}
        self._embedding_name: str | None = EMBEDDING_OUTPUT if EMBEDDING_OUTPUT in names else None
        self._check_against_card(list(inputs[0].shape), list(scores[0].shape))

    def _check_against_card(self, input_shape: list[Any], output_shape: list[Any]) -> None:
        card = self._card
        if len(input_shape) != 4:
            raise ModelLoadError(f"{self.path}: input must be NCHW, got shape {input_shape}")
        expected = [3, card.input_size[0], card.input_size[1]]
        for axis, (dim, want) in enumerate(zip(input_shape[1:], expected, strict=True), 1):
            actual = _static_dim(dim)
            if actual is not None and actual != want:
                raise ModelLoadError(
                    f"{self.path}: input axis {axis} is {actual}, the card says {want} "
                    f"(input_size {list(card.input_size)})"
                )
        classes = _static_dim(output_shape[-1]) if output_shape else None
        if classes is not None and classes != len(card.classes):
            raise ModelLoadError(
                f"{self.path}: the model outputs {classes} scores, the card lists "
                f"{len(card.classes)} classes"
            )

    @property
    def card(self) -> ModelCard:
        return self._card

    def _run(self, outputs: list[str], batch: FloatArray) -> list[FloatArray]:
        if batch.dtype != np.float32 or batch.ndim != 4:
            raise ValueError(f"expected an NCHW float32 batch, got {batch.dtype} {batch.shape}")
        results = self._session.run(outputs, {self._input_name: batch})
        return [np.asarray(result, dtype=np.float32) for result in results]

    def _probabilities(self, scores: FloatArray) -> FloatArray:
        if self._card.output == "logits":
            return softmax(scores)
        return scores

    def predict(self, batch: FloatArray) -> FloatArray:
        (scores,) = self._run([self._output_name], batch)
        return self._probabilities(scores)

    def embed(self, batch: FloatArray) -> FloatArray | None:
        if self._embedding_name is None:
            return None
        (features,) = self._run([self._embedding_name], batch)
        return features

    def predict_with_embedding(self, batch: FloatArray) -> tuple[FloatArray, FloatArray | None]:
        if self._embedding_name is None:
            return self.predict(batch), None
        # One session.run for both outputs: the embedding is an intermediate of the same pass,
        # so asking for it separately would run the whole network twice per frame.
        scores, features = self._run([self._output_name, self._embedding_name], batch)
        return self._probabilities(scores), features
