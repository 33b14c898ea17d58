"""Networks the trainer can build, by name. Small enough to train on a CPU in seconds and to
run on the bin's edge device at camera rate."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        # No conv bias: BatchNorm's shift makes it redundant.
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class CompactCNN(nn.Module):
    """Stride-2 conv-BN-ReLU stages, each followed by a stride-1 one, then global average
    pooling and a linear head. Input N x 3 x H x W (any H, W >= 16), output N x classes logits."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.pool(self.features(x)))
        return logits


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
