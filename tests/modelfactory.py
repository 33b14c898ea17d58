"""Test helper: a small random-weight CNN classifier exported to ONNX, with its model card.

The weights depend only on (classes, seed), so a test can rebuild the same torch module with
`build_torch_model` and compare it with what the ONNX file computes.
"""

from __future__ import annotations

import warnings
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from binloop.ml.card import ModelCard

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TinyClassifier(nn.Module):
    """Two strided convolutions, global average pooling and a linear head: logits out."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_torch_model(classes: list[str], seed: int = 0) -> TinyClassifier:
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = TinyClassifier(len(classes))
        # Default init gives near-uniform outputs; wider weights make the classes distinct.
        with torch.no_grad():
            model.head.weight.mul_(8.0)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()


def make_card(
    classes: list[str],
    *,
    name: str = "tiny-cnn",
    version: int = 1,
    input_size: tuple[int, int] = (64, 64),
    parameters: int = 0,
) -> ModelCard:
    return ModelCard(
        name=name,
        version=version,
        architecture="tiny-cnn",
        classes=list(classes),
        input_size=input_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        output="logits",
        parameters=parameters,
        parent_version=version - 1 if version > 1 else None,
        created_at=datetime.now(UTC),
        notes="random weights, built by tests/modelfactory.py",
    )


def make_onnx_model(
    directory: Path,
    classes: list[str],
    input_size: tuple[int, int] = (64, 64),
    version: int = 1,
    seed: int = 0,
    *,
    name: str = "tiny-cnn",
) -> tuple[Path, Path]:
    """Writes `<directory>/model.onnx` and `<directory>/model.card.json`; returns both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    model = build_torch_model(classes, seed)
    onnx_path = directory / "model.onnx"
    card_path = directory / "model.card.json"
    example = torch.zeros(1, 3, *input_size)
    with warnings.catch_warnings():
        # The TorchScript exporter announces its own deprecation; it is the one that needs no
        # onnxscript, which is why these tests use it.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(onnx_path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    parameters = sum(p.numel() for p in model.parameters())
    card = make_card(
        classes, name=name, version=version, input_size=input_size, parameters=parameters
    )
    card.write(card_path)
    return onnx_path, card_path
