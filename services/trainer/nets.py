"""Networks the trainer can build, by name. Small enough to train on a CPU in seconds and to
run on the bin's edge device at camera rate."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class ExposesEmbedding(Protocol):
    """A classifier that can also return the features its linear head reads."""

    def logits_and_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        # No conv bias: BatchNorm's shift makes it redundant.
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class CompactCNN(nn.Module):
    """Stride-2 conv-BN-ReLU stages, each followed by a stride-1 one, then global average
    pooling and a linear head. Input N x 3 x H x W (any H, W >= 16), output N x classes logits;
    `logits_and_embedding` also returns the pooled N x widths[-1] features (the embedding)."""

    def __init__(
        self, num_classes: int, widths: Sequence[int] = (16, 32, 64, 128), dropout: float = 0.2
    ) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        in_channels = 3
        for width in widths:
            stages.append(conv_bn_relu(in_channels, width, stride=2))
            stages.append(conv_bn_relu(width, width, stride=1))
            in_channels = width
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(in_channels, num_classes)
        )

    def logits_and_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = torch.flatten(self.pool(self.features(x)), 1)
        logits: torch.Tensor = self.head(embedding)
        return logits, embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_and_embedding(x)[0]


class WithEmbedding(nn.Module):
    """Wraps a classifier so its forward returns (logits, embedding): the graph the ONNX export
    traces when the edge should get both from one pass. Holds no weights of its own."""

    def __init__(self, model: ExposesEmbedding) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.logits_and_embedding(x)


ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {
    "compact-cnn": CompactCNN,
    "compact-cnn-narrow": lambda num_classes: CompactCNN(num_classes, widths=(8, 16, 32, 64)),
}


def build_model(architecture: str, num_classes: int) -> nn.Module:
    try:
        factory = ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(
            f"unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)}"
        ) from None
    return factory(num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
