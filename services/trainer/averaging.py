"""An exponential moving average of the weights: the average of the last few thousand steps
generalises better than the last step of a noisy from-scratch run, and it is what validation,
model selection and export see when it is switched on."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class WeightAverage:
    """avg <- d * avg + (1 - d) * weights after every optimizer step, for parameters and
    batch-norm statistics alike (integer buffers are copied). The decay warms up as
    min(decay, (1 + n) / (10 + n)) over the first updates, so a short run is not dominated
    by its random initialisation."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the average's decay must be in (0, 1), not {decay}")
        self.decay = decay
        self.updates = 0
        self.state = {name: value.detach().clone() for name, value in model.state_dict().items()}

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = self.current_decay()
        for name, value in model.state_dict().items():
            average = self.state[name]
            if average.is_floating_point():
                average.lerp_(value.detach(), 1.0 - decay)
            else:
                average.copy_(value)

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state, "updates": self.updates}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copies into the average's own tensors, so it stays on the model's device whatever
        device the checkpoint was loaded onto."""
        saved: dict[str, torch.Tensor] = state["state"]
        if saved.keys() != self.state.keys():
            raise ValueError("the saved weight average is of another network")
        for name, average in self.state.items():
            average.copy_(saved[name])
        self.updates = state["updates"]
