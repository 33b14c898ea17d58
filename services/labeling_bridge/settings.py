"""Settings of the labeling-bridge service."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import (
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from binloop.settings import ServiceSettings
from schemas.base import fits
from schemas.events import LABEL_PATTERN, Label
from schemas.taxonomy import Taxonomy
from services.labeling_bridge.snapshots import TaxonomyMigration

DEFAULT_OBJECTS = ["bottle", "can", "cup", "box", "bag", "napkin", "jar", "wrapper", "other"]
DEFAULT_CONDITIONS = ["clean", "soiled", "crushed", "wet"]


def not_labels(values: Iterable[str]) -> list[str]:
    """The values a label record cannot hold as a label, object or condition."""
    return [value for value in values if not fits(Label, value)]


class LabelingBridgeSettings(ServiceSettings):
    backend: Literal["oracle", "label-studio-export", "label-studio"] = Field(
        default="oracle",
        description="oracle: the sample's ground truth is the label (simulation); "
        "label-studio-export: write Label Studio import tasks with pre-annotations; "
        "label-studio: a Label Studio server (tasks in, annotations back by webhook and "
        "reconciliation)",
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
    taxonomy_migrations: list[TaxonomyMigration] = Field(
        default_factory=list,
        description="How labels of an older taxonomy version map onto newer ones (merges and "
        "splits); applied when a dataset version is cut from items of an older taxonomy",
    )
    objects: list[str] = Field(
        default_factory=lambda: list(DEFAULT_OBJECTS),
        max_length=64,
        description="What the item is (cup, bottle, napkin, ...): an optional choice for "
        "annotators, kept in the label record",
    )
    conditions: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CONDITIONS),
        max_length=64,
        description="The item's condition (soiled, crushed, ...): optional, several allowed",
    )

    label_studio_url: str = Field(
        default="http://127.0.0.1:8080", description="Base URL of the Label Studio server"
    )
    label_studio_token: SecretStr = Field(
        default=SecretStr(""),
        description="Label Studio API token (legacy token: Account & Settings > Access Token)",
    )
    label_studio_project: str = Field(
        default="binloop",
        min_length=1,
        max_length=50,
        description="Title of the Label Studio project; created when missing, reused otherwise",
    )
    label_studio_timeout_s: float = Field(
        default=15.0, gt=0, le=600, description="Timeout of one call to Label Studio"
    )
    webhook_secret: SecretStr = Field(
        default=SecretStr(""),
        description="Shared secret Label Studio sends in the webhook header; also signs the "
        "frame URLs tasks carry. Required for the label-studio backend",
    )
    web_host: str = Field(
        default="0.0.0.0", description="Interface of the webhook, frame and ML-backend server"
    )
    web_port: int = Field(
        default=8090,
        ge=0,
        le=65535,
        description="Port of the webhook, frame and ML-backend server; 0 picks a free one",
    )
    public_url: str = Field(
        default="",
        description="The bridge's web server as Label Studio reaches it (webhook, ML backend) "
        "and, unless frames_url is set, as browsers load frames; empty: "
        "http://127.0.0.1:<web port>",
    )
    frames_url: str = Field(
        default="",
        description="Base of the frame URLs annotators' browsers load (frame_urls=served), when "
        "they reach the bridge otherwise than Label Studio does (e.g. an Ingress that exposes "
        "only /frames/); empty: public_url",
    )
    frame_urls: Literal["served", "presigned", "uri"] = Field(
        default="served",
        description="served: tasks point at signed frame URLs this bridge serves; presigned: "
        "presigned GET URLs of the S3 store (they expire); uri: the store URI (s3://...), "
        "which a Label Studio S3 storage connection resolves to presigned URLs itself",
    )
    register_ml_backend: bool = Field(
        default=True,
        description="Connect this bridge to the project as its ML backend (live predictions "
        "from the champion model)",
    )
    reconcile_every_s: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="How often to list annotated tasks, catching what webhooks missed",
    )
    reconcile_overlap_s: float = Field(
        default=30.0,
        ge=0,
        le=86_400,
        description="Each reconciliation looks this far before the newest change it saw, "
        "for changes committed out of order",
    )
    model_cache: Path = Field(
        default=Path(".binloop/labeling-bridge/models"),
        description="Where the champion model is cached for the ML backend",
    )

    @field_validator("taxonomy")
    @classmethod
    def _labels_fit_label_records(cls, taxonomy: Taxonomy) -> Taxonomy:
        # Annotators choose from these; a choice a label record cannot hold would dead-letter
        # every annotation that makes it.
        bad = not_labels(taxonomy.labels)
        if bad:
            raise ValueError(
                f"taxonomy {taxonomy.version}: labels must match {LABEL_PATTERN} as a label "
                f"record's do, got {bad}"
            )
        return taxonomy

    @field_validator("objects", "conditions")
    @classmethod
    def _choices_fit_label_records(cls, values: list[str]) -> list[str]:
        bad = not_labels(values)
        if bad:
            raise ValueError(
                f"each must match {LABEL_PATTERN} as a label record's fields do, got {bad}"
            )
        return values

    @model_validator(mode="after")
    def _label_studio_needs_credentials(self) -> LabelingBridgeSettings:
        if self.backend == "label-studio":
            missing = [
                name
                for name, value in (
                    ("label_studio_token", self.label_studio_token),
                    ("webhook_secret", self.webhook_secret),
                )
                if not value.get_secret_value()
            ]
            if missing:
                raise ValueError(f"the label-studio backend needs {' and '.join(missing)}")
        return self
