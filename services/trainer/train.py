"""The training loop: seeded and deterministic, light augmentation on whole batches, a
class-weighted loss for imbalanced snapshots, and model selection on the validation split."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader

from services.trainer.data import ManifestDataset

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 24
    patience: int = 8
    batch_size: int = 16
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    min_val_items: int = 20
    """Below this many validation items their accuracy is mostly noise: keep the last epoch."""
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    flip_probability: float = 0.5
    brightness: float = 0.1
    """Brightness shift drawn from [-b, b], on the [0, 1] pixel scale."""
    contrast: float = 0.1
    """Contrast factor drawn from [1 - c, 1 + c]."""


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    train_loss: float
    val_accuracy: float | None
    val_loss: float | None


@dataclass
class TrainResult:
    model: nn.Module
    """The selected weights, in eval mode, on the CPU."""
    best_epoch: int
    history: list[EpochStats] = field(default_factory=list)

    @property
    def best_val_accuracy(self) -> float | None:
        return self.history[self.best_epoch - 1].val_accuracy


def class_weights(counts: torch.Tensor) -> torch.Tensor:
    """'Balanced' weights total / (classes present * count); 0 for a class with no items."""
    counts = counts.to(torch.float32)
    present = int((counts > 0).sum())
    weights = torch.zeros_like(counts)
    mask = counts > 0
    weights[mask] = counts.sum() / (present * counts[mask])
    return weights


class Augmenter:
    """Horizontal flip and brightness/contrast jitter, applied in [0, 1] pixel space to a
    normalised batch so the network still sees exactly the card's preprocessing."""

    def __init__(self, config: TrainConfig, generator: torch.Generator) -> None:
        self.config = config
        self.generator = generator
        self.mean = torch.tensor(config.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(config.std).view(1, 3, 1, 1)

    def _uniform(self, n: int, low: float, high: float) -> torch.Tensor:
        return torch.rand(n, 1, 1, 1, generator=self.generator) * (high - low) + low

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        n = batch.shape[0]
        flip = torch.rand(n, generator=self.generator) < self.config.flip_probability
        batch = torch.where(flip.view(n, 1, 1, 1), batch.flip(-1), batch)
        pixels = batch * self.std + self.mean
        grey = pixels.mean(dim=(1, 2, 3), keepdim=True)
        contrast = self._uniform(n, 1 - self.config.contrast, 1 + self.config.contrast)
        brightness = self._uniform(n, -self.config.brightness, self.config.brightness)
        pixels = ((pixels - grey) * contrast + grey + brightness).clamp(0.0, 1.0)
        return (pixels - self.mean) / self.std


@torch.no_grad()
def predict_logits(model: nn.Module, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    chunks = [
        model(inputs[i : i + batch_size].to(device)).cpu()
        for i in range(0, len(inputs), batch_size)
    ]
    return torch.cat(chunks) if chunks else torch.zeros(0)


def _validate(model: nn.Module, data: ManifestDataset) -> tuple[float, float]:
    logits = predict_logits(model, data.inputs)
    loss = float(nn.functional.cross_entropy(logits, data.targets))
    accuracy = float((logits.argmax(dim=1) == data.targets).float().mean())
    return accuracy, loss


def train_classifier(
    build_model: Callable[[], nn.Module],
    train_data: ManifestDataset,
    val_data: ManifestDataset | None,
    config: TrainConfig,
    device: str = "cpu",
) -> TrainResult:
    """Trains a fresh model. The same seed, data and config give the same weights (on CPU).

    With at least `min_val_items` validation items the weights of the best epoch (val accuracy,
    then val loss) are kept and training stops after `patience` epochs without progress;
    otherwise the last epoch wins (its val metrics are still recorded).
    """
    if len(train_data) == 0:
        raise ValueError("no training items")
    # fork_rng keeps our seeding from leaking into (or depending on) the rest of the process.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model().to(device)
        shuffle = torch.Generator().manual_seed(config.seed)
        augment = Augmenter(config, torch.Generator().manual_seed(config.seed + 1))
        loader = DataLoader(
            train_data, batch_size=config.batch_size, shuffle=True, generator=shuffle
        )
        weights = class_weights(train_data.class_counts()).to(device)
        criterion = nn.CrossEntropyLoss(weight=weights)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=config.learning_rate,
            total_steps=config.epochs * math.ceil(len(train_data) / config.batch_size),
        )
        select_on_val = val_data is not None and len(val_data) >= config.min_val_items
        history: list[EpochStats] = []
        best_score: tuple[float, float] | None = None
        best_state = copy.deepcopy(model.state_dict())
        best_epoch = 1
        for epoch in range(1, config.epochs + 1):
            model.train()
            total_loss = 0.0
            for inputs, targets in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = criterion(model(augment(inputs).to(device)), targets.to(device))
                loss.backward()
                optimizer.step()
                scheduler.step()
                total_loss += loss.item() * len(targets)
            val_accuracy = val_loss = None
            if val_data is not None and len(val_data) > 0:
                val_accuracy, val_loss = _validate(model, val_data)
            history.append(EpochStats(epoch, total_loss / len(train_data), val_accuracy, val_loss))
            if not select_on_val or val_accuracy is None or val_loss is None:
                best_state, best_epoch = model.state_dict(), epoch
                continue
            score = (val_accuracy, -val_loss)
            if best_score is None or score > best_score:
                best_score, best_state, best_epoch = score, copy.deepcopy(model.state_dict()), epoch
            elif epoch - best_epoch >= config.patience:
                log.info("early stop after epoch %d; best was epoch %d", epoch, best_epoch)
                break
    model.load_state_dict(best_state)
    model.cpu().eval()
    return TrainResult(model=model, best_epoch=best_epoch, history=history)
