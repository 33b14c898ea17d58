"""Settings of the edge-inferencer service."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from binloop.ml.shipped import SHIPPED_MODEL
from binloop.settings import ServiceSettings
from schemas.taxonomy import Taxonomy


class EdgeInferencerSettings(ServiceSettings):
    bin_id: str = Field(default="bin-1", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    spool_root: Path = Field(
        default=Path(".binloop/spool"),
        description="The frame spool the ingestor writes; frames are read from here by key",
    )
    model_cache: Path = Field(
        default=Path(".binloop/edge-models"),
        description="Where promoted models are kept, as <name>/v<version>/model.onnx + card, "
        "and current.json naming the one served last (served again after a restart)",
    )
    default_model: Path | None = Field(
        default=SHIPPED_MODEL,
        description="ONNX file served from the first frame until the registry promotes a model, "
        "when model_cache holds no model served before (default: the classifier binloop "
        "ships); its card is <stem>.card.json beside it, else "
        "card.json in the same folder. Empty (BINLOOP_DEFAULT_MODEL=): start with no model and "
        "wait for the first promotion",
    )
    confidence_threshold: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Below this top-1 probability the item goes to the fallback compartment",
    )
    top_k: int = Field(default=3, ge=1, le=16, description="Classes listed in each result")
    intra_op_threads: int = Field(
        default=1, ge=0, le=64, description="onnxruntime intra-op threads (0: it decides)"
    )
    taxonomy: Taxonomy = Field(
        default_factory=Taxonomy, description="Labels and the compartment each one goes to"
    )

    @field_validator("default_model", mode="before")
    @classmethod
    def _empty_means_none(cls, value: object) -> object:
        # An environment variable cannot be null; pydantic would read "" as the path ".".
        return None if isinstance(value, str) and not value.strip() else value
