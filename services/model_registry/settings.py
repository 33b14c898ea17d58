"""Settings of the model-registry service: the promotion rule and where records live."""

from __future__ import annotations

from pydantic import Field

from binloop.settings import ServiceSettings

DEFAULT_KV_BUCKET = "binloop-models"


class RegistrySettings(ServiceSettings):
    model_name: str = Field(
        default="binloop-waste",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="The model whose champion this registry reports and rolls back by default",
    )
    promotion_margin: float = Field(
        default=0.02,
        ge=-1,
        le=1,
        description="Accuracy a candidate must gain over the champion, on the same eval set; "
        "negative lets a candidate that is at most that much worse through (-1: every "
        "candidate measured on the champion's eval set is promoted, e.g. to exercise rollouts)",
    )
    kv_bucket: str = Field(
        default=DEFAULT_KV_BUCKET,
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="JetStream key-value bucket holding version records and champions",
    )
    kv_history: int = Field(
        default=16, ge=1, le=64, description="Revisions the bucket keeps per key (audit trail)"
    )
    fleet_refresh_s: float = Field(
        default=15.0,
        gt=0,
        le=3600,
        description="How often binloop_fleet_serving_bins is recomputed, so bins that went "
        "silent drop out even when no heartbeat arrives at all",
    )
