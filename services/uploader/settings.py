"""Settings of the uploader service."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from binloop.settings import ServiceSettings

SpoolFullPolicy = Literal["drop_oldest", "drop_newest"]


class UploaderSettings(ServiceSettings):
    bin_id: str = Field(default="bin-1", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    spool_root: Path = Field(
        default=Path(".binloop/spool"), description="Edge spool the frame-ingestor writes to"
    )
    spool_retention_s: float = Field(
        default=120.0,
        ge=0,
        le=30 * 24 * 3600,
        description="How long an uploaded frame stays in the spool (the edge-inferencer reads "
        "frames from there too) before the sweep deletes it",
    )
    sweep_interval_s: float = Field(
        default=10.0, gt=0, le=3600, description="How often the spool is swept and measured"
    )
    spool_max_pending_frames: int = Field(
        default=20_000,
        ge=1,
        le=10_000_000,
        description="Most frames waiting for the object store; past it the spool-full policy "
        "drops frames",
    )
    spool_max_pending_bytes: int = Field(
        default=2 * 1024**3,
        ge=1024,
        le=2**50,
        description="Most bytes of frames waiting for the object store; past it the spool-full "
        "policy drops frames",
    )
    spool_full_policy: SpoolFullPolicy = Field(
        default="drop_oldest",
        description="Which waiting frames go when the spool is full: drop_oldest keeps the "
        "recent past, drop_newest keeps the start of the outage. Frames the sampler selected "
        "are never dropped",
    )
    spool_drop_min_age_s: float = Field(
        default=30.0,
        ge=0,
        le=24 * 3600,
        description="A frame spooled more recently than this is never dropped, so the "
        "edge-inferencer can still read it",
    )
    retry_initial_s: float = Field(
        default=0.5, gt=0, le=600, description="Wait after the first failed upload"
    )
    retry_max_s: float = Field(
        default=60.0, gt=0, le=3600, description="Longest wait between upload attempts"
    )
    retry_jitter: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Fraction of each wait that is random (0: none, 1: full jitter), so a "
        "fleet of bins does not retry in step when the store comes back",
    )
    retry_set_aside_after: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="Failed attempts in a row after which a frame failing on its own account "
        "(its spool file, marker or queue entry; not the object store) is set aside behind the "
        "other waiting frames, so it does not block them; it keeps being retried",
    )
    store_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="Connect and read timeout of one S3 request; the uploader's backoff, not "
        "the HTTP client, retries",
    )

    @model_validator(mode="after")
    def _retry_bounds(self) -> UploaderSettings:
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError(
                f"retry_max_s ({self.retry_max_s}) is below retry_initial_s "
                f"({self.retry_initial_s})"
            )
        return self

    @model_validator(mode="after")
    def _drop_age_covers_a_sweep(self) -> UploaderSettings:
        # The sweep learns which frames the edge-inferencer has read; a frame captured after
        # it is kept from the spool-full policy only by its age until the next sweep.
        if self.spool_drop_min_age_s < self.sweep_interval_s:
            raise ValueError(
                f"spool_drop_min_age_s ({self.spool_drop_min_age_s}) is below "
                f"sweep_interval_s ({self.sweep_interval_s}): a full spool could drop a frame "
                "captured since the last sweep before the edge-inferencer reads it"
            )
        return self
