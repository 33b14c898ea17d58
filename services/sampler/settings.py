"""Settings of the sampler service. What it samples by (strategies, weights, dedup, rate
limits) is the sampling policy, a YAML file: see services/sampler/policy.py."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from binloop.settings import ServiceSettings


class SamplerSettings(ServiceSettings):
    policy_file: Path | None = Field(
        default=None,
        description="YAML sampling policy (services/sampler/policy.example.yaml); "
        "none: the built-in defaults",
    )
    remember_selected: int = Field(
        default=100_000,
        ge=1,
        le=1_000_000,
        description="Selected frames remembered so one frame is not picked twice per model "
        "(about 0.5 KiB each, 1 KiB with the longest reasons)",
    )
    name_results: bool = Field(
        default=False,
        description="Fill samples.selected's source_event_id (the result a frame was selected "
        "from), so a result redelivered after a restart is not counted as a repeat. Consumers "
        "of releases before the field refuse it (dead letters on the labeling bridge and every "
        "bin's uploader): turn it on once all of them run a release that reads it",
    )
    batch_size: int = Field(
        default=256, ge=1, le=4096, description="Inference results taken off the bus per pass"
    )
    batch_max_wait_s: float = Field(
        default=0.2, gt=0, le=10, description="Longest wait to fill a batch"
    )
