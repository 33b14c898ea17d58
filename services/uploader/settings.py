"""Settings of the uploader service."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from binloop.settings import ServiceSettings


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
