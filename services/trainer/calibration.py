"""Temperature scaling: one scalar T fitted on the validation split so that softmax(logits / T)
gives calibrated confidences (the sampler and the abstain-to-trash rule act on them).

The fitted T is baked into the exported graph (its "logits" output is already divided by T),
so every consumer of the ONNX file gets calibrated probabilities with no extra code; the card's
notes record the value. Dividing by T > 0 never changes the arg-max, so accuracy is unchanged.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from services.trainer.nets import ExposesEmbedding

log = logging.getLogger(__name__)

MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0


def negative_log_likelihood(
    logits: npt.NDArray[np.floating], targets: npt.NDArray[np.integer], temperature: float = 1.0
) -> float:
    """Mean -log softmax(logits / T)[target]."""
    scaled = torch.from_numpy(np.asarray(logits, dtype=np.float64)) / temperature
    return float(nn.functional.cross_entropy(scaled, torch.from_numpy(np.asarray(targets))))


def fit_temperature(
    logits: npt.NDArray[np.floating], targets: npt.NDArray[np.integer], iterations: int = 80
) -> float:
    """The T minimising the NLL of `targets` under softmax(logits / T), within
    [MIN_TEMPERATURE, MAX_TEMPERATURE].

    The NLL is convex in the inverse temperature b = 1 / T (a log-sum-exp of terms linear in
    b minus a linear term), so a golden-section search over b finds the optimum without a
    learning rate to tune, deterministically."""
    if len(logits) == 0:
        raise ValueError("cannot fit a temperature on no predictions")
    values = np.asarray(logits, dtype=np.float64)
    picked = values[np.arange(len(values)), np.asarray(targets)]

    def nll(inverse_t: float) -> float:
        scaled = values * inverse_t
        top = scaled.max(axis=1)
        log_sum = top + np.log(np.exp(scaled - top[:, None]).sum(axis=1))
        return float((log_sum - picked * inverse_t).mean())

    low, high = 1 / MAX_TEMPERATURE, 1 / MIN_TEMPERATURE
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    nll_a, nll_b = nll(a), nll(b)
    for _ in range(iterations):
        if nll_a <= nll_b:
            high, b, nll_b = b, a, nll_a
            a = high - ratio * (high - low)
            nll_a = nll(a)
        else:
            low, a, nll_a = a, b, nll_b
            b = low + ratio * (high - low)
            nll_b = nll(b)
    return 1 / ((low + high) / 2)


def temperature_on_val(
    logits: npt.NDArray[np.floating], targets: npt.NDArray[np.integer], min_items: int
) -> float | None:
    """The temperature fitted on the val split's `logits`, or None (build in no scaling, T = 1)
    (logged) when there are fewer than `min_items` (TrainConfig.min_val_items: the size
    below which val says too little to select an epoch on, or to calibrate on). On a handful
    of items that the model gets right the NLL keeps falling as T shrinks, so T would land on
    the search bound and multiply every logit of the shipped model by 20. A fitted T on a
    bound is warned about too."""
    if len(logits) < max(min_items, 1):
        # Expected for the loop's early, small datasets: information, not a fault.
        log.info(
            "val split of %d items is under min_val_items %d: no temperature scaling (T = 1)",
            len(logits),
            min_items,
        )
        return None
    temperature = fit_temperature(logits, targets)
    for bound in (MIN_TEMPERATURE, MAX_TEMPERATURE):
        if math.isclose(temperature, bound, rel_tol=1e-3):
            log.warning(
                "temperature T=%.4f fitted on %d val items is at the search bound %g: the val "
                "split is too small or too easy to calibrate on",
                temperature,
                len(logits),
                bound,
            )
    return temperature


class TemperatureScaled(nn.Module):
    """`model`'s logits divided by a fixed temperature: the graph the export traces."""

    temperature: torch.Tensor

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.model = model
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(x)
        return logits / self.temperature


class TemperatureScaledWithEmbedding(TemperatureScaled):
    """The same for a network that also exposes its embedding (left unscaled)."""

    def logits_and_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert isinstance(self.model, ExposesEmbedding)
        logits, embedding = self.model.logits_and_embedding(x)
        return logits / self.temperature, embedding


def with_temperature(model: nn.Module, temperature: float) -> TemperatureScaled:
    if isinstance(model, ExposesEmbedding):
        return TemperatureScaledWithEmbedding(model, temperature)
    return TemperatureScaled(model, temperature)
