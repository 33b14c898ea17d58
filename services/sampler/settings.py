"""Settings of the sampler service."""

from __future__ import annotations

from pydantic import Field

from binloop.settings import ServiceSettings


class SamplerSettings(ServiceSettings):
    least_confidence_threshold: float = Field(
        default=0.6,
        ge=0,
        le=1,
        description="Select a frame when the model's top-1 confidence is below this",
    )
    random_fraction: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Baseline random sample among the frames no other strategy picked",
    )
    max_per_bin_per_hour: int = Field(
        default=600,
        ge=1,
        le=1_000_000,
        description="Selections allowed per bin in any one-hour window; the rest are dropped",
    )
    seed: int = Field(default=0, description="Seed of the random baseline's hash")
    remember_selected: int = Field(
        default=100_000,
        ge=1,
        le=10_000_000,
        description="Selected frames remembered so one frame is not picked twice per model",
    )
    batch_size: int = Field(
        default=256, ge=1, le=4096, description="Inference results taken off the bus per pass"
    )
    batch_max_wait_s: float = Field(
        default=0.2, gt=0, le=10, description="Longest wait to fill a batch"
    )
