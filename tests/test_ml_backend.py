"""The ONNX backend computes what the torch model computes, and refuses files it cannot serve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from binloop.errors import ModelLoadError, PermanentError
from binloop.ml.backend import InferenceBackend, OnnxBackend
from binloop.ml.card import ModelCard
from binloop.ml.preprocess import Preprocessor, decode_rgb
from services.trainer.export import export_onnx
from services.trainer.nets import CompactCNN, build_model
from tests.modelfactory import build_torch_model, make_card, make_onnx_model

CLASSES = ["cardboard", "glass", "metal", "paper", "plastic", "trash"]
DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "eval"


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_onnx_model(tmp_path_factory.mktemp("model"), CLASSES, input_size=(64, 64), seed=3)


def _torch_probabilities(batch: np.ndarray, seed: int) -> np.ndarray:
    model = build_torch_model(CLASSES, seed)
    with torch.no_grad():
        result: np.ndarray = torch.softmax(model(torch.from_numpy(batch)), dim=-1).numpy()
    return result


def _demo_batch(card: ModelCard, per_class: int = 2) -> np.ndarray:
    preprocess = Preprocessor.from_card(card)
    images = [
        decode_rgb(path.read_bytes())
        for label in CLASSES
        for path in sorted((DEMO / label).glob("*.jpg"))[:per_class]
    ]
    return preprocess.batch(images)


def test_onnx_probabilities_match_torch_on_real_frames(model_files: tuple[Path, Path]) -> None:
    onnx_path, card_path = model_files
    card = ModelCard.read(card_path)
    backend: InferenceBackend = OnnxBackend(onnx_path, card, intra_op_threads=2)
    batch = _demo_batch(card)
    assert batch.shape == (12, 3, 64, 64)

    probs = backend.predict(batch)

    expected = _torch_probabilities(batch, seed=3)
    assert probs.shape == (12, len(CLASSES))
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs, expected, atol=1e-4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert backend.embed(batch) is None
    together, embedding = backend.predict_with_embedding(batch)
    np.testing.assert_array_equal(together, probs)
    assert embedding is None  # this graph has logits only


def test_random_batch_matches_torch_and_batch_size_is_dynamic(
    model_files: tuple[Path, Path],
) -> None:
    onnx_path, card_path = model_files
    backend = OnnxBackend(onnx_path, ModelCard.read(card_path))
    batch = np.random.default_rng(7).normal(size=(5, 3, 64, 64)).astype(np.float32)

    np.testing.assert_allclose(
        backend.predict(batch), _torch_probabilities(batch, seed=3), atol=1e-4
    )
    np.testing.assert_allclose(
        backend.predict(batch[:1]), _torch_probabilities(batch[:1], seed=3), atol=1e-4
    )
    assert backend.providers[-1] == "CPUExecutionProvider"


def test_probability_output_is_passed_through(model_files: tuple[Path, Path]) -> None:
    onnx_path, card_path = model_files
    card = ModelCard.read(card_path).model_copy(update={"output": "probabilities"})
    backend = OnnxBackend(onnx_path, card)
    batch = np.random.default_rng(1).normal(size=(3, 3, 64, 64)).astype(np.float32)

    with torch.no_grad():
        logits = build_torch_model(CLASSES, 3)(torch.from_numpy(batch)).numpy()
    # The card says the graph already emits probabilities, so no softmax is applied on top.
    np.testing.assert_allclose(backend.predict(batch), logits, atol=1e-4)


def test_a_file_that_is_not_onnx_is_a_permanent_load_error(
    tmp_path: Path, model_files: tuple[Path, Path]
) -> None:
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"\x89PNG definitely not a protobuf")
    card = ModelCard.read(model_files[1])

    with pytest.raises(ModelLoadError, match="cannot load ONNX model") as caught:
        OnnxBackend(bogus, card)
    assert isinstance(caught.value, PermanentError)
    assert str(bogus) in str(caught.value)


def test_a_card_that_does_not_match_the_graph_is_rejected(model_files: tuple[Path, Path]) -> None:
    onnx_path, card_path = model_files
    card = ModelCard.read(card_path)

    with pytest.raises(ModelLoadError, match="outputs 6 scores, the card lists 3 classes"):
        OnnxBackend(onnx_path, card.model_copy(update={"classes": ["a", "b", "c"]}))
    with pytest.raises(ModelLoadError, match="input axis 2 is 64, the card says 32"):
        OnnxBackend(onnx_path, card.model_copy(update={"input_size": (32, 64)}))


def test_wrong_input_dtype_is_refused(model_files: tuple[Path, Path]) -> None:
    onnx_path, card_path = model_files
    backend = OnnxBackend(onnx_path, ModelCard.read(card_path))

    with pytest.raises(ValueError, match="NCHW float32"):
        backend.predict(np.zeros((1, 3, 64, 64), dtype=np.float64))  # type: ignore[arg-type]


def test_an_embedding_output_comes_with_the_probabilities_from_one_run(tmp_path: Path) -> None:
    model = build_model("compact-cnn", len(CLASSES)).eval()
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(export_onnx(model, (64, 64)))
    card = make_card(CLASSES)
    backend = OnnxBackend(onnx_path, card)
    batch = _demo_batch(card, per_class=1)

    probabilities, embedding = backend.predict_with_embedding(batch)

    assert isinstance(model, CompactCNN)
    with torch.no_grad():
        logits, features = model.logits_and_embedding(torch.from_numpy(batch))
    np.testing.assert_allclose(probabilities, torch.softmax(logits, -1).numpy(), atol=1e-5)
    assert embedding is not None
    assert embedding.shape == (len(CLASSES), 128)
    np.testing.assert_allclose(embedding, features.numpy(), atol=1e-4)
    np.testing.assert_allclose(probabilities, backend.predict(batch), atol=1e-6)


def test_the_lookup_table_normalisation_equals_the_per_pixel_formula() -> None:
    # Preprocessor normalises with a 256-entry table per channel; it must give exactly
    # (x / 255 - mean) / std worked out in float32, the card's formula, for every value.
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    preprocess = Preprocessor((16, 256), mean, std)
    rgb = np.empty((16, 256, 3), dtype=np.uint8)
    rgb[:] = np.arange(256, dtype=np.uint8)[np.newaxis, :, np.newaxis]  # every value, each channel
    rgb[8:] = rgb[8:, ::-1]
    mean_arr, std_arr = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    scale, shift = 1.0 / (255.0 * std_arr), -mean_arr / std_arr
    expected = (rgb.astype(np.float32) * scale + shift).transpose(2, 0, 1)
    actual = preprocess(rgb)  # same size: no resampling, only the normalisation
    assert actual.dtype == np.float32
    assert actual.shape == (3, 16, 256)
    assert actual.flags.c_contiguous
    np.testing.assert_array_equal(actual, expected)
