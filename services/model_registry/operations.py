"""Registry operations over the key-value store: record a finished training run, and roll the
champion back. The decisions themselves are in core.py."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from nats.js.client import JetStreamContext

from binloop.bus import Publisher
from binloop.errors import TransientError
from binloop.observability import metrics
from schemas.base import utc_now
from schemas.events import ModelPromoted, ModelRegistered, ModelRolledBack, TrainingCompleted
from schemas.routes import MODELS_ROLLED_BACK
from services.model_registry.core import (
    RegistryError,
    check_replay,
    pending_promotion,
    register,
    registration_events,
    rollback_target,
    rolled_back_champion,
    rolled_back_event,
)
from services.model_registry.settings import DEFAULT_KV_BUCKET
from services.model_registry.store import ChampionChangedError, RegistryStore


async def record_training(
    store: RegistryStore,
    event: TrainingCompleted,
    margin: float,
    producer: str,
    clock: Callable[[], datetime] = utc_now,
) -> list[ModelRegistered | ModelPromoted]:
    """Records the candidate, promotes it when it earns it, and returns the events to publish.

    A redelivered event finds its record and returns the same events (same ids) again, after
    finishing a promotion a crash may have interrupted.
    """
    model = event.model_name
    existing = await store.version(model, event.model_version)
    if existing is not None:
        check_replay(existing, event)
        state = await store.champion(model)
        unfinished = pending_promotion(existing, state.record)
        if unfinished is not None:
            await store.set_champion(unfinished, state.revision)
        return registration_events(existing, producer)

    state = await store.champion(model)
    champion_record = None
    if state.record is not None:
        champion_record = await store.version(model, state.record.version)
        if champion_record is None:
            raise RegistryError(f"champion {model} v{state.record.version} has no version record")
    record = register(event, state.record, champion_record, margin, clock())
    if not await store.add_version(record):
        raise TransientError(f"{model} v{record.version} was recorded concurrently; retrying")
    promotion = pending_promotion(record, state.record)
    if promotion is not None:
        try:
            await store.set_champion(promotion, state.revision)
        except ChampionChangedError:
            # Decided against a champion that is no longer current: decide again on retry.
            await store.remove_version(model, record.version)
            raise
        metrics.MODEL_ACCURACY.labels(model, "champion").set(record.metrics.accuracy)
    metrics.MODEL_PROMOTIONS.labels(model, record.decision).inc()
    return registration_events(record, producer)


async def rollback(
    js: JetStreamContext,
    publisher: Publisher,
    model_name: str,
    to_version: int | None = None,
    reason: str = "manual rollback",
    *,
    bucket: str = DEFAULT_KV_BUCKET,
) -> ModelRolledBack:
    """Makes the previous champion (or `to_version`) the champion again and publishes
    models.rolled_back with its artifact and card. Raises RegistryError when there is nothing
    to roll back to."""
    store = await RegistryStore.open(js, bucket)
    state = await store.champion(model_name)
    target_version = rollback_target(state.record, to_version)
    target = await store.version(model_name, target_version)
    if state.record is None or target is None:
        raise RegistryError(f"{model_name} v{target_version} is not a recorded version")
    event = rolled_back_event(state.record, target, reason, publisher.service, state.revision)
    await store.set_champion(
        rolled_back_champion(state.record, target, reason, event.occurred_at), state.revision
    )
    await publisher.publish(MODELS_ROLLED_BACK, event)
    metrics.MODEL_PROMOTIONS.labels(model_name, "rolled_back").inc()
    metrics.MODEL_ACCURACY.labels(model_name, "champion").set(target.metrics.accuracy)
    return event
