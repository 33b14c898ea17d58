"""Settings of the labeling-bridge service."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from binloop.settings import ServiceSettings
from schemas.taxonomy import Taxonomy


class LabelingBridgeSettings(ServiceSettings):
    backend: Literal["oracle", "label-studio-export"] = Field(
        default="oracle",
        description="oracle: the sample's ground truth is the label (simulation); "
        "label-studio-export: write Label Studio import tasks with pre-annotations",
    )
    export_dir: Path = Field(
        default=Path(".binloop/label-studio/import"),
        description="Where the label-studio-export backend writes tasks and label_config.xml",
    )
    dataset_name: str = Field(
        default="binloop",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Dataset the labels go into (datasets/<name>/... in the object store)",
    )
    snapshot_every: int = Field(
        default=40,
        ge=1,
        le=1_000_000,
        description="Write a new dataset version once this many labels are not yet in one",
    )
    taxonomy: Taxonomy = Field(
        default_factory=Taxonomy, description="Labels annotators may choose, and compartments"
    )
