"""The envelope every event shares, and the content-addressed reference to a stored blob."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
BinId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
"""A bin id is also a NATS subject token, so it may not hold dots, spaces or wildcards."""
Name = Annotated[str, StringConstraints(min_length=1, max_length=128)]


def utc_now() -> datetime:
    return datetime.now(UTC)


class Frozen(BaseModel):
    """Immutable, strict about unknown keys and non-finite numbers (JSON's NaN and Infinity
    literals, which Python's parser accepts): garbage is rejected, not silently dropped."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class Event(Frozen):
    """Fields every event carries. `event_id` is also sent as `Nats-Msg-Id` for dedup."""

    schema_version: Literal[1] = Field(
        default=1, description="Major version of the payload; a new major is a new subject."
    )
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    occurred_at: AwareDatetime = Field(default_factory=utc_now)
    producer: Name = Field(description="Service (and instance) that emitted the event.")


class BlobRef(Frozen):
    """Where a blob lives and what it must hash to. Bytes never travel in events."""

    key: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    uri: Annotated[str, StringConstraints(min_length=1, max_length=2048)] = Field(
        description="file:///... or s3://bucket/key"
    )
    sha256: Sha256
    size: int = Field(ge=0)
    content_type: str = "application/octet-stream"
