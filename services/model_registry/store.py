"""Registry records in a JetStream key-value bucket: one key per model version and one
"champion" key per model, updated with compare-and-set so two writers cannot both win."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from nats.js.api import KeyValueConfig, StorageType
from nats.js.client import JetStreamContext
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NoKeysError,
    NotFoundError,
)
from nats.js.kv import KeyValue

from binloop.errors import TransientError
from schemas.routes import MODELS_PROMOTED
from services.model_registry.core import ChampionRecord, RegistryError, VersionRecord, key_token


class ChampionChangedError(TransientError):
    """Someone else changed the champion since we read it; retry with the new state."""


@dataclass(frozen=True)
class ChampionState:
    record: ChampionRecord | None
    revision: int
    """Revision of the champion key; 0 when there is none yet."""
    epoch: datetime | None
    """When the bucket that counts `revision` was created: a bucket deleted and created again
    counts from the start, so decisions carry both (see binloop.ml.decisions.is_older). Read
    with the revision rather than once at open, so the two come from the same bucket even
    when it is recreated under a running registry (RegistryStore.champion reads it before and
    after the key). None from a server that does not tell."""


@dataclass(frozen=True)
class VersionEntry:
    record: VersionRecord
    revision: int
    """Revision of the version key, for replace_version."""


def version_key(model_name: str, version: int) -> str:
    return f"{key_token(model_name)}.versions.{version:06d}"


CHAMPION_SUFFIX = ".champion"


def champion_key(model_name: str) -> str:
    return f"{key_token(model_name)}{CHAMPION_SUFFIX}"


async def _event_stream_replicas(js: JetStreamContext) -> int:
    try:
        info = await js.stream_info(MODELS_PROMOTED.stream)
    except NotFoundError:
        return 1
    return info.config.num_replicas or 1


class RegistryStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext, bucket: str) -> RegistryStore:
        """An existing registry bucket. Never creates one: a mistyped bucket name must fail
        as such, not read as an empty registry (and leave an empty bucket behind)."""
        try:
            return cls(await js.key_value(bucket))
        except BucketNotFoundError as exc:
            raise RegistryError(
                f"there is no registry bucket {bucket!r} on this NATS server: check "
                "BINLOOP_KV_BUCKET (the model-registry's kv_bucket) and that the "
                "model-registry has run"
            ) from exc

    @classmethod
    async def open_or_create(
        cls, js: JetStreamContext, bucket: str, history: int = 16, replicas: int | None = None
    ) -> RegistryStore:
        """The registry service's bucket, created on its first start.

        `replicas`: copies JetStream keeps of the bucket; None keeps as many as the stream
        of the registry's events (`ensure_streams` set it from `stream_replicas` before the
        registry opens its bucket), so the champion is as safe as its announcements. An
        existing bucket with fewer is raised to it, never lowered."""
        wanted = replicas if replicas is not None else await _event_stream_replicas(js)
        try:
            kv = await js.key_value(bucket)
        except BucketNotFoundError:
            kv = await js.create_key_value(
                KeyValueConfig(
                    bucket=bucket,
                    description="binloop model registry: version records and champions",
                    history=history,
                    storage=StorageType.FILE,
                    replicas=wanted,
                )
            )
        else:
            info = await js.stream_info(f"KV_{bucket}")
            if (info.config.num_replicas or 1) < wanted:
                await js.update_stream(info.config.evolve(num_replicas=wanted))
        return cls(kv)

    async def version(self, model_name: str, version: int) -> VersionRecord | None:
        entry = await self.version_entry(model_name, version)
        return entry.record if entry is not None else None

    async def version_entry(self, model_name: str, version: int) -> VersionEntry | None:
        try:
            entry = await self.kv.get(version_key(model_name, version))
        except KeyNotFoundError:
            return None
        return VersionEntry(
            VersionRecord.model_validate_json(entry.value or b""), entry.revision or 0
        )

    async def versions(self, model_name: str) -> list[VersionRecord]:
        prefix = f"{key_token(model_name)}.versions."
        try:
            every_key = await self.kv.keys()
        except NoKeysError:
            return []
        # keys(filters=...) matches substrings, not subject wildcards: filter here instead.
        numbers = sorted(int(key[len(prefix) :]) for key in every_key if key.startswith(prefix))
        records = [await self.version(model_name, number) for number in numbers]
        return [record for record in records if record is not None]

    async def champion_models(self) -> list[str]:
        """Every model that has a champion, sorted."""
        try:
            every_key = await self.kv.keys()
        except NoKeysError:
            return []
        return sorted(
            key[: -len(CHAMPION_SUFFIX)] for key in every_key if key.endswith(CHAMPION_SUFFIX)
        )

    async def _epoch(self) -> datetime | None:
        return (await self.kv.status()).stream_info.created

    async def champion(self, model_name: str) -> ChampionState:
        # The epoch is read before and after the key: a bucket recreated in between would
        # otherwise pair one bucket's revision with the other's epoch. Then it is read again.
        epoch = await self._epoch()
        while True:
            try:
                entry: KeyValue.Entry | None = await self.kv.get(champion_key(model_name))
            except KeyNotFoundError:
                entry = None
            epoch_after = await self._epoch()
            if epoch_after == epoch:
                break
            epoch = epoch_after
        if entry is None:
            return ChampionState(None, 0, epoch)
        record = ChampionRecord.model_validate_json(entry.value or b"")
        return ChampionState(record, entry.revision or 0, epoch)

    async def add_version(self, record: VersionRecord) -> bool:
        """Writes a new version record; False when the version is already recorded."""
        try:
            await self.kv.create(
                version_key(record.model_name, record.version), record.model_dump_json().encode()
            )
        except KeyWrongLastSequenceError:
            return False
        return True

    async def replace_version(self, record: VersionRecord, expected_revision: int) -> None:
        """Rewrites a version record (a decision made again) only if it is still at
        `expected_revision`: two registries deciding it again cannot both win."""
        try:
            await self.kv.update(
                version_key(record.model_name, record.version),
                record.model_dump_json().encode(),
                last=expected_revision,
            )
        except KeyWrongLastSequenceError as exc:
            raise TransientError(
                f"{record.model_name} v{record.version} was decided again concurrently; retrying"
            ) from exc

    async def set_champion(self, record: ChampionRecord, expected_revision: int) -> int:
        """Replaces the champion only if it is still at `expected_revision` (0: none yet)."""
        key = champion_key(record.model_name)
        value = record.model_dump_json().encode()
        try:
            if expected_revision == 0:
                return await self.kv.create(key, value)
            return await self.kv.update(key, value, last=expected_revision)
        except KeyWrongLastSequenceError as exc:
            raise ChampionChangedError(
                f"the champion of {record.model_name} changed since revision {expected_revision}"
            ) from exc
