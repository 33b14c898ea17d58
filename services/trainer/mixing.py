"""Mixup and CutMix: each training batch is blended with a shuffled copy of itself, and the
loss with the two label sets in the same proportion. Both keep a from-scratch network from
memorising a small dataset; neither changes what the network sees at inference."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MixedBatch:
    inputs: torch.Tensor
    targets: torch.Tensor
    """Labels of the original images."""
    partner_targets: torch.Tensor
    """Labels of the images blended in."""
    share: float
    """How much of each input is the original image (1: unmixed)."""

    def to(self, device: str) -> MixedBatch:
        return MixedBatch(
            self.inputs.to(device, non_blocking=True),
            self.targets.to(device, non_blocking=True),
            self.partner_targets.to(device, non_blocking=True),
            self.share,
        )

    def loss(self, criterion: Criterion, logits: torch.Tensor) -> torch.Tensor:
        """The criterion against both label sets, weighted by their shares of the inputs."""
        own = criterion(logits, self.targets)
        if self.share >= 1.0:
            return own
        return self.share * own + (1 - self.share) * criterion(logits, self.partner_targets)


class BatchMixer:
    """Blends each batch by mixup (alpha > 0), CutMix (alpha > 0) or, with both on, one of the
    two chosen per batch with equal odds. The mixing share is drawn from Beta(alpha, alpha);
    CutMix's share is then the exact fraction of the image left uncovered by the pasted box.
    Random numbers come from a seeded generator whose state a checkpoint saves."""

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, seed: int) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError("mixup and CutMix alphas must be >= 0 (0 switches one off)")
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.rng = np.random.default_rng(seed)

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> MixedBatch:
        if not self.enabled or len(targets) < 2:
            return MixedBatch(inputs, targets, targets, 1.0)
        use_cutmix = self.cutmix_alpha > 0 and (
            self.mixup_alpha == 0 or bool(self.rng.random() < 0.5)
        )
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        share = float(self.rng.beta(alpha, alpha))
        order = torch.from_numpy(self.rng.permutation(len(targets)))
        partner = inputs[order]
        if use_cutmix:
            mixed, share = self._paste_box(inputs, partner, share)
        else:
            mixed = inputs * share + partner * (1 - share)
        return MixedBatch(mixed, targets, targets[order], share)

    def _paste_box(
        self, inputs: torch.Tensor, partner: torch.Tensor, share: float
    ) -> tuple[torch.Tensor, float]:
        height, width = inputs.shape[-2:]
        side = np.sqrt(1.0 - share)
        box_h, box_w = int(height * side), int(width * side)
        centre_y, centre_x = int(self.rng.integers(height)), int(self.rng.integers(width))
        top, bottom = max(centre_y - box_h // 2, 0), min(centre_y + box_h // 2, height)
        left, right = max(centre_x - box_w // 2, 0), min(centre_x + box_w // 2, width)
        mixed = inputs.clone()
        mixed[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
        covered = (bottom - top) * (right - left) / (height * width)
        return mixed, 1.0 - covered

    def state_dict(self) -> dict[str, Any]:
        return dict(self.rng.bit_generator.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state
