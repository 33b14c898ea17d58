"""The envelope every event shares, and the content-addressed reference to a stored blob."""

from __future__ import annotations

import functools
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
BinId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
"""A bin id is also a NATS subject token, so it may not hold dots, spaces or wildcards."""
Name = Annotated[str, StringConstraints(min_length=1, max_length=128)]


def utc_now() -> datetime:
    return datetime.now(UTC)


class Frozen(BaseModel):
    """Immutable, strict about unknown keys and non-finite numbers (JSON's NaN and Infinity
    literals, which Python's parser accepts): garbage is rejected, not silently dropped.
    Unknown keys are refused where a model is built or written (a producer's typo fails
    there); what another release wrote is read with `read_json`, which ignores them."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


@functools.cache
def _adapter(kind: Any) -> TypeAdapter[Any]:
    return TypeAdapter(kind)


def fits(kind: Any, value: object) -> bool:
    """Whether `value` passes a field type of the schemas (Name, Label, ...): for checking a
    value before it goes into an event, where failing later would cost more."""
    try:
        _adapter(kind).validate_python(value)
    except ValidationError:
        return False
    return True


FrozenT = TypeVar("FrozenT", bound=Frozen)


def read_json(model: type[FrozenT], data: str | bytes | bytearray | dict[str, Any]) -> FrozenT:
    """`data` (JSON, or JSON already parsed) as a `model` that another process, of this
    release or a newer one, wrote: an event off the bus or from a recording, a model card, a
    dataset manifest. Keys the model does not know, at any
    depth, are ignored: a newer producer may add optional fields within a major version, and
    a consumer still on the older release must read its events (bins upgrade later than the
    cloud, and the cloud cannot wait for every bin). Everything the model does know is checked
    as strictly as ever: a wrong type, a missing field or a non-finite number is refused."""
    if isinstance(data, dict):
        return model.model_validate(data, extra="ignore")
    return model.model_validate_json(data, extra="ignore")


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
