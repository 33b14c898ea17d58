"""Settings every service shares. Each service adds its own in its folder's settings.py."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """Read from BINLOOP_* environment variables; unknown keys are an error, not a typo lost."""

    model_config = SettingsConfigDict(env_prefix="BINLOOP_", extra="forbid", frozen=True)

    nats_url: str = Field(default="nats://127.0.0.1:4222", description="NATS server(s)")
    http_port: int = Field(
        default=8000,
        ge=0,
        le=65535,
        description="Port of /metrics, /healthz and /readyz; 0 picks a free one.",
    )
    http_host: str = Field(default="0.0.0.0", description="Interface the health server binds")
    blob_root: Path = Field(
        default=Path(".binloop/blobs"), description="Local object-store folder (embedded default)"
    )
    blob_backend: Literal["local", "s3"] = Field(
        default="local", description="Object store: the local folder blob_root, or S3/MinIO"
    )
    s3_endpoint: str = Field(
        default="127.0.0.1:9000", description="S3/MinIO host:port, without a scheme"
    )
    s3_bucket: str = Field(
        default="binloop",
        min_length=3,
        max_length=63,
        pattern=r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$",
        description="Bucket for every blob; created if missing",
    )
    s3_access_key: str = Field(default="minioadmin", description="S3 access key id")
    s3_secret_key: SecretStr = Field(
        default=SecretStr("minioadmin"), description="S3 secret key (never logged)"
    )
    s3_secure: bool = Field(default=False, description="Talk to the S3 endpoint over TLS")
    s3_public_url: str = Field(
        default="",
        pattern=r"^(https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?)?$",
        description="Base URL (scheme://host[:port]) that browsers reach the store at, when it "
        "differs from s3_endpoint (an in-cluster name such as minio:9000); presigned URLs are "
        "signed for it, so the proxy in front must pass the Host header through. Empty: "
        "s3_endpoint",
    )
    s3_region: str = Field(
        default="us-east-1", description="S3 region (saves a bucket-location lookup)"
    )
    max_deliveries: int = Field(
        default=5,
        ge=1,
        le=100,
        description="Failures (not not-ready retries), or deaths of the process handling it "
        "(plus one), after which a message is dead-lettered",
    )
    max_stops: int = Field(
        default=8,
        ge=1,
        le=1000,
        description="Stops of its service (SIGTERM: a deploy, a node drain, a Job's "
        "activeDeadlineSeconds) that the handling of one message may be cancelled by, counted "
        "from its second delivery; at the next it is dead-lettered (StoppedHandlingError) "
        "instead of naked again. Above max_deliveries because a stop is mostly innocent: every "
        "rollout or drain cancels whatever is in flight, but an innocent message meets one "
        "stop per rollout, so 8 in a row happen only to one that causes them (a training "
        "longer than the trainer's 6 h deadline). Not much above: each such stop costs a whole "
        "run, up to 6 h of the trainer's GPU with its other work waiting behind it",
    )
    retry_delay_s: float = Field(default=2.0, gt=0, le=3600, description="Delay before a retry")
    stream_replicas: int = Field(
        default=1,
        ge=1,
        le=5,
        description="Copies JetStream keeps of each stream and of the registry's bucket, one "
        "per server: 1 on a single server (embedded, a bin, compose), 3 on the k8s hub's "
        "3-server cluster. A stream that already has more keeps them",
    )
    instance: str = Field(
        default="",
        pattern=r"^[A-Za-z0-9_-]{0,64}$",
        description="Instance suffix for the producer name (a pod or host name)",
    )
    heartbeat_interval_s: float = Field(
        default=15.0, gt=0, le=3600, description="How often a bin's services say they are alive"
    )
