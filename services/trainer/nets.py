"""Networks the trainer can build, by name: our CompactCNN (trains on a CPU in seconds) and
edge-sized torchvision / timm networks. Every one returns logits from `forward` and also
exposes `logits_and_embedding`, so the export gives the edge the pooled features too.

Nothing is downloaded unless `pretrained=True` is asked for explicitly (the library's hub);
`load_weights` reads a local checkpoint instead."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

log = logging.getLogger(__name__)


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


class PooledClassifier(nn.Module):
    """Convolutional `features`, global average pooling (the embedding) and a dropout + linear
    head: the shape of our own networks."""

    def __init__(
        self, features: nn.Module, channels: int, num_classes: int, dropout: float
    ) -> None:
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes)
        )

    def logits_and_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = torch.flatten(self.pool(self.features(x)), 1)
        logits: torch.Tensor = self.head(embedding)
        return logits, embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_and_embedding(x)[0]


class CompactCNN(PooledClassifier):
    """Stride-2 conv-BN-ReLU stages, each followed by a stride-1 one, then global average
    pooling and a linear head. Input N x 3 x H x W (any H, W >= 16), output N x classes logits;
    `logits_and_embedding` also returns the pooled N x widths[-1] features (the embedding)."""

    def __init__(
        self, num_classes: int, widths: Sequence[int] = (16, 32, 64, 128), dropout: float = 0.2
    ) -> None:
        stages: list[nn.Module] = []
        in_channels = 3
        for width in widths:
            stages.append(conv_bn_relu(in_channels, width, stride=2))
            stages.append(conv_bn_relu(width, width, stride=1))
            in_channels = width
        super().__init__(nn.Sequential(*stages), in_channels, num_classes, dropout)


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut: ResNet's basic
    block. The shortcut keeps gradients flowing, which lets a from-scratch network train long
    on a small dataset without collapsing."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_relu(in_channels, out_channels, stride),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.relu(self.body(x) + self.shortcut(x))
        return out


class ResidualCNN(PooledClassifier):
    """A small ResNet: a stride-2 stem, then one stage of residual blocks per width (every
    stage after the first halves the resolution), global average pooling and a linear head.
    `logits_and_embedding` returns the pooled N x widths[-1] features too."""

    def __init__(
        self,
        num_classes: int,
        widths: Sequence[int] = (32, 64, 128, 256),
        blocks: Sequence[int] = (1, 1, 1, 1),
        dropout: float = 0.2,
    ) -> None:
        layers: list[nn.Module] = [conv_bn_relu(3, widths[0], stride=2)]
        in_channels = widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                layers.append(ResidualBlock(in_channels, width, stride))
                in_channels = width
        super().__init__(nn.Sequential(*layers), in_channels, num_classes, dropout)


class WithEmbedding(nn.Module):
    """Wraps a classifier so its forward returns (logits, embedding): the graph the ONNX export
    traces when the edge should get both from one pass. Holds no weights of its own."""

    def __init__(self, model: ExposesEmbedding) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.logits_and_embedding(x)


class TorchvisionClassifier(nn.Module):
    """A torchvision classification network split into its pooled features (the embedding)
    and its head, with the head sized for our classes. `net` keeps torchvision's own layer
    names, so its checkpoints load into `net` unchanged."""

    def __init__(self, name: str, num_classes: int, *, pretrained: bool = False) -> None:
        super().__init__()
        import torchvision.models as tv

        # weights="DEFAULT" is torchvision's hub download: only when a user asks for it.
        net: nn.Module = tv.get_model(name, weights="DEFAULT" if pretrained else None)
        head = _replace_last_linear(net, num_classes)
        self.net = net
        self.head = head

    def logits_and_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.net(x)  # the last linear layer is an Identity inside `net`
        logits: torch.Tensor = self.head(embedding)
        return logits, embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_and_embedding(x)[0]


def _replace_last_linear(net: nn.Module, num_classes: int) -> nn.Module:
    """Swaps the network's final nn.Linear for an Identity and returns a fresh head for it.
    What sits before that linear layer (pooling, MobileNet's hidden layer, dropout) stays in
    the network, so the embedding is what the head reads."""
    last = ""
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if not last:
        raise ValueError(f"{type(net).__name__} has no linear classifier to replace")
    old = net.get_submodule(last)
    assert isinstance(old, nn.Linear)
    parent_name, _, attribute = last.rpartition(".")
    # setattr also works for a Sequential's numbered children: they live in _modules by name.
    setattr(net.get_submodule(parent_name), attribute, nn.Identity())
    return nn.Linear(old.in_features, num_classes)


class TimmClassifier(nn.Module):
    """A timm network: `forward_head(pre_logits=True)` is the embedding."""

    def __init__(self, name: str, num_classes: int, *, pretrained: bool = False) -> None:
        super().__init__()
        import timm

        # pretrained=True downloads from the Hugging Face hub: only when a user asks for it.
        self.net: Any = timm.create_model(name, pretrained=pretrained, num_classes=num_classes)

    def logits_and_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding: torch.Tensor = self.net.forward_head(
            self.net.forward_features(x), pre_logits=True
        )
        logits: torch.Tensor = self.net.get_classifier()(embedding)
        return logits, embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_and_embedding(x)[0]


ModelFactory = Callable[[int, bool], nn.Module]


def _torchvision(name: str) -> ModelFactory:
    return lambda num_classes, pretrained: TorchvisionClassifier(
        name, num_classes, pretrained=pretrained
    )


def _compact(widths: Sequence[int]) -> ModelFactory:
    def build(num_classes: int, pretrained: bool) -> nn.Module:
        if pretrained:
            raise ValueError("compact-cnn has no pretrained weights; train it from scratch")
        return CompactCNN(num_classes, widths=widths)

    return build


def _residual(widths: Sequence[int], blocks: Sequence[int]) -> ModelFactory:
    def build(num_classes: int, pretrained: bool) -> nn.Module:
        if pretrained:
            raise ValueError("compact-resnet has no pretrained weights; train it from scratch")
        return ResidualCNN(num_classes, widths=widths, blocks=blocks)

    return build


ARCHITECTURES: dict[str, ModelFactory] = {
    "compact-cnn": _compact((16, 32, 64, 128)),
    "compact-cnn-narrow": _compact((8, 16, 32, 64)),
    "compact-cnn-wide": _compact((32, 64, 128, 256)),
    "compact-resnet": _residual((32, 64, 128, 256), (1, 1, 1, 1)),
    "compact-resnet-deep": _residual((32, 64, 128, 256), (1, 1, 2, 2)),
    "compact-resnet-wide": _residual((40, 80, 160, 320), (1, 1, 2, 2)),
    "mobilenet_v3_small": _torchvision("mobilenet_v3_small"),
    "mobilenet_v3_large": _torchvision("mobilenet_v3_large"),
    "efficientnet_b0": _torchvision("efficientnet_b0"),
    "resnet18": _torchvision("resnet18"),
}
TIMM_PREFIX = "timm:"
"""`timm:<model name>` builds any timm model, e.g. timm:efficientnet_lite0."""


def build_model(architecture: str, num_classes: int, *, pretrained: bool = False) -> nn.Module:
    if architecture.startswith(TIMM_PREFIX):
        return TimmClassifier(
            architecture.removeprefix(TIMM_PREFIX), num_classes, pretrained=pretrained
        )
    try:
        factory = ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(
            f"unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)} "
            f"or {TIMM_PREFIX}<timm model name>"
        ) from None
    return factory(num_classes, pretrained)


def load_weights(model: nn.Module, path: Path) -> list[str]:
    """Loads a local checkpoint (a state dict, a {"model": state dict}, or our checkpoint.pt,
    whose selected weights are taken: the best epoch's, the weight average when there is one)
    into `model`, also into a wrapped library network's `net`. Tensors whose shape differs
    (typically a head for other classes) are left as initialised; returns their names."""
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    state: Mapping[str, torch.Tensor] = loaded.get("best_state", loaded.get("model", loaded))
    target: nn.Module = model
    own = model.state_dict()
    inner = getattr(model, "net", None)
    if not any(key in own for key in state) and isinstance(inner, nn.Module):
        target, own = inner, inner.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ValueError(f"{path}: no tensor in this checkpoint fits {type(model).__name__}")
    left_out = sorted(set(own) - set(usable))
    target.load_state_dict(usable, strict=False)
    if left_out:
        log.warning(
            "%s: %d tensors not loaded (absent or other shape): %s",
            path,
            len(left_out),
            ", ".join(left_out[:5]),
        )
    return left_out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
